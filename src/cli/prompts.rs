//! Turning prompt text (raw or chat-formatted) and prompt files into token ids.

use std::path::Path;

use anyhow::{bail, Context, Result};
use engram::backend::Backend;
use engram::model::chat::ChatMessage;
use engram::Model;
use serde::Deserialize;

/// One prompt of a `--prompts` file: a JSON string, or an object with per-prompt options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    pub prompt: String,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// This sequence's own steering (replaces the command line's --steer for it).
    #[serde(default)]
    pub steer: Option<Vec<super::steering::SteerSpec>>,
}

/// Reads a prompts file: one JSON string or object per line; blank lines are skipped.
pub fn read_prompts_file(path: &Path) -> Result<Vec<PromptSpec>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        let spec = match value {
            serde_json::Value::String(prompt) => PromptSpec { prompt, system: None, max_tokens: None, steer: None },
            other => serde_json::from_value(other).with_context(|| format!("{}:{}: expected a string or {{\"prompt\": ..., \"system\"?: ..., \"max_tokens\"?: ..., \"steer\"?: [...]}}", path.display(), i + 1))?,
        };
        prompts.push(spec);
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

/// Token ids of a prompt: rendered with the chat template when `chat`, else encoded raw.
pub fn prompt_ids<B: Backend>(model: &Model<B>, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
    let ids = if chat {
        let template = model.chat_template.as_ref().with_context(|| format!("{} has no chat template; drop --chat", model.path.display()))?;
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", text));
        let rendered = template.render(&messages, true)?;
        model.tokenizer.encode(&rendered, false)?
    } else {
        if system.is_some() {
            bail!("--system needs --chat");
        }
        model.tokenizer.encode(text, true)?
    };
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    Ok(ids)
}
