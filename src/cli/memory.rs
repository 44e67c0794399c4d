//! `engram memory distill|list|show|merge|export|retrieve|analyze`: neural procedural memory banks
//! made from experiences, inspected, combined, exported as control vectors, queried for a task,
//! and analysed (the analysis itself is in memory_analyze.rs).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use engram::memory::bank::merge;
use engram::memory::distill::{distill, instruction_key, DistillOptions, GroupBy, LayerChoice};
use engram::memory::experience::read_experiences;
use engram::memory::retrieve::{blend, retrieve};
use engram::memory::{MemoryBank, Position};
use engram::steer::compute::Method;

use super::ModelArgs;

#[derive(Args)]
pub struct MemoryArgs {
    #[command(subcommand)]
    command: MemoryCommand,
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// Distil success-minus-failure steering memories from experiences (JSON lines) into a bank.
    Distill(DistillArgs),
    /// List a bank's memories.
    List(ListArgs),
    /// Show one memory: counts, workflow, per-layer norms and separability.
    Show(ShowArgs),
    /// Merge two banks of the same model.
    Merge(MergeArgs),
    /// Write one memory's direction as a control vector (.gguf, .safetensors or .npy).
    Export(ExportArgs),
    /// Retrieve the memories nearest to a task's instruction.
    Retrieve(RetrieveArgs),
    /// Similarity within and across kinds, basis directions, the steps behind them; report and plots.
    Analyze(super::memory_analyze::AnalyzeArgs),
}

#[derive(Args)]
struct DistillArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Experiences: one episode a JSON line.
    #[arg(long)]
    experiences: PathBuf,
    /// The bank to write (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
    /// One memory per task kind, or per task.
    #[arg(long, default_value = "kind")]
    by: GroupBy,
    /// mean (difference of means), pca or probe.
    #[arg(long, default_value = "mean")]
    method: Method,
    /// Layers: A-B, N, auto (the 8 best by held-out AUC) or auto:N.
    #[arg(long, default_value = "auto")]
    layers: LayerChoice,
    /// Where a step's activation is read: context-last or action-mean.
    #[arg(long, default_value = "context-last")]
    position: Position,
    /// Earlier (observation, action) pairs shown in each step's context.
    #[arg(long, default_value_t = 2)]
    history: usize,
    /// Layer of the retrieval keys (default: the middle layer).
    #[arg(long)]
    key_layer: Option<usize>,
    /// Report malformed lines and skip them instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Sequences run together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Where captured activations are kept while distilling, so that an interrupted run
    /// resumes (default: OUTPUT.checkpoint; removed once the bank is written).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Keep activations in memory only (no resuming).
    #[arg(long, conflicts_with = "checkpoint")]
    no_checkpoint: bool,
}

#[derive(Args)]
struct ListArgs {
    bank: PathBuf,
}

#[derive(Args)]
struct ShowArgs {
    bank: PathBuf,
    name: String,
    /// Print the memory's metadata as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MergeArgs {
    a: PathBuf,
    b: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
    /// Rename the second bank's clashing memories NAME{SUFFIX} instead of refusing.
    #[arg(long)]
    suffix: Option<String>,
}

#[derive(Args)]
struct ExportArgs {
    bank: PathBuf,
    name: String,
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
struct RetrieveArgs {
    #[command(flatten)]
    model: ModelArgs,
    bank: PathBuf,
    /// The task's instruction.
    #[arg(long)]
    task: String,
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Memories less similar than this are not returned.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    threshold: f64,
    /// Also write the blend of the retrieved memories as a control vector.
    #[arg(long)]
    blend: Option<PathBuf>,
}

pub fn run(args: MemoryArgs) -> Result<()> {
    match args.command {
        MemoryCommand::Distill(args) => run_distill(args),
        MemoryCommand::List(args) => list(args),
        MemoryCommand::Show(args) => show(args),
        MemoryCommand::Merge(args) => {
            let a = MemoryBank::read(&args.a)?;
            let b = MemoryBank::read(&args.b)?;
            let merged = merge(&a, &b, args.suffix.as_deref()).with_context(|| format!("merging {} and {}", args.a.display(), args.b.display()))?;
            merged.write(&args.output)?;
            println!("wrote {} ({} memories)", args.output.display(), merged.memories.len());
            Ok(())
        }
        MemoryCommand::Export(args) => {
            let bank = MemoryBank::read(&args.bank)?;
            for w in bank.export(&args.name, &args.output).with_context(|| format!("{}", args.bank.display()))? {
                eprintln!("warning: {w}");
            }
            println!("wrote {}", args.output.display());
            Ok(())
        }
        MemoryCommand::Retrieve(args) => run_retrieve(args),
        MemoryCommand::Analyze(args) => super::memory_analyze::run(args),
    }
}

fn run_distill(args: DistillArgs) -> Result<()> {
    let (episodes, warnings) = read_experiences(&args.experiences, args.skip_bad)?;
    for w in &warnings {
        eprintln!("warning: skipped {w}");
    }
    let model = args.model.load()?;
    let options = DistillOptions {
        by: args.by,
        method: args.method,
        layers: args.layers,
        position: args.position,
        history: args.history,
        key_layer: args.key_layer,
        batch: args.batch,
        checkpoint: (!args.no_checkpoint).then(|| args.checkpoint.clone().unwrap_or_else(|| checkpoint_path(&args.output))),
        ..Default::default()
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("distilling [{bar:30}] {pos}/{len} steps ({per_sec}, eta {eta})").expect("valid template"));
    // Where stderr is not a terminal the bar is hidden: a plain line every 30 s instead.
    let started = std::time::Instant::now();
    let mut last_line = started;
    let report = distill(&model, &episodes, &options, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if bar.is_hidden() && (last_line.elapsed().as_secs() >= 30 || done == total) {
            last_line = std::time::Instant::now();
            eprintln!("[{:>7.1} s] distilling: {done}/{total} steps", started.elapsed().as_secs_f64());
        }
    })?;
    bar.finish_and_clear();
    if let Some(note) = &report.checkpoint_note {
        eprintln!("{note}");
    }
    for (name, problem) in &report.errors {
        eprintln!("error: memory '{name}': {problem}");
    }
    if report.bank.memories.is_empty() {
        bail!("no memory could be distilled from {}", args.experiences.display());
    }
    report.bank.write(&args.output)?;
    if let Some(path) = &options.checkpoint {
        // The bank holds everything now; a failure to remove the checkpoint only costs disk.
        if let Err(e) = std::fs::remove_file(path) {
            eprintln!("warning: could not remove {}: {e}", path.display());
        }
    }
    println!(
        "{} episodes ({} lines skipped) | by {} | method {} | position {} | history {}",
        episodes.len(),
        warnings.len(),
        if args.by == GroupBy::Kind { "kind" } else { "task" },
        args.method,
        args.position,
        args.history
    );
    print_list(&report.bank);
    println!("wrote {} ({} memories, {} failed)", args.output.display(), report.bank.memories.len(), report.errors.len());
    Ok(())
}

/// `OUTPUT.checkpoint`, beside the bank.
fn checkpoint_path(output: &std::path::Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".checkpoint");
    PathBuf::from(name)
}

fn print_list(bank: &MemoryBank) {
    println!("{:<24} {:>8} {:>6} {:>6} {:>6} {:>10}  layers", "name", "episodes", "steps", "succ", "fail", "best AUC");
    for m in &bank.memories {
        let c = &m.meta.counts;
        let best = m.meta.layers.iter().filter(|s| s.selected).map(|s| s.held_out_auc.unwrap_or(s.auc)).fold(f64::NAN, f64::max);
        let layers: Vec<String> = m.direction.layers().iter().map(usize::to_string).collect();
        println!("{:<24} {:>8} {:>6} {:>6} {:>6} {:>10.3}  {}", m.meta.name, c.episodes, c.steps, c.successes, c.failures, best, layers.join(","));
    }
}

fn list(args: ListArgs) -> Result<()> {
    let bank = MemoryBank::read(&args.bank)?;
    println!(
        "{}: {} memories, hidden size {}, {} layers, model hint {}",
        args.bank.display(),
        bank.memories.len(),
        bank.hidden_size,
        bank.layer_count,
        bank.model_hint.as_deref().unwrap_or("-")
    );
    print_list(&bank);
    Ok(())
}

fn show(args: ShowArgs) -> Result<()> {
    let bank = MemoryBank::read(&args.bank)?;
    let memory = bank.get(&args.name).ok_or_else(|| bank.missing(&args.name)).with_context(|| format!("{}", args.bank.display()))?;
    let m = &memory.meta;
    if args.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!("memory {} (kind {})", m.name, m.kind);
    println!("{}", m.description);
    let c = &m.counts;
    println!(
        "{} episodes ({} succeeded, {} failed), {} steps ({} success, {} failure)",
        c.episodes, c.successes, c.failures, c.steps, c.success_steps, c.failure_steps
    );
    println!("method {} | position {} | key at layer {}", m.method, m.position, m.key_layer);
    println!("workflow:\n{}", if m.workflow.is_empty() { "-" } else { &m.workflow });
    println!("{:>5} {:>10} {:>8} {:>9} {:>5}", "layer", "norm", "AUC", "held-out", "kept");
    for s in &m.layers {
        let held = s.held_out_auc.map_or("-".to_string(), |a| format!("{a:.3}"));
        println!("{:>5} {:>10.4} {:>8.3} {:>9} {:>5}", s.layer, s.norm, s.auc, held, if s.selected { "yes" } else { "" });
    }
    Ok(())
}

fn run_retrieve(args: RetrieveArgs) -> Result<()> {
    let bank = MemoryBank::read(&args.bank)?;
    let model = args.model.load()?;
    bank.check_fits(model.config.hidden_size, model.config.num_hidden_layers)
        .with_context(|| format!("{} does not fit {}", args.bank.display(), args.model.model.display()))?;
    let mut key_layers: Vec<usize> = bank.memories.iter().map(|m| m.meta.key_layer).collect();
    key_layers.sort_unstable();
    key_layers.dedup();
    let mut hits = Vec::new();
    for layer in key_layers {
        let key = instruction_key(&model, &args.task, layer)?;
        hits.extend(retrieve(&bank, &key, layer, args.top_k, args.threshold)?);
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    hits.truncate(args.top_k);
    if hits.is_empty() {
        println!("no memory at or above similarity {}", args.threshold);
        return Ok(());
    }
    println!("{:>4} {:<24} {:>8}  workflow", "rank", "name", "cosine");
    for (i, h) in hits.iter().enumerate() {
        let workflow = bank.memories[h.index].meta.workflow.lines().next().unwrap_or("-").to_string();
        println!("{:>4} {:<24} {:>8.4}  {}", i + 1, h.name, h.score, workflow);
    }
    if let Some(path) = &args.blend {
        let vector = blend(&bank, &hits)?;
        for w in engram::steer::files::write_vector(path, &vector)? {
            eprintln!("warning: {w}");
        }
        println!("wrote the blend of {} memories to {}", hits.len(), path.display());
    }
    Ok(())
}
