//! Model files: configuration, weights by their Hugging Face names (safetensors or GGUF), tokenizer, chat template.

pub mod config;
pub mod convert;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_tokenizer;
pub mod quant;

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
