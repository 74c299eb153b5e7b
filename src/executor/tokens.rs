//! Token estimates for `openai` runs whose server streams no usage (many
//! OpenAI-compatible servers do not): the prompt and the reply counted with the model
//! family's tokenizer, compiled into the binary (tiktoken-rs; nothing is downloaded at run
//! time). The figures are marked `tokens_estimated`; figures the server reports win.

use serde_json::{Value, json};
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

/// Tokens OpenAI's chat format adds around every message, and to prime the reply (the
/// figures of OpenAI's cookbook for current models).
const PER_MESSAGE: usize = 3;
const REPLY_PRIMING: usize = 3;

/// An estimate of a run's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The encoding counted with.
    pub encoding: &'static str,
}

impl Estimate {
    /// The figures for `resource_usage`.
    pub fn figures(&self) -> [(&'static str, Value); 5] {
        [
            ("prompt_tokens", json!(self.prompt_tokens)),
            ("completion_tokens", json!(self.completion_tokens)),
            (
                "total_tokens",
                json!(self.prompt_tokens + self.completion_tokens),
            ),
            ("tokens_estimated", json!(true)),
            ("tokenizer", json!(self.encoding)),
        ]
    }
}

/// The encoding of `model`: OpenAI's own models by name; any other family (Llama, Qwen,
/// Mistral through vLLM or Ollama) is counted with o200k_base, the encoding of OpenAI's
/// current models, as an estimate.
fn encoding(model: &str) -> (&'static CoreBPE, &'static str) {
    match get_tokenizer(model) {
        Some(Tokenizer::Cl100kBase) => (tiktoken_rs::cl100k_base_singleton(), "cl100k_base"),
        _ => (tiktoken_rs::o200k_base_singleton(), "o200k_base"),
    }
}

/// Counts `messages` (role, content) as the prompt and `reply` as the completion. CPU-bound
/// (about a second per few megabytes): call it off the async threads.
pub fn estimate(model: &str, messages: &[(String, String)], reply: &str) -> Estimate {
    let (bpe, encoding) = encoding(model);
    let prompt_tokens = messages
        .iter()
        .map(|(role, content)| PER_MESSAGE + bpe.count_ordinary(role) + bpe.count_ordinary(content))
        .sum::<usize>()
        + REPLY_PRIMING;
    Estimate {
        prompt_tokens,
        completion_tokens: bpe.count_ordinary(reply),
        encoding,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_models_encoding() {
        let messages = vec![
            ("system".to_string(), "You are terse.".to_string()),
            ("user".to_string(), "hello world".to_string()),
        ];
        let gpt4 = estimate("gpt-4", &messages, "hello world");
        assert_eq!(gpt4.encoding, "cl100k_base");
        // "hello world" is two tokens in both encodings.
        assert_eq!(gpt4.completion_tokens, 2);
        let llama = estimate("llama3.1:8b", &messages, "hello world");
        assert_eq!(llama.encoding, "o200k_base");
        assert_eq!(llama.completion_tokens, 2);
        // 3 per message, the roles, the contents, 3 to prime the reply.
        let (bpe, _) = encoding("gpt-4o");
        let expected = 3
            + bpe.count_ordinary("system")
            + bpe.count_ordinary("You are terse.")
            + 3
            + bpe.count_ordinary("user")
            + 2
            + 3;
        assert_eq!(estimate("gpt-4o", &messages, "").prompt_tokens, expected);
        // Special tokens in a tenant's text are text, not control tokens.
        assert!(estimate("gpt-4o", &[], "<|endoftext|>").completion_tokens > 1);
    }
}
