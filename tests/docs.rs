//! The documentation stays in step with the code: every setting of config/default.toml is
//! in the operator's guide's configuration reference, and so is every metric agentd exports.

#[test]
fn the_operators_guide_documents_every_setting() {
    let guide = include_str!("../docs/operations.md");
    let keys = agentd::config::default_keys();
    assert!(keys.len() > 10, "{keys:?}");
    let missing: Vec<String> = keys
        .into_iter()
        .map(|key| format!("| `{key}` |"))
        .filter(|row| !guide.contains(row))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
}

#[test]
fn the_operators_guide_documents_every_metric() {
    let guide = include_str!("../docs/operations.md");
    let missing: Vec<&str> = agentd::measure::CATALOG
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !guide.contains(&format!("| `{name}` |")))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
}
