//! Logging, set up once per process.
//!
//! agentd writes one line per event: JSON objects for log collectors (when stdout is not a
//! terminal, or `logging.format = "json"`), readable text on a terminal. Every line carries
//! `timestamp`, `level`, `message`, `target`, `worker_id`, the fields of the event, and the
//! fields of every span it happened in, flattened to the top level, so a line about a run
//! has `run_id` and a line about a schedule has `schedule_id` without callers repeating
//! them. The formatter is ours rather than tracing-subscriber's because that one nests span
//! fields under `span`/`spans`, and log queries want `run_id` at the top.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings};

/// Where log lines go: the daemon logs to stdout (where service managers and container
/// runtimes collect it); one-shot commands log to stderr so their stdout holds only their
/// result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Installs the global subscriber, filtered by `logging.level` (which `RUST_LOG` sets when
/// given, checked by the configuration as any value of it). Calling it twice is harmless
/// (the second call does nothing), which keeps tests simple.
pub fn init(settings: &LogSettings, worker_id: &str, stream: LogStream) {
    let filter = EnvFilter::new(default_directives(&settings.level));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => match stream {
            LogStream::Stdout => !std::io::stdout().is_terminal(),
            LogStream::Stderr => !std::io::stderr().is_terminal(),
        },
    };
    let sink: Box<dyn Write + Send> = match stream {
        LogStream::Stdout => Box::new(std::io::stdout()),
        LogStream::Stderr => Box::new(std::io::stderr()),
    };
    let layer = LineLayer::new(worker_id, json, sink);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// `logging.level`, plus: PostgreSQL's NOTICE messages (which sqlx logs at info, such as
/// "relation already exists, skipping" while adopting a database) only as warnings, unless
/// the configured filter says something about sqlx itself.
fn default_directives(level: &str) -> String {
    if level.contains("sqlx") {
        level.to_string()
    } else {
        format!("{level},sqlx::postgres::notice=warn")
    }
}

/// Formats each event as one line (JSON or text) and writes it to a sink.
pub struct LineLayer {
    worker_id: String,
    json: bool,
    sink: Mutex<Box<dyn Write + Send>>,
}

impl LineLayer {
    /// A layer writing to `sink`; tests pass a buffer to read what would be logged.
    pub fn new(worker_id: &str, json: bool, sink: Box<dyn Write + Send>) -> LineLayer {
        LineLayer {
            worker_id: worker_id.to_string(),
            json,
            sink: Mutex::new(sink),
        }
    }

    /// One line: the fixed fields, then the event's, then those of its spans from the
    /// innermost out; a name already written is not written again (the fixed fields win,
    /// then the event, then inner spans). Written straight into the line's text, without a
    /// map per event.
    fn render(
        &self,
        level: &tracing::Level,
        target: &str,
        event: Fields,
        spans: &[&Fields],
    ) -> String {
        let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut event = event;
        let message = match event.take("message") {
            Some(Value::String(text)) => text,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let mut line = String::with_capacity(256);
        if self.json {
            line.push('{');
            push_json_pair(&mut line, "timestamp", &timestamp);
            line.push(',');
            push_json_pair(&mut line, "level", &level.as_str().to_lowercase());
            line.push(',');
            push_json_pair(&mut line, "message", &message);
            line.push(',');
            push_json_pair(&mut line, "target", &target);
            line.push(',');
            push_json_pair(&mut line, "worker_id", &self.worker_id);
            for (name, value) in other_fields(&event, spans) {
                line.push(',');
                push_json_pair(&mut line, name, value);
            }
            line.push_str("}\n");
        } else {
            let _ = write!(line, "{timestamp} {:>5} {message}", level.as_str());
            for (name, value) in other_fields(&event, spans) {
                match value {
                    Value::String(s) => {
                        let _ = write!(line, " {name}={s:?}");
                    }
                    other => {
                        let _ = write!(line, " {name}={other}");
                    }
                }
            }
            let _ = writeln!(line, " worker_id={:?}", self.worker_id);
        }
        line
    }
}

/// The fields a line carries besides the fixed ones: the event's, then its spans' from the
/// innermost out, each name once (the first one met wins; a fixed name is never repeated).
fn other_fields<'a>(
    event: &'a Fields,
    spans: &'a [&'a Fields],
) -> impl Iterator<Item = (&'static str, &'a Value)> {
    let mut written: Vec<&'static str> =
        vec!["timestamp", "level", "message", "target", "worker_id"];
    event
        .0
        .iter()
        .chain(spans.iter().flat_map(|fields| fields.0.iter()))
        .filter_map(move |(name, value)| {
            if written.contains(name) {
                return None;
            }
            written.push(name);
            Some((*name, value))
        })
}

/// `"name":value` (JSON-escaped) at the end of `line`.
fn push_json_pair(line: &mut String, name: &str, value: &(impl serde::Serialize + ?Sized)) {
    // Serializing a string, or a value from a tracing field, into a String cannot fail.
    line.push_str(&serde_json::to_string(name).unwrap_or_default());
    line.push(':');
    line.push_str(&serde_json::to_string(value).unwrap_or_default());
}

/// An event's or a span's fields, in the order they were recorded; a name recorded again
/// replaces its value.
#[derive(Default)]
struct Fields(Vec<(&'static str, Value)>);

impl Fields {
    fn set(&mut self, name: &'static str, value: Value) {
        match self.0.iter_mut().find(|(existing, _)| *existing == name) {
            Some((_, slot)) => *slot = value,
            None => self.0.push((name, value)),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        let index = self.0.iter().position(|(existing, _)| *existing == name)?;
        Some(self.0.remove(index).1)
    }
}

/// Fields recorded on a span, kept in its extensions until it closes.
struct SpanFields(Fields);

impl<S> Layer<S> for LineLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut visitor = JsonVisitor(Fields::default());
        attrs.record(&mut visitor);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(visitor.0));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            let mut extensions = span.extensions_mut();
            if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
                let mut visitor = JsonVisitor(std::mem::take(fields));
                values.record(&mut visitor);
                *fields = visitor.0;
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut visitor = JsonVisitor(Fields::default());
        event.record(&mut visitor);
        let metadata = event.metadata();
        // The spans' extensions stay borrowed while the line is written: no field is copied.
        let scope: Vec<_> = ctx
            .event_scope(event)
            .map(|scope| scope.collect())
            .unwrap_or_default();
        let extensions: Vec<_> = scope.iter().map(|span| span.extensions()).collect();
        let spans: Vec<&Fields> = extensions
            .iter()
            .filter_map(|extension| extension.get::<SpanFields>().map(|fields| &fields.0))
            .collect();
        let line = self.render(metadata.level(), metadata.target(), visitor.0, &spans);
        if let Ok(mut sink) = self.sink.lock() {
            let _ = sink.write_all(line.as_bytes());
            let _ = sink.flush();
        }
    }
}

/// Collects tracing fields as JSON values, keeping numbers and booleans typed.
struct JsonVisitor(Fields);

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.set(field.name(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.set(field.name(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.set(field.name(), Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .set(field.name(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `log` writes through a layer of `worker` (JSON or text).
    fn logged(worker: &str, json: bool, log: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let layer = LineLayer::new(worker, json, Box::new(buffer.clone()));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, log);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_flatten_span_fields_and_carry_worker_id() {
        let text = logged("w-1", true, || {
            let span = tracing::info_span!("run", run_id = "r-9");
            let _entered = span.enter();
            tracing::warn!(lines = 3_u64, "log batch \"written\"");
        });
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["run_id"], "r-9");
        assert_eq!(line["worker_id"], "w-1");
        assert_eq!(line["level"], "warn");
        assert_eq!(line["lines"], 3);
        assert_eq!(line["message"], "log batch \"written\"");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn the_event_wins_over_its_spans_and_inner_spans_over_outer_ones() {
        let text = logged("w-3", true, || {
            let outer = tracing::info_span!("team", run_id = "outer", team_id = "t-1");
            let _outer = outer.enter();
            let inner = tracing::info_span!("run", run_id = "inner", attempt = 1_u64);
            let _inner = inner.enter();
            inner.record("attempt", 2_u64);
            tracing::info!(attempt = 3_u64, level = "not the level", "step");
            tracing::info!("plain");
        });
        let lines: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines[0]["attempt"], 3, "{text}");
        assert_eq!(lines[0]["level"], "info", "{text}");
        assert_eq!(lines[0]["run_id"], "inner", "{text}");
        assert_eq!(lines[0]["team_id"], "t-1", "{text}");
        assert_eq!(lines[1]["attempt"], 2, "{text}");
        assert_eq!(lines[1]["message"], "plain", "{text}");
        assert_eq!(lines[1].as_object().unwrap().len(), 8, "{text}");
    }

    #[test]
    fn text_lines_are_readable() {
        let text = logged("w-2", false, || {
            tracing::info!(schedule_id = "s-1", "fired");
        });
        assert!(
            text.contains(" INFO fired schedule_id=\"s-1\" worker_id=\"w-2\""),
            "{text}"
        );
    }
}
