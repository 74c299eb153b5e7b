//! The `agentd` binary: parse the command line, load settings, hand over to the library.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;

use agentd::cli::{Cli, Command, ScheduleCommand};
use agentd::config::Settings;
use agentd::{shutdown, startup, telemetry};

/// Exit status for unusable input (bad configuration) and for a command that declined
/// what it was asked ([`startup::Refusal`]), as sysexits' EX_USAGE family uses 2.
const EXIT_BAD_INPUT: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Pure commands need neither settings nor a runtime.
    if let Command::Schedule(ScheduleCommand::Preview(args)) = &cli.command {
        return match agentd::schedule::preview::preview(args, chrono::Utc::now()) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(EXIT_BAD_INPUT)
            }
        };
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = match Settings::load(cli.config.as_deref(), &env) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    // The daemon's log is its output; every other command keeps stdout for its answer.
    let stream = match cli.command {
        Command::Run(_) => telemetry::LogStream::Stdout,
        Command::Demo(_)
        | Command::Chat(_)
        | Command::Migrate
        | Command::Trigger(_)
        | Command::Cancel(_)
        | Command::Bench(_)
        | Command::Status(_)
        | Command::Healthcheck(_)
        | Command::Schedule(_) => telemetry::LogStream::Stderr,
    };
    telemetry::init(&settings.log, &settings.worker.id, stream);
    for deprecation in &settings.deprecations {
        tracing::warn!("{deprecation}");
    }
    // Before any other thread exists: agentd's memory and environment become unreadable to
    // the programs it runs, and escaping processes come back to it (docs/security.md).
    if matches!(
        cli.command,
        Command::Run(_) | Command::Demo(_) | Command::Chat(_)
    ) {
        let secrets: Vec<&str> = settings
            .secret_variables
            .iter()
            .map(String::as_str)
            .collect();
        for failure in agentd::process::harden(&secrets).failed {
            tracing::warn!("{failure}");
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Input that can be checked before doing anything: a bad value is exit status 2.
    let input = match &cli.command {
        Command::Trigger(args) => match args.input.as_deref().map(serde_json::from_str) {
            None => None,
            Some(Ok(value)) => Some(value),
            Some(Err(error)) => {
                eprintln!("--input: not valid JSON: {error}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        },
        Command::Run(_)
        | Command::Migrate
        | Command::Cancel(_)
        | Command::Demo(_)
        | Command::Chat(_)
        | Command::Bench(_)
        | Command::Status(_)
        | Command::Healthcheck(_)
        | Command::Schedule(_) => None,
    };
    let result = runtime.block_on(async {
        let shutdown = shutdown::on_signals()?;
        match &cli.command {
            Command::Run(args) => startup::run(&settings, args.migrate, &shutdown)
                .await
                .map(|()| true),
            Command::Migrate => startup::migrate(&settings, &shutdown).await.map(|()| true),
            Command::Trigger(args) => {
                let kind = args.target.run_kind();
                startup::trigger(&settings, kind, args.id, input, args.wait, &shutdown).await
            }
            Command::Cancel(args) => startup::cancel(&settings, args.run_id, &shutdown)
                .await
                .map(|()| true),
            Command::Demo(args) => startup::demo(&settings, args.into_existing_database, &shutdown)
                .await
                .map(|()| true),
            Command::Chat(args) => startup::chat(
                &settings,
                args.agent,
                args.conversation,
                args.worker,
                &shutdown,
            )
            .await
            .map(|()| true),
            Command::Bench(options) => {
                let report = agentd::bench::run(&settings, options, &shutdown).await?;
                print!("{}", report.render(options.format)?);
                Ok(true)
            }
            Command::Status(args) => startup::status(&settings, args.format, &shutdown)
                .await
                .map(|()| true),
            Command::Healthcheck(args) => startup::healthcheck(&settings, args.url.as_deref())
                .await
                .map(|()| true),
            Command::Schedule(_) => Ok(true),
        }
    });
    shutdown::wait_if_exiting_at_once();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(startup::EXIT_RUN_FAILED),
        Err(error) => {
            if let Some(refusal) = error.downcast_ref::<startup::Refusal>() {
                eprintln!("{refusal}");
                return ExitCode::from(EXIT_BAD_INPUT);
            }
            tracing::error!(error = format!("{error:#}"), "agentd failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
