//! `chat`: C conversations, each asked one question, answered by replicas whose model (the
//! bench's own [`FakeModel`]) streams K chunks at a fixed pace; how soon each message's
//! turn starts, how soon its reply shows text once the model sent some, what the replicas
//! cost, and how many row writes a reply takes.
//!
//! The questions are written one statement each at a steady pace over
//! `--message-spread`, so each meets a claim loop with nothing waiting (the replicas are
//! busy streaming the earlier replies, as a live service is): the turn-start lag is that of
//! a worker with room, not of a backlog.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgPool;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::fleet::Fleet;
use super::model::{FakeModel, answer};
use super::{Bench, Scratch, ms, percentile, round2};
use crate::store;

/// How often the replies are looked at for their first text: a reply's first text is
/// seen at most one look (this and the look's own time) after it became visible.
const LOOK_INTERVAL: Duration = Duration::from_millis(10);

/// What `chat` measured.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(test, derive(serde::Deserialize))]
pub struct ChatReport {
    /// Conversations, one question each.
    pub conversations: usize,
    /// Replicas (processes) that answered them.
    pub replicas: usize,
    /// Chunks the model streams per answer.
    pub chunks_per_reply: usize,
    /// Time between two chunks, ms.
    pub chunk_interval_ms: f64,
    /// The questions were written evenly over this long, seconds.
    pub message_spread_seconds: f64,
    /// `conversations.stream_interval` of the replicas, ms.
    pub stream_interval_ms: f64,
    /// From the first question's insert to the last turn's end, seconds.
    pub seconds: f64,
    /// Requests the model received (one per turn when none was retried).
    pub model_requests: usize,
    /// Turns (runs) started.
    pub turns: i64,
    /// Replies (agent messages) written.
    pub replies: i64,
    /// Conversations with a reply.
    pub conversations_answered: i64,
    /// Replies `completed` with the model's whole answer as their text.
    pub replies_completed: i64,
    /// Questions whose turn-start lag was measured.
    pub start_lag_samples: usize,
    /// Median time from a question's insert to its turn's start, ms (database clock).
    pub start_lag_p50_ms: Option<f64>,
    /// 99th percentile of the turn-start lag, ms.
    pub start_lag_p99_ms: Option<f64>,
    /// Largest turn-start lag, ms.
    pub start_lag_max_ms: Option<f64>,
    /// Replies whose first-text delay was measured.
    pub first_text_samples: usize,
    /// Median time from the model's first chunk to the first look that saw the reply's
    /// text, ms (bench clock).
    pub first_text_p50_ms: Option<f64>,
    /// 99th percentile of the first-text delay, ms.
    pub first_text_p99_ms: Option<f64>,
    /// Largest first-text delay, ms.
    pub first_text_max_ms: Option<f64>,
    /// CPU seconds each replica used from its start to the last reply's end.
    pub replica_cpu_seconds: Vec<f64>,
    /// Peak resident memory of each replica, MiB.
    pub replica_peak_rss_mib: Vec<f64>,
    /// Rows the replies inserted and updated in `messages` (the server's statistics, less
    /// the questions' inserts; absent when the statistics did not count every insert).
    pub reply_row_writes: Option<i64>,
    /// `reply_row_writes` per reply.
    pub writes_per_reply: Option<f64>,
}

/// The question of conversation `index`: unique, so the model's request names its
/// conversation.
fn question(index: usize) -> String {
    format!("bench question {index}")
}

/// Runs `chat` on a scratch database.
pub(super) async fn run(bench: &mut Bench<'_>) -> anyhow::Result<ChatReport> {
    let n = bench.options.conversations;
    let replicas = bench.options.replicas;
    let chunks = bench.options.chunks;
    let chunk_interval = bench.options.chunk_interval;
    let spread = bench.options.message_spread;
    let stream_interval = bench.settings.conversations.stream_interval;
    let model = FakeModel::start(chunks, chunk_interval).await?;
    let mut scratch = bench.scratch("chat", 4).await?;
    let conversations = store::bench::seed_conversations(&scratch.pool, n as i64).await?;
    store::bench::analyze(&scratch.pool).await?;
    let mut settings = model.replica_settings();
    settings.push((
        "AGENTD__CONVERSATIONS__STREAM_INTERVAL".to_string(),
        humantime::format_duration(stream_interval).to_string(),
    ));
    let mut fleet = bench.fleet_with(&scratch, replicas, 1, settings)?;
    bench.registered(&scratch, &mut fleet, replicas).await?;
    listening(bench, &scratch, &mut fleet, replicas).await?;

    let stop = CancellationToken::new();
    let (asked_tx, asked_rx) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(first_texts(
        scratch.pool.clone(),
        conversations.clone(),
        asked_rx,
        stop.clone(),
    ));
    let asked = ask(&scratch.pool, &conversations, spread, asked_tx).await;
    let finished = match &asked {
        Ok(_) => {
            let limit = spread + chunk_interval * (chunks as u32 + 1) + Duration::from_secs(60);
            bench.finished(&scratch, &mut fleet, n as i64, limit).await
        }
        Err(_) => Ok(()),
    };
    stop.cancel();
    let seen = watcher.await?;
    let (messages, written_at) = asked?;
    finished?;
    let seen = seen?;
    let costs = fleet.costs();
    fleet.stop(Duration::from_secs(30));

    let lags = store::bench::turn_start_lags(&scratch.pool, &messages, &written_at).await?;
    let counts = store::bench::reply_counts(&scratch.pool, &answer(chunks)).await?;
    let span = store::bench::run_span(&scratch.pool).await?;
    let first_chunks = model.first_chunks();
    let model_requests = model.requests();
    drop(model);
    let mut delays: Vec<f64> = seen
        .iter()
        .enumerate()
        .filter_map(|(index, seen)| {
            let chunk = first_chunks.get(&question(index))?;
            let seen = (*seen)?;
            Some(seen.saturating_duration_since(*chunk).as_secs_f64())
        })
        .collect();
    delays.sort_by(f64::total_cmp);

    // The statistics are complete once every backend that wrote has exited.
    scratch.pool.close().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store::bench::backends(&bench.database.pool, &scratch.name).await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "chat: connections to {} stayed open 30 s after the replicas stopped",
            scratch.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    scratch.pool = bench.connect(&scratch.name, 1).await?;
    let reply_row_writes = reply_row_writes(&scratch.pool, n as i64, counts.replies).await?;
    bench.drop_scratch(scratch).await?;

    let seconds = match (written_at.first(), span.last_end) {
        (Some(first), Some(last)) => (last - *first).num_microseconds().unwrap_or(0) as f64 / 1e6,
        _ => 0.0,
    };
    Ok(ChatReport {
        conversations: n,
        replicas,
        chunks_per_reply: chunks,
        chunk_interval_ms: chunk_interval.as_secs_f64() * 1000.0,
        message_spread_seconds: spread.as_secs_f64(),
        stream_interval_ms: stream_interval.as_secs_f64() * 1000.0,
        seconds: round2(seconds),
        model_requests,
        turns: counts.turns,
        replies: counts.replies,
        conversations_answered: counts.conversations_answered,
        replies_completed: counts.completed,
        start_lag_samples: lags.len(),
        start_lag_p50_ms: ms(percentile(&lags, 50.0)),
        start_lag_p99_ms: ms(percentile(&lags, 99.0)),
        start_lag_max_ms: ms(lags.last().copied()),
        first_text_samples: delays.len(),
        first_text_p50_ms: ms(percentile(&delays, 50.0)),
        first_text_p99_ms: ms(percentile(&delays, 99.0)),
        first_text_max_ms: ms(delays.last().copied()),
        replica_cpu_seconds: costs.iter().map(|c| round2(c.cpu_seconds)).collect(),
        replica_peak_rss_mib: costs.iter().map(|c| round2(c.peak_rss_mib)).collect(),
        reply_row_writes,
        writes_per_reply: reply_row_writes
            .filter(|_| counts.replies > 0)
            .map(|writes| round2(writes as f64 / counts.replies as f64)),
    })
}

/// Waits until `replicas` replicas listen for chat messages. A replica registers before
/// its listener connects: a question written in between waits for the listener's first
/// look, which is a start-up's cost, not a turn's.
async fn listening(
    bench: &Bench<'_>,
    scratch: &Scratch,
    fleet: &mut Fleet,
    replicas: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while store::bench::message_listeners(&bench.database.pool, &scratch.name).await?
        < replicas as i64
    {
        fleet.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "chat: the replicas did not listen for messages within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Writes each conversation's question, evenly over `spread`, one statement each; tells
/// `asked` the index of each one written. Returns the messages' ids and when each was
/// written (database clock).
async fn ask(
    pool: &PgPool,
    conversations: &[Uuid],
    spread: Duration,
    asked: mpsc::UnboundedSender<usize>,
) -> anyhow::Result<(Vec<Uuid>, Vec<DateTime<Utc>>)> {
    let started = Instant::now();
    let mut messages = Vec::with_capacity(conversations.len());
    let mut written_at = Vec::with_capacity(conversations.len());
    for (index, conversation) in conversations.iter().enumerate() {
        let due = started + spread.mul_f64(index as f64 / conversations.len() as f64);
        tokio::time::sleep_until(due).await;
        let (id, at) = store::bench::post_message(pool, *conversation, &question(index)).await?;
        messages.push(id);
        written_at.push(at);
        // The watcher ends first only when the scenario is over.
        let _ = asked.send(index);
    }
    Ok((messages, written_at))
}

/// Looks, every `LOOK_INTERVAL` until `stop`, at the replies of the conversations asked
/// (indexes from `asked`) that showed no text yet; returns, for each conversation, when
/// the look that first saw its reply's text was sent (bench clock).
async fn first_texts(
    pool: PgPool,
    conversations: Vec<Uuid>,
    mut asked: mpsc::UnboundedReceiver<usize>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<Option<Instant>>> {
    let index_of: HashMap<Uuid, usize> = conversations
        .iter()
        .enumerate()
        .map(|(index, id)| (*id, index))
        .collect();
    let mut seen = vec![None; conversations.len()];
    let mut waiting: HashSet<usize> = HashSet::new();
    let mut unseen = conversations.len();
    while unseen > 0 && !stop.is_cancelled() {
        while let Ok(index) = asked.try_recv() {
            waiting.insert(index);
        }
        if !waiting.is_empty() {
            let ids: Vec<Uuid> = waiting.iter().map(|index| conversations[*index]).collect();
            let look = Instant::now();
            for id in store::bench::replies_with_text(&pool, &ids).await? {
                if let Some(index) = index_of.get(&id)
                    && waiting.remove(index)
                {
                    seen[*index] = Some(look);
                    unseen -= 1;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LOOK_INTERVAL) => {}
            _ = stop.cancelled() => {}
        }
    }
    Ok(seen)
}

/// The rows the replies wrote into `messages`: every insert and update the statistics
/// counted, less the `questions` inserted by the bench. `None` when the statistics have
/// not counted an insert for every question and reply within 10 s (they are off, or late).
async fn reply_row_writes(
    pool: &PgPool,
    questions: i64,
    replies: i64,
) -> anyhow::Result<Option<i64>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (inserted, updated) = store::bench::message_row_writes(pool).await?;
        if inserted >= questions + replies {
            return Ok(Some(inserted - questions + updated));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
