//! Model files: configuration, weights by their Hugging Face names (safetensors or GGUF), tokenizer, chat template.

pub mod chat;
pub mod config;
pub mod convert;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_tokenizer;
pub mod quant;
pub mod quantize;
pub mod random;
pub mod safetensors;
pub mod tokenizer;

use crate::error::Result;
use crate::tensor::{DType, HostTensor};

/// A file (or set of files) holding tensors addressed by their Hugging Face names
/// (`model.layers.0.self_attn.q_proj.weight`, ...), whatever the on-disk naming.
pub trait TensorSource {
    /// What to call this source in messages (usually the path).
    fn describe(&self) -> String;
    /// Hugging Face names of all tensors available.
    fn tensor_names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// Shape (outermost first) without loading the data.
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// Storage type name as in the file ("BF16", "Q4_1", ...), for `engram info`.
    fn stored_type(&self, name: &str) -> Result<String>;
    /// Loads (dequantizing and converting as needed) one tensor into `dtype`.
    fn load(&self, name: &str, dtype: DType) -> Result<HostTensor>;
}

/// Memory-maps a model file read-only.
pub fn map_file(path: &std::path::Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    // SAFETY: mapping is unsafe only because another process could truncate or rewrite the file
    // while it is mapped; model files are not modified while engram reads them (README says so).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| crate::Error::io(path, e))
}

/// How the model was stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    HuggingFaceDir,
    Gguf,
}

/// A model path resolved into its config, tensors, tokenizer and chat template (nothing is
/// loaded into a backend yet).
pub struct ModelFiles {
    pub path: std::path::PathBuf,
    pub format: ModelFormat,
    pub config: config::ModelConfig,
    pub source: Box<dyn TensorSource + Send + Sync>,
    pub tokenizer: tokenizer::TextTokenizer,
    pub chat_template: Option<chat::ChatTemplate>,
    /// End-of-sequence ids from every place that names them (config, generation config, tokenizer).
    pub eos_ids: Vec<u32>,
}

fn read_json_if_exists(path: &std::path::Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| crate::Error::format(path, format!("invalid JSON: {e}")))
}

fn json_ids(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        _ => Vec::new(),
    }
}

impl ModelFiles {
    /// Opens a Hugging Face model directory or a `.gguf` file.
    pub fn open(path: &std::path::Path) -> Result<Self> {
        if !path.exists() {
            return Err(crate::Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or directory")));
        }
        if path.is_dir() {
            Self::open_hf_dir(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_hf_dir(dir: &std::path::Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(crate::Error::format(dir, "missing config.json (not a Hugging Face model directory)"));
        }
        let config = config::ModelConfig::from_config_json(&config_path)?;
        let tokenizer = tokenizer::TextTokenizer::from_dir(dir)?;
        let tokenizer_config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json_if_exists(&dir.join("generation_config.json"))?;
        let chat_template = tokenizer_config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(|t| t.as_str().map(String::from))
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
            .map(|source| chat::ChatTemplate::new(source, tokenizer.bos_token.clone(), tokenizer.eos_token.clone()));
        let mut eos_ids = config.eos_token_ids.clone();
        eos_ids.extend(json_ids(generation_config.as_ref().and_then(|g| g.get("eos_token_id"))));
        Self::finish(dir, ModelFormat::HuggingFaceDir, config, Box::new(safetensors::SafetensorsSource::open_dir(dir)?), tokenizer, chat_template, eos_ids)
    }

    fn open_gguf(path: &std::path::Path) -> Result<Self> {
        let source = gguf_model::GgufModelSource::open(path)?;
        let config = source.config().clone();
        let file = source.file();
        let tokenizer_json = gguf_tokenizer::tokenizer_json_from_gguf(file)?;
        let tokenizer_config = gguf_tokenizer::tokenizer_config_from_gguf(file)?;
        let tokenizer = tokenizer::TextTokenizer::from_json(&tokenizer_json.to_string(), Some(&tokenizer_config), path)?;
        let chat_template = tokenizer_config
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(|source| chat::ChatTemplate::new(source, tokenizer.bos_token.clone(), tokenizer.eos_token.clone()));
        let eos_ids = config.eos_token_ids.clone();
        Self::finish(path, ModelFormat::Gguf, config, Box::new(source), tokenizer, chat_template, eos_ids)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        path: &std::path::Path,
        format: ModelFormat,
        config: config::ModelConfig,
        source: Box<dyn TensorSource + Send + Sync>,
        tokenizer: tokenizer::TextTokenizer,
        chat_template: Option<chat::ChatTemplate>,
        mut eos_ids: Vec<u32>,
    ) -> Result<Self> {
        if let Some(id) = tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(crate::Error::format(path, format!("the tokenizer has {} tokens but the model's vocabulary is {}", tokenizer.vocab_size(), config.vocab_size)));
        }
        Ok(ModelFiles { path: path.to_path_buf(), format, config, source, tokenizer, chat_template, eos_ids })
    }
}
