//! `engram bench`: prefill and decode tokens/s per weight dtype, conditions interleaved in one
//! process, medians and interquartile ranges over repeats, next to the memory-bandwidth floor.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use engram::backend::cpu::simd;
use engram::backend::cpu::CpuBackend;
use engram::backend::Backend;
use engram::generate::argmax;
use engram::session::{LogitRequest, SequenceInput};
use engram::{DType, Model, Session, SessionOptions};
use rayon::prelude::*;
use serde::Serialize;

#[derive(Args)]
pub struct BenchArgs {
    #[arg(short, long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Weight dtypes to compare, each loaded once and measured in turn every repeat.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<DType>,
    /// Prompt tokens for the prefill measurement (0 skips it).
    #[arg(short = 'p', long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Decode steps for the decode measurement (0 skips it).
    #[arg(short = 'n', long, default_value_t = 128)]
    decode_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Summary {
    median: f64,
    q1: f64,
    q3: f64,
    samples: Vec<f64>,
}

fn summarize(mut samples: Vec<f64>) -> Summary {
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let pos = q * (sorted.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
    };
    let s = Summary { median: at(0.5), q1: at(0.25), q3: at(0.75), samples: Vec::new() };
    samples.shrink_to_fit();
    Summary { samples, ..s }
}

#[derive(Serialize)]
struct DtypeResult {
    dtype: String,
    weight_bytes: usize,
    prefill_tokens_per_second: Option<Summary>,
    decode_tokens_per_second: Option<Summary>,
    decode_bytes_per_token: f64,
    decode_floor_tokens_per_second: f64,
}

/// Deterministic token ids spread over the vocabulary (what llama-bench does with random tokens).
fn bench_tokens(count: usize, vocab: usize) -> Vec<u32> {
    (0..count).map(|i| ((i as u64 * 2_654_435_761 + 12_345) % vocab as u64) as u32).collect()
}

fn measure_prefill(model: &Model<CpuBackend>, tokens: &[u32]) -> Result<f64> {
    let mut options = SessionOptions::new(1, tokens.len());
    options.max_batch_rows = tokens.len();
    let mut session = Session::new(model, options)?;
    let start = Instant::now();
    session.step(&[SequenceInput { slot: 0, tokens, logits: LogitRequest::Last }])?;
    Ok(tokens.len() as f64 / start.elapsed().as_secs_f64())
}

fn measure_decode(model: &Model<CpuBackend>, steps: usize, batch: usize) -> Result<f64> {
    let mut session = Session::new(model, SessionOptions::new(batch, steps + 1))?;
    let mut next: Vec<u32> = (0..batch as u32).map(|b| b + 1).collect();
    let start = Instant::now();
    for _ in 0..steps {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<SequenceInput> = tokens.iter().enumerate().map(|(slot, t)| SequenceInput { slot, tokens: t, logits: LogitRequest::Last }).collect();
        let logits = session.step(&inputs)?;
        next = (0..batch).map(|b| argmax(logits.last(b))).collect();
    }
    Ok((steps * batch) as f64 / start.elapsed().as_secs_f64())
}

/// Streaming-read bandwidth in bytes/s with the backend's threads (median of 5 passes over 1 GiB).
fn memory_bandwidth(backend: &CpuBackend) -> f64 {
    let data = vec![1.0f32; 1 << 28];
    let mut rates = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        // A SIMD reduction per chunk: a plain float sum would be latency-bound, not memory-bound.
        let level = backend.simd_level();
        let sum: f32 = backend.run(|| data.par_chunks(1 << 16).map(|c| simd::sum_squares(level, c)).sum());
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        rates.push((data.len() * 4) as f64 / secs);
    }
    summarize(rates).median
}

pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.repeats > 0 && args.batch > 0, "--repeats and --batch must be positive");
    let mut models = Vec::new();
    for &dtype in &args.dtypes {
        let model_args = super::ModelArgs { model: args.model.clone(), dtype, threads: args.threads };
        models.push(model_args.load()?);
    }
    let config = models[0].config.clone();
    let backend_name = models[0].backend.name();
    let bandwidth = memory_bandwidth(&models[0].backend);
    let prompt = bench_tokens(args.prompt_tokens, config.vocab_size);
    // Warm-up: first touches of weights and buffers are not part of the measurement.
    for model in &models {
        if args.prompt_tokens > 0 {
            measure_prefill(model, &prompt[..prompt.len().min(64)])?;
        }
        measure_decode(model, 4, args.batch)?;
    }
    let mut prefill: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    let mut decode: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    for _ in 0..args.repeats {
        for (m, model) in models.iter().enumerate() {
            if args.prompt_tokens > 0 {
                prefill[m].push(measure_prefill(model, &prompt)?);
            }
            if args.decode_tokens > 0 {
                decode[m].push(measure_decode(model, args.decode_tokens, args.batch)?);
            }
        }
    }
    // Bytes a decode step reads: every weight matrix once, plus the KV cache at the mean context.
    let mean_context = (args.decode_tokens as f64 + 1.0) / 2.0;
    let kv_bytes = mean_context * (config.num_hidden_layers * 2 * config.kv_dim() * 4) as f64 * args.batch as f64;
    println!("engram bench: {} | {} | p={} n={} batch={} repeats={}", args.model.display(), backend_name, args.prompt_tokens, args.decode_tokens, args.batch, args.repeats);
    println!("memory bandwidth (streaming read): {:.1} GB/s", bandwidth / 1e9);
    println!("{:<6} {:>10} {:>22} {:>22} {:>12} {:>8}", "dtype", "weights", "prefill tok/s (IQR)", "decode tok/s (IQR)", "floor tok/s", "of floor");
    let mut results = Vec::new();
    for (m, model) in models.iter().enumerate() {
        let bytes_per_token = model.weights.matrix_bytes as f64 / args.batch as f64 + kv_bytes / args.batch as f64;
        let floor = bandwidth / bytes_per_token;
        let p = (!prefill[m].is_empty()).then(|| summarize(prefill[m].clone()));
        let d = (!decode[m].is_empty()).then(|| summarize(decode[m].clone()));
        let show = |s: &Option<Summary>| s.as_ref().map_or("-".to_string(), |s| format!("{:.1} ({:.1}-{:.1})", s.median, s.q1, s.q3));
        let of_floor = d.as_ref().map_or("-".to_string(), |d| format!("{:.0}%", 100.0 * d.median / floor));
        println!("{:<6} {:>8.1}MB {:>22} {:>22} {:>12.1} {:>8}", model.weights.dtype, model.weights.matrix_bytes as f64 / 1e6, show(&p), show(&d), floor, of_floor);
        results.push(DtypeResult {
            dtype: model.weights.dtype.to_string(),
            weight_bytes: model.weights.matrix_bytes,
            prefill_tokens_per_second: p,
            decode_tokens_per_second: d,
            decode_bytes_per_token: bytes_per_token,
            decode_floor_tokens_per_second: floor,
        });
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "model": args.model, "backend": backend_name, "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens, "batch": args.batch, "repeats": args.repeats,
            "memory_bandwidth_bytes_per_second": bandwidth, "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
