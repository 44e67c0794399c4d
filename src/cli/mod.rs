//! Subcommand definitions and the options they share (model path, dtype, threads).

mod agent;
mod bench;
mod convert;
mod generate;
mod info;
mod logits;
mod make_random;
mod memory;
mod memory_analyze;
mod memory_apply;
mod prompts;
mod quantize;
mod steering;
mod vectors;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use engram::backend::cpu::CpuBackend;
use engram::backend::cpu::simd::SimdLevel;
use engram::backend::cuda::{CudaBackend, DeviceChoice};
use engram::backend::Backend;
use engram::model::ModelFiles;
use engram::{DType, KvPrecision, Model};

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
    /// Re-encode a GGUF file's weight matrices as q8_0, q4_0, q4_1, q5_0, q4_k or q6_k (or f16/bf16/f32).
    Quantize(quantize::QuantizeArgs),
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
    /// Weights in memory: f32, f16, bf16 (GGUF blocks decoded exactly, then rounded), q8_0, q4_0,
    /// q4_1, q5_0, q4_k, q6_k (computed on as blocks; a file's blocks of that type are used as
    /// they are; the K types need rows of whole 256-value super-blocks), or native
    /// (each tensor in its file's type when engram computes on it, else f32).
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// CPU threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where to run: auto (CUDA when a usable GPU is present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// KV cache entries: f16 (half the bytes a long context reads per token; the CPU's
    /// default) or f32 (the projections kept exactly; CUDA's only choice). Unset: the device's.
    #[arg(long, value_name = "f16|f32")]
    pub kv_cache: Option<KvPrecision>,
    /// The highest CPU SIMD level to use: scalar, avx2 or avx512 (unset: the best this CPU
    /// has; a higher one than it has runs at its best), for comparing the kernels of each level
    /// on one machine.
    #[arg(long, value_name = "scalar|avx2|avx512", value_parser = parse_simd_level)]
    pub simd: Option<SimdLevel>,
}

pub(crate) fn parse_simd_level(text: &str) -> std::result::Result<SimdLevel, String> {
    match text {
        "scalar" => Ok(SimdLevel::Scalar),
        "avx2" => Ok(SimdLevel::Avx2),
        "avx512" => Ok(SimdLevel::Avx512),
        other => Err(format!("unknown SIMD level {other:?}: use scalar, avx2 or avx512")),
    }
}

/// A command body that runs on whichever backend `--device` selected (a trait rather than a
/// closure because the body is generic over the backend).
pub trait ModelTask {
    type Output;
    fn run<B: Backend>(self, model: Model<B>) -> Result<Self::Output>;
}

/// The backend `--device` resolved to.
pub(crate) enum Selected {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

impl ModelArgs {
    /// Loads the model on the device `--device` names and runs `task` on it.
    pub fn with_model<T: ModelTask>(&self, task: T) -> Result<T::Output> {
        match self.select()? {
            Selected::Cpu(backend) => task.run(self.load_on(backend, self.dtype)?),
            Selected::Cuda(backend) => {
                // The GPU computes with 16-bit weights: f32 (the CPU default) is held as bf16.
                let dtype = if self.dtype == DType::F32 { DType::BF16 } else { self.dtype };
                task.run(self.load_on(*backend, dtype)?)
            }
        }
    }

    pub(crate) fn select(&self) -> Result<Selected> {
        match self.device {
            DeviceChoice::Cpu => Ok(Selected::Cpu(self.cpu_backend()?)),
            DeviceChoice::Cuda(ordinal) => {
                self.check_cuda_kv_cache()?;
                let backend = CudaBackend::new(ordinal).with_context(|| format!("--device cuda:{ordinal}"))?;
                Ok(Selected::Cuda(Box::new(backend)))
            }
            // Usable means the whole backend starts (driver, device, kernels compiled); anything
            // short of that runs on the CPU, with the reason on one line.
            DeviceChoice::Auto => match CudaBackend::new(0) {
                Ok(backend) => {
                    self.check_cuda_kv_cache()?;
                    Ok(Selected::Cuda(Box::new(backend)))
                }
                Err(reason) => {
                    let reason = reason.to_string();
                    let first_line = reason.trim_start_matches("device: ").lines().next().unwrap_or_default().to_string();
                    let more = if reason.lines().count() > 1 { " (--device cuda shows the details)" } else { "" };
                    eprintln!("engram: running on the CPU: {first_line}{more}");
                    Ok(Selected::Cpu(self.cpu_backend()?))
                }
            },
        }
    }

    /// Loads the model on the CPU; for commands that do not run on a GPU yet (an explicit
    /// `--device cuda` is refused rather than ignored).
    pub fn load(&self) -> Result<Model<CpuBackend>> {
        if let DeviceChoice::Cuda(_) = self.device {
            anyhow::bail!("this command runs on the CPU only for now; drop --device {} (or pass --device cpu)", device_text(self.device));
        }
        self.load_on(self.cpu_backend()?, self.dtype)
    }

    /// The CPU backend with `--threads` and `--kv-cache` applied.
    pub(crate) fn cpu_backend(&self) -> Result<CpuBackend> {
        let backend = CpuBackend::new(self.threads, self.simd)?;
        Ok(match self.kv_cache {
            Some(precision) => backend.with_kv_precision(precision),
            None => backend,
        })
    }

    /// CUDA's attention reads an f32 cache only: an explicit other choice is refused, not ignored.
    fn check_cuda_kv_cache(&self) -> Result<()> {
        match self.kv_cache {
            Some(precision) if precision != KvPrecision::F32 => {
                anyhow::bail!("--kv-cache {precision} runs on the CPU only (CUDA keeps an f32 cache): pass --kv-cache f32 or --device cpu")
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn load_on<B: Backend>(&self, backend: B, dtype: DType) -> Result<Model<B>> {
        if !self.model.exists() && self.model == std::path::Path::new(DEFAULT_MODEL) {
            anyhow::bail!("{DEFAULT_MODEL} is missing: run `bash tools/fetch_model.sh` first (see README.md)");
        }
        let files = ModelFiles::open(&self.model)?;
        let progress = indicatif::ProgressBar::new(files.config.num_hidden_layers as u64);
        progress.set_style(indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers").expect("valid template"));
        progress.set_message(self.model.display().to_string());
        let model = Model::load(backend, files, dtype, |done, _| progress.set_position(done as u64))
            .with_context(|| format!("loading {}", self.model.display()))?;
        progress.finish_and_clear();
        Ok(model)
    }
}

fn device_text(device: DeviceChoice) -> String {
    match device {
        DeviceChoice::Auto => "auto".into(),
        DeviceChoice::Cpu => "cpu".into(),
        DeviceChoice::Cuda(n) => format!("cuda:{n}"),
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Info(args) => info::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Bench(args) => bench::run(args),
        Command::MakeRandom(args) => make_random::run(args),
        Command::Vectors(args) => vectors::run(args),
        Command::Memory(args) => memory::run(args),
        Command::Agent(args) => agent::run(args),
    }
}
