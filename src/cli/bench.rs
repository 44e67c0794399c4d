//! `engram bench`: prefill and decode tokens/s per weight dtype and per steering condition, all
//! interleaved in one process, medians and interquartile ranges over repeats, overheads as
//! ratios taken round by round, next to the memory-bandwidth floor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use engram::backend::cpu::buffer::ZeroedBuffer;
use engram::backend::cpu::simd;
use engram::backend::cpu::CpuBackend;
use engram::backend::cuda::{CudaBackend, DeviceChoice};
use engram::backend::Backend;
use engram::generate::argmax;
use engram::session::{LogitRequest, SequenceInput};
use engram::steer::{CapturePlan, CapturePositions, Point, ReadoutPlan, SteeringMode, SteeringPlan, SteeringTerm, SteeringVector};
use engram::{DType, KvPrecision, Model, Session, SessionOptions};
use rand::{Rng, SeedableRng};
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
    /// Tokens already in each sequence's context when the decode measurement starts (prefilled
    /// untimed), to measure decode at long contexts.
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where to run: auto (CUDA when usable, else the CPU), cpu, cuda or cuda:N. The bandwidth
    /// floor is a streaming read on the CPU and a device-to-device copy on a GPU.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// KV cache entries: f16 or f32 (unset: the device's default, f16 on the CPU, f32 on CUDA).
    /// The floor counts the cache's bytes at this precision.
    #[arg(long, value_name = "f16|f32")]
    kv_cache: Option<KvPrecision>,
    /// The highest CPU SIMD level to use: scalar, avx2 or avx512 (unset: the best this CPU has),
    /// to time each level's kernels on one machine.
    #[arg(long, value_name = "scalar|avx2|avx512", value_parser = super::parse_simd_level)]
    simd: Option<engram::backend::cpu::simd::SimdLevel>,
    /// Conditions measured in turn every repeat, comma-separated; each is `none` or features
    /// joined by `+`: steer (a vector at every layer and token), per-seq (each sequence of the
    /// batch its own vector), relative, clamp (conditional steering), capture (every layer at
    /// every token), readout (|h| and projections at every layer). A second `none` is reported
    /// as an A/A control: its overhead against the first shows the measurement's own bias.
    #[arg(long, value_delimiter = ',', default_value = "none")]
    conditions: Vec<Condition>,
    /// Steer with this vector file instead of random vectors (per-seq still uses random ones).
    #[arg(long)]
    steer_file: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One measured configuration of steering, capture and readouts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Condition {
    name: String,
    steer: bool,
    per_sequence: bool,
    mode: Option<SteeringMode>,
    capture: bool,
    readout: bool,
}

impl std::str::FromStr for Condition {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut c = Condition { name: text.to_string(), ..Default::default() };
        if text == "none" {
            return Ok(c);
        }
        for feature in text.split('+') {
            match feature {
                "steer" => c.steer = true,
                "per-seq" => (c.steer, c.per_sequence) = (true, true),
                "relative" => (c.steer, c.mode) = (true, Some(SteeringMode::Relative)),
                "clamp" => (c.steer, c.mode) = (true, Some(SteeringMode::Clamp { target: 1.0 })),
                "capture" => c.capture = true,
                "readout" => c.readout = true,
                other => {
                    return Err(format!(
                        "unknown condition feature '{other}' (expected none or steer, per-seq, relative, clamp, capture, readout joined by +)"
                    ))
                }
            }
        }
        Ok(c)
    }
}

/// The vectors conditions steer with: one shared vector, and one per sequence of the batch.
struct BenchVectors {
    shared: Arc<SteeringVector>,
    per_sequence: Vec<Arc<SteeringVector>>,
}

/// A random direction at every layer with norm `norm` (small next to residual norms, so the
/// steered model stays numerically ordinary).
fn random_vector(hidden: usize, layers: usize, norm: f32, seed: u64) -> Arc<SteeringVector> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = SteeringVector::new(hidden, layers);
    for l in 0..layers {
        let d: Vec<f32> = (0..hidden).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let n = d.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.set(l, d.iter().map(|x| x * norm / n).collect()).expect("random direction fits");
    }
    Arc::new(v)
}

impl Condition {
    /// Installs this condition's plans on a fresh session of `slots` sequences.
    fn install<B: Backend>(&self, session: &mut Session<'_, B>, slots: usize, vectors: &BenchVectors, layers: usize) -> Result<()> {
        let vector_of = |slot: usize| {
            if self.per_sequence {
                vectors.per_sequence[slot].clone()
            } else {
                vectors.shared.clone()
            }
        };
        if self.steer {
            for slot in 0..slots {
                let mut term = SteeringTerm::new(vector_of(slot), 1.0);
                term.mode = self.mode.unwrap_or(SteeringMode::Add);
                session.set_steering(slot, Some(SteeringPlan { terms: vec![term] }))?;
            }
        }
        if self.capture {
            session.set_capture(Some(CapturePlan { points: (0..layers).map(Point::Block).collect(), positions: CapturePositions::All }))?;
        }
        if self.readout {
            let probes: Vec<_> = if self.per_sequence {
                (0..slots).map(|s| (format!("seq{s}"), vector_of(s))).collect()
            } else {
                vec![("shared".to_string(), vectors.shared.clone())]
            };
            session.set_readout(Some(ReadoutPlan::all_blocks(layers, probes)))?;
        }
        Ok(())
    }
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

/// Deterministic token ids spread over the vocabulary (what llama-bench does with random tokens).
fn bench_tokens(count: usize, vocab: usize) -> Vec<u32> {
    (0..count).map(|i| ((i as u64 * 2_654_435_761 + 12_345) % vocab as u64) as u32).collect()
}

/// What a condition needs to set up a session.
struct Setup<'a> {
    condition: &'a Condition,
    vectors: &'a BenchVectors,
}

impl Setup<'_> {
    fn session<'m, B: Backend>(&self, model: &'m Model<B>, options: SessionOptions) -> Result<Session<'m, B>> {
        let mut session = Session::new(model, options)?;
        self.condition.install(&mut session, options.slots, self.vectors, model.config.num_hidden_layers)?;
        Ok(session)
    }
}

fn measure_prefill<B: Backend>(model: &Model<B>, tokens: &[u32], setup: &Setup<'_>) -> Result<f64> {
    let mut options = SessionOptions::new(1, tokens.len());
    options.max_batch_rows = tokens.len();
    let mut session = setup.session(model, options)?;
    let start = Instant::now();
    session.step(&[SequenceInput { slot: 0, tokens, logits: LogitRequest::Last }])?;
    let rate = tokens.len() as f64 / start.elapsed().as_secs_f64();
    std::hint::black_box(session.take_captures());
    Ok(rate)
}

/// Decode tokens/s of every condition, interleaved step by step: one session per condition, and
/// each decode step runs under every condition in a rotating order, each timed on its own. A
/// slowdown from elsewhere on the machine lasting longer than a few steps hits all conditions
/// alike, so the per-condition ratios resolve far smaller overheads than whole-run timings.
///
/// Where a session's buffers land in memory shifts its speed by a few percent at larger
/// batches, consistently for that session. Sessions are therefore created in an order rotated
/// by `rotation` (the repeat index), so each condition gets other buffers every repeat and the
/// layout effect spreads over the repeats instead of biasing one condition.
fn measure_decode<B: Backend>(
    model: &Model<B>,
    steps: usize,
    batch: usize,
    context: &[u32],
    setups: &[Setup<'_>],
    rotation: usize,
) -> Result<Vec<f64>> {
    let mut created: Vec<Option<Session<'_, B>>> = setups.iter().map(|_| None).collect();
    for k in 0..setups.len() {
        let c = (rotation + k) % setups.len();
        let mut session = setups[c].session(model, SessionOptions::new(batch, context.len() + steps + 1))?;
        if !context.is_empty() {
            let inputs: Vec<SequenceInput> = (0..batch).map(|slot| SequenceInput { slot, tokens: context, logits: LogitRequest::None }).collect();
            session.step(&inputs)?;
        }
        for slot in 0..batch {
            session.begin_generation(slot)?; // every row is a generated row
        }
        created[c] = Some(session);
    }
    let mut sessions: Vec<Session<'_, B>> = created.into_iter().map(|s| s.expect("every condition has a session")).collect();
    let mut next: Vec<Vec<u32>> = vec![(0..batch as u32).map(|b| b + 1).collect(); setups.len()];
    let mut seconds = vec![0.0f64; setups.len()];
    for step in 0..steps {
        for k in 0..setups.len() {
            let c = (step + k) % setups.len();
            let tokens: Vec<[u32; 1]> = next[c].iter().map(|&t| [t]).collect();
            let inputs: Vec<SequenceInput> =
                tokens.iter().enumerate().map(|(slot, t)| SequenceInput { slot, tokens: t, logits: LogitRequest::Last }).collect();
            let start = Instant::now();
            let logits = sessions[c].step(&inputs)?;
            std::hint::black_box(&logits.readouts);
            next[c] = (0..batch).map(|b| argmax(logits.last(b))).collect();
            seconds[c] += start.elapsed().as_secs_f64();
        }
    }
    for session in &mut sessions {
        std::hint::black_box(session.take_captures());
    }
    Ok(seconds.iter().map(|s| (steps * batch) as f64 / s).collect())
}

/// Streaming-read bandwidth in bytes/s with the backend's threads: the best of several readings,
/// each the median of 5 passes over 1 GiB. One reads each task's chunk as one sequential stream;
/// the others as four streams at once (its quarters, as the decode GEMV reads weight rows), once
/// with each prefetch plan the GEMV may use, since the hardware prefetchers serve these
/// differently from machine to machine. The floor is the best a read achieves.
/// The data sits in huge pages, as the weights do: the floor is what the machine can stream,
/// not what 4 KiB pages let through.
fn memory_bandwidth(backend: &CpuBackend) -> Result<f64> {
    let mut data = ZeroedBuffer::<f32>::new(1 << 28).context("allocating 1 GiB for the bandwidth reading")?;
    // Written, not left zero: untouched anonymous memory reads as the one shared zero page.
    data.fill(1.0);
    let level = backend.simd_level();
    let one_stream = |chunk: &[f32]| simd::sum_squares(level, chunk);
    let four_streams = |plan: simd::StreamPrefetch| {
        move |chunk: &[f32]| {
            let quarter = chunk.len() / 4;
            let q: [&[f32]; 4] = std::array::from_fn(|i| &chunk[i * quarter..(i + 1) * quarter]);
            // Each quarter dotted with the first: every byte of the chunk is read once from memory.
            simd::dot4_f32(level, plan, q, q[0]).iter().sum::<f32>()
        }
    };
    let reading = |read: &(dyn Fn(&[f32]) -> f32 + Sync)| {
        let mut rates = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            // A SIMD reduction per chunk: a plain float sum would be latency-bound, not memory-bound.
            let sum: f32 = backend.run(|| data.par_chunks(1 << 18).map(read).sum());
            let secs = start.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            rates.push((data.len() * 4) as f64 / secs);
        }
        summarize(rates).median
    };
    let four_stream_readings = simd::StreamPrefetch::CANDIDATES.map(|plan| reading(&four_streams(plan)));
    Ok(four_stream_readings.into_iter().fold(reading(&one_stream), f64::max))
}

/// `none / condition − 1` per round: the extra time a condition costs (0.01 = 1% slower).
fn overheads(baseline: &[f64], condition: &[f64]) -> Vec<f64> {
    baseline.iter().zip(condition).map(|(b, c)| b / c - 1.0).collect()
}

pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.repeats > 0 && args.batch > 0, "--repeats and --batch must be positive");
    anyhow::ensure!(!args.conditions.is_empty() && !args.dtypes.is_empty(), "give at least one condition and one dtype");
    let model_args = |dtype| super::ModelArgs { model: args.model.clone(), dtype, threads: args.threads, device: args.device, kv_cache: args.kv_cache, simd: args.simd };
    match model_args(args.dtypes[0]).select()? {
        super::Selected::Cpu(first) => {
            let mut models = Vec::new();
            for &dtype in &args.dtypes {
                let args = model_args(dtype);
                models.push(args.load_on(args.cpu_backend()?, dtype)?);
            }
            let bandwidth = memory_bandwidth(&first)?;
            let tuning: Vec<String> = models
                .iter()
                .flat_map(|m| {
                    let prefetch = m.backend.prefetch_tunings().into_iter().map(|t| format!("weight prefetch (timed at load): {t}"));
                    prefetch.chain(m.backend.bf16_prefill_choice().map(|c| format!("bf16 prefill: {c}")))
                })
                .collect();
            bench_on(&args, models, bandwidth, &tuning)
        }
        super::Selected::Cuda(first) => {
            // The GPU holds 16-bit weights: f32 is measured as bf16, once.
            let mut dtypes: Vec<DType> = Vec::new();
            for &dtype in &args.dtypes {
                let on_device = if dtype == DType::F32 { DType::BF16 } else { dtype };
                if !dtypes.contains(&on_device) {
                    dtypes.push(on_device);
                }
            }
            let bandwidth = first.copy_bandwidth().context("measuring the device's copy bandwidth")?;
            let ordinal = first.info().ordinal;
            let mut models = Vec::new();
            let mut first = Some(*first);
            for &dtype in &dtypes {
                let backend = match first.take() {
                    Some(backend) => backend,
                    None => CudaBackend::new(ordinal)?,
                };
                models.push(model_args(dtype).load_on(backend, dtype)?);
            }
            bench_on(&args, models, bandwidth, &[])
        }
    }
}

/// Measures every condition on `models` (one per dtype); `bandwidth` is the memory floor in
/// bytes/s measured on the same device.
/// `tuning` lines say what the backends chose at load (printed under the header).
fn bench_on<B: Backend>(args: &BenchArgs, models: Vec<Model<B>>, bandwidth: f64, tuning: &[String]) -> Result<()> {
    let config = models[0].config.clone();
    let (hidden, layers) = (config.hidden_size, config.num_hidden_layers);
    let shared = match &args.steer_file {
        Some(path) => super::steering::VectorCache::default().load(&models[0], path)?,
        None => random_vector(hidden, layers, 1.0, 7),
    };
    let vectors = BenchVectors { shared, per_sequence: (0..args.batch).map(|s| random_vector(hidden, layers, 1.0, 100 + s as u64)).collect() };
    let backend_name = models[0].backend.name();
    let prompt = bench_tokens(args.prompt_tokens, config.vocab_size);
    let context = bench_tokens(args.context, config.vocab_size);
    // Warm-up: first touches of weights and buffers are not part of the measurement.
    let setups: Vec<Setup> = args.conditions.iter().map(|condition| Setup { condition, vectors: &vectors }).collect();
    for model in &models {
        for setup in &setups {
            if args.prompt_tokens > 0 {
                measure_prefill(model, &prompt[..prompt.len().min(64)], setup)?;
            }
        }
        measure_decode(model, 4, args.batch, &context, &setups, 0)?;
    }
    // samples[m][c]: every repeat of model m under condition c, interleaved round by round.
    let cells = args.conditions.len();
    let mut prefill: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); cells]; models.len()];
    let mut decode: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); cells]; models.len()];
    for repeat in 0..args.repeats {
        for (m, model) in models.iter().enumerate() {
            if args.prompt_tokens > 0 {
                // Prefills are long single steps: interleave per repeat, rotating the order.
                for k in 0..cells {
                    let c = (repeat + k) % cells;
                    prefill[m][c].push(measure_prefill(model, &prompt, &setups[c])?);
                }
            }
            if args.decode_tokens > 0 {
                for (c, rate) in measure_decode(model, args.decode_tokens, args.batch, &context, &setups, repeat)?.into_iter().enumerate() {
                    decode[m][c].push(rate);
                }
            }
        }
    }
    // Bytes a decode step reads: every weight matrix once, plus the KV cache at the mean context.
    let mean_context = args.context as f64 + (args.decode_tokens as f64 + 1.0) / 2.0;
    // The backend's default is `--kv-cache` where given (CUDA refuses anything but f32).
    let kv_precision = models[0].backend.default_kv_precision();
    let kv_bytes = mean_context * (config.num_hidden_layers * 2 * config.kv_dim() * kv_precision.bytes_per_value()) as f64 * args.batch as f64;
    println!(
        "engram bench: {} | {} | {kv_precision} KV cache | p={} n={} context={} batch={} repeats={}",
        args.model.display(),
        backend_name,
        args.prompt_tokens,
        args.decode_tokens,
        args.context,
        args.batch,
        args.repeats
    );
    println!("memory bandwidth (streaming read): {:.1} GB/s", bandwidth / 1e9);
    for line in tuning {
        println!("{line}");
    }
    println!(
        "{:<6} {:<24} {:>10} {:>22} {:>22} {:>10} {:>8} {:>22} {:>22}",
        "dtype",
        "condition",
        "weights",
        "prefill tok/s (IQR)",
        "decode tok/s (IQR)",
        "floor",
        "of floor",
        "prefill overhead (IQR)",
        "decode overhead (IQR)"
    );
    let show = |s: &Option<Summary>| s.as_ref().map_or("-".to_string(), |s| format!("{:.1} ({:.1}-{:.1})", s.median, s.q1, s.q3));
    let show_overhead = |s: &Option<Summary>| {
        s.as_ref().map_or("-".to_string(), |s| format!("{:+.2}% ({:+.2}..{:+.2})", 100.0 * s.median, 100.0 * s.q1, 100.0 * s.q3))
    };
    let baseline = args.conditions.iter().position(|c| c.name == "none");
    let mut results = Vec::new();
    for (m, model) in models.iter().enumerate() {
        let bytes_per_token = model.weights.matrix_bytes as f64 / args.batch as f64 + kv_bytes / args.batch as f64;
        let floor = bandwidth / bytes_per_token;
        for (c, condition) in args.conditions.iter().enumerate() {
            let p = (!prefill[m][c].is_empty()).then(|| summarize(prefill[m][c].clone()));
            let d = (!decode[m][c].is_empty()).then(|| summarize(decode[m][c].clone()));
            let overhead = |samples: &Vec<Vec<f64>>| match baseline {
                Some(b) if b != c && !samples[c].is_empty() => Some(summarize(overheads(&samples[b], &samples[c]))),
                _ => None,
            };
            let (p_over, d_over) = (overhead(&prefill[m]), overhead(&decode[m]));
            let of_floor = d.as_ref().map_or("-".to_string(), |d| format!("{:.0}%", 100.0 * d.median / floor));
            // A second `none` is an A/A control: its "overhead" is the measurement's own bias.
            let label = if condition.name == "none" && Some(c) != baseline { "none (A/A control)".to_string() } else { condition.name.clone() };
            println!(
                "{:<6} {:<24} {:>8.1}MB {:>22} {:>22} {:>10.1} {:>8} {:>22} {:>22}",
                model.weights.dtype,
                label,
                model.weights.matrix_bytes as f64 / 1e6,
                show(&p),
                show(&d),
                floor,
                of_floor,
                show_overhead(&p_over),
                show_overhead(&d_over)
            );
            results.push(serde_json::json!({
                "dtype": model.weights.dtype.to_string(),
                "condition": label,
                "weight_bytes": model.weights.matrix_bytes,
                "prefill_tokens_per_second": p,
                "decode_tokens_per_second": d,
                "prefill_overhead": p_over,
                "decode_overhead": d_over,
                "decode_bytes_per_token": bytes_per_token,
                "decode_floor_tokens_per_second": floor,
            }));
        }
    }
    if baseline.is_none() && args.conditions.len() > 1 {
        println!("(add `none` to --conditions for overhead ratios)");
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "model": args.model, "backend": backend_name, "prompt_tokens": args.prompt_tokens,
            "decode_tokens": args.decode_tokens, "context": args.context, "batch": args.batch, "repeats": args.repeats,
            "conditions": args.conditions.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
            "memory_bandwidth_bytes_per_second": bandwidth, "tuning": tuning, "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
