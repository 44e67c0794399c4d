//! engram: an inference engine for Llama-family models whose first-class feature is activation
//! steering fused into the residual kernels.
//!
//! The pieces, in data-flow order: [`model`] resolves model files (Hugging Face directories and
//! GGUF) into [`model::ModelFiles`]; [`session::Model`] holds the weights on a
//! [`backend::Backend`]; [`forward`] is the one forward pass; [`kv`] the preallocated KV cache;
//! [`session::Session`] runs batches of rows; [`generate`] samples tokens.
//!
//! ```no_run
//! use engram::backend::cpu::CpuBackend;
//! use engram::generate::{generate, GenerationRequest, SamplingParams, StopParams};
//! use engram::model::ModelFiles;
//! use engram::{DType, Model, Session, SessionOptions};
//!
//! # fn main() -> engram::Result<()> {
//! let files = ModelFiles::open("models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! let model = Model::load(CpuBackend::new(2, None)?, files, DType::BF16, |_, _| {})?;
//! let prompt_ids = model.tokenizer.encode("The capital of France is", true)?;
//! let mut session = Session::new(&model, SessionOptions::new(1, 256))?;
//! let request = GenerationRequest {
//!     prompt_ids,
//!     sampling: SamplingParams::default(),
//!     stop: StopParams { max_tokens: 16, ..Default::default() },
//! };
//! let (outputs, timing) = generate(&mut session, &[request], &mut |_: usize, text: &str| print!("{text}"))?;
//! println!("\n{:?}, {:.1} tok/s", outputs[0].finish_reason, timing.decode_tokens_per_second());
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod backend;
pub mod error;
pub mod forward;
pub mod generate;
pub mod kv;
pub mod memory;
pub mod model;
pub mod session;
pub mod steer;
pub mod tensor;
pub mod weights;

pub use error::{Error, Result};
pub use session::{Model, Session, SessionOptions};
pub use backend::KvPrecision;
pub use tensor::{DType, HostTensor, TensorData};
