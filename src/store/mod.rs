//! Every SQL statement agentd runs, and the connection to PostgreSQL.
//!
//! Nothing outside this module writes SQL: callers use one function per statement, named for
//! what it does, so queries can be read, reviewed and batched in one place. (The schema
//! itself lives in `migrations/`, compiled into the binary.)

use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseSettings;
use crate::retry::Retry;

pub mod agents;
pub mod bench;
pub mod conversations;
pub mod demo;
pub mod exec;
pub mod failover;
pub mod maintenance;
pub mod runs;
pub mod schedules;
pub mod socket;
pub mod status;
pub mod workers;

/// Where agentd records which migrations ran: in its own schema, so that Supabase's API
/// (which exposes `public`) never shows it.
const MIGRATIONS_TABLE: &str = "agentd._sqlx_migrations";

/// Errors of the store layer. Messages never contain connection passwords.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL cannot be parsed.
    #[error("database.url: not a valid PostgreSQL URL: {0}")]
    BadUrl(String),
    /// A query or connection failed.
    #[error("database: {}", describe(.0))]
    Sql(sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {}", describe_migration(.0))]
    Migrate(sqlx::migrate::MigrateError),
    /// Connecting kept failing until the caller's deadline.
    #[error("database: could not connect within {waited:?}: {last_error}")]
    GaveUp {
        waited: Duration,
        last_error: String,
    },
    /// The server's TLS certificate was refused (wrong CA, or a host name it does not
    /// name), or the server offers no TLS where the URL requires it: retrying cannot help.
    #[error(
        "database: TLS: {0} (check sslmode and sslrootcert in database.url; docs/operations.md, \"TLS\")"
    )]
    Tls(String),
    /// Shutdown was requested while connecting.
    #[error("shutdown requested while connecting to the database")]
    ShutDown,
    /// Migrations were asked for through a transaction-mode pooler.
    #[error(
        "database.pooler is \"transaction\": migrations hold a session-level advisory lock, which a transaction-mode pooler cannot keep; run `agentd migrate` with a direct or session-mode URL (DATABASE_URL=postgres://…direct… agentd migrate), and leave database.migrate off"
    )]
    NeedsSession,
    /// A row holds something the schema's checks should have prevented.
    #[error("database: unexpected data: {0}")]
    Corrupt(String),
}

/// Every failed statement of the store passes here: an error that says the server is
/// read-only, in recovery or gone has the pool's connections rebuilt ([`failover`]).
impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        failover::observe(&error);
        StoreError::Sql(error)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> StoreError {
        StoreError::Migrate(error)
    }
}

/// What an operator reads of a failed statement or connection: the server's message with
/// its SQLSTATE (sqlx's own text adds "at line N", the line of the server's C source that
/// raised it, which reads as a line of ours), and without the driver's source location.
pub fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database) => match database.code() {
            Some(code) => format!("{} (SQLSTATE {code})", database.message()),
            None => database.message().to_string(),
        },
        sqlx::Error::Protocol(text) if text.starts_with("unexpected response from SSLRequest") => {
            "the server did not answer as PostgreSQL does (check database.url's host and port)"
                .to_string()
        }
        other => {
            let text = other.to_string();
            // "… (sqlx_postgres::connection::tls:95)": where in the driver, not what.
            match text.rfind(" (sqlx_") {
                Some(at) if text.ends_with(')') => text[..at].to_string(),
                _ => text,
            }
        }
    }
}

/// [`describe`] for a failed migration: which one, and why, once.
fn describe_migration(error: &sqlx::migrate::MigrateError) -> String {
    use sqlx::migrate::MigrateError;
    match error {
        MigrateError::Execute(error) => describe(error),
        MigrateError::ExecuteMigration(error, version) => {
            format!("migration {version}: {}", describe(error))
        }
        other => other.to_string(),
    }
}

impl StoreError {
    /// The SQLSTATE the database answered with, if it answered with an error (safe to log:
    /// unlike the message, it never quotes a value).
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Sql(sqlx::Error::Database(error)) => {
                error.code().map(|code| code.into_owned())
            }
            _ => None,
        }
    }

    /// Whether the database refused the statement for its data (SQLSTATE classes 22, data
    /// exception, and 23, integrity constraint violation): sending it again cannot succeed.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Sql(sqlx::Error::Database(error)) => error
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            StoreError::Sql(_)
            | StoreError::BadUrl(_)
            | StoreError::Migrate(_)
            | StoreError::GaveUp { .. }
            | StoreError::Tls(_)
            | StoreError::ShutDown
            | StoreError::NeedsSession
            | StoreError::Corrupt(_) => false,
        }
    }
}

/// agentd's migrations, embedded in the binary, with their bookkeeping table in schema
/// `agentd`. Migrations applied by a newer agentd are ignored, not an error, so rolling the
/// binary back (its `migrate` included) works on the newer schema.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator.create_schema("agentd");
    migrator.set_ignore_missing(true);
    migrator
}

/// Parses a connection URL; the error names what is wrong without repeating the URL (it may
/// carry a password).
pub fn parse_url(url: &str) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url).map_err(|error| {
        let reason = match error {
            sqlx::Error::Configuration(inner) => inner.to_string(),
            other => other.to_string(),
        };
        StoreError::BadUrl(reason)
    })
}

/// `postgres://u@h:5432/old?x=y` with the database replaced: `postgres://u@h:5432/{name}?x=y`.
pub fn url_with_database(url: &str, name: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_path(&format!("/{name}"));
            parsed.to_string()
        }
        // Not reached: every URL here was parsed as a PostgreSQL URL before (sqlx parses
        // with the same crate); the unchanged URL then fails as it did.
        Err(error) => {
            tracing::error!(error = %error, "a database URL could not be taken apart");
            url.to_string()
        }
    }
}

/// A pool's options for connections made with `options`: each new TCP connection gets
/// TCP_NODELAY (see [`socket`]: without it, large statements wait for the server's delayed
/// acknowledgement), and connections opened before a failover was seen are closed, not
/// used ([`failover`]). A connection closed because it was dead or stale is counted as
/// lost, and the next one opened as a reconnect ([`failover::connection_opened`]).
pub fn pool_options(options: &PgConnectOptions) -> PgPoolOptions {
    let port = tcp_port(options);
    PgPoolOptions::new()
        // The ping sqlx sends before lending an idle connection, sent by the hook instead,
        // so that a connection the server dropped is seen (and counted) as lost.
        .test_before_acquire(false)
        .before_acquire(|connection, metadata| {
            Box::pin(async move {
                if !failover::is_current(metadata.age) {
                    failover::connection_lost();
                    return Ok(false);
                }
                // An error has the pool drop the connection without a goodbye (which a dead
                // connection would hold up), as its own ping does.
                connection
                    .ping()
                    .await
                    .inspect_err(|_| failover::connection_lost())?;
                Ok(true)
            })
        })
        .after_release(|_connection, metadata| {
            Box::pin(async move {
                let current = failover::is_current(metadata.age);
                if !current {
                    failover::connection_lost();
                }
                Ok(current)
            })
        })
        .after_connect(move |_connection, _metadata| {
            Box::pin(async move {
                if let Some(port) = port {
                    socket::disable_nagle_towards(port);
                }
                failover::connection_opened();
                Ok(())
            })
        })
}

/// The server's port when `options` connect over TCP (`None`: a Unix socket).
fn tcp_port(options: &PgConnectOptions) -> Option<u16> {
    options.get_socket().is_none().then(|| options.get_port())
}

/// One connection outside any pool, for a task that must never wait for the worker's
/// pool nor take from it (the readiness check); with the TCP options a pool's connections
/// get. A single attempt: the caller decides when to try again.
pub async fn connect_one(options: &PgConnectOptions) -> Result<PgConnection, StoreError> {
    let connection = PgConnection::connect_with(options).await?;
    if let Some(port) = tcp_port(options) {
        socket::disable_nagle_towards(port);
    }
    Ok(connection)
}

/// Opens a pool, retrying failed attempts with exponential backoff and jitter (capped at
/// `database.max_backoff`) until it succeeds, `give_up_after` passes, or `shutdown` fires.
/// Each failure is logged once, without the password.
pub async fn connect(
    options: PgConnectOptions,
    settings: &DatabaseSettings,
    give_up_after: Option<Duration>,
    shutdown: &CancellationToken,
) -> Result<PgPool, StoreError> {
    let options = options.application_name("agentd");
    let through_pooler = settings
        .pooler
        .is_transaction(options.get_host(), options.get_port());
    exec::set_transaction_pooler(through_pooler);
    if through_pooler {
        tracing::info!(
            "database.pooler: a transaction-mode pooler; every statement is sent unnamed, in a transaction of its own when alone"
        );
    }
    let started = tokio::time::Instant::now();
    let mut retry = Retry::up_to(settings.max_backoff);
    loop {
        let result = pool_options(&options)
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.connect_timeout)
            .connect_with(options.clone())
            .await;
        let error = match result {
            Ok(pool) => {
                if retry.failures() > 0 {
                    tracing::info!(attempts = retry.failures() + 1, "connected to the database");
                }
                return Ok(pool);
            }
            Err(error) => error,
        };
        // The pool hides why a connection could not be opened (refused, unreachable) behind
        // its own timeout: one connection of our own says it.
        let cause = match error {
            sqlx::Error::PoolTimedOut => {
                let probe = PgConnection::connect_with(&options);
                match tokio::time::timeout(settings.connect_timeout, probe).await {
                    Ok(Err(cause)) => cause,
                    Ok(Ok(connection)) => {
                        // Reachable by now: the next attempt will tell.
                        let _ = connection.close().await;
                        error
                    }
                    Err(_) => error,
                }
            }
            other => other,
        };
        let error = cause;
        if let Some(reason) = tls_refusal(&error) {
            return Err(StoreError::Tls(reason));
        }
        let delay = retry.failed();
        if let Some(limit) = give_up_after
            && started.elapsed() + delay > limit
        {
            return Err(StoreError::GaveUp {
                waited: started.elapsed(),
                last_error: describe(&error),
            });
        }
        tracing::warn!(
            attempt = retry.failures(),
            retry_in_ms = delay.as_millis() as u64,
            error = %describe(&error),
            "cannot connect to the database; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Err(StoreError::ShutDown),
        }
    }
}

/// Why TLS failed, when `error` is a refusal that connecting again cannot change: the
/// server's certificate did not verify, or the server offers no TLS.
fn tls_refusal(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Tls(reason) => Some(reason.to_string()),
        // rustls reports a refused certificate as an I/O error carrying its own error.
        sqlx::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(rustls::Error::to_string),
        _ => None,
    }
}

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run, oldest first.
    pub applied: Vec<i64>,
    /// The newest version now in the database.
    pub current: Option<i64>,
}

/// Applies the pending migrations. Safe with several replicas starting at once: sqlx takes
/// an advisory lock for the duration.
pub async fn migrate(pool: &PgPool) -> Result<MigrationReport, StoreError> {
    if exec::transaction_pooler() {
        return Err(StoreError::NeedsSession);
    }
    let migrator = migrator();
    let before = applied_versions(pool).await?;
    migrator.run(pool).await?;
    let after = applied_versions(pool).await?;
    let applied = after
        .iter()
        .copied()
        .filter(|version| !before.contains(version))
        .collect();
    Ok(MigrationReport {
        applied,
        current: after.last().copied(),
    })
}

/// The versions recorded as applied (empty before the first migration).
pub async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    applied_versions_on(&mut *pool.acquire().await?).await
}

/// [`applied_versions`], on a connection of the caller's.
async fn applied_versions_on(connection: &mut PgConnection) -> Result<Vec<i64>, StoreError> {
    // Both statements in one transaction: through a transaction-mode pooler, a statement
    // outside one may be split across two servers (see exec).
    let mut transaction = connection.begin().await?;
    let exists: bool = exec::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(MIGRATIONS_TABLE)
        .fetch_one(&mut *transaction)
        .await?;
    let versions = if exists {
        exec::query_scalar(
            "SELECT version FROM agentd._sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&mut *transaction)
        .await?
    } else {
        Vec::new()
    };
    transaction.commit().await?;
    Ok(versions)
}

/// The migrations this binary knows that the database has not applied (empty: current).
/// Migrations the database has and this binary does not know (a newer agentd ran them) do
/// not count: replicas of the previous version keep working during a rolling upgrade.
pub async fn pending_migrations(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    pending_migrations_on(&mut *pool.acquire().await?).await
}

/// [`pending_migrations`], on a connection of the caller's (the readiness check's own).
pub async fn pending_migrations_on(connection: &mut PgConnection) -> Result<Vec<i64>, StoreError> {
    let applied = applied_versions_on(connection).await?;
    Ok(migrator()
        .iter()
        .map(|migration| migration.version)
        .filter(|version| !applied.contains(version))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_another_database() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5432/app?sslmode=require", "b"),
            "postgres://u:p@h:5432/b?sslmode=require"
        );
        assert_eq!(url_with_database("postgres://h", "b"), "postgres://h/b");
        assert_eq!(
            url_with_database("postgresql://h/x", "b"),
            "postgresql://h/b"
        );
        assert_eq!(
            url_with_database("postgres:///app?host=/tmp", "b"),
            "postgres:///b?host=/tmp"
        );
    }

    #[test]
    fn bad_url_error_hides_the_url() {
        let error = parse_url("postgres://user:secret@host:notaport/db").unwrap_err();
        assert!(!error.to_string().contains("secret"), "{error}");
    }
}
