//! `agentd status`: the fleet and its backlog for operators, as a readable report or JSON.
//! Pure rendering of a [`StatusSnapshot`]; `now` comes from the snapshot (the database's
//! clock), never read here.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::scheduler::listener::ListenMode;
use crate::store::status::StatusSnapshot;

/// `agentd status --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Table,
    Json,
}

/// The most connections one replica with these settings opens to PostgreSQL at once:
/// what a fleet's size is checked against (docs/operations.md, "Connection budget").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// The worker's pool (`database.max_connections`).
    pub pool: u32,
    /// The listener's connection, on `database.listen_url`'s server (0 with
    /// `database.notify = "poll"`).
    pub listener: u32,
    /// The readiness check's connection (0 without endpoints, `http.listen` empty).
    pub readiness_check: u32,
}

impl ConnectionBudget {
    /// The budget of a replica run with `settings` (through a transaction-mode pooler or
    /// not). Nothing else connects while the replica runs: the embedded server's start-up
    /// connections are closed before the pool opens, and the listener's check, the poller
    /// and every loop use the pool.
    pub fn of(settings: &Settings, transaction_pooler: bool) -> ConnectionBudget {
        ConnectionBudget {
            pool: settings.database.max_connections,
            listener: u32::from(ListenMode::of(settings, transaction_pooler).listens()),
            readiness_check: u32::from(settings.http.listen.is_some()),
        }
    }

    /// Connections at most, all together.
    pub fn total(&self) -> u32 {
        self.pool + self.listener + self.readiness_check
    }

    /// How many replicas `available` connections hold.
    pub fn replicas_within(&self, available: i64) -> i64 {
        available.max(0) / i64::from(self.total().max(1))
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn seconds_between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> f64 {
    (later - earlier).num_milliseconds() as f64 / 1000.0
}

/// The JSON document. A worker is `stale` when it has not been seen for longer than
/// `stale_after` (its heartbeat stopped: killed, frozen or cut off).
pub fn to_json(
    snapshot: &StatusSnapshot,
    stale_after: Duration,
    budget: &ConnectionBudget,
) -> Value {
    let stale_after = stale_after.as_secs_f64();
    let workers: Vec<Value> = snapshot
        .workers
        .iter()
        .map(|worker| {
            let ago = seconds_between(worker.last_seen_at, snapshot.now);
            json!({
                "id": worker.id,
                "host": worker.host,
                "pid": worker.pid,
                "version": worker.version,
                "started_at": time(worker.started_at),
                "last_seen_at": time(worker.last_seen_at),
                "last_seen_seconds_ago": ago,
                "stale": ago > stale_after,
                "runs_in_flight": worker.runs_in_flight,
            })
        })
        .collect();
    let in_flight: Vec<Value> = snapshot
        .in_flight
        .iter()
        .map(|row| {
            json!({
                "worker_id": row.worker_id,
                "runs": row.runs,
                "leases_expired": row.expired,
                "registered": snapshot.workers.iter().any(|w| w.id == row.worker_id),
            })
        })
        .collect();
    json!({
        "now": time(snapshot.now),
        "workers": workers,
        "runs_in_flight_by_worker": in_flight,
        "schedules": {
            "due_now": snapshot.schedules_due,
            "oldest_due": snapshot.oldest_due.map(time),
            "backlog_seconds": snapshot.oldest_due.map(|due| seconds_between(due, snapshot.now)),
            "unplanned": snapshot.schedules_unplanned,
            "invalid": snapshot.invalid_total,
            "used_up": snapshot.used_up_total,
        },
        "requests": {
            "waiting": snapshot.requests_waiting,
            "oldest": snapshot.oldest_request.map(time),
        },
        "conversations": {
            "waiting": snapshot.conversations_waiting,
            "oldest_message": snapshot.oldest_message.map(time),
            "turns_running": snapshot.turns_running,
        },
        "invalid_schedules": snapshot.invalid.iter().map(|row| json!({
            "schedule_id": row.schedule_id,
            "agent_id": row.agent_id,
            "error": row.error,
            "since": time(row.since),
        })).collect::<Vec<_>>(),
        "connections": connections_json(snapshot, budget),
        "runs": {
            "running": snapshot.running,
            "last_hour": {
                "completed": snapshot.completed_last_hour,
                "failed": snapshot.failed_last_hour,
            },
        },
    })
}

fn connections_json(snapshot: &StatusSnapshot, budget: &ConnectionBudget) -> Value {
    let server = &snapshot.connections;
    let available = server.max_connections - server.reserved;
    let by_application: serde_json::Map<String, Value> = server
        .by_agentd
        .iter()
        .map(|(name, count)| (name.clone(), json!(count)))
        .collect();
    json!({
        "per_replica_max": budget.total(),
        "pool": budget.pool,
        "listener": budget.listener,
        "readiness_check": budget.readiness_check,
        "server_max_connections": server.max_connections,
        "reserved": server.reserved,
        "available": available,
        "in_use": server.in_use,
        "by_agentd": server.by_agentd.iter().map(|(_, count)| count).sum::<i64>(),
        "by_agentd_application": by_application,
        "replicas_fit": budget.replicas_within(available),
    })
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// The readable report.
pub fn to_table(
    snapshot: &StatusSnapshot,
    stale_after: Duration,
    budget: &ConnectionBudget,
) -> String {
    let now = snapshot.now;
    let mut out = format!("agentd status at {}\n\n", time(now));

    out.push_str(&format!("Workers: {}\n", snapshot.workers.len()));
    if !snapshot.workers.is_empty() {
        let rows: Vec<Vec<String>> = snapshot
            .workers
            .iter()
            .map(|worker| {
                let ago = seconds_between(worker.last_seen_at, now);
                let seen = if ago > stale_after.as_secs_f64() {
                    format!("{ago:.0}s ago (stale)")
                } else {
                    format!("{ago:.0}s ago")
                };
                vec![
                    worker.id.clone(),
                    worker.host.clone(),
                    worker.version.clone(),
                    time(worker.started_at),
                    seen,
                    worker.runs_in_flight.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["ID", "HOST", "VERSION", "STARTED", "LAST SEEN", "RUNS"],
            &rows,
        ));
    }

    out.push_str("\nRuns in flight by worker:");
    if snapshot.in_flight.is_empty() {
        out.push_str(" none\n");
    } else {
        out.push('\n');
        let rows: Vec<Vec<String>> = snapshot
            .in_flight
            .iter()
            .map(|row| {
                let mut note = Vec::new();
                if !snapshot.workers.iter().any(|w| w.id == row.worker_id) {
                    note.push("not registered".to_string());
                }
                if row.expired > 0 {
                    note.push(format!("{} lease(s) expired", row.expired));
                }
                vec![row.worker_id.clone(), row.runs.to_string(), note.join(", ")]
            })
            .collect();
        out.push_str(&table(&["WORKER", "RUNS", "NOTE"], &rows));
    }

    out.push_str("\nSchedules:\n");
    match snapshot.oldest_due {
        Some(due) => out.push_str(&format!(
            "  due now: {} (oldest next_run {}, {:.1}s behind)\n",
            snapshot.schedules_due,
            time(due),
            seconds_between(due, now)
        )),
        None => out.push_str("  due now: 0\n"),
    }
    out.push_str(&format!(
        "  waiting for their first next_run: {}\n",
        snapshot.schedules_unplanned
    ));
    match snapshot.oldest_request {
        Some(oldest) => out.push_str(&format!(
            "  requested runs waiting: {} (oldest {})\n",
            snapshot.requests_waiting,
            time(oldest)
        )),
        None => out.push_str("  requested runs waiting: 0\n"),
    }
    out.push_str(&format!(
        "  used up (a once that has come): {}\n",
        snapshot.used_up_total
    ));
    out.push_str(&format!("  invalid: {}\n", snapshot.invalid_total));
    for row in &snapshot.invalid {
        out.push_str(&format!(
            "    {}  {}  (since {})\n",
            row.schedule_id,
            row.error,
            time(row.since)
        ));
    }
    if snapshot.invalid_total > snapshot.invalid.len() as i64 {
        out.push_str(&format!(
            "    … and {} more\n",
            snapshot.invalid_total - snapshot.invalid.len() as i64
        ));
    }

    out.push_str("\nConversations:\n");
    match snapshot.oldest_message {
        Some(oldest) => out.push_str(&format!(
            "  waiting for a turn: {} (oldest message {}, {:.1}s ago)\n",
            snapshot.conversations_waiting,
            time(oldest),
            seconds_between(oldest, now)
        )),
        None => out.push_str("  waiting for a turn: 0\n"),
    }
    out.push_str(&format!("  turns running: {}\n", snapshot.turns_running));

    out.push_str(&format!(
        "\nRuns:\n  running now: {}\n  last hour: {} completed, {} failed\n",
        snapshot.running, snapshot.completed_last_hour, snapshot.failed_last_hour
    ));

    let server = &snapshot.connections;
    let available = server.max_connections - server.reserved;
    out.push_str(&format!(
        "\nConnections:\n  per replica at most: {} (pool {} + listener {} + readiness check {})\n",
        budget.total(),
        budget.pool,
        budget.listener,
        budget.readiness_check
    ));
    out.push_str(&format!(
        "  server allows: {available} (max_connections {} - {} reserved)\n",
        server.max_connections, server.reserved
    ));
    let by_agentd: i64 = server.by_agentd.iter().map(|(_, count)| count).sum();
    let by_application: Vec<String> = server
        .by_agentd
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    out.push_str(&format!(
        "  open now: {} on the server, {by_agentd} by agentd on this database{}\n",
        server.in_use,
        if by_application.is_empty() {
            String::new()
        } else {
            format!(" ({})", by_application.join(", "))
        }
    ));
    out.push_str(&format!(
        "  replicas that fit: {} (with none left for the application)\n",
        budget.replicas_within(available)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(env: &[(&str, &str)]) -> ConnectionBudget {
        let env = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        ConnectionBudget::of(&Settings::load(None, &env).unwrap(), false)
    }

    #[test]
    fn a_replica_holds_its_pool_its_listener_and_its_readiness_check() {
        let defaults = budget(&[]);
        assert_eq!(
            (defaults.pool, defaults.listener, defaults.readiness_check),
            (10, 1, 1)
        );
        assert_eq!(defaults.total(), 12);
        let small = budget(&[("AGENTD__DATABASE__MAX_CONNECTIONS", "4")]);
        assert_eq!(small.total(), 6);
        assert_eq!(small.replicas_within(60), 10);
        assert_eq!(small.replicas_within(57), 9);
        let polling = budget(&[
            ("AGENTD__DATABASE__MAX_CONNECTIONS", "4"),
            ("AGENTD__DATABASE__NOTIFY", "poll"),
            ("AGENTD__HTTP__LISTEN", ""),
        ]);
        assert_eq!(polling.total(), 4);
        assert_eq!(polling.replicas_within(-3), 0);
        let settings = Settings::load(None, &Default::default()).unwrap();
        assert_eq!(ConnectionBudget::of(&settings, true).listener, 0);
    }
}
