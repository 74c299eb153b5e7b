//! The database a command works on: the configured server, or the embedded one when no URL
//! is configured. Its own module so that every command (`startup`'s and `agentd bench`)
//! opens, addresses and closes the database one way, without importing each other.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, redact_url};
use crate::embedded_pg::{EmbeddedOptions, EmbeddedPostgres};
use crate::store;

/// How long `agentd migrate` keeps retrying an unreachable database before failing, so a
/// one-shot migrate step started alongside the database waits for it but does not hang.
pub const MIGRATE_CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// A connected database, with the embedded server behind it when there is one.
pub struct Database {
    /// The connection pool.
    pub pool: PgPool,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// The database is the embedded server of this process (no other process reaches it).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Connects to `database.url`, or starts the embedded server when it is empty. Retries
    /// with backoff until connected, `give_up_after` passes, or `shutdown` fires.
    pub async fn open(
        settings: &Settings,
        give_up_after: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Database> {
        let (options, embedded) = match &settings.database.url {
            Some(url) => {
                tracing::info!(database = %redact_url(url), "connecting to the database");
                (store::parse_url(url)?, None)
            }
            None => {
                let embedded = EmbeddedPostgres::start(&EmbeddedOptions {
                    data_dir: settings.embedded.data_dir.clone(),
                    bin_dir: settings.embedded.bin_dir.clone(),
                    start_timeout: settings.embedded.start_timeout,
                    unsafe_no_fsync: false,
                    keep_running: false,
                })
                .await?;
                (embedded.connect_options(), Some(embedded))
            }
        };
        let pool = store::connect(options, &settings.database, give_up_after, shutdown).await;
        match pool {
            Ok(pool) => Ok(Database { pool, embedded }),
            Err(error) => {
                if let Some(embedded) = embedded {
                    embedded.stop().await;
                }
                Err(error.into())
            }
        }
    }

    /// The URL of database `name` on the same server (for child processes).
    pub fn url_of(&self, settings: &Settings, name: &str) -> String {
        match (&self.embedded, &settings.database.url) {
            (Some(embedded), _) => embedded.url(name),
            (None, Some(url)) => store::url_with_database(url, name),
            (None, None) => String::new(),
        }
    }

    /// Connection options for database `name` on the same server, as the application
    /// connects (its changes notify the workers).
    pub fn options_of(&self, settings: &Settings, name: &str) -> anyhow::Result<PgConnectOptions> {
        Ok(match &self.embedded {
            Some(embedded) => embedded.connect_options().database(name),
            None => store::parse_url(&self.url_of(settings, name))?,
        })
    }

    /// Closes the pool, then stops the embedded server if this process started it.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(embedded) = self.embedded {
            embedded.stop().await;
        }
    }
}
