//! Text <-> token ids: a Hugging Face `tokenizers` Tokenizer plus the special-token facts of
//! tokenizer_config.json (BOS handling, EOS ids).

use std::path::Path;

use crate::error::{Error, Result};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// Whether a BOS token is prepended to raw (non-chat) prompts.
    pub add_bos: bool,
}

/// A token given in tokenizer_config.json either as a string or as `{"content": ...}`.
fn token_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// From a parsed tokenizer.json and (optionally) tokenizer_config.json; `origin` names the
    /// file(s) in errors.
    pub fn from_json(tokenizer_json: &str, tokenizer_config: Option<&serde_json::Value>, origin: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer = tokenizer_json
            .parse()
            .map_err(|e| Error::format(origin, format!("cannot load tokenizer: {e}")))?;
        let bos_token = token_string(tokenizer_config.and_then(|c| c.get("bos_token")));
        let eos_token = token_string(tokenizer_config.and_then(|c| c.get("eos_token")));
        let add_bos = tokenizer_config.and_then(|c| c.get("add_bos_token")).and_then(|v| v.as_bool()).unwrap_or(false);
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(TextTokenizer { inner, bos_token, eos_token, bos_id, add_bos })
    }

    /// Reads `tokenizer.json` (required) and `tokenizer_config.json` (optional) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(dir, "missing tokenizer.json (engram needs the Hugging Face tokenizer file)"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let raw = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            Some(serde_json::from_str(&raw).map_err(|e| Error::format(&config_path, format!("invalid JSON: {e}")))?)
        } else {
            None
        };
        Self::from_json(&text, config.as_ref(), &path)
    }

    /// Encodes text. Special tokens written in the text (e.g. `<|im_start|>`) are recognised.
    /// `add_special` applies the tokenizer's post-processor and the BOS rule (raw prompts);
    /// chat-rendered text already holds its special tokens and is encoded without them.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(format!("cannot decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
