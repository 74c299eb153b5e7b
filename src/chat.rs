//! `agentd chat`: a terminal chat through the database, the way the web app chats. Each
//! line typed is a user message of the conversation; the reply is printed as it streams
//! into its row (docs/conversations.md).

use std::io::Write;
use std::time::Duration;

use sqlx::postgres::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::conversations::reply_to;

/// How often the reply's row is read while it streams.
const POLL: Duration = Duration::from_millis(100);

/// How a reply ended, as its `attachments` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyEnd {
    pub status: String,
    pub error: Option<String>,
}

/// Prints the reply to `message_id` to `out` as its text grows, until it is final (or
/// `shutdown` fires: `None`).
pub async fn follow_reply(
    pool: &PgPool,
    message_id: Uuid,
    out: &mut (impl Write + Send),
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<ReplyEnd>> {
    let mut printed = 0;
    loop {
        if let Some((content, attachments)) = reply_to(pool, message_id).await? {
            // Each update holds the whole text: print what is new.
            if content.len() > printed && content.is_char_boundary(printed) {
                write!(out, "{}", &content[printed..])?;
                out.flush()?;
                printed = content.len();
            }
            let status = attachments["status"].as_str().unwrap_or("streaming");
            if status != "streaming" {
                writeln!(out)?;
                return Ok(Some(ReplyEnd {
                    status: status.to_string(),
                    error: attachments["error"].as_str().map(str::to_string),
                }));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}
