//! Errors that name the key, the value and where it came from.
//!
//! Deserialization says which key failed and why; the merged layers say what the value was
//! and which layer gave it (every value carries its origin, see [`Source::tag`]). A value
//! that may be a secret is never shown whole: URLs through [`redact_url`], the database URL
//! always, and an unknown key's value not at all (it may be a secret under a mistyped name).

use super::value::redact_url;
use super::{ConfigError, Source};

/// Keys whose value is a secret, or may hold one whatever it looks like.
const SECRET_KEYS: &[&str] = &["database.url", "database.listen_url"];

/// The merged layers, for describing a key's value in an error.
pub(super) struct Report<'a> {
    merged: &'a config::Value,
}

impl<'a> Report<'a> {
    /// Describes values of `merged`, the layers as merged by `config`.
    pub(super) fn new(merged: &'a config::Value) -> Report<'a> {
        Report { merged }
    }

    /// `key`'s value is wrong for `reason` (`expected …`).
    pub(super) fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        let value = self.value_at(key);
        ConfigError::Invalid {
            key: key.to_string(),
            value: value.map_or_else(|| "nothing".into(), |value| render(key, value)),
            origin: value.map_or(Source::Default, origin_of),
            reason: reason.into(),
        }
    }

    /// The error for what deserializing the merged layers refused.
    pub(super) fn explain(&self, error: config::ConfigError) -> ConfigError {
        let (key, reason) = key_and_reason(error);
        if let Some(field) = reason
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field)
        {
            let key = match key {
                Some(parent) if !parent.is_empty() => format!("{parent}.{field}"),
                _ => field.to_string(),
            };
            // A section nobody knows: name the first key set in it, and where.
            let (key, origin) = match self.value_at(&key) {
                Some(value) => first_leaf(key, value),
                None => (key, Source::Default),
            };
            return ConfigError::UnknownKey { key, origin };
        }
        match key {
            Some(key) if reason == "missing" => ConfigError::Missing { key },
            Some(key) => self.invalid(&key, reason),
            None => ConfigError::Unusable { reason },
        }
    }

    /// The value at `key` (`section.key`, `section.list[2]`), if set.
    fn value_at(&self, key: &str) -> Option<&'a config::Value> {
        let mut value = self.merged;
        for segment in key.split('.') {
            let (name, indexes) = match segment.find('[') {
                Some(at) => segment.split_at(at),
                None => (segment, ""),
            };
            let config::ValueKind::Table(table) = &value.kind else {
                return None;
            };
            value = table.get(name)?;
            for index in indexes.split(['[', ']']).filter(|part| !part.is_empty()) {
                let config::ValueKind::Array(items) = &value.kind else {
                    return None;
                };
                value = items.get(index.parse::<usize>().ok()?)?;
            }
        }
        Some(value)
    }
}

/// The key and the reason of a deserialization error; the reason reads `expected …` (serde's
/// and `config`'s words for types become TOML's), or `missing`, or serde's unknown-field text.
fn key_and_reason(error: config::ConfigError) -> (Option<String>, String) {
    match error {
        config::ConfigError::Type { key, expected, .. } => (key, toml_words(expected)),
        config::ConfigError::At { error, key, .. } => {
            let (inner, reason) = key_and_reason(*error);
            (key.or(inner), reason)
        }
        config::ConfigError::NotFound(key) => (Some(key), "missing".into()),
        config::ConfigError::Message(message) => (None, reason_of(&message)),
        // Reading files is agentd's own; other errors have no key to name.
        other => (None, reason_of(&other.to_string())),
    }
}

/// serde's `invalid type: string "x", expected y` as `expected y` (without the value, which
/// the error shows once, redacted when needed).
fn reason_of(message: &str) -> String {
    if message.starts_with("unknown field `") {
        return message.to_string();
    }
    match message.split_once(", expected ") {
        Some((_, expected)) if message.starts_with("invalid ") => toml_words(expected),
        _ => message.to_string(),
    }
}

/// `expected {what}`, in TOML's words.
fn toml_words(what: &str) -> String {
    let what = what.strip_prefix("expected ").unwrap_or(what);
    let what = match what {
        "a map" => "a table such as { name = \"value\" }",
        "a sequence" => "an array such as [\"a\", \"b\"]",
        "a boolean" => "true or false",
        other if other.starts_with("struct ") => "a table of settings",
        other => other,
    };
    format!("expected {what}")
}

/// Where `value` came from.
fn origin_of(value: &config::Value) -> Source {
    value.origin().map_or(Source::Default, Source::from_tag)
}

/// The first key set under `key` whose value `value` is (itself when not a table), and where
/// that value came from: a table's own origin is the first layer that made it.
fn first_leaf(key: String, value: &config::Value) -> (String, Source) {
    match &value.kind {
        config::ValueKind::Table(table) => match table.iter().next() {
            Some((name, inner)) => first_leaf(format!("{key}.{name}"), inner),
            None => (key, origin_of(value)),
        },
        _ => (key, origin_of(value)),
    }
}

/// A value as TOML writes it, with secrets hidden.
fn render(key: &str, value: &config::Value) -> String {
    let secret = SECRET_KEYS.contains(&key);
    to_toml(value, secret).to_string()
}

fn to_toml(value: &config::Value, secret: bool) -> toml::Value {
    use config::ValueKind;
    match &value.kind {
        ValueKind::Nil => toml::Value::String(String::new()),
        ValueKind::Boolean(flag) => toml::Value::Boolean(*flag),
        ValueKind::I64(number) => toml::Value::Integer(*number),
        ValueKind::I128(number) => toml::Value::String(number.to_string()),
        ValueKind::U64(number) => toml::Value::String(number.to_string()),
        ValueKind::U128(number) => toml::Value::String(number.to_string()),
        ValueKind::Float(number) => toml::Value::Float(*number),
        ValueKind::String(text) if secret || text.contains("://") => {
            toml::Value::String(redact_url(text))
        }
        ValueKind::String(text) => toml::Value::String(text.clone()),
        ValueKind::Array(items) => {
            toml::Value::Array(items.iter().map(|item| to_toml(item, secret)).collect())
        }
        ValueKind::Table(table) => toml::Value::Table(
            table
                .iter()
                .map(|(name, value)| (name.clone(), to_toml(value, secret)))
                .collect(),
        ),
    }
}
