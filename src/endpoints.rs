//! The operations endpoints on `http.listen`: `GET /healthz` (liveness), `GET /readyz`
//! (readiness) and `GET /metrics` (Prometheus text format).
//!
//! The server starts before the database is reached, so an orchestrator sees a live but
//! not-ready process while agentd connects, and it stops after the worker has finished, so
//! liveness holds through the shutdown grace period while readiness already says no.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// Longest the readiness check waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(3);
/// How often histogram buckets are folded and idle metrics expired.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What the handlers read.
#[derive(Clone)]
pub struct Endpoints {
    health: Health,
    pool: Arc<OnceLock<PgPool>>,
    metrics: Option<PrometheusHandle>,
}

impl Endpoints {
    /// Endpoints reporting `health`, and metrics from `metrics` when a recorder is installed.
    pub fn new(health: Health, metrics: Option<PrometheusHandle>) -> Endpoints {
        Endpoints {
            health,
            pool: Arc::new(OnceLock::new()),
            metrics,
        }
    }

    /// The database is connected: readiness can check it from now on.
    pub fn set_pool(&self, pool: PgPool) {
        let _ = self.pool.set(pool);
    }

    /// The routes, for serving or for tests.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Binds `addr` (failing at once if it cannot) and serves until `stop` fires.
    pub async fn bind(
        &self,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| anyhow::anyhow!("http.listen: cannot listen on {addr}: {error}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "operations endpoints listening (/healthz, /readyz, /metrics)");
        let router = self.router();
        let upkeep = self.metrics.clone();
        Ok(tokio::spawn(async move {
            let upkeep_stop = stop.clone();
            if let Some(handle) = upkeep {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(UPKEEP_INTERVAL) => handle.run_upkeep(),
                            _ = upkeep_stop.cancelled() => return,
                        }
                    }
                });
            }
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(error = %error, "operations endpoints stopped");
            }
        }))
    }
}

async fn healthz(State(endpoints): State<Endpoints>) -> Response {
    match endpoints.health.liveness() {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "alive"}))).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "dead", "reason": reason})),
        )
            .into_response(),
    }
}

async fn readyz(State(endpoints): State<Endpoints>) -> Response {
    match readiness(&endpoints).await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response(),
    }
}

/// Ready: not shutting down, the worker serving, the database answering within
/// [`READY_TIMEOUT`], and every migration of this binary applied.
async fn readiness(endpoints: &Endpoints) -> Result<(), String> {
    if endpoints.health.stopping() {
        return Err("shutting down".into());
    }
    endpoints.health.liveness()?;
    let Some(pool) = endpoints.pool.get() else {
        return Err("connecting to the database".into());
    };
    let pending = tokio::time::timeout(READY_TIMEOUT, crate::store::pending_migrations(pool))
        .await
        .map_err(|_| format!("database did not answer within {READY_TIMEOUT:?}"))?
        .map_err(|error| format!("database unreachable: {error}"))?;
    if !pending.is_empty() {
        let versions: Vec<String> = pending.iter().map(i64::to_string).collect();
        return Err(format!(
            "migrations pending: {} (run `agentd migrate`)",
            versions.join(", ")
        ));
    }
    // Shutdown may have begun (and the worker stopped serving) while the database was
    // asked: that is "shutting down", not "not started yet".
    if endpoints.health.stopping() {
        return Err("shutting down".into());
    }
    if !endpoints.health.serving() {
        return Err("worker not started yet".into());
    }
    Ok(())
}

async fn metrics(State(endpoints): State<Endpoints>) -> Response {
    match &endpoints.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are recorded by another agentd instance in this process\n",
        )
            .into_response(),
    }
}

/// Longest `agentd healthcheck` waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `agentd healthcheck`: GET `url` with a short timeout; true on HTTP 200. For container
/// health checks in images that have no curl.
pub async fn probe(url: &str) -> anyhow::Result<()> {
    use crate::executor::http;
    let client = http::client(crate::config::HttpClientSettings {
        connect_timeout: PROBE_TIMEOUT,
        read_timeout: PROBE_TIMEOUT,
    })
    .map_err(anyhow::Error::msg)?;
    let response = client
        .get(url)
        .timeout(PROBE_TIMEOUT)
        .send()
        .await
        .map_err(|error| anyhow::anyhow!("{url}: {error}"))?;
    let status = response.status();
    if status == reqwest::StatusCode::OK {
        Ok(())
    } else {
        anyhow::bail!(
            "{url}: HTTP {status}: {}",
            http::error_excerpt(response).await.trim()
        )
    }
}
