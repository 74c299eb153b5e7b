//! `agentd schedule preview`: the slots of a schedule given on the command line, so people
//! (and tests) can see what a row will do without a database.

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, ValueEnum};

use super::{Rule, ScheduleError, ScheduleSpec};

/// The schedule, as the columns of a row, and what to show.
#[derive(Debug, Clone, Args)]
pub struct PreviewArgs {
    /// once, minutely, hourly, daily, weekly, monthly or cron.
    #[arg(long, default_value = "daily", conflicts_with = "cron")]
    pub frequency: String,
    /// Every N units of the frequency (1…10000).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub interval: i32,
    /// Local time of day, HH:MM or HH:MM:SS (default 00:00).
    #[arg(long, conflicts_with = "cron")]
    pub time: Option<String>,
    /// Weekdays, comma-separated, 0 = Sunday … 6 = Saturday (7 is Sunday too).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub days: Option<Vec<i32>>,
    /// Day of month for monthly: 1…31, or -1…-31 from the end.
    #[arg(long, allow_negative_numbers = true)]
    pub date: Option<i32>,
    /// IANA time zone.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// A cron expression (stands for --frequency cron --time EXPR).
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// The row's created_at, RFC 3339 (default: now).
    #[arg(long, value_name = "INSTANT")]
    pub created_at: Option<String>,
    /// Show slots strictly after this instant, RFC 3339 (default: --created-at).
    #[arg(long, value_name = "INSTANT")]
    pub after: Option<String>,
    /// How many slots to show.
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = PreviewFormat::Table)]
    pub format: PreviewFormat,
}

/// Output formats of the preview.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreviewFormat {
    /// A readable table: UTC instant and local time with its offset.
    Table,
    /// One JSON array of `{"utc": …, "local": …}`.
    Json,
}

/// The slots of the schedule as the command prints them (stdout), or the error line.
pub fn preview(args: &PreviewArgs, now: DateTime<Utc>) -> Result<String, ScheduleError> {
    let created_at = match &args.created_at {
        Some(text) => parse_instant("created-at", text)?,
        None => now,
    };
    let after = match &args.after {
        Some(text) => parse_instant("after", text)?,
        None => created_at,
    };
    let (frequency, time) = match &args.cron {
        Some(expression) => ("cron".to_string(), Some(expression.clone())),
        None => (args.frequency.clone(), args.time.clone()),
    };
    let spec = ScheduleSpec {
        frequency,
        interval: args.interval,
        time,
        days: args.days.clone(),
        date: args.date,
        timezone: args.timezone.clone(),
        created_at,
    };
    let rule = Rule::parse(&spec, after.max(created_at))?;
    let mut slots = Vec::with_capacity(args.count.min(10_000));
    let mut cursor = after;
    while slots.len() < args.count {
        match rule.next_after(cursor) {
            Some(slot) => {
                slots.push(slot);
                cursor = slot;
            }
            None => break,
        }
    }
    let zone = rule.timezone();
    let rows: Vec<(String, String)> = slots
        .iter()
        .map(|slot| {
            (
                slot.to_rfc3339_opts(SecondsFormat::Secs, true),
                slot.with_timezone(&zone)
                    .to_rfc3339_opts(SecondsFormat::Secs, false),
            )
        })
        .collect();
    Ok(match args.format {
        PreviewFormat::Json => {
            let array: Vec<serde_json::Value> = rows
                .iter()
                .map(|(utc, local)| serde_json::json!({ "utc": utc, "local": local }))
                .collect();
            let mut text = serde_json::Value::Array(array).to_string();
            text.push('\n');
            text
        }
        PreviewFormat::Table => {
            let mut text = format!("{:<22} {:<27} {}\n", "UTC", "LOCAL", "ZONE");
            for (utc, local) in &rows {
                text.push_str(&format!("{utc:<22} {local:<27} {zone}\n"));
            }
            if rows.is_empty() {
                text.push_str("(no slots)\n");
            }
            text
        }
    })
}

fn parse_instant(flag: &'static str, text: &str) -> Result<DateTime<Utc>, ScheduleError> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|instant| instant.with_timezone(&Utc))
        .map_err(|_| {
            ScheduleError::new(
                flag,
                format!("{text:?} is not an RFC 3339 instant such as \"2025-03-01T00:00:00Z\""),
            )
        })
}
