//! `engram vectors compute|show`: contrastive steering vectors from prompt sets, and what a
//! vector file holds (layers, norms, cosine similarity between layers).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use engram::steer::collect::{capture_prompts, PromptReduction};
use engram::steer::compute::{compute_direction, cross_validate, Activations, DirectionOptions, Method, Separation};
use engram::steer::files::{describe, read_vector, write_vector};
use engram::steer::plan::parse_range;
use engram::steer::SteeringVector;
use serde::Serialize;

use super::{prompts, ModelArgs};

#[derive(Args)]
pub struct VectorsArgs {
    #[command(subcommand)]
    command: VectorsCommand,
}

#[derive(Subcommand)]
enum VectorsCommand {
    /// Compute a steering vector from positive and negative prompts, with per-layer separation.
    Compute(ComputeArgs),
    /// Print a vector file's layers, norms and the cosine similarity between its layers.
    Show(ShowArgs),
}

#[derive(Args)]
struct ComputeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Positive prompts: one a line (plain text), or JSON lines (.jsonl/.json: a string or {"prompt", "system"?}).
    #[arg(long)]
    pos: PathBuf,
    /// Negative prompts, in the same forms.
    #[arg(long)]
    neg: PathBuf,
    /// Output vector: .gguf (llama.cpp control vector), .safetensors or .npy.
    #[arg(short, long)]
    output: PathBuf,
    /// mean (difference of means), pca (of paired differences, sign fixed) or probe (logistic regression).
    #[arg(long, default_value = "mean")]
    method: Method,
    /// Layers to compute (inclusive range A-B; default all).
    #[arg(long, value_name = "A-B")]
    layers: Option<String>,
    /// Which row stands for a prompt: its last token, or the mean over its tokens.
    #[arg(long, default_value = "last")]
    positions: PromptReduction,
    /// Line i of --pos and line i of --neg are a pair (same context, opposite behaviour).
    #[arg(long)]
    paired: bool,
    /// Render every prompt with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Folds for the held-out separation (0 skips it).
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Prompts run together as one batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Also write the per-layer report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct ShowArgs {
    /// A .gguf control vector, .safetensors or .npy vector file.
    file: PathBuf,
    /// Print the statistics as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: VectorsArgs) -> Result<()> {
    match args.command {
        VectorsCommand::Compute(args) => compute(args),
        VectorsCommand::Show(args) => show(args),
    }
}

/// Prompts of a contrast file: JSON lines for .jsonl/.json, otherwise one plain-text prompt a line.
fn read_contrast_prompts(path: &Path) -> Result<Vec<prompts::PromptSpec>> {
    let is_json = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    if is_json {
        return prompts::read_prompts_file(path);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let specs: Vec<prompts::PromptSpec> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| prompts::PromptSpec { prompt: l.to_string(), system: None, max_tokens: None, steer: None })
        .collect();
    if specs.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(specs)
}

#[derive(Serialize)]
struct LayerReport {
    layer: usize,
    norm: f64,
    in_sample: Separation,
    held_out: Option<Separation>,
    explained: Option<f64>,
    converged: bool,
}

fn compute(args: ComputeArgs) -> Result<()> {
    let pos_specs = read_contrast_prompts(&args.pos)?;
    let neg_specs = read_contrast_prompts(&args.neg)?;
    if args.paired && pos_specs.len() != neg_specs.len() {
        bail!("--paired: {} has {} prompts but {} has {}", args.pos.display(), pos_specs.len(), args.neg.display(), neg_specs.len());
    }
    let model = args.model.load()?;
    let layer_count = model.config.num_hidden_layers;
    let (first, last) = match &args.layers {
        Some(text) => parse_range(text).with_context(|| format!("--layers '{text}' (expected A-B)"))?,
        None => (0, layer_count - 1),
    };
    if last >= layer_count {
        bail!("--layers {first}-{last}: the model has {layer_count} layers (0-{})", layer_count - 1);
    }
    let layers: Vec<usize> = (first..=last).collect();
    let encode = |specs: &[prompts::PromptSpec], file: &Path| -> Result<Vec<Vec<u32>>> {
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                prompts::prompt_ids(&model, &s.prompt, args.chat, s.system.as_deref().or(args.system.as_deref()))
                    .with_context(|| format!("{}: prompt {}", file.display(), i + 1))
            })
            .collect()
    };
    let pos_ids = encode(&pos_specs, &args.pos)?;
    let neg_ids = encode(&neg_specs, &args.neg)?;
    let all: Vec<Vec<u32>> = pos_ids.iter().chain(&neg_ids).cloned().collect();
    let bar = indicatif::ProgressBar::new(all.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("capturing [{bar:30}] {pos}/{len} prompts ({per_sec}, eta {eta})").expect("valid template"));
    let captured = capture_prompts(&model, &all, &layers, args.positions, args.batch, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();

    let hidden = model.config.hidden_size;
    let split = pos_ids.len() * hidden;
    let mut options = DirectionOptions::new(args.method);
    options.paired = args.paired;
    let folds = args.folds.min(pos_ids.len()).min(neg_ids.len());
    let mut vector = SteeringVector::new(hidden, layer_count);
    vector.model_hint = Some(model.config.architecture.model_type().to_string());
    let mut reports = Vec::new();
    for layer in &captured {
        let pos = Activations::new(&layer.values[..split], hidden)?;
        let neg = Activations::new(&layer.values[split..], hidden)?;
        let fit = compute_direction(&pos, &neg, &options).with_context(|| format!("layer {}", layer.layer))?;
        let held_out = if args.folds >= 2 && folds >= 2 { Some(cross_validate(&pos, &neg, &options, folds)?) } else { None };
        let norm = fit.direction.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        vector.set(layer.layer, fit.direction)?;
        reports.push(LayerReport { layer: layer.layer, norm, in_sample: fit.separation, held_out, explained: fit.explained, converged: fit.converged });
    }
    for w in write_vector(&args.output, &vector)? {
        eprintln!("warning: {w}");
    }

    println!(
        "{} positive, {} negative prompts | method {} | positions {} | {}",
        pos_ids.len(),
        neg_ids.len(),
        args.method,
        if args.positions == PromptReduction::Last { "last" } else { "mean" },
        if args.paired { "paired" } else { "unpaired" }
    );
    println!("{:>5} {:>9} {:>9} {:>9} {:>8} {:>9}", "layer", "norm", "AUC", "held-out", "d", "gap");
    for r in &reports {
        let held = r.held_out.map_or("-".to_string(), |s| format!("{:.3}", s.auc));
        println!("{:>5} {:>9.3} {:>9.3} {:>9} {:>8.2} {:>9.3}", r.layer, r.norm, r.in_sample.auc, held, r.in_sample.cohens_d, r.in_sample.gap());
    }
    let key = |r: &LayerReport| r.held_out.map_or(r.in_sample.auc, |s| s.auc);
    let mut ranked: Vec<&LayerReport> = reports.iter().collect();
    ranked.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.layer.cmp(&b.layer)));
    let best: Vec<String> = ranked.iter().take(5).map(|r| format!("{} ({:.3})", r.layer, key(r))).collect();
    println!("best separating layers ({}): {}", if folds >= 2 && args.folds >= 2 { "held-out AUC" } else { "in-sample AUC" }, best.join(", "));
    println!("wrote {} ({} layers)", args.output.display(), reports.len());
    if let Some(path) = &args.report {
        let report = serde_json::json!({
            "model": model.path, "pos": args.pos, "neg": args.neg, "method": args.method,
            "positions": if args.positions == PromptReduction::Last { "last" } else { "mean" }, "paired": args.paired,
            "pos_count": pos_ids.len(), "neg_count": neg_ids.len(), "folds": folds, "layers": reports,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn show(args: ShowArgs) -> Result<()> {
    let (vector, warnings) = read_vector(&args.file)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let stats = describe(&vector);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!(
        "{}: hidden size {}, {} layers, model hint {}, directions at {} layers",
        args.file.display(),
        stats.hidden_size,
        stats.layer_count,
        stats.model_hint.as_deref().unwrap_or("-"),
        stats.layers.len()
    );
    println!("{:>5} {:>10} {:>12}", "layer", "norm", "cos(prev)");
    for (k, (&layer, &norm)) in stats.layers.iter().zip(&stats.norms).enumerate() {
        let prev = if k == 0 { "-".to_string() } else { format!("{:.3}", stats.cosine[k][k - 1]) };
        println!("{layer:>5} {norm:>10.4} {prev:>12}");
    }
    if stats.layers.len() > 1 {
        println!("cosine similarity between layers:");
        print!("{:>5}", "");
        for layer in &stats.layers {
            print!("{layer:>6}");
        }
        println!();
        for (a, row) in stats.cosine.iter().enumerate() {
            print!("{:>5}", stats.layers[a]);
            for c in row {
                print!("{c:>6.2}");
            }
            println!();
        }
    }
    Ok(())
}
