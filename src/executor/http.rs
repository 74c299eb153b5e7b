//! The HTTP client of the `openai` and `webhook` executors: rustls with the ring provider
//! (the one sqlx uses, so the build has one crypto library) and the webpki root
//! certificates, with the timeouts of `[executors.http]`; and reading answers within a cap,
//! because the endpoints are driven by tenants and an answer may never end.

use std::sync::Arc;

use crate::config::HttpClientSettings;

/// Most bytes of an error answer's body read (the start of it goes into the error).
pub const ERROR_BODY_BYTES: usize = 64 * 1024;

/// A client for outgoing requests with the given timeouts; an error only if TLS cannot be
/// set up.
pub fn client(timeouts: HttpClientSettings) -> Result<reqwest::Client, String> {
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
        .connect_timeout(timeouts.connect_timeout)
        .read_timeout(timeouts.read_timeout)
        .build()
        .map_err(|error| format!("HTTP client setup failed: {error}"))
}

/// A response body read up to a cap.
#[derive(Debug, Default)]
pub struct CappedBody {
    /// At most the cap's worth of the body's first bytes.
    pub bytes: Vec<u8>,
    /// The body was longer than the cap; the rest was not read.
    pub truncated: bool,
    /// Reading broke off (connection error, `executors.http.read_timeout`) after `bytes`.
    pub error: Option<reqwest::Error>,
}

/// Reads `response`'s body, keeping at most `limit` bytes and reading little more than
/// that, however long the body is.
pub async fn read_capped(mut response: reqwest::Response, limit: usize) -> CappedBody {
    let mut body = CappedBody::default();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.bytes.len();
                if chunk.len() > room {
                    body.bytes.extend_from_slice(&chunk[..room]);
                    body.truncated = true;
                    return body;
                }
                body.bytes.extend_from_slice(&chunk);
            }
            Ok(None) => return body,
            Err(error) => {
                body.error = Some(error);
                return body;
            }
        }
    }
}

/// The start of an error answer's body (read within [`ERROR_BODY_BYTES`]), on one line.
pub async fn error_excerpt(response: reqwest::Response) -> String {
    let body = read_capped(response, ERROR_BODY_BYTES).await;
    let mut text = excerpt(&String::from_utf8_lossy(&body.bytes), 200);
    if body.truncated && !text.ends_with('…') {
        text.push('…');
    }
    text
}

/// What went wrong with a request, on one line; a timeout names the setting that ended it.
pub fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() && error.is_connect() {
        "no connection within executors.http.connect_timeout".into()
    } else if error.is_timeout() {
        "no data within executors.http.read_timeout".into()
    } else {
        error.to_string()
    }
}

/// The first `limit` characters of a response body, for error messages.
pub fn excerpt(text: &str, limit: usize) -> String {
    let mut excerpt: String = text.chars().take(limit).collect();
    if excerpt.len() < text.len() {
        excerpt.push('…');
    }
    excerpt.replace(['\n', '\r'], " ")
}
