//! Conversations (docs/conversations.md): agentd answers user messages with one streamed
//! reply per turn, against a real PostgreSQL, with workers in this process (the library's
//! real services) and real `agentd` processes.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd::executor::{BoxFuture, Executor, Outcome, RunContext};
use serde_json::{Value, json};
use sqlx::PgPool;
use support::{
    InProcessWorker, TestDb, as_user, count, create_agent, create_user, eventually, execute_script,
};
use uuid::Uuid;

/// A conversation of a new user with a new agent of theirs.
async fn new_conversation(pool: &PgPool) -> (Uuid, Uuid, Uuid) {
    let user = create_user(pool).await;
    let agent = create_agent(pool, user).await;
    let conversation: Uuid = sqlx::query_scalar(
        "INSERT INTO conversations (user_id, agent_id, title) VALUES ($1, $2, 'chat') RETURNING id",
    )
    .bind(user)
    .bind(agent)
    .fetch_one(pool)
    .await
    .unwrap();
    (user, agent, conversation)
}

/// A user message, written as the application writes it: as the signed-in user.
async fn say(pool: &PgPool, user: Uuid, conversation: Uuid, text: &str) -> Uuid {
    as_user::<Uuid>(
        pool,
        user,
        &format!(
            "INSERT INTO messages (conversation_id, content, sender_type) \
             VALUES ('{conversation}', {}, 'user') RETURNING id",
            quote(text)
        ),
    )
    .await
    .unwrap()
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A conversation's replies, oldest first: (content, attachments).
async fn replies(pool: &PgPool, conversation: Uuid) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT content, coalesce(attachments, 'null'::jsonb) FROM messages \
          WHERE conversation_id = $1 AND sender_type = 'agent' ORDER BY created_at, id",
    )
    .bind(conversation)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn final_replies(pool: &PgPool, conversation: Uuid, n: usize) -> Vec<(String, Value)> {
    eventually(Duration::from_secs(20), "the replies are final", || async {
        let replies = replies(pool, conversation).await;
        replies.len() >= n && replies.iter().all(|(_, a)| a["status"] != "streaming")
    })
    .await;
    replies(pool, conversation).await
}

/// The turns' runs of a conversation, oldest first: (status, error, input).
async fn turn_runs(pool: &PgPool, conversation: Uuid) -> Vec<(String, Option<String>, Value)> {
    sqlx::query_as(
        "SELECT status, error, input FROM runs \
          WHERE input->>'conversation_id' = $1::text ORDER BY start_time, id",
    )
    .bind(conversation)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// An executor that records what it was given and streams `chunks` into the reply, one
/// every `pause`.
struct Chatty {
    chunks: Vec<String>,
    pause: Duration,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Chatty {
    fn new(chunks: &[&str], pause: Duration) -> (Arc<Chatty>, Arc<Mutex<Vec<Value>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        (
            Arc::new(Chatty {
                chunks: chunks.iter().map(|c| c.to_string()).collect(),
                pause,
                seen: seen.clone(),
            }),
            seen,
        )
    }
}

impl Executor for Chatty {
    fn name(&self) -> &'static str {
        "chatty"
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            self.seen.lock().unwrap().push(json!({
                "input": run.run.input,
                "conversation": run.conversation,
            }));
            for chunk in &self.chunks {
                tokio::time::sleep(self.pause).await;
                run.reply.push(chunk);
            }
            Outcome::Completed {
                output: json!({"text": self.chunks.concat()}),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_builtin_executor_answers_a_message_once_and_moves_the_conversation_on() {
    let db = TestDb::migrated().await;
    let (user, agent, conversation) = new_conversation(&db.pool).await;
    let artifacts = tempfile::tempdir().unwrap();
    let dir = artifacts.path().to_string_lossy().to_string();
    let worker =
        InProcessWorker::start_configured(&db, "w1", &[("AGENTD__ARTIFACTS__DIR", &dir)]).await;
    let asked = say(&db.pool, user, conversation, "What is the weather?").await;
    let replies = final_replies(&db.pool, conversation, 1).await;
    worker.stop().await;

    assert_eq!(replies.len(), 1);
    let (content, attachments) = &replies[0];
    assert!(content.contains("Say hello"), "{content}");
    assert!(content.contains("What is the weather?"), "{content}");
    assert_eq!(attachments["status"], "completed", "{attachments}");
    assert!(attachments.get("error").is_none());
    let listed = attachments["artifacts"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{attachments}");
    assert_eq!(listed[0]["name"], "result.md");

    let runs = turn_runs(&db.pool, conversation).await;
    assert_eq!(runs.len(), 1);
    let (status, _, input) = &runs[0];
    assert_eq!(status, "completed");
    assert_eq!(input["trigger"], "message");
    assert_eq!(input["message_ids"], json!([asked]));
    let (run_id, target, triggered_by): (Uuid, Uuid, Uuid) = sqlx::query_as(
        "SELECT id, target_id, triggered_by_id FROM runs WHERE input->>'conversation_id' = $1::text",
    )
    .bind(conversation)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((target, triggered_by), (agent, user));
    assert_eq!(attachments["run_id"], json!(run_id));

    let (last_message, last_time, reply_time): (
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "SELECT c.last_message, c.last_message_time, m.created_at FROM conversations c \
               JOIN messages m ON m.conversation_id = c.id AND m.sender_type = 'agent' \
              WHERE c.id = $1",
    )
    .bind(conversation)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(&last_message, content);
    assert_eq!(last_time, reply_time);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_streams_into_its_row_and_messages_sent_meanwhile_are_answered_together() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let chunks: Vec<String> = (0..20).map(|i| format!("w{i} ")).collect();
    let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (executor, seen) = Chatty::new(&chunks, Duration::from_millis(100));
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[("AGENTD__CONVERSATIONS__STREAM_INTERVAL", "100ms")],
        executor,
    )
    .await;
    let first = say(&db.pool, user, conversation, "first").await;
    // The reply grows while the turn runs: seen with part of its text, streaming.
    eventually(Duration::from_secs(10), "a partial reply", || async {
        replies(&db.pool, conversation)
            .await
            .iter()
            .any(|(content, a)| {
                a["status"] == "streaming" && !content.is_empty() && content.len() < 60
            })
    })
    .await;
    // Double texting while the turn runs: answered once, by the next turn.
    let second = say(&db.pool, user, conversation, "second").await;
    let third = say(&db.pool, user, conversation, "third").await;
    let replies = final_replies(&db.pool, conversation, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;

    assert_eq!(replies.len(), 2, "{replies:?}");
    for (content, attachments) in &replies {
        assert_eq!(content, &chunks.concat());
        assert_eq!(attachments["status"], "completed");
    }
    let runs = turn_runs(&db.pool, conversation).await;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].2["message_ids"], json!([first]));
    assert_eq!(runs[1].2["message_ids"], json!([second, third]));
    // The second turn's history: both earlier messages, the first reply, and its own two.
    let seen = seen.lock().unwrap();
    let history = seen[1]["conversation"]["messages"]
        .as_array()
        .unwrap()
        .clone();
    let roles: Vec<&str> = history
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "user"]);
    assert_eq!(history[3]["content"], "third");
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupt_stops_the_running_turn_and_keeps_its_text() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let chunks: Vec<String> = (0..100).map(|i| format!("t{i} ")).collect();
    let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (executor, _) = Chatty::new(&chunks, Duration::from_millis(50));
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[
            ("AGENTD__CONVERSATIONS__MULTITASK", "interrupt"),
            ("AGENTD__CONVERSATIONS__STREAM_INTERVAL", "50ms"),
        ],
        executor,
    )
    .await;
    say(&db.pool, user, conversation, "tell me a long story").await;
    eventually(Duration::from_secs(10), "some text", || async {
        replies(&db.pool, conversation)
            .await
            .iter()
            .any(|(content, _)| !content.is_empty())
    })
    .await;
    let newer = say(&db.pool, user, conversation, "stop, something else").await;
    let replies = final_replies(&db.pool, conversation, 2).await;
    worker.stop().await;

    assert_eq!(replies.len(), 2, "{replies:?}");
    let (partial, attachments) = &replies[0];
    assert_eq!(attachments["status"], "interrupted", "{attachments}");
    assert!(!partial.is_empty() && partial.len() < chunks.concat().len());
    assert_eq!(replies[1].1["status"], "completed");
    let runs = turn_runs(&db.pool, conversation).await;
    assert_eq!(runs[0].0, "failed");
    assert!(
        runs[0].1.as_deref().unwrap().starts_with("interrupted"),
        "{runs:?}"
    );
    assert_eq!(runs[1].2["message_ids"], json!([newer]));
}

/// An interruption that comes too late to stop anything (the turn's executor already
/// finished, its reply complete) leaves a completed turn: the run and its reply agree.
#[tokio::test(flavor = "multi_thread")]
async fn an_interruption_after_the_reply_was_complete_leaves_the_turn_completed() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let (executor, _) = Chatty::new(&["one ", "two ", "three"], Duration::from_millis(300));
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[("AGENTD__CONVERSATIONS__MULTITASK", "interrupt")],
        executor,
    )
    .await;
    say(&db.pool, user, conversation, "count to three").await;
    eventually(Duration::from_secs(10), "the turn runs", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM agentd.turns WHERE NOT ended",
        )
        .await
            == 1
    })
    .await;
    // What a newer message's claim writes; here without the cancellation it would send, as
    // when the claim comes after the executor's last chunk and before the final write.
    sqlx::query("UPDATE agentd.turns SET interrupted = true WHERE NOT ended")
        .execute(&db.pool)
        .await
        .unwrap();
    let replies = final_replies(&db.pool, conversation, 1).await;
    eventually(Duration::from_secs(10), "the turn's run ended", || async {
        turn_runs(&db.pool, conversation).await[0].0 != "running"
    })
    .await;
    let runs = turn_runs(&db.pool, conversation).await;
    worker.stop().await;

    assert_eq!(replies[0].0, "one two three");
    assert_eq!(replies[0].1["status"], "completed", "{replies:?}");
    assert_eq!(
        (runs[0].0.as_str(), runs[0].1.as_deref()),
        ("completed", None),
        "{runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn debounce_waits_for_the_user_to_stop_typing() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let (executor, _) = Chatty::new(&["ok"], Duration::ZERO);
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[("AGENTD__CONVERSATIONS__DEBOUNCE", "700ms")],
        executor,
    )
    .await;
    let mut said = Vec::new();
    for text in ["one", "two", "three"] {
        said.push(say(&db.pool, user, conversation, text).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let replies = final_replies(&db.pool, conversation, 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    worker.stop().await;
    assert_eq!(replies.len(), 1);
    let runs = turn_runs(&db.pool, conversation).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].2["message_ids"], json!(said));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_history_is_cut_to_the_budget_but_keeps_the_turns_own_messages() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    // Earlier history, answered before (written by the worker's role, as replies are).
    for i in 0..10 {
        sqlx::query(
            "INSERT INTO messages (conversation_id, content, sender_type, created_at) \
             VALUES ($1, $2, $3, now() - interval '1 hour' + $4 * interval '1 second')",
        )
        .bind(conversation)
        .bind(format!("old {i}"))
        .bind(if i % 2 == 0 { "user" } else { "agent" })
        .bind(i)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // Those were never a turn's: the ones the trigger queued are dropped here.
    sqlx::query("DELETE FROM agentd.unanswered")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM agentd.waiting_conversations")
        .execute(&db.pool)
        .await
        .unwrap();
    let (executor, seen) = Chatty::new(&["ok"], Duration::ZERO);
    let worker = InProcessWorker::start(
        &db,
        "w1",
        &[
            ("AGENTD__CONVERSATIONS__HISTORY_MESSAGES", "4"),
            ("AGENTD__CONVERSATIONS__HISTORY_BYTES", "2000"),
        ],
        executor,
    )
    .await;
    let big = "x".repeat(5000) + "THE END";
    say(&db.pool, user, conversation, "short question").await;
    final_replies(&db.pool, conversation, 6).await;
    say(&db.pool, user, conversation, &big).await;
    final_replies(&db.pool, conversation, 7).await;
    worker.stop().await;

    let seen = seen.lock().unwrap();
    let first = seen[0]["conversation"]["messages"].as_array().unwrap();
    let texts: Vec<&str> = first
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["old 7", "old 8", "old 9", "short question"]);
    // Its own message alone is over the budget: only its end is kept, and nothing else.
    let second = seen[1]["conversation"]["messages"].as_array().unwrap();
    assert_eq!(second.len(), 1);
    let text = second[0]["content"].as_str().unwrap();
    assert_eq!(text.len(), 2000);
    assert!(text.ends_with("THE END"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_turn_and_a_failed_turn_still_leave_a_reply_that_says_so() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let chunks: Vec<String> = (0..100).map(|i| format!("c{i} ")).collect();
    let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (executor, _) = Chatty::new(&chunks, Duration::from_millis(50));
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    say(&db.pool, user, conversation, "go on").await;
    eventually(Duration::from_secs(10), "the turn runs", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'running'",
        )
        .await
            == 1
    })
    .await;
    let run_id: Uuid = sqlx::query_scalar("SELECT id FROM runs WHERE status = 'running'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let cancelled: bool = as_user(&db.pool, user, &format!("SELECT cancel_run('{run_id}')"))
        .await
        .unwrap();
    assert!(cancelled);
    let replies = final_replies(&db.pool, conversation, 1).await;
    worker.stop().await;
    assert_eq!(replies[0].1["status"], "cancelled", "{:?}", replies[0]);
    assert!(replies[0].1.get("error").is_none());

    // An agent owned by someone else (written around the policies): the turn fails, and
    // its reply says why, with no text.
    let stranger = create_user(&db.pool).await;
    let foreign = create_agent(&db.pool, stranger).await;
    sqlx::query("UPDATE conversations SET agent_id = $2 WHERE id = $1")
        .bind(conversation)
        .bind(foreign)
        .execute(&db.pool)
        .await
        .unwrap();
    let (executor, seen) = Chatty::new(&["never"], Duration::ZERO);
    let worker = InProcessWorker::start(&db, "w2", &[], executor).await;
    say(&db.pool, user, conversation, "and now?").await;
    let replies = final_replies(&db.pool, conversation, 2).await;
    worker.stop().await;
    let (content, attachments) = &replies[1];
    assert_eq!(content, "");
    assert_eq!(attachments["status"], "failed");
    assert!(
        attachments["error"]
            .as_str()
            .unwrap()
            .contains("belongs to another user"),
        "{attachments}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the foreign agent ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_written_before_adoption_are_history_not_questions() {
    let db = TestDb::new().await;
    execute_script(&db.pool, support::SUPABASE_PLATFORM).await;
    execute_script(&db.pool, include_str!("fixtures/application_schema.sql")).await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    for text in ["years", "of", "history"] {
        sqlx::query(
            "INSERT INTO messages (conversation_id, content, sender_type) VALUES ($1, $2, 'user')",
        )
        .bind(conversation)
        .bind(text)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    agentd::store::migrate(&db.pool).await.unwrap();
    let (executor, seen) = Chatty::new(&["hi"], Duration::ZERO);
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    let asked = say(&db.pool, user, conversation, "new question").await;
    let replies = final_replies(&db.pool, conversation, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    assert_eq!(replies.len(), 1);
    let runs = turn_runs(&db.pool, conversation).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].2["message_ids"], json!([asked]));
    // The old messages are the new question's history.
    let history = seen.lock().unwrap()[0]["conversation"]["messages"].clone();
    assert_eq!(history.as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn users_write_only_user_messages_into_their_own_conversations() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let (other, _, others_conversation) = new_conversation(&db.pool).await;
    // An agent message: refused by the policies (SQLSTATE 42501).
    let forged = as_user::<Uuid>(
        &db.pool,
        user,
        &format!(
            "INSERT INTO messages (conversation_id, content, sender_type) \
             VALUES ('{conversation}', 'I am the agent', 'agent') RETURNING id"
        ),
    )
    .await;
    assert_eq!(support::refusal(&forged, "an agent message").0, "42501");
    // Into someone else's conversation: refused too.
    let intruding = as_user::<Uuid>(
        &db.pool,
        user,
        &format!(
            "INSERT INTO messages (conversation_id, content, sender_type) \
             VALUES ('{others_conversation}', 'hi', 'user') RETURNING id"
        ),
    )
    .await;
    assert_eq!(
        support::refusal(&intruding, "another user's conversation").0,
        "42501"
    );
    // A reply cannot be changed, nor turned into a user message.
    let reply: Uuid = sqlx::query_scalar(
        "INSERT INTO messages (conversation_id, content, sender_type) \
         VALUES ($1, 'an answer', 'agent') RETURNING id",
    )
    .bind(conversation)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let changed: i64 = as_user(
        &db.pool,
        user,
        &format!(
            "WITH c AS (UPDATE messages SET content = 'forged', sender_type = 'user' \
              WHERE id = '{reply}' RETURNING 1) SELECT count(*) FROM c"
        ),
    )
    .await
    .unwrap();
    assert_eq!(changed, 0);
    // A user message cannot become an agent message.
    let own = say(&db.pool, user, conversation, "mine").await;
    let turned = as_user::<i64>(
        &db.pool,
        user,
        &format!(
            "WITH c AS (UPDATE messages SET sender_type = 'agent' WHERE id = '{own}' RETURNING 1) \
             SELECT count(*) FROM c"
        ),
    )
    .await;
    assert_eq!(
        support::refusal(&turned, "a user message turned agent").0,
        "42501"
    );
    // Nobody sees another user's messages.
    let visible: i64 = as_user(
        &db.pool,
        other,
        &format!("SELECT count(*) FROM messages WHERE conversation_id = '{conversation}'"),
    )
    .await
    .unwrap();
    assert_eq!(visible, 0);
    // And the queue is out of users' reach.
    let queue = as_user::<i64>(&db.pool, user, "SELECT count(*) FROM agentd.unanswered").await;
    assert_eq!(support::refusal(&queue, "the queue").0, "42501");
}

/// An OpenAI-compatible server on 127.0.0.1 that streams `chunks` pieces of text, one every
/// `pause`, to every request; returns its base URL and the requests it got.
async fn slow_model(chunks: usize, pause: Duration) -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::body::{Body, Bytes};
    use axum::routing::post;
    use futures_util::StreamExt;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let counted = calls.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |body: Bytes| {
            let counted = counted.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                counted.lock().unwrap().push(request);
                let mut events: Vec<String> = (0..chunks)
                    .map(|i| {
                        format!(
                            "data: {}\n\n",
                            json!({"choices": [{"delta": {"content": format!("c{i} ")}}]})
                        )
                    })
                    .collect();
                events.push(format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})
                ));
                let stream = futures_util::stream::iter(events).then(move |event| async move {
                    tokio::time::sleep(pause).await;
                    Ok::<_, std::io::Error>(Bytes::from(event))
                });
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(stream))
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{address}/v1"), calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_answer_each_message_once_even_when_one_is_killed_mid_stream() {
    use nix::sys::signal::Signal;
    let db = TestDb::migrated().await;
    let (model, calls) = slow_model(50, Duration::from_millis(100)).await;
    let settings = [
        ("AGENTD__EXECUTION__DEFAULT", "openai"),
        ("AGENTD__EXECUTORS__OPENAI__BASE_URL", model.as_str()),
        ("AGENTD__EXECUTORS__OPENAI__API_KEY_ENV", "TEST_MODEL_KEY"),
        ("TEST_MODEL_KEY", "sk-test"),
        ("AGENTD__LEASE__TTL", "3s"),
        ("AGENTD__LOGGING__LEVEL", "info"),
    ];
    let mut replicas: Vec<support::Daemon> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| support::replica(&db.url, id, &settings))
        .collect();
    for replica in replicas.iter_mut() {
        replica.wait_for("worker started", Duration::from_secs(30));
    }
    let mut conversations = Vec::new();
    for i in 0..30 {
        let (user, _, conversation) = new_conversation(&db.pool).await;
        let asked = say(&db.pool, user, conversation, &format!("stream to me {i}")).await;
        conversations.push((user, conversation, asked));
    }
    // Kill the replica answering the first conversation while its reply streams.
    eventually(Duration::from_secs(20), "a reply streaming", || async {
        count(
            &db.pool,
            &format!(
                "SELECT count(*) FROM messages WHERE conversation_id = '{}' \
                   AND sender_type = 'agent' AND content <> ''",
                conversations[0].1
            ),
        )
        .await
            == 1
    })
    .await;
    let holder: String = sqlx::query_scalar(
        "SELECT l.worker_id FROM agentd.leases l JOIN agentd.turns t ON t.run_id = l.run_id \
          WHERE t.conversation_id = $1",
    )
    .bind(conversations[0].1)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let victim = ["r1", "r2", "r3"]
        .iter()
        .position(|id| *id == holder)
        .unwrap();
    replicas[victim].signal(Signal::SIGKILL);
    replicas[victim].wait_exit(Duration::from_secs(10));

    // Every conversation's reply final; on a timeout, say what the database and the
    // replicas saw (this failed once in CI and never here).
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut waiting = Vec::new();
        for (_, conversation, _) in &conversations {
            let replies = replies(&db.pool, *conversation).await;
            if replies.is_empty() || replies.iter().any(|(_, a)| a["status"] == "streaming") {
                waiting.push(*conversation);
            }
        }
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let state: Vec<(String,)> = sqlx::query_as(
                "SELECT format('turn %s conv %s ended %s interrupted %s lease %s run %s/%s reply %s', \
                        t.run_id, t.conversation_id, t.ended, t.interrupted, \
                        (SELECT l.worker_id || ' until ' || l.expires_at || ' now ' || now() \
                           FROM agentd.leases l WHERE l.run_id = t.run_id), \
                        r.status, r.error, \
                        (SELECT m.attachments::text FROM messages m WHERE m.id = t.reply_id)) \
                   FROM agentd.turns t LEFT JOIN runs r ON r.id = t.run_id \
                  WHERE t.conversation_id = ANY($1) \
                 UNION ALL SELECT format('waiting %s', w.conversation_id) \
                   FROM agentd.waiting_conversations w WHERE w.conversation_id = ANY($1)",
            )
            .bind(&waiting)
            .fetch_all(&db.pool)
            .await
            .unwrap();
            let logs: Vec<Vec<String>> = replicas
                .iter_mut()
                .map(|replica| {
                    replica
                        .drain()
                        .iter()
                        .filter(|line| !line.contains("\"level\":\"info\""))
                        .cloned()
                        .collect()
                })
                .collect();
            panic!("replies not final after 40 s: {waiting:?}\n{state:#?}\n{logs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut lost = 0;
    for (_, conversation, asked) in &conversations {
        let replies = replies(&db.pool, *conversation).await;
        assert_eq!(replies.len(), 1, "{conversation}: {replies:?}");
        let (content, attachments) = &replies[0];
        match attachments["status"].as_str().unwrap() {
            "completed" => assert_eq!(content.matches(' ').count(), 50, "{content}"),
            "failed" => {
                lost += 1;
                let error = attachments["error"].as_str().unwrap();
                assert!(error.starts_with("worker lost"), "{error}");
            }
            other => panic!("unexpected status {other}: {attachments}"),
        }
        let runs = turn_runs(&db.pool, *conversation).await;
        assert_eq!(runs.len(), 1, "{conversation}: {runs:?}");
        assert_eq!(runs[0].2["message_ids"], json!([asked]));
    }
    assert!(lost >= 1, "the killed replica's turn was not reported");
    // No turn ran twice: at most one model call per question (a turn lost before its call
    // made none), and one for every completed reply.
    let mut asked: Vec<String> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|call| call["messages"][1]["content"].as_str().unwrap().to_string())
        .collect();
    let made = asked.len();
    asked.sort();
    asked.dedup();
    assert_eq!(asked.len(), made, "a question was sent to the model twice");
    assert!(
        made >= conversations.len() - lost,
        "{made} calls, {lost} lost"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.turn_messages").await,
        conversations.len() as i64
    );
    // The user whose turn was lost writes again, and is answered.
    let (user, conversation, _) = conversations[0];
    say(&db.pool, user, conversation, "again please").await;
    let replies = final_replies(&db.pool, conversation, 2).await;
    assert_eq!(replies[1].1["status"], "completed", "{replies:?}");
    for (index, replica) in replicas.iter_mut().enumerate() {
        if index != victim {
            replica.signal(Signal::SIGTERM);
            assert!(replica.wait_exit(Duration::from_secs(40)).success());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_message_and_hostile_attachments_leave_the_worker_answering_others() {
    let db = TestDb::migrated().await;
    let (attacker, _, attacked) = new_conversation(&db.pool).await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let artifacts = tempfile::tempdir().unwrap();
    let dir = artifacts.path().to_string_lossy().to_string();
    let worker =
        InProcessWorker::start_configured(&db, "w1", &[("AGENTD__ARTIFACTS__DIR", &dir)]).await;
    // 1 MiB messages (of two-byte characters) with deeply nested and huge attachments.
    let huge = "ü".repeat(512 * 1024);
    let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    let wide = format!("[{}]", vec!["\"xxxxxxxxxx\""; 100_000].join(","));
    for attachments in [deep.as_str(), wide.as_str(), "{\"a\": 1}"] {
        as_user::<Uuid>(
            &db.pool,
            attacker,
            &format!(
                "INSERT INTO messages (conversation_id, content, sender_type, attachments) \
                 VALUES ('{attacked}', {}, 'user', '{attachments}'::jsonb) RETURNING id",
                quote(&huge)
            ),
        )
        .await
        .unwrap();
    }
    say(&db.pool, user, conversation, "hello").await;
    let replies_of_user = final_replies(&db.pool, conversation, 1).await;
    assert_eq!(replies_of_user[0].1["status"], "completed");
    // The attacker's own messages are answered too (in one to three turns, as they
    // arrived), each reply within the bounds.
    eventually(
        Duration::from_secs(20),
        "the attacker's messages answered",
        || async {
            let turns = turn_runs(&db.pool, attacked).await;
            let covered: usize = turns
                .iter()
                .map(|(_, _, input)| input["message_ids"].as_array().unwrap().len())
                .sum();
            covered == 3 && replies(&db.pool, attacked).await.len() == turns.len()
        },
    )
    .await;
    for (content, attachments) in final_replies(&db.pool, attacked, 1).await {
        assert_eq!(attachments["status"], "completed", "{attachments}");
        assert!(content.len() <= agentd::conversation::MAX_REPLY_BYTES);
    }
    // Still answering.
    say(&db.pool, user, conversation, "still there?").await;
    final_replies(&db.pool, conversation, 2).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agentd_chat_writes_lines_as_messages_and_prints_the_streamed_replies() {
    use std::io::Write;
    let db = TestDb::migrated().await;
    let user = create_user(&db.pool).await;
    let agent = create_agent(&db.pool, user).await;
    let mut child = support::agentd()
        .args(["chat", &agent.to_string(), "--worker"])
        .env("DATABASE_URL", &db.url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there\n\nsecond line\n")
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("You wrote: hello there"), "{stdout}");
    assert!(stdout.contains("You wrote: second line"), "{stdout}");
    assert!(stderr.contains("conversation "), "{stderr}");
    let (conversations, user_messages, replies): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversations WHERE user_id = $1 AND agent_id = $2), \
                (SELECT count(*) FROM messages WHERE sender_type = 'user'), \
                (SELECT count(*) FROM messages WHERE sender_type = 'agent' \
                    AND attachments->>'status' = 'completed')",
    )
    .bind(user)
    .bind(agent)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((conversations, user_messages, replies), (1, 2, 2));

    // An unknown agent, a conversation of another agent: one clear line each.
    let other = create_agent(&db.pool, user).await;
    let conversation: Uuid = sqlx::query_scalar("SELECT id FROM conversations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let refused = support::agentd()
        .args([
            "chat",
            &other.to_string(),
            "--conversation",
            &conversation.to_string(),
        ])
        .env("DATABASE_URL", &db.url)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!(
            "--conversation: no conversation {conversation} with agent {other}"
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_and_command_executors_receive_the_history() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let (model, calls) = slow_model(3, Duration::from_millis(10)).await;
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "openai"),
            ("AGENTD__EXECUTORS__OPENAI__BASE_URL", model.as_str()),
        ],
    )
    .await;
    say(&db.pool, user, conversation, "first question").await;
    final_replies(&db.pool, conversation, 1).await;
    say(&db.pool, user, conversation, "second question").await;
    let replies = final_replies(&db.pool, conversation, 2).await;
    worker.stop().await;
    assert_eq!(replies[1].0, "c0 c1 c2 ");
    let second_call = calls.lock().unwrap()[1].clone();
    let messages = second_call["messages"].as_array().unwrap();
    let sent: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        sent,
        [
            ("system", "Say hello"),
            ("user", "first question"),
            ("assistant", "c0 c1 c2 "),
            ("user", "second question"),
        ]
    );

    // The command executor: the history on stdin, the reply from the program's output.
    let script = "import json, sys\n\
doc = json.load(sys.stdin)\n\
said = ' | '.join(m['role'] + ': ' + m['content'] for m in doc['messages'])\n\
print(json.dumps({'output': {'reply': doc['conversation'] + ' ' + said}}))\n";
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("reply.py");
    std::fs::write(&path, script).unwrap();
    let program = format!(r#"["python3", "{}"]"#, path.display());
    let worker = InProcessWorker::start_configured(
        &db,
        "w2",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "command"),
            ("AGENTD__EXECUTORS__COMMAND__PROGRAM", program.as_str()),
        ],
    )
    .await;
    say(&db.pool, user, conversation, "third").await;
    let replies = final_replies(&db.pool, conversation, 3).await;
    worker.stop().await;
    assert_eq!(replies[2].1["status"], "completed", "{:?}", replies[2]);
    assert_eq!(
        replies[2].0,
        format!(
            "{conversation} user: first question | assistant: c0 c1 c2  | user: second question \
             | assistant: c0 c1 c2  | user: third"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_executor_receives_the_history_and_its_output_is_the_reply() {
    use axum::body::Bytes;
    use axum::routing::post;
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let record = received.clone();
    let router = axum::Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let record = record.clone();
            async move {
                let run: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let said = run["messages"]
                    .as_array()
                    .map(|messages| messages.len())
                    .unwrap_or_default();
                record.lock().unwrap().push(run);
                format!(
                    "{}\n",
                    json!({"type": "output", "output": {"reply": format!("{said} message(s) seen")}})
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let worker = InProcessWorker::start_configured(
        &db,
        "w1",
        &[
            ("AGENTD__EXECUTION__DEFAULT", "webhook"),
            ("AGENTD__EXECUTORS__WEBHOOK__URL", url.as_str()),
            ("AGENTD__EXECUTORS__WEBHOOK__SECRET_ENV", "TEST_HOOK_SECRET"),
            ("TEST_HOOK_SECRET", "s3cret"),
        ],
    )
    .await;
    say(&db.pool, user, conversation, "one").await;
    final_replies(&db.pool, conversation, 1).await;
    say(&db.pool, user, conversation, "two").await;
    let replies = final_replies(&db.pool, conversation, 2).await;
    worker.stop().await;
    assert_eq!(replies[0].0, "1 message(s) seen");
    assert_eq!(replies[1].0, "3 message(s) seen");
    let received = received.lock().unwrap();
    assert_eq!(received[1]["conversation"], json!(conversation));
    let roles: Vec<&str> = received[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(received[1]["messages"][2]["content"], "two");
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_takes_a_turns_record_with_its_run_and_keeps_what_answered_each_message() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let (executor, _) = Chatty::new(&["ok"], Duration::ZERO);
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    say(&db.pool, user, conversation, "old question").await;
    final_replies(&db.pool, conversation, 1).await;
    worker.stop().await;
    sqlx::query("DELETE FROM run_logs")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE runs SET end_time = now() - interval '2 days'")
        .execute(&db.pool)
        .await
        .unwrap();
    let deleted =
        agentd::store::maintenance::delete_old_runs(&db.pool, Duration::from_secs(86400), 100)
            .await
            .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.turns").await,
        0
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.turn_messages").await,
        1
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM messages").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_messages_is_answered_in_bounded_turns_and_delays_no_one_else() {
    let db = TestDb::migrated().await;
    let (attacker, _, flooded) = new_conversation(&db.pool).await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let flood: i64 = as_user(
        &db.pool,
        attacker,
        &format!(
            "WITH m AS (INSERT INTO messages (conversation_id, content, sender_type) \
               SELECT '{flooded}', 'spam ' || g, 'user' FROM generate_series(1, 20000) g \
               RETURNING 1) SELECT count(*) FROM m"
        ),
    )
    .await
    .unwrap();
    assert_eq!(flood, 20000);
    let (executor, seen) = Chatty::new(&["ok"], Duration::ZERO);
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    say(&db.pool, user, conversation, "am I delayed?").await;
    let replies = final_replies(&db.pool, conversation, 1).await;
    assert_eq!(replies[0].1["status"], "completed");
    worker.stop().await;
    // The attacker's turns each covered at most conversations.max_turn_messages (100),
    // oldest first, and saw a bounded history.
    let runs = turn_runs(&db.pool, flooded).await;
    assert!(!runs.is_empty());
    for (_, _, input) in &runs {
        assert!(input["message_ids"].as_array().unwrap().len() <= 100);
    }
    assert_eq!(runs[0].2["message_ids"].as_array().unwrap().len(), 100);
    for seen in seen.lock().unwrap().iter() {
        assert!(seen["conversation"]["messages"].as_array().unwrap().len() <= 150);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agentd_status_shows_conversations_waiting_and_turns_running() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    say(&db.pool, user, conversation, "anyone?").await;
    say(&db.pool, user, conversation, "hello?").await;
    let status = |format: &'static str| {
        let url = db.url.clone();
        move || {
            support::agentd()
                .args(["status", "--format", format])
                .env("DATABASE_URL", url)
                .output()
                .unwrap()
        }
    };
    let output = tokio::task::spawn_blocking(status("json")).await.unwrap();
    assert!(output.status.success());
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["conversations"]["waiting"], 1, "{json:#}");
    assert_eq!(json["conversations"]["turns_running"], 0);
    assert!(json["conversations"]["oldest_message"].is_string());
    let output = tokio::task::spawn_blocking(status("table")).await.unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("\nConversations:\n  waiting for a turn: 1 (oldest message "),
        "{table}"
    );
    assert!(table.contains("  turns running: 0\n"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn last_message_time_never_moves_backwards() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    // The application recorded a later message there already.
    sqlx::query(
        "UPDATE conversations SET last_message = 'newer', \
                last_message_time = now() + interval '1 hour', \
                updated_at = now() - interval '1 day' WHERE id = $1",
    )
    .bind(conversation)
    .execute(&db.pool)
    .await
    .unwrap();
    let (executor, _) = Chatty::new(&["a reply"], Duration::ZERO);
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    say(&db.pool, user, conversation, "hi").await;
    final_replies(&db.pool, conversation, 1).await;
    worker.stop().await;
    let (last_message, moved_back, updated_recently): (String, bool, bool) = sqlx::query_as(
        "SELECT last_message, last_message_time < now(), updated_at > now() - interval '1 minute' \
           FROM conversations WHERE id = $1",
    )
    .bind(conversation)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(last_message, "newer");
    assert!(!moved_back);
    assert!(updated_recently);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_conversations_disabled_leaves_them_to_the_others() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let (executor, seen) = Chatty::new(&["ok"], Duration::ZERO);
    let off = InProcessWorker::start(
        &db,
        "off",
        &[("AGENTD__CONVERSATIONS__ENABLED", "false")],
        executor,
    )
    .await;
    say(&db.pool, user, conversation, "hello?").await;
    // The disabled replica runs its other loops (a requested run is done) …
    let agent = create_agent(&db.pool, user).await;
    let run = support::request_agent_run(&db.pool, agent).await;
    support::finished_run(&db.pool, run, Duration::from_secs(10)).await;
    // … but took no turn.
    assert!(replies(&db.pool, conversation).await.is_empty());
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM agentd.turns").await,
        0
    );
    let (executor, _) = Chatty::new(&["answered"], Duration::ZERO);
    let on = InProcessWorker::start(&db, "on", &[], executor).await;
    let replies = final_replies(&db.pool, conversation, 1).await;
    assert_eq!(replies[0].0, "answered");
    on.stop().await;
    off.stop().await;
    assert_eq!(seen.lock().unwrap().len(), 1, "only the requested run");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_deleted_during_its_turn_ends_the_turn_quietly() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let chunks: Vec<String> = (0..20).map(|i| format!("d{i} ")).collect();
    let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (executor, _) = Chatty::new(&chunks, Duration::from_millis(50));
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    say(&db.pool, user, conversation, "forget me").await;
    eventually(Duration::from_secs(10), "the reply streams", || async {
        !replies(&db.pool, conversation).await.is_empty()
    })
    .await;
    as_user::<i64>(
        &db.pool,
        user,
        &format!(
            "WITH m AS (DELETE FROM messages WHERE conversation_id = '{conversation}' RETURNING 1), \
                  c AS (DELETE FROM conversations WHERE id = '{conversation}' RETURNING 1) \
             SELECT (SELECT count(*) FROM m) + (SELECT count(*) FROM c)"
        ),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the turn's run ends", || async {
        count(
            &db.pool,
            "SELECT count(*) FROM runs WHERE status = 'running'",
        )
        .await
            == 0
    })
    .await;
    worker.stop().await;
    let status: String = sqlx::query_scalar("SELECT status FROM runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM messages").await, 0);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM agentd.turns WHERE NOT ended"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn infinite_timestamps_in_a_users_rows_leave_turns_working() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    for at in ["infinity", "-infinity", "20000-01-01"] {
        as_user::<Uuid>(
            &db.pool,
            user,
            &format!(
                "INSERT INTO messages (conversation_id, content, sender_type, created_at) \
                 VALUES ('{conversation}', 'at {at}', 'user', '{at}') RETURNING id"
            ),
        )
        .await
        .unwrap();
    }
    as_user::<i64>(
        &db.pool,
        user,
        &format!(
            "WITH c AS (UPDATE conversations SET last_message_time = '-infinity', \
               updated_at = 'infinity' WHERE id = '{conversation}' RETURNING 1) \
             SELECT count(*) FROM c"
        ),
    )
    .await
    .unwrap();
    let (executor, seen) = Chatty::new(&["fine"], Duration::ZERO);
    let worker = InProcessWorker::start(&db, "w1", &[], executor).await;
    let replies = final_replies(&db.pool, conversation, 1).await;
    say(&db.pool, user, conversation, "still fine?").await;
    let more = final_replies(&db.pool, conversation, 2).await;
    worker.stop().await;
    assert_eq!(replies[0].1["status"], "completed");
    assert_eq!(more[1].1["status"], "completed");
    // Times no arithmetic can use reach the executor as null, in the stored order.
    let history = seen.lock().unwrap()[0]["conversation"]["messages"].clone();
    let times: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["created_at"])
        .collect();
    assert_eq!(times, [&Value::Null, &Value::Null, &Value::Null]);
    // The reply moved last_message_time forward from -infinity.
    let moved: bool = sqlx::query_scalar(
        "SELECT last_message_time > now() - interval '1 minute' FROM conversations WHERE id = $1",
    )
    .bind(conversation)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(moved);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_another_claim_held_and_let_go_is_answered_without_a_new_notification() {
    let db = TestDb::migrated().await;
    let (user, _, conversation) = new_conversation(&db.pool).await;
    let artifacts = tempfile::tempdir().unwrap();
    let dir = artifacts.path().to_string_lossy().to_string();
    // A claim of another replica holds the conversation while the worker looks, then ends
    // without committing (as when that replica dies mid-claim): nothing notifies again, and
    // the poll is a minute away.
    let (other_user, _, other) = new_conversation(&db.pool).await;
    say(&db.pool, user, conversation, "held by another claim").await;
    let mut claim = db.pool.begin().await.unwrap();
    let held: Option<Uuid> = sqlx::query_scalar(
        "SELECT conversation_id FROM agentd.waiting_conversations \
          WHERE conversation_id = $1 FOR UPDATE",
    )
    .bind(conversation)
    .fetch_optional(&mut *claim)
    .await
    .unwrap();
    assert_eq!(held, Some(conversation));
    let worker =
        InProcessWorker::start_configured(&db, "w1", &[("AGENTD__ARTIFACTS__DIR", &dir)]).await;
    // Another user's message wakes the worker, whose claim skips the held conversation.
    say(&db.pool, other_user, other, "not held").await;
    final_replies(&db.pool, other, 1).await;
    claim.rollback().await.unwrap();
    let answered = std::time::Instant::now();
    let replies = final_replies(&db.pool, conversation, 1).await;
    assert_eq!(replies[0].1["status"], "completed", "{replies:?}");
    assert!(
        answered.elapsed() < Duration::from_secs(10),
        "answered after {:?}: only the minute's poll found it",
        answered.elapsed()
    );
    worker.stop().await;
}
