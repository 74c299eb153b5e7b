//! Text as agentd shows it in errors and log lines.

/// Most characters of a value quoted in an error message.
pub const MAX_QUOTED_CHARS: usize = 200;

/// `"value"` with quotes and escapes (control characters included), for error messages; at
/// most [`MAX_QUOTED_CHARS`] characters of it, then `…`, however long the value.
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// `text` cut after [`MAX_QUOTED_CHARS`] characters (with `…`), not quoted.
pub fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_escaped_and_cut() {
        assert_eq!(quoted("a\u{1b}[31m"), "\"a\\u{1b}[31m\"");
        let long = "x".repeat(1 << 20);
        assert_eq!(
            quoted(&long),
            format!("{:?}…", "x".repeat(MAX_QUOTED_CHARS))
        );
        assert_eq!(cut(&long), format!("{}…", "x".repeat(MAX_QUOTED_CHARS)));
        assert_eq!(cut("short"), "short");
    }
}
