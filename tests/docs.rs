//! The documentation stays in step with the code: every setting of config/default.toml is
//! in the README's configuration reference.

#[test]
fn readme_documents_every_setting() {
    let readme = include_str!("../README.md");
    let keys = agentd::config::default_keys();
    assert!(keys.len() > 10, "{keys:?}");
    let missing: Vec<String> = keys
        .into_iter()
        .map(|key| format!("`{key}`"))
        .filter(|name| !readme.contains(name))
        .collect();
    assert!(missing.is_empty(), "README.md lacks {missing:?}");
}
