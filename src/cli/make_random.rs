//! `engram make-random`: random-weight model directories shaped like real models.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use engram::model::config::{Architecture, ModelConfig};
use engram::model::random::{tiny_config, write_random_model};
use engram::DType;

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    Tiny,
    #[value(name = "smollm2-135m")]
    Smollm2135m,
    #[value(name = "llama-1b")]
    Llama1b,
    #[value(name = "llama-8b")]
    Llama8b,
}

#[derive(Args)]
pub struct MakeRandomArgs {
    /// Which model's shape to copy.
    #[arg(long, value_enum, default_value = "tiny")]
    like: Shape,
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn shaped(base: ModelConfig, hidden: usize, ffn: usize, layers: usize, heads: usize, kv_heads: usize, vocab: usize, theta: f32, tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: hidden / heads,
        vocab_size: vocab,
        rope_theta: theta,
        tie_word_embeddings: tied,
        max_position_embeddings: 8192,
        ..base
    }
}

pub fn run(args: MakeRandomArgs) -> Result<()> {
    let base = tiny_config(Architecture::Llama);
    let config = match args.like {
        Shape::Tiny => base,
        Shape::Smollm2135m => shaped(base, 576, 1536, 30, 9, 3, 49152, 100000.0, true),
        Shape::Llama1b => shaped(base, 2048, 8192, 16, 32, 8, 128256, 500000.0, true),
        Shape::Llama8b => shaped(base, 4096, 14336, 32, 32, 8, 128256, 500000.0, false),
    };
    write_random_model(&args.output, &config, args.dtype, args.seed)?;
    eprintln!("wrote a random {} model to {}", config.architecture.model_type(), args.output.display());
    Ok(())
}
