//! Conversations: claiming turns, reading a turn's history, writing its reply (streamed,
//! then final), and ending turns whose worker was lost (docs/conversations.md).
//!
//! Every reply write is fenced like any other write of a run: it succeeds only while the
//! worker holds the run's lease. The final write also ends the turn, so the conversation's
//! next turn may start, and wakes the replicas when messages are waiting for it.

use super::exec;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::StoreError;
use super::runs::Fenced;
use crate::conversation::{StoredMessage, bounded_attachments, turn_input};
use crate::domain::{ChatMessage, ChatRole, ClaimedRun, RunKind, Turn};

/// How turns are claimed (from `[conversations]`).
#[derive(Debug, Clone, Copy)]
pub struct TurnRules {
    pub debounce: Duration,
    pub debounce_max: Duration,
    /// Most user messages one turn covers.
    pub max_turn_messages: usize,
    /// A message arriving during a turn cancels it (`multitask = "interrupt"`).
    pub interrupt: bool,
}

/// When work is left that another replica's claim holds locked, how soon to look again.
pub const LOCKED_ELSEWHERE_RELOOK: Duration = Duration::from_millis(250);

/// What one claim did.
#[derive(Debug, Default)]
pub struct TurnClaim {
    pub runs: Vec<ClaimedRun>,
    /// Running turns this claim interrupted.
    pub interrupted: u64,
    /// When to look again, from now: a conversation waiting for its debounce becomes
    /// ready, or ready ones were locked by another claim (`None`: neither).
    pub next_ready: Option<Duration>,
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The debounce rule, in SQL: a waiting conversation is ready once no message arrived for
/// `$debounce` ms, or `$debounce_max` ms after the first one.
macro_rules! ready_at {
    ($debounce:literal, $debounce_max:literal) => {
        concat!(
            "least(w.last_at + ",
            $debounce,
            " * interval '1 millisecond', w.first_at + ",
            $debounce_max,
            " * interval '1 millisecond')"
        )
    };
}

/// Claims up to `limit` turns: conversations with unanswered user messages, ready by the
/// debounce rule and with no turn running, oldest first, users taking turns; each becomes a
/// running run leased to `worker_id`, covering up to `rules.max_turn_messages` of its
/// messages. In interrupt mode, running turns of conversations with new messages are asked
/// to stop first. One transaction; rows other replicas are claiming are skipped.
pub async fn claim_turns(
    pool: &PgPool,
    limit: usize,
    worker_id: &str,
    lease_ttl: Duration,
    rules: TurnRules,
) -> Result<TurnClaim, StoreError> {
    let mut transaction = pool.begin().await?;
    let mut claim = TurnClaim::default();
    if rules.interrupt {
        claim.interrupted = exec::query_scalar::<i64>(concat!(
            r#"
            WITH hit AS (
              SELECT t.run_id FROM agentd.waiting_conversations w
                JOIN agentd.turns t ON t.conversation_id = w.conversation_id
                                   AND NOT t.ended AND NOT t.interrupted
               WHERE "#,
            ready_at!("$1", "$2"),
            r#" <= clock_timestamp()
               FOR UPDATE OF t SKIP LOCKED
            ), marked AS (
              UPDATE agentd.turns t SET interrupted = true FROM hit h WHERE t.run_id = h.run_id
              RETURNING t.run_id
            ), asked AS (
              UPDATE agentd.leases l SET cancel_requested = true FROM marked m
               WHERE l.run_id = m.run_id
              RETURNING l.run_id
            )
            SELECT count(pg_notify('agentd_cancel', run_id::text)) FROM asked
            "#
        ))
        .bind(millis(rules.debounce))
        .bind(millis(rules.debounce_max))
        .fetch_one(&mut *transaction)
        .await? as u64;
    }
    let rows = exec::query(concat!(
        r#"
        WITH picked AS (
          SELECT w.conversation_id FROM agentd.waiting_conversations w
           WHERE "#,
        ready_at!("$2", "$3"),
        r#" <= clock_timestamp()
             AND NOT EXISTS (SELECT 1 FROM agentd.turns t
                              WHERE t.conversation_id = w.conversation_id AND NOT t.ended)
           ORDER BY w.rank, w.first_at
           LIMIT $1
           FOR UPDATE OF w SKIP LOCKED
        ), chosen AS (
          -- The oldest $4 of each conversation, read by index: a conversation flooded
          -- with messages costs the claim no more than any other.
          SELECT x.message_id FROM picked p
           CROSS JOIN LATERAL (SELECT u.message_id FROM agentd.unanswered u
                                WHERE u.conversation_id = p.conversation_id
                                ORDER BY u.arrived_at, u.message_id
                                LIMIT $4) x
        ), taken AS (
          DELETE FROM agentd.unanswered u USING chosen x
           WHERE u.message_id = x.message_id
          RETURNING u.message_id, u.conversation_id, u.arrived_at
        ), unqueued AS (
          -- A conversation with messages left over keeps its place: its next turn follows.
          DELETE FROM agentd.waiting_conversations w USING picked p
           WHERE w.conversation_id = p.conversation_id
             AND NOT EXISTS (SELECT 1 FROM agentd.unanswered u
                              WHERE u.conversation_id = p.conversation_id
                                AND NOT EXISTS (SELECT 1 FROM chosen x
                                                 WHERE x.message_id = u.message_id))
        )
        SELECT t.conversation_id, c.user_id, c.agent_id, a.user_id AS agent_owner,
               array_agg(t.message_id ORDER BY t.arrived_at, t.message_id) AS message_ids,
               greatest(extract(epoch FROM clock_timestamp() - min(t.arrived_at)), 0)::float8
                 AS waited
          FROM taken t
          JOIN public.conversations c ON c.id = t.conversation_id
          LEFT JOIN public.agents a ON a.id = c.agent_id
         GROUP BY t.conversation_id, c.user_id, c.agent_id, a.user_id
         ORDER BY min(t.arrived_at)
        "#
    ))
    .bind(limit as i64)
    .bind(millis(rules.debounce))
    .bind(millis(rules.debounce_max))
    .bind(rules.max_turn_messages as i64)
    .fetch_all(&mut *transaction)
    .await?;

    let mut run_ids = Vec::with_capacity(rows.len());
    let mut conversations = Vec::with_capacity(rows.len());
    let mut agents = Vec::with_capacity(rows.len());
    let mut users = Vec::with_capacity(rows.len());
    let mut inputs = Vec::with_capacity(rows.len());
    let mut replies = Vec::with_capacity(rows.len());
    let mut covered_messages = Vec::new();
    let mut covering_runs = Vec::new();
    for row in &rows {
        let conversation_id: Uuid = row.try_get("conversation_id")?;
        let user_id: Uuid = row.try_get("user_id")?;
        let agent_id: Uuid = row.try_get("agent_id")?;
        let agent_owner: Option<Uuid> = row.try_get("agent_owner")?;
        let message_ids: Vec<Uuid> = row.try_get("message_ids")?;
        let waited = Duration::from_secs_f64(row.try_get::<f64, _>("waited")?.clamp(0.0, 1e9));
        let (run_id, reply_id) = (Uuid::now_v7(), Uuid::now_v7());
        let input = turn_input(conversation_id, &message_ids);
        covered_messages.extend(message_ids.iter().copied());
        covering_runs.extend(std::iter::repeat_n(run_id, message_ids.len()));
        // The policies keep a user's conversation on their own agents; a row written
        // around them (by a service key, or before the policies) fails its turn.
        let defect = match agent_owner {
            Some(owner) if owner != user_id => Some(format!(
                "the conversation's agent {agent_id} belongs to another user; \
                 a conversation may only name its user's own agents"
            )),
            _ => None,
        };
        run_ids.push(run_id);
        conversations.push(conversation_id);
        agents.push(agent_id);
        users.push(user_id);
        inputs.push(sqlx::types::Json(input.clone()));
        replies.push(reply_id);
        claim.runs.push(ClaimedRun {
            run_id,
            kind: RunKind::Agent,
            target_id: agent_id,
            owner_id: user_id,
            input: Some(input),
            schedule_id: None,
            agent: None,
            defect,
            turn: Some(Turn {
                conversation_id,
                message_ids,
                reply_id,
                waited,
            }),
        });
    }
    if !run_ids.is_empty() {
        exec::query(
            r#"
            WITH x AS (
              SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::jsonb[],
                                   $6::uuid[]) AS x(run_id, conversation_id, agent_id, user_id,
                                                    input, reply_id)
            ), new_runs AS (
              INSERT INTO public.runs (id, type, target_id, status, start_time, triggered_by_id, input)
              SELECT run_id, 'agent', agent_id, 'running', now(), user_id, input FROM x
            ), new_leases AS (
              INSERT INTO agentd.leases (run_id, worker_id, expires_at)
              SELECT run_id, $7, now() + $8 * interval '1 millisecond' FROM x
            ), new_turns AS (
              INSERT INTO agentd.turns (run_id, conversation_id, reply_id)
              SELECT run_id, conversation_id, reply_id FROM x
            )
            INSERT INTO agentd.turn_messages (message_id, run_id)
            SELECT * FROM unnest($9::uuid[], $10::uuid[])
            "#,
        )
        .bind(&run_ids)
        .bind(&conversations)
        .bind(&agents)
        .bind(&users)
        .bind(&inputs)
        .bind(&replies)
        .bind(worker_id)
        .bind(millis(lease_ttl))
        .bind(&covered_messages)
        .bind(&covering_runs)
        .execute(&mut *transaction)
        .await?;
    }
    if claim.runs.len() < limit {
        // Ready conversations this claim did not take were locked by another replica's
        // claim, which may never commit (its replica died mid-claim): no notification
        // would say so, so the caller looks again soon.
        let skipped: bool = exec::query_scalar(concat!(
            "SELECT EXISTS (SELECT 1 FROM agentd.waiting_conversations w WHERE ",
            ready_at!("$1", "$2"),
            r#" <= clock_timestamp()
                 AND NOT EXISTS (SELECT 1 FROM agentd.turns t
                                  WHERE t.conversation_id = w.conversation_id AND NOT t.ended))"#
        ))
        .bind(millis(rules.debounce))
        .bind(millis(rules.debounce_max))
        .fetch_one(&mut *transaction)
        .await?;
        if skipped {
            claim.next_ready = Some(LOCKED_ELSEWHERE_RELOOK);
        }
    }
    if !rules.debounce.is_zero() && claim.runs.len() < limit {
        let seconds: Option<f64> = exec::query_scalar(concat!(
            "SELECT extract(epoch FROM min(",
            ready_at!("$1", "$2"),
            r#") - clock_timestamp())::float8
              FROM agentd.waiting_conversations w
             WHERE NOT EXISTS (SELECT 1 FROM agentd.turns t
                                WHERE t.conversation_id = w.conversation_id AND NOT t.ended)"#
        ))
        .bind(millis(rules.debounce))
        .bind(millis(rules.debounce_max))
        .fetch_one(&mut *transaction)
        .await?;
        let ready = seconds.map(|seconds| Duration::from_secs_f64(seconds.max(0.0)));
        claim.next_ready = match (claim.next_ready, ready) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    transaction.commit().await?;
    Ok(claim)
}

/// Rows of a conversation looked at beyond `history_messages` when reading its history:
/// room for messages waiting for later turns (skipped) without reading a flood of them.
pub const HISTORY_SCAN_SLACK: usize = 1000;

/// A turn's history as stored, oldest first: the turn's own messages and up to
/// `max_messages` others before them (not the messages waiting for a later turn, not the
/// turn's own reply), among the newest `max_messages` + [`HISTORY_SCAN_SLACK`] rows. A
/// message over `max_bytes` by itself is not read, unless the turn covers it; then only its
/// last `max_bytes` characters are.
pub async fn load_history(
    pool: &PgPool,
    turn: &Turn,
    max_messages: usize,
    max_bytes: usize,
) -> Result<Vec<StoredMessage>, StoreError> {
    let rows = exec::query(
        r#"
        WITH own AS (
          SELECT m.* FROM public.messages m
           WHERE m.id = ANY($2) AND m.conversation_id = $1
        ), others AS (
          -- The newest messages but those waiting for a later turn; at most $7 rows are
          -- looked at, so a flood of waiting messages cannot make this read long.
          SELECT r.* FROM (SELECT m.* FROM public.messages m
                            WHERE m.conversation_id = $1
                            ORDER BY m.created_at DESC, m.id DESC
                            LIMIT $7) r
           WHERE r.id <> $3 AND NOT (r.id = ANY($2))
             AND NOT EXISTS (SELECT 1 FROM agentd.unanswered u WHERE u.message_id = r.id)
           ORDER BY r.created_at DESC, r.id DESC
           LIMIT $4
        ), history AS (
          SELECT true AS own, * FROM own UNION ALL SELECT false, * FROM others
        )
        SELECT h.id, h.own, h.sender_type, octet_length(h.content) AS bytes,
               CASE WHEN h.own THEN right(h.content, $5)
                    WHEN octet_length(h.content) <= $5 THEN h.content
                    ELSE '' END AS content,
               octet_length(h.attachments::text) AS attachment_bytes,
               CASE WHEN octet_length(h.attachments::text) <= $6 THEN h.attachments::text END
                 AS attachments,
               agentd.usable_time(h.created_at) AS created_at
          FROM history h
         ORDER BY h.created_at, h.id
        "#,
    )
    .bind(turn.conversation_id)
    .bind(&turn.message_ids)
    .bind(turn.reply_id)
    .bind(max_messages as i64)
    .bind(max_bytes.min(i32::MAX as usize) as i32)
    .bind(crate::conversation::MAX_ATTACHMENTS_BYTES as i32)
    .bind((max_messages + HISTORY_SCAN_SLACK) as i64)
    .fetch_all(exec::on(pool))
    .await?;
    rows.iter()
        .map(|row| {
            let sender: &str = row.try_get("sender_type")?;
            let attachment_bytes: Option<i32> = row.try_get("attachment_bytes")?;
            let attachments: Option<&str> = row.try_get("attachments")?;
            let attachments = match (attachments, attachment_bytes) {
                (_, None) => None,
                (json, Some(bytes)) => {
                    bounded_attachments(Some(json.unwrap_or("{}")), bytes.max(0) as usize)
                }
            };
            Ok(StoredMessage {
                message: ChatMessage {
                    id: row.try_get("id")?,
                    role: if sender == "agent" {
                        ChatRole::Assistant
                    } else {
                        ChatRole::User
                    },
                    content: row.try_get("content")?,
                    attachments,
                    created_at: row.try_get("created_at")?,
                },
                bytes: row.try_get::<i32, _>("bytes")?.max(0) as usize,
                own: row.try_get("own")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// The text of a streaming reply, for one turn.
#[derive(Debug, Clone)]
pub struct ReplyText {
    pub run_id: Uuid,
    pub content: String,
}

/// Writes the text of several streaming replies in one statement (inserting a reply on
/// its first write), each only while `worker_id` holds its run's lease and its turn runs.
pub async fn write_replies(
    pool: &PgPool,
    worker_id: &str,
    replies: &[ReplyText],
) -> Result<Vec<Fenced>, StoreError> {
    let runs: Vec<Uuid> = replies.iter().map(|reply| reply.run_id).collect();
    let texts: Vec<&str> = replies.iter().map(|reply| reply.content.as_str()).collect();
    let written: Vec<Uuid> = exec::query_scalar(
        r#"
        INSERT INTO public.messages (id, conversation_id, content, sender_type, attachments)
        SELECT t.reply_id, t.conversation_id, x.content, 'agent',
               jsonb_build_object('run_id', t.run_id, 'status', 'streaming',
                                  'artifacts', '[]'::jsonb)
          FROM unnest($1::uuid[], $2::text[]) AS x(run_id, content)
          JOIN agentd.turns t ON t.run_id = x.run_id AND NOT t.ended
          JOIN agentd.leases l ON l.run_id = x.run_id AND l.worker_id = $3
                              AND l.expires_at > now()
         WHERE EXISTS (SELECT 1 FROM public.conversations c WHERE c.id = t.conversation_id)
        ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content
        RETURNING (attachments ->> 'run_id')::uuid
        "#,
    )
    .bind(&runs)
    .bind(&texts)
    .bind(worker_id)
    .fetch_all(exec::on(pool))
    .await?;
    Ok(runs
        .iter()
        .map(|run_id| {
            if written.contains(run_id) {
                Fenced::Written
            } else {
                Fenced::LeaseLost
            }
        })
        .collect())
}

/// The conversation of a final reply (CTE `reply`: its `conversation_id`, `created_at`,
/// `content`) moves on: `last_message` (cut to the characters in parameter `$n`) and
/// `last_message_time` only forwards, `updated_at` to now.
macro_rules! moved_conversations {
    ($n:literal) => {
        concat!(
            r#"moved AS (
          UPDATE public.conversations c
             SET last_message = CASE WHEN c.last_message_time IS NULL OR c.last_message_time <= r.created_at
                                     THEN left(r.content, "#,
            $n,
            r#") ELSE c.last_message END,
                 last_message_time = CASE WHEN c.last_message_time IS NULL OR c.last_message_time <= r.created_at
                                          THEN r.created_at ELSE c.last_message_time END,
                 updated_at = now()
            FROM reply r WHERE c.id = r.conversation_id
          RETURNING c.id
        )"#
        )
    };
}

/// A turn's reply, final.
#[derive(Debug, Clone)]
pub struct FinalReply {
    pub run_id: Uuid,
    pub content: String,
    /// `completed`, `failed` or `cancelled` (`interrupted` when the turn was interrupted).
    pub status: &'static str,
    pub error: Option<String>,
}

/// What writing a final reply found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyEnd {
    /// Written (or the conversation is gone); `interrupted`: a newer message stopped it.
    Ended { interrupted: bool },
    /// The lease is gone: the turn is no longer this worker's.
    LeaseLost,
}

/// Writes a turn's final reply with its artifacts and status, ends the turn, moves the
/// conversation's `last_message` forward, and wakes the replicas when messages wait for
/// the conversation's next turn; one statement, fenced by the lease.
pub async fn finish_reply(
    pool: &PgPool,
    worker_id: &str,
    reply: &FinalReply,
) -> Result<ReplyEnd, StoreError> {
    let row = exec::query(concat!(
        r#"
        WITH lease AS (
          SELECT run_id FROM agentd.leases
           WHERE run_id = $1 AND worker_id = $2 AND expires_at > now()
           FOR UPDATE
        ), turn AS (
          UPDATE agentd.turns t SET ended = true FROM lease
           WHERE t.run_id = lease.run_id AND NOT t.ended
          RETURNING t.run_id, t.conversation_id, t.reply_id, t.interrupted
        ), artifacts AS (
          SELECT coalesce(jsonb_agg(jsonb_build_object('name', a.name, 'url', a.url,
                                                       'type', a.type, 'size', a.size)
                                    ORDER BY a.created_at, a.id), '[]'::jsonb) AS list
            FROM public.run_artifacts a WHERE a.run_id = $1
        ), reply AS (
          INSERT INTO public.messages (id, conversation_id, content, sender_type, attachments)
          SELECT t.reply_id, t.conversation_id, $3::text, 'agent',
                 jsonb_build_object('run_id', t.run_id,
                                    'status', CASE WHEN t.interrupted AND $4::text = 'cancelled'
                                                   THEN 'interrupted' ELSE $4::text END,
                                    'artifacts', artifacts.list)
                 || CASE WHEN $5::text IS NULL THEN '{}'::jsonb
                         ELSE jsonb_build_object('error', $5::text) END
            FROM turn t, artifacts
           WHERE EXISTS (SELECT 1 FROM public.conversations c WHERE c.id = t.conversation_id)
          ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content, attachments = EXCLUDED.attachments
          RETURNING id, conversation_id, created_at, content
        ), "#,
            moved_conversations!("$6"),
            r#", woken AS (
          SELECT pg_notify('agentd_messages', '') FROM turn t
           WHERE EXISTS (SELECT 1 FROM agentd.waiting_conversations w
                          WHERE w.conversation_id = t.conversation_id)
        )
        SELECT t.interrupted, (SELECT count(*) FROM woken) AS woken,
               (SELECT count(*) FROM moved) AS moved
          FROM turn t
        "#
    ))
    .bind(reply.run_id)
    .bind(worker_id)
    .bind(&reply.content)
    .bind(reply.status)
    .bind(reply.error.as_deref())
    .bind(crate::conversation::LAST_MESSAGE_CHARS as i32)
    .fetch_optional(exec::on(pool))
    .await?;
    match row {
        Some(row) => Ok(ReplyEnd::Ended {
            interrupted: row.try_get("interrupted")?,
        }),
        None => Ok(ReplyEnd::LeaseLost),
    }
}

/// Ends up to `limit` turns whose run lost its lease before its reply was final (the
/// worker died, or was cut off and reaped): each reply keeps the text it had and says
/// `failed` with the run's error. Returns how many it ended.
pub async fn end_orphaned_turns(pool: &PgPool, limit: usize) -> Result<u64, StoreError> {
    let ended: i64 = exec::query_scalar(concat!(
        r#"
        WITH orphans AS (
          SELECT t.run_id FROM agentd.turns t
           WHERE NOT t.ended
             AND NOT EXISTS (SELECT 1 FROM agentd.leases l WHERE l.run_id = t.run_id)
           LIMIT $1
           FOR UPDATE SKIP LOCKED
        ), ended AS (
          UPDATE agentd.turns t SET ended = true FROM orphans o WHERE t.run_id = o.run_id
          RETURNING t.run_id, t.conversation_id, t.reply_id
        ), reply AS (
          INSERT INTO public.messages (id, conversation_id, content, sender_type, attachments)
          SELECT e.reply_id, e.conversation_id, '', 'agent',
                 jsonb_build_object('run_id', e.run_id, 'status', 'failed',
                                    'artifacts', '[]'::jsonb,
                                    'error', coalesce(r.error, 'worker lost: the turn ended without its reply'))
            FROM ended e LEFT JOIN public.runs r ON r.id = e.run_id
           WHERE EXISTS (SELECT 1 FROM public.conversations c WHERE c.id = e.conversation_id)
          ON CONFLICT (id) DO UPDATE SET attachments = EXCLUDED.attachments
          RETURNING id, conversation_id, created_at, content
        ), "#,
            moved_conversations!("$2"),
            r#", woken AS (
          SELECT pg_notify('agentd_messages', '') FROM ended e
           WHERE EXISTS (SELECT 1 FROM agentd.waiting_conversations w
                          WHERE w.conversation_id = e.conversation_id)
           LIMIT 1
        )
        SELECT count(*) + 0 * (SELECT count(*) FROM woken) + 0 * (SELECT count(*) FROM moved)
          FROM ended
        "#
    ))
    .bind(limit as i64)
    .bind(crate::conversation::LAST_MESSAGE_CHARS as i32)
    .fetch_one(exec::on(pool))
    .await?;
    Ok(ended.max(0) as u64)
}

/// A conversation `agentd chat` may write to: its user, when it exists and talks to
/// `agent_id`.
pub async fn conversation_user(
    pool: &PgPool,
    conversation_id: Uuid,
    agent_id: Uuid,
) -> Result<Option<Uuid>, StoreError> {
    Ok(exec::query_scalar(
        "SELECT user_id FROM public.conversations WHERE id = $1 AND agent_id = $2",
    )
    .bind(conversation_id)
    .bind(agent_id)
    .fetch_optional(exec::on(pool))
    .await?)
}

/// A new conversation of the agent's owner with the agent (`None`: no such agent).
pub async fn start_conversation(
    pool: &PgPool,
    agent_id: Uuid,
    title: &str,
) -> Result<Option<(Uuid, Uuid)>, StoreError> {
    let row = exec::query(
        r#"
        INSERT INTO public.conversations (user_id, agent_id, title)
        SELECT a.user_id, a.id, $2 FROM public.agents a WHERE a.id = $1
        RETURNING id, user_id
        "#,
    )
    .bind(agent_id)
    .bind(title)
    .fetch_optional(exec::on(pool))
    .await?;
    row.map(|row| Ok((row.try_get("id")?, row.try_get("user_id")?)))
        .transpose()
        .map_err(|error: sqlx::Error| StoreError::from(error))
}

/// Writes a user message into a conversation, as the application does; returns its id.
pub async fn post_user_message(
    pool: &PgPool,
    conversation_id: Uuid,
    content: &str,
) -> Result<Uuid, StoreError> {
    Ok(exec::query_scalar(
        "INSERT INTO public.messages (conversation_id, content, sender_type) \
         VALUES ($1, $2, 'user') RETURNING id",
    )
    .bind(conversation_id)
    .bind(content)
    .fetch_one(exec::on(pool))
    .await?)
}

/// The reply to a user message as it stands: its text and `attachments` (`None`: no turn
/// has shown text for it yet).
pub async fn reply_to(
    pool: &PgPool,
    message_id: Uuid,
) -> Result<Option<(String, serde_json::Value)>, StoreError> {
    let row = exec::query(
        r#"
        SELECT m.content, coalesce(m.attachments, '{}'::jsonb) AS attachments
          FROM agentd.turn_messages tm
          JOIN agentd.turns t ON t.run_id = tm.run_id
          JOIN public.messages m ON m.id = t.reply_id
         WHERE tm.message_id = $1
        "#,
    )
    .bind(message_id)
    .fetch_optional(exec::on(pool))
    .await?;
    row.map(|row| Ok((row.try_get("content")?, row.try_get("attachments")?)))
        .transpose()
        .map_err(|error: sqlx::Error| StoreError::from(error))
}
