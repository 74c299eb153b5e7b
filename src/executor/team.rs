//! Team runs: one `runs` row of type `team`, its members run by their own executors.
//!
//! - `route`: the one member best suited to the input runs: chosen by the model when
//!   `execution.team_router = "openai"` (from the members' names, descriptions and
//!   categories), otherwise (or when the model's answer names no member) the highest
//!   word-overlap score between the input and the member's name, description and category
//!   (ties: lowest position). The choice and its reason are logged and recorded.
//! - `coordinate`: members run in position order, each receiving the previous member's
//!   output as its input; the first failure stops the team.
//! - `collaborate`: all members run at once on the same input (at most `concurrency` at a
//!   time) and their outputs are combined.
//!
//! The team is one more executor ([`TeamExecutor`]): the runner executes a team run as it
//! executes any run.
//!
//! Each step is logged with the member's name; the team's output records every step
//! (agent id, name, status, duration, output or error); the team fails if a needed step
//! failed; an empty team fails with a clear error.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::builtin::input_text;
use super::{BoxFuture, Executor, Executors, Outcome, ReplySink, RunContext, Usage};
use crate::domain::{AgentDefinition, ClaimedRun, RunKind, Target, TeamDefinition, TeamStrategy};

/// The executor of team runs: each member runs with the executor of its own category,
/// under that executor's timeout (`execution.timeout` when it has none), sharing the team
/// run's logs and artifacts; the members' usage figures add up in the team's.
pub struct TeamExecutor {
    /// The executors members run with (never this one: a member is an agent).
    members: Executors,
    /// Members of a `collaborate` team running at once.
    concurrency: usize,
    /// `execution.timeout`: a member's limit when its executor has none of its own.
    run_timeout: Duration,
}

impl TeamExecutor {
    /// A team executor running members with `members`.
    pub fn new(members: Executors, concurrency: usize, run_timeout: Duration) -> TeamExecutor {
        TeamExecutor {
            members,
            concurrency: concurrency.max(1),
            run_timeout,
        }
    }
}

impl Executor for TeamExecutor {
    fn name(&self) -> &'static str {
        "team"
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match &run.target {
                Target::Team(team) => self.run_team(team, run).await,
                Target::Agent(agent) => Outcome::Failed {
                    error: format!("agent {} is not a team", agent.id),
                    output: None,
                },
            }
        })
    }
}

/// What one member's step produced.
struct Step {
    record: Value,
    outcome: Outcome,
}

impl TeamExecutor {
    async fn run_team(&self, team: &TeamDefinition, run: &RunContext) -> Outcome {
        if team.members.is_empty() {
            return Outcome::Failed {
                error: format!("team {:?} has no members", team.name),
                output: None,
            };
        }
        let input = run.run.input.clone();
        run.logs
            .info(format!(
                "team {:?} ({}) with {} member(s)",
                team.name,
                team.strategy.as_str(),
                team.members.len()
            ))
            .await;
        match team.strategy {
            TeamStrategy::Route => {
                let text = input_text(input.as_ref());
                let (index, reason) = match self.members.router() {
                    Some(router) => match router.choose(&team.members, &text).await {
                        Ok(index) => (index, "chosen by the model".to_string()),
                        Err(why) => {
                            let (index, reason) = route(&team.members, &text);
                            (index, format!("{why}; by word overlap instead: {reason}"))
                        }
                    },
                    None => route(&team.members, &text),
                };
                let member = &team.members[index];
                run.logs
                    .info(format!("route: chose {:?} ({reason})", member.name))
                    .await;
                let step = self.run_step(1, member, input, run).await;
                let output = json!({
                    "strategy": "route",
                    "chosen": { "agent_id": member.id, "name": member.name, "reason": reason },
                    "steps": [step.record],
                    "output": output_of(&step.outcome),
                });
                finish(step.outcome, output, &member.name)
            }
            TeamStrategy::Coordinate => {
                let mut steps = Vec::new();
                let mut current = input;
                for (index, member) in team.members.iter().enumerate() {
                    let step = self.run_step(index + 1, member, current.clone(), run).await;
                    steps.push(step.record);
                    match step.outcome {
                        Outcome::Completed { output } => current = Some(output),
                        Outcome::Failed { error, .. } => {
                            return Outcome::Failed {
                                error: format!(
                                    "step {} ({}) failed: {error}",
                                    index + 1,
                                    member.name
                                ),
                                output: Some(json!({ "strategy": "coordinate", "steps": steps })),
                            };
                        }
                    }
                }
                Outcome::Completed {
                    output: json!({ "strategy": "coordinate", "steps": steps, "output": current }),
                }
            }
            TeamStrategy::Collaborate => {
                let steps: Vec<BoxFuture<'_, (usize, Step)>> = team
                    .members
                    .iter()
                    .enumerate()
                    .map(|(index, member)| {
                        let input = input.clone();
                        Box::pin(async move {
                            (index, self.run_step(index + 1, member, input, run).await)
                        }) as BoxFuture<'_, (usize, Step)>
                    })
                    .collect();
                let mut results: Vec<(usize, Step)> = futures_util::stream::iter(steps)
                    .buffer_unordered(self.concurrency)
                    .collect()
                    .await;
                results.sort_by_key(|(index, _)| *index);
                let failed: Vec<String> = results
                    .iter()
                    .filter_map(|(index, step)| match &step.outcome {
                        Outcome::Failed { error, .. } => {
                            Some(format!("{} ({error})", team.members[*index].name))
                        }
                        Outcome::Completed { .. } => None,
                    })
                    .collect();
                let outputs: Vec<Value> = results
                    .iter()
                    .map(|(index, step)| json!({ "name": team.members[*index].name, "output": output_of(&step.outcome) }))
                    .collect();
                let steps: Vec<Value> = results.into_iter().map(|(_, step)| step.record).collect();
                let output =
                    json!({ "strategy": "collaborate", "steps": steps, "outputs": outputs });
                if failed.is_empty() {
                    Outcome::Completed { output }
                } else {
                    Outcome::Failed {
                        error: format!(
                            "{} of {} members failed: {}",
                            failed.len(),
                            team.members.len(),
                            failed.join("; ")
                        ),
                        output: Some(output),
                    }
                }
            }
        }
    }

    /// Runs one member with its own executor and under its timeout, logging the step with
    /// the member's name; its usage figures are added to the team's.
    async fn run_step(
        &self,
        number: usize,
        member: &AgentDefinition,
        input: Option<Value>,
        team_run: &RunContext,
    ) -> Step {
        let executor = self.members.for_category(Some(&member.category)).clone();
        let logs = &team_run.logs;
        logs.info(format!(
            "step {number}: {} ({}) starts",
            member.name,
            executor.name()
        ))
        .await;
        let started = Instant::now();
        let run: &ClaimedRun = &team_run.run;
        let context = RunContext {
            run: ClaimedRun {
                run_id: run.run_id,
                kind: RunKind::Agent,
                target_id: member.id,
                owner_id: run.owner_id,
                input,
                schedule_id: run.schedule_id,
                agent: None,
                defect: None,
                turn: None,
            },
            target: Target::Agent(member.clone()),
            logs: logs.clone(),
            artifacts: team_run.artifacts.clone(),
            usage: Usage::default(),
            conversation: None,
            reply: ReplySink::default(),
        };
        let timeout = executor.timeout().unwrap_or(self.run_timeout);
        let outcome = tokio::time::timeout(timeout, executor.execute(&context))
            .await
            .unwrap_or_else(|_| Outcome::Failed {
                error: format!(
                    "timed out: the member took longer than {}",
                    humantime::format_duration(timeout)
                ),
                output: None,
            });
        team_run.usage.add(&context.usage);
        let duration_ms = started.elapsed().as_millis() as u64;
        let (status, detail) = match &outcome {
            Outcome::Completed { output } => ("completed", json!({ "output": bounded(output) })),
            Outcome::Failed { error, .. } => ("failed", json!({ "error": error })),
        };
        logs.info(format!(
            "step {number}: {} {status} in {duration_ms} ms",
            member.name
        ))
        .await;
        let mut record = json!({
            "step": number,
            "agent_id": member.id,
            "name": member.name,
            "status": status,
            "duration_ms": duration_ms,
        });
        if let (Some(record), Some(detail)) = (record.as_object_mut(), detail.as_object()) {
            record.extend(detail.clone());
        }
        Step { record, outcome }
    }
}

/// Most bytes of one member's output copied into the team's output (a team of many
/// members must not add up to more than the database or the worker can hold).
pub const MAX_STEP_OUTPUT_BYTES: usize = 1024 * 1024;

fn output_of(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Completed { output } => bounded(output),
        Outcome::Failed { output, .. } => output.as_ref().map_or(Value::Null, bounded),
    }
}

/// `output`, or a note saying it was left out when it is over [`MAX_STEP_OUTPUT_BYTES`].
fn bounded(output: &Value) -> Value {
    let size = serde_json::to_vec(output).map_or(0, |bytes| bytes.len());
    if size > MAX_STEP_OUTPUT_BYTES {
        json!({ "omitted": format!("this output is {size} bytes, over the {MAX_STEP_OUTPUT_BYTES} a team records per member") })
    } else {
        output.clone()
    }
}

fn finish(outcome: Outcome, output: Value, name: &str) -> Outcome {
    match outcome {
        Outcome::Completed { .. } => Outcome::Completed { output },
        Outcome::Failed { error, .. } => Outcome::Failed {
            error: format!("{name} failed: {error}"),
            output: Some(output),
        },
    }
}

/// Lower-case words of three or more letters or digits.
fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|word| word.chars().count() >= 3)
        .map(str::to_lowercase)
        .collect()
}

/// The member whose name, description and category share the most words with the input
/// (ties: the lowest position), and why.
pub fn route(members: &[AgentDefinition], input: &str) -> (usize, String) {
    let wanted = words(input);
    let mut best = (0, 0usize, Vec::new());
    for (index, member) in members.iter().enumerate() {
        let profile = words(&format!(
            "{} {} {}",
            member.name,
            member.description.as_deref().unwrap_or_default(),
            member.category
        ));
        let shared: Vec<String> = wanted.intersection(&profile).cloned().collect();
        if shared.len() > best.1 {
            best = (index, shared.len(), shared);
        }
    }
    let reason = if best.1 == 0 {
        "no member matches the input's words; the first member by position".to_string()
    } else {
        format!("{} shared word(s): {}", best.1, best.2.join(", "))
    };
    (best.0, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn agent(name: &str, description: &str, category: &str) -> AgentDefinition {
        AgentDefinition {
            id: Uuid::new_v4(),
            name: name.into(),
            description: Some(description.into()),
            category: category.into(),
            instructions: None,
            variables: Vec::new(),
            notices: Vec::new(),
            defect: None,
        }
    }

    #[test]
    fn routes_by_word_overlap_with_ties_to_the_lowest_position() {
        let members = [
            agent("Writer", "drafts blog posts", "writing"),
            agent("Analyst", "reads sales numbers and charts", "data"),
        ];
        assert_eq!(route(&members, "chart the sales numbers").0, 1);
        assert_eq!(route(&members, "write a blog post draft about posts").0, 0);
        let (index, reason) = route(&members, "hello");
        assert_eq!(index, 0);
        assert!(reason.starts_with("no member matches"));
    }
}
