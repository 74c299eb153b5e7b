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

#[test]
fn the_readmes_figures_come_from_the_benchmarks_page() {
    let readme = include_str!("../README.md");
    let benchmarks = include_str!("../docs/benchmarks.md");
    let start = readme
        .find("## Benchmarks")
        .expect("README has a Benchmarks section");
    let section = &readme[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    // Every decimal figure of the section appears verbatim in docs/benchmarks.md.
    let figures: Vec<&str> = section
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|word| word.contains('.') && word.chars().any(|c| c.is_ascii_digit()))
        .map(|word| word.trim_matches('.'))
        .filter(|word| word.contains('.'))
        .collect();
    assert!(figures.len() >= 8, "{figures:?}");
    let missing: Vec<&&str> = figures
        .iter()
        .filter(|figure| !benchmarks.contains(**figure))
        .collect();
    assert!(
        missing.is_empty(),
        "README figures not in docs/benchmarks.md: {missing:?}"
    );
}
