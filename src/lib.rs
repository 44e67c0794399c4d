//! engram: an inference engine for Llama-family models whose first-class feature is activation
//! steering fused into the residual kernels.
//!
//! The pieces, in data-flow order: [`model`] reads model files (Hugging Face directories and
//! GGUF) into a [`model::Model`]; [`forward`] runs the one forward pass over a
//! [`backend::Backend`]; [`kv`] holds the preallocated KV cache; [`generate`] samples tokens.

pub mod error;
pub mod model;
pub mod tensor;

pub use error::{Error, Result};
pub use tensor::{DType, HostTensor, TensorData};
