//! Subcommand definitions and the options they share (model path, dtype, threads).

mod agent;
mod bench;
mod convert;
mod generate;
mod info;
mod logits;
mod make_random;
mod memory;
mod memory_apply;
mod prompts;
mod steering;
mod vectors;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use engram::backend::cpu::CpuBackend;
use engram::model::ModelFiles;
use engram::{DType, Model};

/// Where README.md's set-up puts the default model.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "engram", version, about = "Llama-family inference with fused activation steering")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (or a batch of prompts).
    Generate(generate::GenerateArgs),
    /// Write the logits of a prompt to a .npy file.
    Logits(logits::LogitsArgs),
    /// Convert a GGUF file into a Hugging Face model directory.
    Convert(convert::ConvertArgs),
    /// Print a model's architecture, sizes, dtypes, tokenizer and template facts.
    Info(info::InfoArgs),
    /// Measure prefill and decode speed (median over interleaved repeats).
    Bench(bench::BenchArgs),
    /// Write a random-weight model directory (for tests and benchmarks).
    MakeRandom(make_random::MakeRandomArgs),
    /// Compute steering vectors from contrastive prompts, or show a vector file.
    Vectors(vectors::VectorsArgs),
    /// Neural procedural memory: distil, list, show, merge, export and retrieve memory banks.
    Memory(memory::MemoryArgs),
    /// Agents in text environments: collect experiences, evaluate memory conditions.
    Agent(agent::AgentArgs),
}

/// Options every command that runs a model takes.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Weight dtype in memory (GGUF quantized weights are dequantized to it).
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// CPU threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model<CpuBackend>> {
        if !self.model.exists() && self.model == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!("{DEFAULT_MODEL} is missing: run `bash tools/fetch_model.sh` first (see README.md)");
        }
        let files = ModelFiles::open(&self.model)?;
        let backend = CpuBackend::new(self.threads, None)?;
        let progress = indicatif::ProgressBar::new(files.config.num_hidden_layers as u64);
        progress.set_style(indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers").expect("valid template"));
        progress.set_message(self.model.display().to_string());
        let model = Model::load(backend, files, self.dtype, |done, _| progress.set_position(done as u64))
            .with_context(|| format!("loading {}", self.model.display()))?;
        progress.finish_and_clear();
        Ok(model)
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
        Command::MakeRandom(args) => make_random::run(args),
        Command::Vectors(args) => vectors::run(args),
        Command::Memory(args) => memory::run(args),
        Command::Agent(args) => agent::run(args),
    }
}
