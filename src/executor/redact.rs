//! Keeps secret values (agent variables, often API keys) out of agentd's own logs.

/// Replaces every occurrence of the secrets in a text with `***`.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

/// Shorter values are not treated as secrets: replacing "1" or "on" everywhere would make
/// messages unreadable, and such values are not keys.
const MIN_SECRET_LEN: usize = 4;

impl Redactor {
    /// A redactor for these values (empty and very short ones are ignored).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut secrets: Vec<String> = values
            .into_iter()
            .filter(|value| value.len() >= MIN_SECRET_LEN)
            .map(str::to_string)
            .collect();
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_secrets_longest_first_and_ignores_short_values() {
        let redactor = Redactor::new(["sk-abc", "sk-abcdef", "on", ""]);
        assert_eq!(
            redactor.redact("key sk-abcdef and sk-abc, on"),
            "key *** and ***, on"
        );
    }
}
