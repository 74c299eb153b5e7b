//! The command line: `agentd run`, `agentd migrate`, the operators' commands, and the global
//! options. The top floor: it imports the option types of the modules below (`bench`,
//! `status`, `schedule::preview`) and nothing below imports it; `main` turns its values
//! into the plain parameters of `startup`'s commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bench::BenchOptions;
use crate::domain::RunKind;
use crate::schedule::preview::PreviewArgs;
use crate::status::StatusFormat;

/// agentd runs the agents of an AI-agent platform: it fires schedules on time, executes
/// agent and team runs, and streams their logs and artifacts into PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "agentd", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file overriding the built-in defaults (see config/default.toml).
    #[arg(long, global = true, env = "AGENTD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// agentd's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker daemon until SIGTERM or SIGINT (a second signal kills the runs'
    /// programs and exits at once).
    Run(RunArgs),
    /// Apply pending database migrations and exit (retries an unreachable database for 60 s).
    Migrate,
    /// Ask for an agent or team run now; prints the run's id.
    Trigger(TriggerArgs),
    /// Cancel a running (or requested) run.
    Cancel(CancelArgs),
    /// Try agentd: demo agents, teams and schedules, a team run at once, the worker printing
    /// every run's logs until Ctrl-C (on the embedded PostgreSQL unless database.url or
    /// DATABASE_URL names a database).
    /// Refuses a database that holds users or agents it did not create.
    Demo(DemoArgs),
    /// Chat with an agent in the terminal, through the database as the web app does: each
    /// line is a user message, each reply is printed as it streams.
    Chat(ChatArgs),
    /// Schedules without a database.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// For operators: live workers, runs in flight, the schedule backlog, invalid schedules
    /// and the last hour's runs.
    Status(StatusArgs),
    /// Measure agentd on a scratch database of the configured server (or the embedded
    /// one): burst, defaults, steady, throughput, logs, idle, chat, waiting, scale; with
    /// the server's own ceiling.
    Bench(BenchOptions),
    /// Exit 0 when GET /healthz of the local agentd answers 200 (container health checks;
    /// no curl needed).
    Healthcheck(HealthcheckArgs),
}

/// Options of `agentd demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Add the demo data even when the database already holds users or agents the demo did
    /// not create (refused otherwise, exit status 2): its schedules fire every minute for as
    /// long as a worker runs on that database.
    #[arg(long)]
    pub into_existing_database: bool,
}

/// Options of `agentd status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// `table` (readable) or `json`.
    #[arg(long, value_enum, default_value = "table")]
    pub format: StatusFormat,
}

/// Options of `agentd healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The URL to check. Default: /healthz on http.listen (a wildcard address is reached
    /// through 127.0.0.1).
    #[arg(long)]
    pub url: Option<String>,
}

/// `agentd schedule …`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Print the next slots of a schedule given as the columns of a row.
    Preview(PreviewArgs),
}

/// Options of `agentd trigger`.
#[derive(Debug, Args)]
pub struct TriggerArgs {
    /// What to run.
    #[arg(value_enum)]
    pub target: TriggerTarget,
    /// The agent's or team's id.
    pub id: uuid::Uuid,
    /// The run's input, as JSON.
    #[arg(long, value_name = "JSON")]
    pub input: Option<String>,
    /// Follow the run's logs until it ends; exit with status 1 if it failed.
    #[arg(long)]
    pub wait: bool,
}

/// The kinds of target `agentd trigger` accepts.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TriggerTarget {
    Agent,
    Team,
}

impl TriggerTarget {
    /// The kind of run the target asks for, as `startup::trigger` takes it.
    pub fn run_kind(self) -> RunKind {
        match self {
            TriggerTarget::Agent => RunKind::Agent,
            TriggerTarget::Team => RunKind::Team,
        }
    }
}

/// Options of `agentd chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The agent to chat with (the conversation is its owner's).
    pub agent: uuid::Uuid,
    /// Continue this conversation (default: a new one).
    #[arg(long, value_name = "ID")]
    pub conversation: Option<uuid::Uuid>,
    /// Answer in this process too (always so on the embedded database); otherwise the
    /// running replicas answer.
    #[arg(long)]
    pub worker: bool,
}

/// Options of `agentd cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run's id (as printed by `agentd trigger`).
    pub run_id: uuid::Uuid,
}

/// Options of `agentd run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Apply pending migrations before serving (same as database.migrate = true).
    #[arg(long)]
    pub migrate: bool,
}
