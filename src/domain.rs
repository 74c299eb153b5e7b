//! The values every floor shares: what a run is and executes. Defined here, below the
//! store (which reads them from rows) and the executors (which run them), so that neither
//! imports the other; each is parsed once, at the edge, into a type that cannot hold an
//! invalid value (a team's strategy, a run's kind and status).

use serde_json::Value;
use uuid::Uuid;

/// What a run executes (`runs.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Agent,
    Team,
}

impl RunKind {
    /// The value of `runs.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Agent => "agent",
            RunKind::Team => "team",
        }
    }

    /// The kind named by `runs.type`; `None` for any other text.
    pub fn parse(text: &str) -> Option<RunKind> {
        match text {
            "agent" => Some(RunKind::Agent),
            "team" => Some(RunKind::Team),
            _ => None,
        }
    }
}

/// Where a run stands (`runs.status`, and `Queued` for a request not claimed yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Requested, waiting in `agentd.requests` for a worker.
    Queued,
    Running,
    Completed,
    Failed,
}

impl RunStatus {
    /// The value of `runs.status` (`queued` for a request).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
        }
    }

    /// The status named by `text`; `None` for any other text.
    pub fn parse(text: &str) -> Option<RunStatus> {
        match text {
            "queued" => Some(RunStatus::Queued),
            "running" => Some(RunStatus::Running),
            "completed" => Some(RunStatus::Completed),
            "failed" => Some(RunStatus::Failed),
            _ => None,
        }
    }
}

/// How a run ended: the two final statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Completed,
    Failed,
}

impl RunResult {
    /// The final `runs.status`.
    pub fn status(self) -> RunStatus {
        match self {
            RunResult::Completed => RunStatus::Completed,
            RunResult::Failed => RunStatus::Failed,
        }
    }
}

/// A run this worker holds a lease on and must execute.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run_id: Uuid,
    pub kind: RunKind,
    pub target_id: Uuid,
    pub owner_id: Uuid,
    pub input: Option<Value>,
    pub schedule_id: Option<Uuid>,
    /// The agent, when the claim already read it (scheduled runs: in the claim's own
    /// transaction); `None`: the runner reads the target itself.
    pub agent: Option<AgentDefinition>,
    /// Why the run cannot execute (its input could not be read): it fails with this error.
    pub defect: Option<String>,
    /// The conversation turn the run answers (`None`: not a turn).
    pub turn: Option<Turn>,
}

/// A turn of a conversation: the run answers these user messages with one reply.
#[derive(Debug, Clone)]
pub struct Turn {
    pub conversation_id: Uuid,
    /// The user messages the turn covers, oldest first.
    pub message_ids: Vec<Uuid>,
    /// The id the reply row has (inserted when its first text arrives).
    pub reply_id: Uuid,
    /// How long its oldest message had waited when the turn was claimed.
    pub waited: std::time::Duration,
}

/// Who wrote a message of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    /// `sender_type = 'user'`.
    User,
    /// `sender_type = 'agent'`: a reply.
    Assistant,
}

/// One message of a conversation's history, as an executor sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    #[serde(skip)]
    pub id: Uuid,
    pub role: ChatRole,
    pub content: String,
    pub attachments: Option<Value>,
    /// `None`: a time outside the years 1 to 9999.
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The conversation a turn answers: its history, cut to the budget, newest last.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conversation {
    pub id: Uuid,
    pub messages: Vec<ChatMessage>,
}

impl Conversation {
    /// The text of the newest user message ("" when there is none).
    pub fn last_user_text(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|message| message.role == ChatRole::User)
            .map_or("", |message| message.content.as_str())
    }
}

/// An agent as an executor sees it.
#[derive(Debug, Clone)]
pub struct AgentDefinition {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub category: String,
    pub instructions: Option<String>,
    /// The variables passed to the run (within the store's bounds).
    pub variables: Vec<Variable>,
    /// Warn lines for the run's logs: what a bound left out (names only, never values).
    pub notices: Vec<String>,
    /// Why the agent cannot run at all (its instructions are over the bound).
    pub defect: Option<String>,
}

/// One of an agent's variables. Values are often API keys: never log them.
#[derive(Clone)]
pub struct Variable {
    pub name: String,
    pub value: Option<String>,
}

impl std::fmt::Debug for Variable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variable")
            .field("name", &self.name)
            .field("value", &self.value.as_ref().map(|_| "***"))
            .finish()
    }
}

/// How a team runs its members (`teams.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeamStrategy {
    /// The one member best suited to the input runs.
    Route,
    /// Members run in order, each on the previous one's output.
    Coordinate,
    /// Members run at once on the same input; their outputs are combined.
    Collaborate,
}

impl TeamStrategy {
    /// The value of `teams.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            TeamStrategy::Route => "route",
            TeamStrategy::Coordinate => "coordinate",
            TeamStrategy::Collaborate => "collaborate",
        }
    }

    /// The strategy `teams.type` names; the error names the value and the valid ones.
    pub fn parse(text: &str) -> Result<TeamStrategy, String> {
        match text {
            "route" => Ok(TeamStrategy::Route),
            "coordinate" => Ok(TeamStrategy::Coordinate),
            "collaborate" => Ok(TeamStrategy::Collaborate),
            other => Err(format!(
                "the team's type {} is not a strategy (expected route, coordinate or collaborate)",
                crate::text::quoted(other)
            )),
        }
    }
}

/// A team and its members, in position order.
#[derive(Debug, Clone)]
pub struct TeamDefinition {
    pub id: Uuid,
    pub name: String,
    pub strategy: TeamStrategy,
    /// The members that are the team owner's own agents.
    pub members: Vec<AgentDefinition>,
    /// Warn lines for the run's logs: members skipped because another user owns them
    /// (named by agent id; their variables are never read).
    pub notices: Vec<String>,
    /// Why the team cannot run at all (too many members, an unknown strategy).
    pub defect: Option<String>,
}

/// What a run executes, loaded before it starts.
#[derive(Debug, Clone)]
pub enum Target {
    Agent(AgentDefinition),
    Team(TeamDefinition),
}

impl Target {
    /// Warn lines for the run's logs: what the bounds on the target's rows left out.
    pub fn notices(&self) -> Vec<String> {
        match self {
            Target::Agent(agent) => agent.notices.clone(),
            Target::Team(team) => team
                .notices
                .iter()
                .cloned()
                .chain(team.members.iter().flat_map(|member| {
                    member
                        .notices
                        .iter()
                        .map(move |notice| format!("member {:?}: {notice}", member.name))
                }))
                .collect(),
        }
    }

    /// Why the target cannot run at all.
    pub fn defect(&self) -> Option<String> {
        match self {
            Target::Agent(agent) => agent.defect.clone(),
            Target::Team(team) => team.defect.clone().or_else(|| {
                team.members.iter().find_map(|member| {
                    member
                        .defect
                        .as_ref()
                        .map(|defect| format!("member {:?}: {defect}", member.name))
                })
            }),
        }
    }

    /// Every variable value of the target (the agent's, or every member's): what the
    /// runner keeps out of agentd's own logs.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        let agents: Vec<&AgentDefinition> = match self {
            Target::Agent(agent) => vec![agent],
            Target::Team(team) => team.members.iter().collect(),
        };
        agents
            .into_iter()
            .flat_map(|agent| agent.variables.iter())
            .filter_map(|variable| variable.value.as_deref())
    }

    /// The agent, for an agent run.
    pub fn agent(&self) -> Option<&AgentDefinition> {
        match self {
            Target::Agent(agent) => Some(agent),
            Target::Team(_) => None,
        }
    }
}
