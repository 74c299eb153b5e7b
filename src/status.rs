//! `agentd status`: the fleet and its backlog for operators, as a readable report or JSON.
//! Pure rendering of a [`StatusSnapshot`]; `now` comes from the snapshot (the database's
//! clock), never read here.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::store::status::StatusSnapshot;

/// `agentd status --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Table,
    Json,
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn seconds_between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> f64 {
    (later - earlier).num_milliseconds() as f64 / 1000.0
}

/// The JSON document. A worker is `stale` when it has not been seen for longer than
/// `stale_after` (its heartbeat stopped: killed, frozen or cut off).
pub fn to_json(snapshot: &StatusSnapshot, stale_after: Duration) -> Value {
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
        "runs": {
            "running": snapshot.running,
            "last_hour": {
                "completed": snapshot.completed_last_hour,
                "failed": snapshot.failed_last_hour,
            },
        },
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
pub fn to_table(snapshot: &StatusSnapshot, stale_after: Duration) -> String {
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
    out
}
