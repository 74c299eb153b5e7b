//! The HTTP client of the `openai` and `webhook` executors: rustls with the ring provider
//! (the one sqlx uses, so the build has one crypto library) and the webpki root
//! certificates.

use std::sync::Arc;

/// A client for outgoing requests; `None` only if TLS cannot be set up.
pub fn client() -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| format!("TLS setup failed: {error}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .user_agent(concat!("agentd/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| format!("HTTP client setup failed: {error}"))
}

/// The first `limit` characters of a response body, for error messages.
pub fn excerpt(text: &str, limit: usize) -> String {
    let mut excerpt: String = text.chars().take(limit).collect();
    if excerpt.len() < text.len() {
        excerpt.push('…');
    }
    excerpt.replace(['\n', '\r'], " ")
}
