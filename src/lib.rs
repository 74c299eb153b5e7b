//! # agentd
//!
//! The worker daemon of an AI-agent platform whose data lives in PostgreSQL (often
//! Supabase). The platform's web application writes users, agents, schedules, teams and
//! conversations; agentd *runs* the agents: it fires schedules on time, executes agent and
//! team runs, streams their logs and artifacts into the database while they execute,
//! records the outcome, and answers chat messages with streamed replies. Several replicas
//! share one database; there is no leader on the hot path.
//!
//! ## The modules, in the order data flows through them
//!
//! A run's way: the application's rows are read by the [`store`], claimed by the
//! [`scheduler`], executed by the [`runner`] with an [`executor`], and written back by the
//! store. A module reaches only downward in this list's sense: the foundations at the
//! bottom know nothing of the floors above, and nothing below the runner knows about SQL.
//! Inside a module, its files use from `mod.rs` only what the module offers everyone (the
//! `Executor` trait, `StoreError`, `ScheduleError`, the `Runner`), never each other in a
//! circle.
//!
//! Entry:
//! - `main.rs` (the binary) and [`cli`]: the command line, the top floor (it imports the
//!   option types of the modules below, none of them imports it); [`startup`]: one function per
//!   command; [`bench`](mod@bench): `agentd bench`; [`chat`]: `agentd chat`.
//! - [`telemetry`]: agentd's own log lines; [`measure`]: its metrics; [`endpoints`] with
//!   [`readiness`] and [`health`]: `/healthz`, `/readyz`, `/metrics`; [`status`]:
//!   `agentd status`.
//!
//! The worker:
//! - [`worker`]: one replica's services, started together, stopped in order; [`shutdown`]:
//!   the signals.
//! - [`scheduler`]: the claim loops (schedules, requests, conversation turns), their pure
//!   planning, LISTEN.
//! - [`schedule`]: the pure time engine (when a schedule fires).
//! - [`runner`]: one run's life: slots, lease, log pipe, artifacts, a turn's reply, outcome.
//! - [`executor`]: builtin, command (in a [`process`]-level sandbox), openai, webhook, and
//!   team (members run by the others).
//! - [`artifact_store`]: where artifacts are kept (folder or bucket).
//! - [`maintenance`]: the reaper of dead replicas' runs, retention.
//!
//! Data and foundations:
//! - [`store`]: every SQL statement and the connection pool; `migrations/` is the schema.
//! - [`embedded_pg`]: the private PostgreSQL used when no database URL is configured.
//! - [`database`]: the database a command works on (configured URL or embedded server).
//! - [`domain`]: what a run is and executes (kinds, statuses, agents, teams, targets, turns);
//!   [`conversation`]: the pure rules of a turn (the history's cut, the reply's text).
//! - [`config`]: typed settings, layered (defaults, file, environment), validated once.
//! - [`retry`]: the one retry policy and source of randomness; [`text`]: quoting values.

pub mod artifact_store;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod conversation;
pub mod database;
pub mod domain;
pub mod embedded_pg;
pub mod endpoints;
pub mod executor;
pub mod health;
pub mod maintenance;
pub mod measure;
pub mod process;
pub mod readiness;
pub mod retry;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod shutdown;
pub mod startup;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod worker;
