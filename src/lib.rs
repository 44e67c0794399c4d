//! engram: an inference engine for Llama-family models whose first-class feature is activation
//! steering fused into the residual kernels.
//!
//! The pieces, in data-flow order: [`model`] resolves model files (Hugging Face directories and
//! GGUF) into [`model::ModelFiles`]; [`session::Model`] holds the weights on a
//! [`backend::Backend`]; [`forward`] is the one forward pass; [`kv`] the preallocated KV cache;
//! [`session::Session`] runs batches of rows; [`generate`] samples tokens.

pub mod backend;
pub mod error;
pub mod forward;
pub mod generate;
pub mod kv;
pub mod model;
pub mod session;
pub mod tensor;
pub mod weights;

pub use error::{Error, Result};
pub use session::{Model, Session, SessionOptions};
pub use tensor::{DType, HostTensor, TensorData};
