//! The built-in executor: needs nothing outside the process, so a fresh install does
//! something visible. It renders the agent's instructions with its variables (`{{name}}`)
//! and the run's input (`{{input}}`), logs each step (pausing
//! `executors.builtin.step_delay` between them), completes with the rendered text as
//! output, and writes it as a Markdown artifact. In a conversation turn `{{input}}` is the
//! newest user message, and the reply is the rendered instructions followed by that
//! message (or the rendered text alone when the instructions use `{{input}}`), so a fresh
//! install converses without a model.

use std::time::Duration;

use serde_json::{Value, json};

use super::{ArtifactFile, BoxFuture, Executor, Outcome, RunContext};

/// See the module documentation.
pub struct BuiltinExecutor {
    step_delay: Duration,
    noop_lines: u64,
}

impl BuiltinExecutor {
    /// An executor pausing `step_delay` between steps.
    pub fn new(step_delay: Duration) -> BuiltinExecutor {
        BuiltinExecutor {
            step_delay,
            noop_lines: 0,
        }
    }

    /// With `lines > 0`, a no-op (benchmarks): each run only logs `lines` short lines and
    /// completes.
    pub fn with_noop_lines(mut self, lines: u64) -> BuiltinExecutor {
        self.noop_lines = lines;
        self
    }

    async fn pause(&self) {
        if !self.step_delay.is_zero() {
            tokio::time::sleep(self.step_delay).await;
        }
    }
}

/// The input as text: a string as is, anything else as JSON; "" when there is none.
pub fn input_text(input: Option<&Value>) -> String {
    match input {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Longest rendered instructions, in bytes: instructions of 1 MiB repeating a variable of
/// 64 KiB could otherwise render to gigabytes.
pub const MAX_RENDERED_BYTES: usize = 4 * 1024 * 1024;

/// Replaces `{{name}}` (spaces inside the braces allowed) by the variable's value and
/// `{{input}}` by the input; unknown names are left as they are. Fails once the result
/// would pass [`MAX_RENDERED_BYTES`].
pub fn render(
    template: &str,
    variables: &[(String, String)],
    input: &str,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len().min(MAX_RENDERED_BYTES));
    let mut rest = template;
    let push = |out: &mut String, text: &str| {
        if out.len() + text.len() > MAX_RENDERED_BYTES {
            return Err(format!(
                "the rendered instructions would be over {MAX_RENDERED_BYTES} bytes"
            ));
        }
        out.push_str(text);
        Ok(())
    };
    while let Some(start) = rest.find("{{") {
        push(&mut out, &rest[..start])?;
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            push(&mut out, &rest[start..])?;
            return Ok(out);
        };
        let name = after[..end].trim();
        let value = if name == "input" {
            Some(input)
        } else {
            variables
                .iter()
                .find(|(variable, _)| variable == name)
                .map(|(_, value)| value.as_str())
        };
        match value {
            Some(value) => push(&mut out, value)?,
            None => push(&mut out, &rest[start..start + 2 + end + 2])?,
        }
        rest = &after[end + 2..];
    }
    push(&mut out, rest)?;
    Ok(out)
}

impl Executor for BuiltinExecutor {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn execute<'a>(&'a self, run: &'a RunContext) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            if self.noop_lines > 0 {
                for line in 1..=self.noop_lines {
                    run.logs.info(format!("noop line {line}")).await;
                }
                return Outcome::Completed {
                    output: json!({"noop": true, "lines": self.noop_lines}),
                };
            }
            let claimed = &run.run;
            let input = run.input_text();
            let (title, template, variables) = match run.target.agent() {
                Some(agent) => (
                    agent.name.clone(),
                    agent.instructions.clone().unwrap_or_default(),
                    agent
                        .variables
                        .iter()
                        .map(|v| (v.name.clone(), v.value.clone().unwrap_or_default()))
                        .collect::<Vec<_>>(),
                ),
                None => (
                    format!("{} {}", claimed.kind.as_str(), claimed.target_id),
                    String::new(),
                    Vec::new(),
                ),
            };
            run.logs.info(format!("starting {title}")).await;
            self.pause().await;
            let names: Vec<&str> = variables.iter().map(|(name, _)| name.as_str()).collect();
            run.logs
                .info(format!(
                    "rendering the instructions with {} variable(s){}{}",
                    names.len(),
                    if names.is_empty() { "" } else { ": " },
                    names.join(", ")
                ))
                .await;
            let rendered = match render(&template, &variables, &input) {
                Ok(rendered) => rendered,
                Err(error) => {
                    return Outcome::Failed {
                        error,
                        output: None,
                    };
                }
            };
            self.pause().await;
            let body = if input.is_empty() {
                rendered.clone()
            } else {
                format!("{rendered}\n\n## Input\n\n{input}")
            };
            let markdown = format!("# {title}\n\n{body}\n");
            run.artifacts
                .save(ArtifactFile::bytes(
                    "result.md",
                    Some("text/markdown".into()),
                    markdown.into_bytes(),
                ))
                .await;
            run.logs.info(format!("finished {title}")).await;
            if run.conversation.is_some() {
                // A reply made from the instructions and the newest user message, streamed
                // a line at a time.
                let reply = if template.replace(' ', "").contains("{{input}}") {
                    rendered.clone()
                } else if rendered.trim().is_empty() {
                    format!("You wrote: {input}")
                } else {
                    format!("{rendered}\n\nYou wrote: {input}")
                };
                for piece in reply.split_inclusive('\n') {
                    run.reply.push(piece);
                    self.pause().await;
                }
                return Outcome::Completed {
                    output: json!({"executor": "builtin", "agent": title, "text": reply}),
                };
            }
            Outcome::Completed {
                output: json!({
                    "executor": "builtin",
                    "agent": title,
                    "text": rendered,
                    "input": claimed.input,
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_variables_and_input() {
        let variables = vec![("CITY".to_string(), "Oslo".to_string())];
        assert_eq!(
            render(
                "Weather in {{ CITY }} for {{input}}; {{unknown}} {{",
                &variables,
                "today"
            )
            .unwrap(),
            "Weather in Oslo for today; {{unknown}} {{"
        );
    }

    #[test]
    fn rendering_stops_at_its_bound() {
        let variables = vec![("A".to_string(), "x".repeat(64 * 1024))];
        let template = "{{A}}".repeat(200_000);
        let error = render(&template, &variables, "").unwrap_err();
        assert!(error.contains("would be over"), "{error}");
    }
}
