//! The layers of the settings as the `config` crate merges them, each value tagged with
//! where it came from.
//!
//! agentd reads each layer itself rather than with `config`'s `File` and `Environment`
//! sources, for three reasons: an error must name the environment variable a value came
//! from (`Environment` tags every value "the environment"); variables hold TOML values such
//! as `["python3", "agent.py"]` and `{ research = "command" }` (`Environment` only splits
//! lists on a separator and has no tables); and the old section names are renamed within
//! each layer before layers are merged, so a new name given beside an old one wins there.

use std::collections::HashMap;
use std::path::Path;

use super::{ConfigError, DEFAULT_TOML, Source};

/// Prefix of the environment variables that override settings.
pub(super) const ENV_PREFIX: &str = "AGENTD__";

/// Sections whose names said too little (`[log]` beside `[logs]`, `[executor]` beside
/// `[executors]`): old name → new name. The old names still work, with a warning.
pub(super) const RENAMED_SECTIONS: &[(&str, &str)] = &[
    ("log", "logging"),
    ("logs", "run_logs"),
    ("executor", "execution"),
];

/// One layer: a table of values, each carrying its origin (see [`Source::tag`]).
#[derive(Debug, Clone)]
pub(super) struct Layer(config::Map<String, config::Value>);

impl config::Source for Layer {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

impl Layer {
    /// Every value of `table`, from `source`.
    fn new(table: toml::Table, source: &Source) -> Layer {
        let origin = source.tag();
        Layer(
            table
                .into_iter()
                .map(|(key, value)| (key, value_of(value, &origin)))
                .collect(),
        )
    }
}

/// `config/default.toml`, parsed (it is compiled in; a test loads it).
pub(super) fn defaults() -> Result<toml::Table, ConfigError> {
    parse_toml(DEFAULT_TOML, "config/default.toml")
}

/// The defaults as the first layer.
pub(super) fn default_layer(defaults: &toml::Table) -> Layer {
    Layer::new(defaults.clone(), &Source::Default)
}

/// The file at `path`, its old section names renamed (one warning each in `deprecations`).
pub(super) fn file(path: &Path, deprecations: &mut Vec<String>) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    let source = Source::File(path.to_path_buf());
    let mut table = parse_toml(&text, &source.to_string())?;
    rename_sections(&mut table, &source, deprecations);
    Ok(Layer::new(table, &source))
}

/// Moves the old sections of a file's `table` to their new names, a key given under both
/// names keeping the new name's value; one warning per old section in `deprecations`.
fn rename_sections(table: &mut toml::Table, source: &Source, deprecations: &mut Vec<String>) {
    for (old, new) in RENAMED_SECTIONS {
        let Some(old_value) = table.remove(*old) else {
            continue;
        };
        let mut shadowed = Vec::new();
        match (table.get_mut(*new), old_value) {
            (Some(toml::Value::Table(current)), toml::Value::Table(old_table)) => {
                for (key, value) in old_table {
                    if current.contains_key(&key) {
                        shadowed.push(format!("{new}.{key}"));
                    } else {
                        current.insert(key, value);
                    }
                }
            }
            (Some(_), _) => shadowed.push((*new).to_string()),
            (None, old_value) => {
                table.insert((*new).to_string(), old_value);
            }
        }
        let mut warning =
            format!("config: {source}: section [{old}] is deprecated, rename it [{new}]");
        if !shadowed.is_empty() {
            warning.push_str(&format!(
                "; {} set under both names, the value in [{new}] wins",
                shadowed.join(", ")
            ));
        }
        deprecations.push(warning);
    }
}

/// One layer per `AGENTD__SECTION__KEY` variable, old section names renamed (one warning per
/// variable in `deprecations`). A value is read as TOML (`10`, `true`, `["a", "b"]`,
/// `{ a = "b" }`) when the key's default is not text, and as text otherwise.
pub(super) fn environment(
    env: &HashMap<String, String>,
    defaults: &toml::Table,
    deprecations: &mut Vec<String>,
) -> Vec<Layer> {
    let mut names: Vec<&String> = env.keys().filter(|k| k.starts_with(ENV_PREFIX)).collect();
    names.sort();
    let path_of = |name: &str| -> Vec<String> {
        name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect()
    };
    let set_directly: Vec<Vec<String>> = names.iter().map(|name| path_of(name)).collect();
    let mut layers = Vec::new();
    for name in names {
        let mut path = path_of(name);
        if let Some((_, new)) = RENAMED_SECTIONS.iter().find(|(old, _)| path[0] == *old) {
            path[0] = (*new).to_string();
            let replacement = format!("{ENV_PREFIX}{}", path.join("__").to_uppercase());
            if set_directly.contains(&path) {
                deprecations.push(format!(
                    "config: environment variable {name} is deprecated and ignored: \
                     {replacement} is set too and wins"
                ));
                continue;
            }
            deprecations.push(format!(
                "config: environment variable {name} is deprecated, rename it {replacement}"
            ));
        }
        let raw = &env[name];
        let value = match lookup(defaults, &path) {
            None | Some(toml::Value::String(_)) => toml::Value::String(raw.clone()),
            Some(_) => parse_env_value(raw).unwrap_or_else(|| toml::Value::String(raw.clone())),
        };
        let nested = path.iter().skip(1).rev().fold(value, |value, segment| {
            toml::Value::Table(toml::Table::from_iter([(segment.clone(), value)]))
        });
        let table = toml::Table::from_iter([(path[0].clone(), nested)]);
        layers.push(Layer::new(table, &Source::Env(name.clone())));
    }
    layers
}

/// `DATABASE_URL`, the last layer, for the database URL only.
pub(super) fn database_url(env: &HashMap<String, String>) -> Option<Layer> {
    const NAME: &str = "DATABASE_URL";
    let url = env.get(NAME)?;
    let database = toml::Table::from_iter([("url".to_string(), toml::Value::String(url.clone()))]);
    let table = toml::Table::from_iter([("database".to_string(), toml::Value::Table(database))]);
    Some(Layer::new(table, &Source::Env(NAME.into())))
}

/// `RUST_LOG`, when set and not empty: `logging.level`, winning over every other layer, so
/// it is checked as that setting is (a bare word that is not a level silences every line).
pub(super) fn rust_log(env: &HashMap<String, String>) -> Option<Layer> {
    const NAME: &str = "RUST_LOG";
    let filter = env.get(NAME).filter(|filter| !filter.trim().is_empty())?;
    let logging =
        toml::Table::from_iter([("level".to_string(), toml::Value::String(filter.clone()))]);
    let table = toml::Table::from_iter([("logging".to_string(), toml::Value::Table(logging))]);
    Some(Layer::new(table, &Source::Env(NAME.into())))
}

/// The value at `path` in `table`, if there is one.
pub(super) fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    rest.iter().try_fold(table.get(first)?, |value, segment| {
        value.as_table().and_then(|table| table.get(segment))
    })
}

/// Reads a non-text environment value as a TOML value (`10`, `true`, `["a","b"]`).
fn parse_env_value(raw: &str) -> Option<toml::Value> {
    let document = format!("value = {raw}");
    let mut table = document.parse::<toml::Table>().ok()?;
    table.remove("value")
}

/// `text` as a TOML table; the error names `name` and says where the text is wrong.
pub(super) fn parse_toml(text: &str, name: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|error| ConfigError::Syntax {
            path: name.to_string(),
            reason: error.message().replace('\n', " "),
        })
}

/// A TOML value as the `config` crate holds it, tagged with `origin`.
fn value_of(value: toml::Value, origin: &String) -> config::Value {
    use config::ValueKind;
    let kind = match value {
        toml::Value::String(text) => ValueKind::String(text),
        toml::Value::Integer(number) => ValueKind::I64(number),
        toml::Value::Float(number) => ValueKind::Float(number),
        toml::Value::Boolean(flag) => ValueKind::Boolean(flag),
        toml::Value::Datetime(datetime) => ValueKind::String(datetime.to_string()),
        toml::Value::Array(items) => ValueKind::Array(
            items
                .into_iter()
                .map(|item| value_of(item, origin))
                .collect(),
        ),
        toml::Value::Table(table) => ValueKind::Table(
            table
                .into_iter()
                .map(|(key, value)| (key, value_of(value, origin)))
                .collect(),
        ),
    };
    config::Value::new(Some(origin), kind)
}
