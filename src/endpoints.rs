//! The operations endpoints on `http.listen`: `GET /healthz` (liveness), `GET /readyz`
//! (readiness) and `GET /metrics` (Prometheus text format).
//!
//! The server starts before the database is reached, so an orchestrator sees a live but
//! not-ready process while agentd connects, and it stops after the worker has finished, so
//! liveness holds through the shutdown grace period while readiness already says no.
//!
//! No request reaches the database: `/readyz` reads the last answer of the readiness check
//! ([`crate::readiness`]), which runs on a connection of its own, so a flood of requests
//! costs the worker's pool nothing. With `http.token_env` set, `/readyz` and `/metrics`
//! require the bearer token; `/healthz` stays open for probes that cannot send one.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BearerToken, DatabaseSettings};
use crate::health::Health;
use crate::readiness::DatabaseReadiness;

/// How often histogram buckets are folded and idle metrics expired.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What the handlers read.
#[derive(Clone)]
pub struct Endpoints {
    health: Health,
    database: DatabaseReadiness,
    metrics: Option<PrometheusHandle>,
    token: Option<BearerToken>,
    /// The readiness check, which the server waits for when it stops.
    tasks: TaskTracker,
}

impl Endpoints {
    /// Endpoints reporting `health`, and metrics from `metrics` when a recorder is installed;
    /// with a `token`, `/readyz` and `/metrics` answer only requests bearing it.
    pub fn new(
        health: Health,
        metrics: Option<PrometheusHandle>,
        token: Option<BearerToken>,
    ) -> Endpoints {
        Endpoints {
            health,
            database: DatabaseReadiness::new(),
            metrics,
            token,
            tasks: TaskTracker::new(),
        }
    }

    /// The database is reachable: from now on readiness follows a background check on a
    /// connection of its own, made with the worker's connection `options`, until `stop`
    /// fires. Requests never reach the database themselves. The check is supervised like
    /// the worker's loops: when it keeps failing, `fatal` stops the process.
    pub fn check_database(
        &self,
        options: PgConnectOptions,
        settings: &DatabaseSettings,
        stop: CancellationToken,
        fatal: CancellationToken,
    ) {
        let check = self
            .database
            .check(options, settings.connect_timeout, settings.max_backoff);
        let stopping = stop.clone();
        self.tasks.spawn(self.health.supervise(
            "readiness check",
            move || stopping.is_cancelled(),
            fatal,
            move || check.clone().run(stop.clone()),
        ));
    }

    /// The routes, for serving or for tests.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Binds `addr` (failing at once if it cannot) and serves until `stop` fires; the
    /// returned task ends once the readiness check has stopped too.
    pub async fn bind(
        &self,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| anyhow::anyhow!("http.listen: cannot listen on {addr}: {error}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(
            addr = %bound,
            token_required = self.token.is_some(),
            "operations endpoints listening (/healthz, /readyz, /metrics)"
        );
        let router = self.router();
        let upkeep = self.metrics.clone();
        let tasks = self.tasks.clone();
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
            tasks.close();
            tasks.wait().await;
        }))
    }

    /// Whether the request may read `/readyz` and `/metrics`: always without a token,
    /// otherwise only with `Authorization: Bearer <token>`.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(value) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        else {
            return false;
        };
        let Some((scheme, credentials)) = value.trim().split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("bearer") && token.matches(credentials.trim())
    }
}

/// 401 for a missing or wrong token, the same whichever it was.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({"status": "unauthorized"})),
    )
        .into_response()
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

async fn readyz(State(endpoints): State<Endpoints>, headers: HeaderMap) -> Response {
    if !endpoints.authorized(&headers) {
        return unauthorized();
    }
    match readiness(&endpoints).await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": reason})),
        )
            .into_response(),
    }
}

/// Ready: not shutting down, alive, the database check's answer ready, and the worker
/// serving. Answered from memory (or from one shared fresh check, see `readiness`).
async fn readiness(endpoints: &Endpoints) -> Result<(), String> {
    // Read first: shutdown marks the process stopping before the worker stops serving, so
    // a worker found not serving because it stopped is found stopping below.
    let serving = endpoints.health.serving();
    if endpoints.health.stopping() {
        return Err("shutting down".into());
    }
    endpoints.health.liveness()?;
    endpoints.database.verdict().await?;
    if !serving {
        return Err("worker not started yet".into());
    }
    Ok(())
}

async fn metrics(State(endpoints): State<Endpoints>, headers: HeaderMap) -> Response {
    if !endpoints.authorized(&headers) {
        return unauthorized();
    }
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

/// `agentd healthcheck`: GET `url` with a short timeout, bearing `token` when there is
/// one; true on HTTP 200. For container health checks in images that have no curl.
pub async fn probe(url: &str, token: Option<&BearerToken>) -> anyhow::Result<()> {
    use crate::executor::http;
    let client = http::client(crate::config::HttpClientSettings {
        connect_timeout: PROBE_TIMEOUT,
        read_timeout: PROBE_TIMEOUT,
    })
    .map_err(anyhow::Error::msg)?;
    let mut request = client.get(url).timeout(PROBE_TIMEOUT);
    if let Some(token) = token {
        request = request.bearer_auth(token.expose());
    }
    let response = request
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
