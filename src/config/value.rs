//! The values settings hold, each parsed once from what the configuration says.
//!
//! A setting's field either has a type that parses itself ([`Parse`]: URLs, the uid range,
//! every fixed choice such as the executor kinds), or names a function of this module in
//! `deserialize_with` (durations, bounded numbers, folders). Either way the error is the
//! reason alone (`expected …`); the key, the value and its origin are added by the caller,
//! which knows them, so a value never appears twice and a secret never appears at all.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// A setting written as text and parsed once into its type.
pub(super) trait Parse: Sized {
    /// The reason any other value is refused: `expected …`, with the valid values.
    fn expected() -> String;

    /// The value `text` describes, if any.
    fn parse(text: &str) -> Option<Self>;
}

/// `a, b, c or d`: the valid values of a choice, for its error.
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [only] => (*only).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Gives settings with a fixed set of values their names: `name()` matches every variant (so
/// a new one cannot be forgotten), and parsing lists the valid names in its error.
macro_rules! choices {
    ($type:ident { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $type {
            /// This value's name in the configuration.
            pub fn name(self) -> &'static str {
                match self {
                    $($type::$variant => $name),+
                }
            }
        }

        impl Parse for $type {
            fn expected() -> String {
                format!("expected {}", one_of(&[$($name),+]))
            }

            fn parse(text: &str) -> Option<Self> {
                [$($type::$variant),+].into_iter().find(|choice| choice.name() == text)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                parsed(deserializer)
            }
        }
    };
}

choices!(ExecutorKind {
    Builtin => "builtin",
    Command => "command",
    OpenAi => "openai",
    Webhook => "webhook",
});
choices!(LogFormat {
    Auto => "auto",
    Json => "json",
    Text => "text",
});
choices!(Pooler {
    Auto => "auto",
    None => "none",
    Transaction => "transaction",
});
choices!(MisfirePolicy {
    Coalesce => "coalesce",
    Skip => "skip",
});
choices!(NotifyMode {
    Listen => "listen",
    Poll => "poll",
});
choices!(OverlapPolicy {
    Skip => "skip",
    Allow => "allow",
});
choices!(Multitask {
    Enqueue => "enqueue",
    Interrupt => "interrupt",
});

/// How a `route` team picks its member (`execution.team_router`); settings keep it as
/// `route_with_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TeamRouter {
    /// The member sharing the most words with the input.
    Words,
    /// Ask the model, falling back to words.
    OpenAi,
}

choices!(TeamRouter {
    Words => "words",
    OpenAi => "openai",
});

/// `execution.team_router`, as whether teams are routed by the model.
pub(super) fn team_router<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(match parsed::<D, TeamRouter>(deserializer)? {
        TeamRouter::Words => false,
        TeamRouter::OpenAi => true,
    })
}

/// A PostgreSQL connection URL (`postgres://` or `postgresql://`). It may carry a password,
/// so it is never printed whole: `Debug` shows it through [`redact_url`], and the text is
/// reached only as a `str` (for connecting).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl Parse for DatabaseUrl {
    fn expected() -> String {
        "expected a postgres:// or postgresql:// URL".into()
    }

    fn parse(text: &str) -> Option<Self> {
        (text.starts_with("postgres://") || text.starts_with("postgresql://"))
            .then(|| DatabaseUrl(text.to_string()))
    }
}

impl std::ops::Deref for DatabaseUrl {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// An `http://` or `https://` URL that the url crate accepts, kept as written without a
/// trailing `/` (paths are appended to it, such as `/chat/completions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(String);

impl HttpUrl {
    /// The URL as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Parse for HttpUrl {
    fn expected() -> String {
        "expected an http:// or https:// URL".into()
    }

    fn parse(text: &str) -> Option<Self> {
        let web = text.starts_with("http://") || text.starts_with("https://");
        (web && url::Url::parse(text).is_ok())
            .then(|| HttpUrl(text.trim_end_matches('/').to_string()))
    }
}

impl std::ops::Deref for HttpUrl {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The uids the command executor's runs run as, `FIRST-LAST`: unprivileged (from 1000), first
/// not above last, and below 4294967295 (the "no uid" value). Each run has one of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    first: u32,
    last: u32,
}

impl UidRange {
    /// The first uid of the range.
    pub fn first(self) -> u32 {
        self.first
    }

    /// The last uid of the range (inclusive).
    pub fn last(self) -> u32 {
        self.last
    }
}

impl Parse for UidRange {
    fn expected() -> String {
        "expected a range of uids such as \"100000-165535\" (from 1000 up, first not above last)"
            .into()
    }

    fn parse(text: &str) -> Option<Self> {
        let number = |part: &str| part.trim().parse::<u32>().ok();
        let (first, last) = text.trim().split_once('-')?;
        match (number(first), number(last)) {
            (Some(first), Some(last)) if first >= 1000 && first <= last && last < u32::MAX => {
                Some(UidRange { first, last })
            }
            _ => None,
        }
    }
}

macro_rules! deserialize_parsed {
    ($($type:ty),+) => {
        $(impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                parsed(deserializer)
            }
        })+
    };
}

deserialize_parsed!(DatabaseUrl, HttpUrl, UidRange);

/// Accepts text only (a number or a table where text belongs is an error, not converted) and
/// hands it to `parse`; `expected` is the error for anything else.
struct Text<T, F> {
    expected: String,
    parse: F,
    output: PhantomData<T>,
}

impl<'de, T, F> Visitor<'de> for Text<T, F>
where
    F: FnOnce(&str) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expected)
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.parse)(text).map_err(E::custom)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Err(E::custom(self.expected))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Err(E::custom(self.expected))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Err(E::custom(self.expected))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Err(E::custom(self.expected))
    }

    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Err(E::custom(self.expected))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(self.expected))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        Err(de::Error::custom(self.expected))
    }
}

/// Text read through `parse`; `expected` is the error when the value is not text.
fn text<'de, D, T>(
    deserializer: D,
    expected: impl Into<String>,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_any(Text {
        expected: expected.into(),
        parse,
        output: PhantomData,
    })
}

/// A value of a type that parses itself.
fn parsed<'de, D: Deserializer<'de>, T: Parse>(deserializer: D) -> Result<T, D::Error> {
    text(deserializer, T::expected(), |text| {
        T::parse(text).ok_or_else(T::expected)
    })
}

/// Empty text (or only spaces) is `None`; anything else is parsed.
pub(super) fn empty_or<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Parse,
{
    text(deserializer, T::expected(), |text| {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            T::parse(text).map(Some).ok_or_else(T::expected)
        }
    })
}

/// `true` or `false`, nothing else.
pub(super) fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct Flag;
    impl Visitor<'_> for Flag {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("expected true or false")
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<bool, E> {
            Ok(value)
        }
    }
    deserializer
        .deserialize_any(Flag)
        .map_err(|_: D::Error| de::Error::custom("expected true or false"))
}

/// A whole number from `MIN` to `MAX`, written as a number.
pub(super) fn whole<'de, D, T, const MIN: i64, const MAX: i64>(
    deserializer: D,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    struct Whole<T, const MIN: i64, const MAX: i64>(PhantomData<T>);
    impl<T: TryFrom<i64>, const MIN: i64, const MAX: i64> Visitor<'_> for Whole<T, MIN, MAX> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "expected a whole number from {MIN} to {MAX}")
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<T, E> {
            if (MIN..=MAX).contains(&number) {
                T::try_from(number).map_err(|_| E::custom(WholeError::<MIN, MAX>))
            } else {
                Err(E::custom(WholeError::<MIN, MAX>))
            }
        }

        fn visit_u64<E: de::Error>(self, number: u64) -> Result<T, E> {
            match i64::try_from(number) {
                Ok(number) => self.visit_i64(number),
                Err(_) => Err(E::custom(WholeError::<MIN, MAX>)),
            }
        }
    }
    deserializer
        .deserialize_any(Whole::<T, MIN, MAX>(PhantomData))
        .map_err(|_: D::Error| de::Error::custom(WholeError::<MIN, MAX>))
}

/// The reason a whole number was refused.
struct WholeError<const MIN: i64, const MAX: i64>;

impl<const MIN: i64, const MAX: i64> fmt::Display for WholeError<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected a whole number from {MIN} to {MAX}")
    }
}

const DURATION: &str = "expected a duration such as \"500ms\", \"30s\", \"15m\", \"2h\" or \"30d\"";

/// A duration, zero allowed.
pub(super) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    text(deserializer, DURATION, parse_duration)
}

fn positive(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("expected a duration above zero".into());
    }
    Ok(duration)
}

/// A duration above zero.
pub(super) fn positive_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    text(deserializer, DURATION, positive)
}

/// Empty: `None` (no limit, keep forever); otherwise a duration above zero.
pub(super) fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    text(deserializer, DURATION, |text| {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            positive(text).map(Some)
        }
    })
}

/// Empty: zero, which [`super::Settings::load`] replaces with `execution.timeout`; otherwise
/// a duration above zero.
pub(super) fn duration_or_run_timeout<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    text(deserializer, DURATION, |text| {
        if text.trim().is_empty() {
            Ok(Duration::ZERO)
        } else {
            positive(text)
        }
    })
}

/// A lease's life: at least a second, so renewing every third of it is not a busy loop.
pub(super) fn lease_ttl<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    text(deserializer, DURATION, |text| {
        let ttl = positive(text)?;
        if ttl < Duration::from_secs(1) {
            return Err("expected at least 1s".into());
        }
        Ok(ttl)
    })
}

/// A folder that must be named.
pub(super) fn folder<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    text(deserializer, "expected a folder path", |text| {
        if text.trim().is_empty() {
            Err("expected a folder path".into())
        } else {
            Ok(PathBuf::from(text))
        }
    })
}

/// Empty: `None`; otherwise a folder, as written.
pub(super) fn optional_folder<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    text(deserializer, "expected a folder path", |text| {
        Ok((!text.trim().is_empty()).then(|| PathBuf::from(text)))
    })
}

/// Empty: `None`; otherwise a folder, without surrounding spaces.
pub(super) fn optional_trimmed_folder<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    text(deserializer, "expected a folder path", |text| {
        Ok((!text.trim().is_empty()).then(|| PathBuf::from(text.trim())))
    })
}

/// A tracing filter: a level (`info`) or directives (`info,sqlx=warn`).
pub(super) fn log_filter<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    const EXPECTED: &str =
        "expected trace, debug, info, warn, error or a tracing filter such as \"info,sqlx=warn\"";
    text(deserializer, EXPECTED, |text| {
        if text.trim().is_empty() || tracing_subscriber::EnvFilter::try_new(text).is_err() {
            return Err(EXPECTED.into());
        }
        // A bare word is a valid filter for a module of that name, at every level: "warning"
        // or "verbose" would silently turn off every line agentd writes. A directive without
        // `=` must be a level (a module at every level is written `module=trace`).
        if let Some(word) = text.split(',').map(str::trim).find(|directive| {
            !directive.is_empty()
                && !directive.contains('=')
                && !directive.contains('[')
                && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        }) {
            return Err(format!(
                "{word:?} is not a level: {EXPECTED} (a module at every level is written \"{word}=trace\")"
            ));
        }
        Ok(text.to_string())
    })
}

/// The levels a log filter may name on their own.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Empty: no listener; otherwise an address and port.
pub(super) fn listen<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    const EXPECTED: &str = "expected an address and port such as \"127.0.0.1:9464\", or empty";
    text(deserializer, EXPECTED, |text| {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| EXPECTED.into())
    })
}

/// This replica's name: at most 200 printable characters; empty means host name and
/// process id.
pub(super) fn worker_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    const EXPECTED: &str = "expected at most 200 printable characters";
    text(deserializer, EXPECTED, |text| {
        let id = text.trim();
        if id.chars().any(char::is_control) || id.len() > 200 {
            return Err(EXPECTED.into());
        }
        Ok(if id.is_empty() {
            default_worker_id()
        } else {
            id.to_string()
        })
    })
}

/// Empty: not configured (an empty text); otherwise an http(s) URL, kept without a trailing
/// `/` like [`HttpUrl`].
pub(super) fn http_url_or_empty<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    text(deserializer, HttpUrl::expected(), |text| {
        if text.trim().is_empty() {
            Ok(String::new())
        } else {
            HttpUrl::parse(text)
                .map(|url| url.0)
                .ok_or_else(HttpUrl::expected)
        }
    })
}

/// The name of an environment variable (trimmed), or empty for none.
pub(super) fn env_name_or_empty<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
    const EXPECTED: &str =
        "expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*), or empty";
    text(deserializer, EXPECTED, |text| {
        let name = text.trim();
        if name.is_empty() || is_env_name(name) {
            Ok(name.to_string())
        } else {
            Err(EXPECTED.to_string())
        }
    })
}

/// Empty: artifacts stay in folders; otherwise `s3://bucket/prefix`, which needs agentd built
/// with the `s3` feature.
pub(super) fn bucket_url<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    const EXPECTED: &str = "expected an s3://bucket/prefix URL, or empty";
    text(deserializer, EXPECTED, |text| {
        let url = text.trim();
        if url.is_empty() {
            Ok(None)
        } else if !url.starts_with("s3://") || url.len() <= "s3://".len() {
            Err(EXPECTED.into())
        } else if !cfg!(feature = "s3") {
            Err("this agentd was built without the s3 feature (cargo build --features s3)".into())
        } else {
            Ok(Some(url.to_string()))
        }
    })
}

/// An array whose items are text, each read through `item`; `expected` is the one error for
/// anything else (it names the whole setting, which the error shows).
fn list<'de, D, T>(
    deserializer: D,
    expected: &'static str,
    item: fn(&str) -> Option<T>,
) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
{
    struct List<T> {
        expected: &'static str,
        item: fn(&str) -> Option<T>,
    }
    impl<'de, T> Visitor<'de> for List<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expected)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut items: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(text) = items
                .next_element::<ItemText>()
                .map_err(|_| de::Error::custom(self.expected))?
            {
                out.push((self.item)(&text.0).ok_or_else(|| de::Error::custom(self.expected))?);
            }
            Ok(out)
        }
    }
    deserializer
        .deserialize_any(List { expected, item })
        .map_err(|_: D::Error| de::Error::custom(expected))
}

/// One item of a [`list`]: text, nothing else.
struct ItemText(String);

impl<'de> serde::Deserialize<'de> for ItemText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        text(deserializer, "expected text", |text| {
            Ok(ItemText(text.to_string()))
        })
    }
}

/// A program and its arguments.
pub(super) fn program<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    list(
        deserializer,
        "expected an array of strings such as [\"python3\", \"agent.py\"]",
        |text| Some(text.to_string()),
    )
}

/// Environment variable names or prefixes (`NAME`, `PREFIX_*`).
pub(super) fn env_patterns<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<EnvPattern>, D::Error> {
    list(
        deserializer,
        "expected an array of names or prefixes such as [\"MY_TOOL_*\", \"SECRET_CONFIG\"]",
        EnvPattern::parse,
    )
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a name every shell and `env` accepts.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// An operator's addition to the refused names (`executors.command.refused_env`): a name, or
/// the start of names followed by `*`. Parsed once from the settings, kept upper-case since
/// names are compared without regard to case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPattern {
    upper: String,
    prefix: bool,
}

impl EnvPattern {
    /// The pattern `text` describes: a name, or a name's start (possibly empty) followed by
    /// `*`; `None` for anything else.
    pub fn parse(text: &str) -> Option<EnvPattern> {
        let (name, prefix) = match text.strip_suffix('*') {
            Some(start) => (start, true),
            None => (text, false),
        };
        (is_env_name(name) || (prefix && name.is_empty())).then(|| EnvPattern {
            upper: name.to_ascii_uppercase(),
            prefix,
        })
    }

    /// Whether the upper-cased name `upper` is refused by this pattern.
    pub fn matches(&self, upper: &str) -> bool {
        if self.prefix {
            upper.starts_with(&self.upper)
        } else {
            upper == self.upper
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// What stands between agentd and the server (`database.pooler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooler {
    /// `transaction` for the URLs of the well-known transaction-mode poolers (Supabase's
    /// port 6543 on `*.pooler.supabase.com`, Neon's `-pooler` hosts), `none` otherwise.
    Auto,
    /// A direct connection, or a session-mode pooler: a client keeps its server connection.
    None,
    /// A transaction-mode pooler: a server connection is lent for one transaction at a time.
    Transaction,
}

impl Pooler {
    /// Whether a database reached at `host`:`port` is behind a transaction-mode pooler.
    pub fn is_transaction(self, host: &str, port: u16) -> bool {
        match self {
            Pooler::Transaction => true,
            Pooler::None => false,
            Pooler::Auto => {
                let host = host.to_ascii_lowercase();
                (host.ends_with(".pooler.supabase.com") && port == 6543)
                    || host
                        .split('.')
                        .next()
                        .is_some_and(|label| label.ends_with("-pooler"))
            }
        }
    }
}

/// What to do with a slot fired later than `misfire_grace` after its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MisfirePolicy {
    /// Fire one run anyway.
    Coalesce,
    /// Fire nothing; only advance to the next slot.
    Skip,
}

/// What to do when a schedule's previous run is still running at its next slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlapPolicy {
    Skip,
    Allow,
}

/// How a worker learns of new work between its looks at the database (`database.notify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyMode {
    /// LISTEN on one connection, checked at start-up; polling when the check fails.
    Listen,
    /// Poll only, every [`crate::scheduler::listener::POLL_INTERVAL`].
    Poll,
}

/// What a user message arriving while its conversation's turn runs does
/// (`conversations.multitask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multitask {
    /// The next turn covers it, when the running one ends.
    Enqueue,
    /// The running turn is cancelled; the next covers everything not yet answered.
    Interrupt,
}

/// The executors agentd can run agents with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutorKind {
    Builtin,
    Command,
    OpenAi,
    Webhook,
}

/// Parses a duration written like `500ms`, `30s`, `15m`, `2h`, `30d` (or combinations such
/// as `1h 30m`). The error says what is expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        "expected a duration such as \"500ms\", \"30s\", \"15m\", \"2h\" or \"30d\"".into()
    })
}

/// `host-pid`: distinct for every process, readable in logs.
fn default_worker_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}-{}", std::process::id())
}

/// The URL with its password (in the user info or a `password=` query parameter) replaced
/// by `***`, for logs and errors; `***` alone for text that is not a URL.
pub fn redact_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return "***".into();
    };
    if url.password().is_some() && url.set_password(Some("***")).is_err() {
        return "***".into();
    }
    if url
        .query_pairs()
        .any(|(name, _)| name.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let value = if name.eq_ignore_ascii_case("password") {
                    "***".to_string()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.into()
}
