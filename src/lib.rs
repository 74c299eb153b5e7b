//! # agentd
//!
//! The worker daemon of an AI-agent platform whose data lives in PostgreSQL (often
//! Supabase). The platform's web application writes users, agents, schedules and teams;
//! agentd *runs* the agents: it fires schedules on time, executes agent and team runs,
//! streams their logs and artifacts into the database while they execute, and records the
//! outcome. Several replicas share one database; there is no leader on the hot path.
//!
//! ## Architecture
//!
//! Data flows one way: `store` → scheduler → runner → executor → runner → `store`. A module
//! reaches only downward; nothing below the runner knows about SQL.
//!
//! - [`config`]: typed settings, layered (defaults, file, environment) and validated once.
//! - [`telemetry`]: one log line per event, JSON or text, with `worker_id` on every line.
//! - [`store`]: every SQL statement and the connection pool; `migrations/` is the schema.
//! - [`embedded_pg`]: the private PostgreSQL used when no database URL is configured.
//! - [`database`]: the database a command works on (configured URL or embedded server).
//! - [`startup`]: builds the application from settings; one function per command.
//! - [`bench`]: `agentd bench`, one file per scenario.
//! - [`shutdown`]: the cancellation token that SIGTERM/SIGINT fire.
//! - [`cli`]: the command line, the top floor: it imports the option types of the modules
//!   below, and none of them imports it.

pub mod bench;
pub mod cli;
pub mod config;
pub mod database;
pub mod embedded_pg;
pub mod endpoints;
pub mod executor;
pub mod health;
pub mod maintenance;
pub mod measure;
pub mod process;
pub mod readiness;
pub mod runner;
pub mod schedule;
pub mod scheduler;
pub mod shutdown;
pub mod startup;
pub mod status;
pub mod store;
pub mod team;
pub mod telemetry;
pub mod worker;
