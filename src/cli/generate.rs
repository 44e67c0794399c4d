//! `engram generate`: chat or raw prompts, sampling options, streaming, JSON, batches of prompts.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::generate::{self, GenerationRequest, SamplingParams, StopParams};
use engram::backend::Backend;
use engram::{Model, Session, SessionOptions};

use super::prompts::{self, PromptSpec};
use super::memory_apply::{AppliedMemory, MemoryOptions};
use super::steering::{self, SteerArgs, VectorCache};
use super::{ModelArgs, ModelTask};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text.
    #[arg(short, long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A file of prompts, one JSON string or {"prompt", "system", "max_tokens"} object a line; run as one batch.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Apply the model's chat template (the prompt is the user message).
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Maximum tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (throughput runs).
    #[arg(long)]
    ignore_eos: bool,
    /// Positions per sequence (default: prompt + max tokens, within the model's maximum).
    #[arg(long)]
    context: Option<usize>,
    /// Print one JSON object per prompt instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    steering: SteerArgs,
    #[command(flatten)]
    memory: MemoryOptions,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let specs: Vec<PromptSpec> = match (&args.prompt, &args.prompts) {
        (Some(p), None) => vec![PromptSpec { prompt: p.clone(), system: None, max_tokens: None, steer: None }],
        (None, Some(path)) => prompts::read_prompts_file(path)?,
        _ => bail!("give a prompt with -p TEXT or a file with --prompts FILE"),
    };
    if args.steering.readout && !args.json && args.steering.readout_out.is_none() {
        bail!("--readout needs --json (readouts in each output line) or --readout-out FILE");
    }
    args.model.clone().with_model(Generate { args, specs })
}

struct Generate {
    args: GenerateArgs,
    specs: Vec<PromptSpec>,
}

impl ModelTask for Generate {
    type Output = ();
    fn run<B: Backend>(self, model: Model<B>) -> Result<()> {
        generate_with(self.args, self.specs, model)
    }
}

fn generate_with<B: Backend>(args: GenerateArgs, specs: Vec<PromptSpec>, model: Model<B>) -> Result<()> {
    let sampling = SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    // Procedural memory: each prompt retrieves its own memories (the prompt text is the task).
    let mut applied: Vec<Option<AppliedMemory>> = Vec::new();
    if let Some(bank) = args.memory.load(&model)? {
        let path = args.memory.memory.as_deref().expect("a bank was loaded");
        for (i, spec) in specs.iter().enumerate() {
            let memory = args.memory.apply(&model, &bank, path, &spec.prompt).with_context(|| format!("memory for prompt {i}"))?;
            let names: Vec<String> = memory.retrieved.iter().map(|(n, s)| format!("{n} ({s:.3})")).collect();
            eprintln!("memory for prompt {i}: {}", if names.is_empty() { "none above the threshold".to_string() } else { names.join(", ") });
            applied.push(Some(memory));
        }
    } else {
        applied.resize_with(specs.len(), || None);
    }
    let mut requests = Vec::new();
    for (spec, memory) in specs.iter().zip(&applied) {
        let system = spec.system.as_deref().or(args.system.as_deref());
        let text = memory.as_ref().map_or(spec.prompt.as_str(), |m| m.prompt.as_str());
        requests.push(GenerationRequest {
            prompt_ids: prompts::prompt_ids(&model, text, args.chat, system)?,
            sampling,
            stop: StopParams { max_tokens: spec.max_tokens.unwrap_or(args.max_tokens), stop_strings: args.stop.clone(), ignore_eos: args.ignore_eos },
        });
    }
    if requests.iter().any(|r| r.stop.max_tokens == 0) {
        bail!("--max-tokens must be at least 1");
    }
    let max_positions = model.config.max_position_embeddings;
    for (i, r) in requests.iter().enumerate() {
        if r.prompt_ids.len() + r.stop.max_tokens > max_positions {
            bail!(
                "prompt {i} has {} tokens; with {} new tokens it exceeds the model's maximum context of {max_positions} positions",
                r.prompt_ids.len(),
                r.stop.max_tokens
            );
        }
    }
    let longest = requests.iter().map(|r| r.prompt_ids.len() + r.stop.max_tokens).max().unwrap_or(1);
    let context = args.context.unwrap_or(longest.min(model.config.max_position_embeddings));
    let mut options = SessionOptions::new(requests.len(), context);
    options.max_logit_rows = requests.len();
    let mut session = Session::new(&model, options)?;
    let mut vectors = VectorCache::default();
    let global_plan = args.steering.plan(&model, &mut vectors)?;
    for (i, spec) in specs.iter().enumerate() {
        let mut plan = match &spec.steer {
            Some(own) => steering::plan_from_specs(&model, &mut vectors, own).with_context(|| format!("steering of prompt {i}"))?,
            None => global_plan.clone(),
        };
        if let Some(term) = applied[i].as_ref().and_then(|m| m.term.clone()) {
            plan.get_or_insert_with(Default::default).terms.push(term);
        }
        session.set_steering(i, plan)?;
    }
    args.steering.configure(&mut session, &model, &vectors)?;
    let probe_names = SteerArgs::probe_names(&vectors);

    let streaming = !args.json && requests.len() == 1;
    let stdout = std::io::stdout();
    let mut sink = |_: usize, text: &str| {
        if streaming {
            let mut out = stdout.lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    };
    let (outputs, timing) = generate::generate(&mut session, &requests, &mut sink)?;
    args.steering.write_captures(&session.take_captures(), &model.path)?;
    if let Some(path) = &args.steering.readout_out {
        let records = outputs.iter().enumerate().flat_map(|(i, o)| o.readouts.iter().map(move |r| steering::readout_json(Some(i), r)));
        steering::write_readouts(path, &probe_names, records)?;
    }
    if args.json {
        for (i, (spec, output)) in specs.iter().zip(&outputs).enumerate() {
            let line = serde_json::json!({
                "prompt": spec.prompt,
                "prompt_ids": output.prompt_ids,
                "generated_ids": output.generated_ids,
                "text": output.text,
                "finish_reason": output.finish_reason,
                "prompt_tokens": output.prompt_ids.len(),
                "generated_tokens": output.generated_ids.len(),
                "batch_size": outputs.len(),
                "prefill_tokens_per_second": timing.prefill_tokens_per_second(),
                "decode_tokens_per_second": timing.decode_tokens_per_second(),
            });
            let mut line = line;
            if let Some(memory) = &applied[i] {
                line["memory"] = memory.retrieved.iter().map(|(name, score)| serde_json::json!({"name": name, "score": score})).collect();
            }
            if args.steering.readout {
                line["readout_probes"] = serde_json::json!(probe_names);
                line["readouts"] = output.readouts.iter().map(|r| steering::readout_json(None, r)).collect();
            }
            println!("{line}");
        }
    } else if streaming {
        println!();
    } else {
        for (i, output) in outputs.iter().enumerate() {
            println!("=== {} ({:?}) ===\n{}", i, output.finish_reason, output.text);
        }
    }
    eprintln!(
        "prefill: {} tokens at {:.1} tok/s | decode: {} tokens at {:.1} tok/s | {} | {} weights | {} KV cache",
        timing.prompt_tokens,
        timing.prefill_tokens_per_second(),
        timing.decode_tokens,
        timing.decode_tokens_per_second(),
        engram::backend::Backend::name(&model.backend),
        model.weights.dtype,
        session.kv_precision(),
    );
    Ok(())
}
