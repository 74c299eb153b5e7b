//! How the store's statements reach the server: as they are on a direct connection (or
//! through a session-mode pooler), or, through a transaction-mode pooler (PgBouncer's
//! `pool_mode = transaction`, Supavisor's port 6543, Neon's `-pooler` endpoints), in the
//! only form such a pooler keeps correct.
//!
//! A transaction-mode pooler lends a server connection for one transaction and takes it
//! back at the first `ReadyForQuery` that reports no transaction open. sqlx sends a
//! statement in two rounds (Parse and Describe, then Bind and Execute, each ending in a
//! Sync), so outside a transaction the second round may reach another server, where the
//! statement does not exist, or where another client's unnamed statement does (and would
//! run instead). Named statements (sqlx's cache: `sqlx_s_1`, …) outlive the transaction on a
//! server other clients then borrow ("prepared statement \"sqlx_s_1\" already exists").
//! So in that mode every statement is unnamed (`persistent(false)`: re-planned each time),
//! and a statement sent to the pool runs in a transaction of its own (BEGIN, statement,
//! COMMIT: three round trips instead of one). Statements sent inside the store's own
//! transactions only need the first.
//!
//! Every statement of the store is built with [`query`], [`query_as`] or
//! [`query_scalar`], and every one sent to the pool goes through [`on`]; the mode is the
//! process's, set once when it connects ([`set_transaction_pooler`]).

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgPool, PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{Either, Execute, Executor, FromRow, Postgres, SqlSafeStr, SqlStr};

/// Whether this process reaches its database through a transaction-mode pooler.
static TRANSACTION_POOLER: AtomicBool = AtomicBool::new(false);

/// Sets the process's mode (at connect time, from `database.pooler`).
pub fn set_transaction_pooler(on: bool) {
    TRANSACTION_POOLER.store(on, Ordering::Relaxed);
}

/// Whether statements go through a transaction-mode pooler.
pub fn transaction_pooler() -> bool {
    TRANSACTION_POOLER.load(Ordering::Relaxed)
}

/// A statement; prepared and cached per connection unless through a transaction pooler.
pub fn query<'q>(sql: impl SqlSafeStr) -> Query<'q, Postgres, PgArguments> {
    sqlx::query(sql).persistent(!transaction_pooler())
}

/// [`query`], its rows read as `O`.
pub fn query_as<'q, O>(sql: impl SqlSafeStr) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(!transaction_pooler())
}

/// [`query`], the first column of its rows read as `O`.
pub fn query_scalar<'q, O>(sql: impl SqlSafeStr) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(!transaction_pooler())
}

/// The pool as an executor that, through a transaction-mode pooler, runs each statement in
/// a transaction of its own; otherwise it is the pool itself.
pub fn on(pool: &PgPool) -> On<'_> {
    On(pool)
}

/// See [`on`].
#[derive(Debug, Clone, Copy)]
pub struct On<'p>(&'p PgPool);

/// A statement sent unnamed whatever it was built as.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(self) -> SqlStr {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

impl<'p> Executor<'p> for On<'p> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !transaction_pooler() {
            return self.0.fetch_many(query);
        }
        let pool = self.0;
        // The results are read whole before the commit: a statement of the store returns a
        // bounded batch, and a stream cannot hold the transaction it borrows from.
        futures_util::stream::once(async move {
            let mut transaction = pool.begin().await?;
            let results: Vec<_> = (&mut *transaction)
                .fetch_many(Unnamed(query))
                .try_collect()
                .await?;
            transaction.commit().await?;
            Ok::<_, sqlx::Error>(futures_util::stream::iter(results.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !transaction_pooler() {
            return self.0.fetch_optional(query);
        }
        let pool = self.0;
        Box::pin(async move {
            let mut transaction = pool.begin().await?;
            let row = (&mut *transaction).fetch_optional(Unnamed(query)).await?;
            transaction.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        self.0.prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'p: 'e,
    {
        self.0.describe(sql)
    }
}

#[cfg(test)]
mod tests {
    /// Every statement of the store is built here, and none is sent to a pool but through
    /// [`super::on`]: one that bypassed them would be named, or split across servers,
    /// through a transaction-mode pooler. (`sqlx::raw_sql`, the demo's seed, is the simple
    /// protocol: one message, one round trip, nothing named.)
    #[test]
    fn every_statement_of_the_store_goes_through_this_module() {
        let sources = [
            ("agents.rs", include_str!("agents.rs")),
            ("bench.rs", include_str!("bench.rs")),
            ("conversations.rs", include_str!("conversations.rs")),
            ("demo.rs", include_str!("demo.rs")),
            ("maintenance.rs", include_str!("maintenance.rs")),
            ("mod.rs", include_str!("mod.rs")),
            ("runs.rs", include_str!("runs.rs")),
            ("schedules.rs", include_str!("schedules.rs")),
            ("status.rs", include_str!("status.rs")),
            ("workers.rs", include_str!("workers.rs")),
        ];
        for (file, source) in sources {
            for bypass in [
                "sqlx::query(",
                "sqlx::query_as(",
                "sqlx::query_scalar(",
                "sqlx::query_as::<",
                "sqlx::query_scalar::<",
                ".fetch_one(pool)",
                ".fetch_all(pool)",
                ".fetch_optional(pool)",
                ".fetch(pool)",
                ".execute(pool)",
            ] {
                let found = source
                    .lines()
                    .filter(|line| line.contains(bypass) && !line.trim_start().starts_with("//"))
                    .collect::<Vec<_>>();
                assert!(found.is_empty(), "{file}: {bypass} {found:?}");
            }
        }
    }
}
