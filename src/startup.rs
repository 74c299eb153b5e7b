//! Building the application from settings: one function per command that works on the
//! database (opened through [`crate::database`]). Kept apart from `main` so tests and every
//! command share one path; the commands take plain values, never the command line's types.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::database::{Database, MIGRATE_CONNECT_PATIENCE};
use crate::endpoints::Endpoints;
use crate::health::Health;
use crate::store::runs::RunKind;
use crate::{store, worker};

/// `agentd migrate`: apply pending migrations and say what changed.
pub async fn migrate(settings: &Settings, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let result = store::migrate(&database.pool).await;
    database.close().await;
    let report = result?;
    let current = report
        .current
        .map_or_else(|| "none".to_string(), |v| v.to_string());
    if report.applied.is_empty() {
        println!("database is up to date (migration {current})");
    } else {
        let applied: Vec<String> = report.applied.iter().map(i64::to_string).collect();
        println!(
            "applied {} migration(s): {} (now at {current})",
            report.applied.len(),
            applied.join(", ")
        );
    }
    Ok(())
}

/// `agentd run`: connect (retrying), migrate when asked, then serve until shutdown.
pub async fn run(
    settings: &Settings,
    migrate: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // The executors first: a command executor whose runs cannot get places of their own
    // stops start-up with one line (exit 2).
    let executors = crate::executor::from_settings(settings).map_err(Refusal)?;
    // So does an artifact bucket whose client cannot be built: otherwise every artifact
    // would be refused, the first one long after start-up.
    if let crate::artifact_store::ArtifactBackend::Unavailable(reason) =
        crate::artifact_store::ArtifactStore::from_settings(
            &settings.artifacts,
            settings.database.max_backoff,
        )
        .backend
    {
        return Err(Refusal(format!(
            "artifacts.url: artifacts cannot be stored: {reason}"
        ))
        .into());
    }
    // Processes escaping a run are re-parented to agentd: reaped here, so no zombie stays.
    let orphans_stop = CancellationToken::new();
    let orphans = tokio::spawn(crate::process::reap_orphans(orphans_stop.clone()));
    let result = serve(settings, migrate, executors, shutdown).await;
    orphans_stop.cancel();
    let _ = orphans.await;
    result
}

/// `agentd run` once its executors are ready.
async fn serve(
    settings: &Settings,
    migrate: bool,
    executors: crate::executor::Executors,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // The endpoints come up first: live (and not ready) while the database is reached.
    let health = Health::new();
    let http_stop = CancellationToken::new();
    let mut endpoints = None;
    if let Some(addr) = settings.http.listen {
        let metrics = crate::measure::install(&settings.worker.id);
        let served = Endpoints::new(health.clone(), metrics, settings.http.token.clone());
        let task = served.bind(addr, http_stop.clone()).await?;
        endpoints = Some((served, task));
    }
    let stop_endpoints = |endpoints: Option<(Endpoints, tokio::task::JoinHandle<()>)>| async {
        http_stop.cancel();
        if let Some((_, task)) = endpoints {
            let _ = task.await;
        }
    };
    let database = match Database::open(settings, None, shutdown).await {
        Ok(database) => database,
        Err(error) if shutdown.is_cancelled() => {
            tracing::info!(reason = %error, "stopped before the database was reachable");
            stop_endpoints(endpoints).await;
            return Ok(());
        }
        Err(error) => {
            stop_endpoints(endpoints).await;
            return Err(error);
        }
    };
    if let Some((served, _)) = &endpoints {
        served.check_database(
            (*database.pool.connect_options()).clone(),
            &settings.database,
            http_stop.clone(),
            shutdown.clone(),
        );
    }
    // The embedded server is this process's own: nobody else migrates it.
    if migrate || settings.database.migrate || database.is_embedded() {
        match store::migrate(&database.pool).await {
            Ok(report) => tracing::info!(
                applied = report.applied.len(),
                current = report.current.unwrap_or_default(),
                "migrations applied"
            ),
            Err(error) => {
                database.close().await;
                stop_endpoints(endpoints).await;
                return Err(error.into());
            }
        }
    } else if !wait_for_migrations(&database, shutdown).await {
        tracing::info!("agentd stopping");
        stop_endpoints(endpoints).await;
        database.close().await;
        tracing::info!("agentd stopped");
        return Ok(());
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "agentd running");
    let served = worker::serve(
        database.pool.clone(),
        settings,
        executors,
        health,
        shutdown.clone(),
    )
    .await;
    tracing::info!("agentd stopping");
    stop_endpoints(endpoints).await;
    database.close().await;
    tracing::info!("agentd stopped");
    served.map_err(Into::into)
}

/// How often `agentd run` without `--migrate` looks again for the migrations it waits for.
const MIGRATIONS_RECHECK: Duration = Duration::from_secs(2);

/// `agentd run` without `--migrate`: waits until every migration of this binary is applied
/// (by `agentd migrate`, a migration Job or another replica started with `--migrate`),
/// saying once what it waits for; `/readyz` says "migrations pending" meanwhile. A worker
/// started on an older schema would fail at its first statement, and a replica started
/// beside its deployment's migration step would exit and be restarted with growing delays.
/// Returns false when shutdown came first.
async fn wait_for_migrations(database: &Database, shutdown: &CancellationToken) -> bool {
    let mut said = None;
    loop {
        match store::pending_migrations(&database.pool).await {
            Ok(pending) if pending.is_empty() => {
                if said.is_some() {
                    tracing::info!("migrations applied: starting");
                }
                return true;
            }
            Ok(pending) => {
                let what = pending
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                if said.as_ref() != Some(&what) {
                    tracing::warn!(
                        pending = %what,
                        "waiting for migrations: run `agentd migrate` (or start a replica with --migrate)"
                    );
                    said = Some(what);
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the applied migrations; looking again");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(MIGRATIONS_RECHECK) => {}
        }
    }
}

/// A one-shot command's database must hold agentd's schema: without it every statement
/// would fail with the server's "does not exist".
async fn require_schema(database: &Database) -> anyhow::Result<()> {
    if store::applied_versions(&database.pool).await?.is_empty() {
        anyhow::bail!(
            "the database holds no agentd schema (no migration applied): run `agentd migrate` first"
        );
    }
    Ok(())
}

/// `agentd status`: one snapshot of the fleet, printed as a table or JSON.
pub async fn status(
    settings: &Settings,
    format: crate::status::StatusFormat,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let snapshot = match require_schema(&database).await {
        Ok(()) => store::status::snapshot(&database.pool)
            .await
            .map_err(Into::into),
        Err(error) => Err(error),
    };
    database.close().await;
    let snapshot = snapshot?;
    let stale_after = settings.worker_stale_after();
    let budget = crate::status::ConnectionBudget::of(settings, store::exec::transaction_pooler());
    match format {
        crate::status::StatusFormat::Table => {
            print!(
                "{}",
                crate::status::to_table(&snapshot, stale_after, &budget)
            )
        }
        crate::status::StatusFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&crate::status::to_json(&snapshot, stale_after, &budget))?
        ),
    }
    Ok(())
}

/// `agentd healthcheck`: GET the liveness endpoint (or `url`, with the bearer token when
/// one is configured); an error says why it failed.
pub async fn healthcheck(settings: &Settings, url: Option<&str>) -> anyhow::Result<()> {
    let url = match url {
        Some(url) => url.to_string(),
        None => {
            let Some(mut addr) = settings.http.listen else {
                anyhow::bail!("http.listen is empty: the endpoints are off (give --url)");
            };
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}/healthz")
        }
    };
    crate::endpoints::probe(&url, settings.http.token.as_ref()).await
}

/// Exit status of `trigger --wait` when the run failed.
pub const EXIT_RUN_FAILED: u8 = 1;

/// `agentd trigger`: queue a run of `kind` for the agent or team `target`, print its id,
/// and when `wait` is set follow its logs until it ends. Returns whether the run completed
/// (always true without `wait`).
pub async fn trigger(
    settings: &Settings,
    kind: RunKind,
    target: uuid::Uuid,
    input: Option<serde_json::Value>,
    wait: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    use crate::domain::RunStatus;
    use crate::store::runs::{request_run, run_logs_after, run_state};
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let result = async {
        require_schema(&database).await?;
        let run_id = request_run(&database.pool, kind, target, input.as_ref()).await?;
        println!("{run_id}");
        if !wait {
            return Ok(true);
        }
        let mut position = None;
        loop {
            let state = run_state(&database.pool, run_id).await?;
            for (timestamp, id, level, message) in
                run_logs_after(&database.pool, run_id, position).await?
            {
                println!(
                    "{} {level:>5} {message}",
                    timestamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                );
                position = Some((timestamp, id));
            }
            let Some(state) = state else {
                // The claim moves a request into runs in one transaction, so only deletion
                // (retention, the application) makes a run disappear.
                anyhow::bail!("run {run_id} no longer exists");
            };
            match state.status {
                RunStatus::Completed => {
                    println!("run {run_id} completed");
                    return Ok(true);
                }
                RunStatus::Failed => {
                    println!("run {run_id} failed: {}", state.error.unwrap_or_default());
                    return Ok(false);
                }
                RunStatus::Queued | RunStatus::Running => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.cancelled() => anyhow::bail!("interrupted; the run goes on"),
            }
        }
    }
    .await;
    database.close().await;
    result
}

/// `agentd cancel`: ask to cancel a run; fails when there is nothing to cancel.
pub async fn cancel(
    settings: &Settings,
    run_id: uuid::Uuid,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let result = match require_schema(&database).await {
        Ok(()) => store::runs::cancel_run(&database.pool, run_id)
            .await
            .map_err(Into::into),
        Err(error) => Err(error),
    };
    database.close().await;
    if result? {
        println!("cancellation of run {run_id} requested");
        Ok(())
    } else {
        anyhow::bail!("run {run_id} is not running or queued: nothing to cancel")
    }
}

/// `agentd chat`: a terminal chat with `agent` (in `conversation`, or a new conversation
/// of the agent's owner). Each line read from stdin is a user message; each reply is
/// printed as it streams. A worker answers in this process when `worker` is set or the
/// database is the embedded one (no other replica reaches it). Returns at the end of
/// input, once the last reply is final, or on Ctrl-C.
pub async fn chat(
    settings: &Settings,
    agent: uuid::Uuid,
    conversation: Option<uuid::Uuid>,
    worker: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use store::conversations::{conversation_user, post_user_message, start_conversation};
    use tokio::io::AsyncBufReadExt;
    // The local worker's executors before anything else, as for `agentd run`; the embedded
    // database (no `database.url`) is reached by no other replica.
    let executors = if worker || settings.database.url.is_none() {
        Some(crate::executor::from_settings(settings).map_err(Refusal)?)
    } else {
        None
    };
    let database = Database::open(settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let result = async {
        // The embedded database is this process's own; a configured one is migrated by
        // its deployment, as for `agentd run`.
        if database.is_embedded() {
            store::migrate(&database.pool).await?;
        } else {
            require_schema(&database).await?;
        }
        let conversation = match conversation {
            Some(id) => {
                if conversation_user(&database.pool, id, agent)
                    .await?
                    .is_none()
                {
                    anyhow::bail!("--conversation: no conversation {id} with agent {agent}");
                }
                id
            }
            None => {
                let title = format!(
                    "agentd chat {}",
                    chrono::Utc::now().format("%Y-%m-%d %H:%M")
                );
                let Some((id, _)) = start_conversation(&database.pool, agent, &title).await? else {
                    anyhow::bail!("no agent {agent}");
                };
                id
            }
        };
        eprintln!("conversation {conversation} (end with Ctrl-D)");
        let answering = CancellationToken::new();
        let local = executors.map(|executors| {
            let (pool, settings, stop) =
                (database.pool.clone(), settings.clone(), answering.clone());
            tokio::spawn(async move {
                worker::serve(pool, &settings, executors, Health::new(), stop)
                    .await
                    .map_err(anyhow::Error::from)
            })
        });
        let interactive = std::io::stdin().is_terminal();
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let chatted = async {
            loop {
                if interactive {
                    eprint!("> ");
                }
                let line = tokio::select! {
                    line = lines.next_line() => line?,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                let Some(line) = line else { return Ok(()) };
                if line.trim().is_empty() {
                    continue;
                }
                let message = post_user_message(&database.pool, conversation, &line).await?;
                let mut out = std::io::stdout();
                match crate::chat::follow_reply(&database.pool, message, &mut out, shutdown).await?
                {
                    None => return Ok(()),
                    Some(end) if end.status == "completed" => {}
                    Some(end) => eprintln!(
                        "[{}{}]",
                        end.status,
                        end.error
                            .map(|error| format!(": {error}"))
                            .unwrap_or_default()
                    ),
                }
            }
        }
        .await;
        answering.cancel();
        if let Some(local) = local {
            local.await??;
        }
        chatted
    }
    .await;
    database.close().await;
    result
}

/// A command declined what it was asked, before doing it: nothing failed and nothing was
/// written (a setup its executors or artifact store cannot work with, a database the demo
/// did not fill). `main` prints its one line and exits 2, as for a bad setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// `agentd demo`: migrate, seed the demo data (once), queue a team run, and run a worker
/// that prints every run's log lines until Ctrl-C. A database holding users or agents the
/// demo did not create is refused before anything is written ([`Refusal`]), unless
/// `into_existing_database`.
pub async fn demo(
    settings: &Settings,
    into_existing_database: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    // The "system" agent runs a real program when one is there.
    if let Some(uname) = find_program("uname") {
        settings.executors.command.program = vec![uname, "-a".into()];
        settings
            .executor
            .by_category
            .insert("system".into(), crate::config::ExecutorKind::Command);
    }
    if settings.executors.builtin.step_delay.is_zero() {
        settings.executors.builtin.step_delay = Duration::from_millis(300);
    }
    // Before anything is written, as for `agentd run`.
    let executors = crate::executor::from_settings(&settings).map_err(Refusal)?;
    let database = Database::open(&settings, Some(MIGRATE_CONNECT_PATIENCE), shutdown).await?;
    let result = async {
        if !into_existing_database {
            refuse_other_data(store::demo::other_rows(&database.pool).await?)?;
        }
        store::migrate(&database.pool).await?;
        let inserted = store::demo::seed(&database.pool).await?;
        if inserted > 0 {
            println!("demo data created: a user, 3 agents, 3 teams (route, coordinate, collaborate), 2 schedules firing every minute, a conversation");
        } else {
            println!("demo data already present");
        }
        // Lines are stamped by the worker's clock when emitted: everything from now on.
        let since: (chrono::DateTime<chrono::Utc>, uuid::Uuid) = (chrono::Utc::now(), uuid::Uuid::nil());
        let run_id = store::runs::request_run(
            &database.pool,
            RunKind::Team,
            store::demo::COORDINATE_TEAM,
            Some(&serde_json::json!("agents that run on time")),
        )
        .await?;
        println!("team run {run_id} queued; the worker runs it now (Ctrl-C stops)");
        // A chat message to the Greeter; its reply is printed once final.
        let question = "Hello! What can you do?";
        let message = store::conversations::post_user_message(
            &database.pool,
            store::demo::CONVERSATION,
            question,
        )
        .await?;
        let chat = {
            let (pool, shutdown) = (database.pool.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut reply = Vec::new();
                match crate::chat::follow_reply(&pool, message, &mut reply, &shutdown).await {
                    Ok(Some(end)) => println!(
                        "chat with the Greeter ({}):\n  you: {question}\n  Greeter: {}",
                        end.status,
                        String::from_utf8_lossy(&reply).trim_end().replace('\n', "\n  ")
                    ),
                    Ok(None) => {}
                    Err(error) => tracing::warn!(error = %error, "following the demo chat failed"),
                }
            })
        };
        let printer = tokio::spawn(print_logs(database.pool.clone(), since, shutdown.clone()));
        let orphans_stop = CancellationToken::new();
        let orphans = tokio::spawn(crate::process::reap_orphans(orphans_stop.clone()));
        let served = worker::serve(
            database.pool.clone(),
            &settings,
            executors,
            Health::new(),
            shutdown.clone(),
        )
        .await;
        let _ = printer.await;
        chat.abort();
        orphans_stop.cancel();
        let _ = orphans.await;
        served.map_err(anyhow::Error::from)
    }
    .await;
    database.close().await;
    result
}

/// The demo's refusal of a database holding data it did not create, naming what it found
/// and the flag that proceeds anyway.
fn refuse_other_data(found: store::demo::OtherRows) -> Result<(), Refusal> {
    let rows = |count: i64| match count {
        1 => "1 row".to_string(),
        count if count >= store::demo::OTHER_ROWS_COUNTED => format!("{count} or more rows"),
        count => format!("{count} rows"),
    };
    let tables: Vec<String> = [
        ("public.users", found.users),
        ("public.agents", found.agents),
    ]
    .into_iter()
    .filter(|(_, count)| *count > 0)
    .map(|(table, count)| format!("{table}: {}", rows(count)))
    .collect();
    if tables.is_empty() {
        return Ok(());
    }
    Err(Refusal(format!(
        "demo: the database holds data the demo did not create ({}); its schedules would fire \
         every minute there for as long as a worker runs: use an empty database, or pass \
         --into-existing-database to add the demo data anyway",
        tables.join(", ")
    )))
}

/// Prints new log lines of every run twice a second until shutdown.
async fn print_logs(
    pool: sqlx::PgPool,
    mut position: (chrono::DateTime<chrono::Utc>, uuid::Uuid),
    shutdown: CancellationToken,
) {
    loop {
        match store::demo::logs_after(&pool, position).await {
            Ok(lines) => {
                for line in lines {
                    let run = line.run_id.to_string();
                    println!(
                        "{} run {} {:>5} {}",
                        line.timestamp.format("%H:%M:%S%.3f"),
                        &run[..8],
                        line.level,
                        line.message
                    );
                    position = (line.timestamp, line.id);
                }
            }
            Err(error) => tracing::warn!(error = %error, "reading run logs failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The full path of a program found in PATH.
fn find_program(name: &str) -> Option<String> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
            .map(|found| found.to_string_lossy().into_owned())
    })
}
