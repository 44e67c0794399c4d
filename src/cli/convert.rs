//! `engram convert`: a GGUF file to a Hugging Face model directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use engram::DType;

#[derive(Args)]
pub struct ConvertArgs {
    /// The .gguf file to convert.
    input: PathBuf,
    /// Output directory (config.json, model.safetensors, tokenizer files).
    output: PathBuf,
    /// Dtype of the written weights (quantized tensors are dequantized exactly, then rounded).
    #[arg(long, default_value = "f32")]
    dtype: DType,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    engram::model::convert::convert_gguf_to_hf(&args.input, &args.output, args.dtype)?;
    eprintln!("wrote {} ({} weights)", args.output.display(), args.dtype);
    Ok(())
}
