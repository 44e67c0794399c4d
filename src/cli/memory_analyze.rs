//! `engram memory analyze`: a bank's similarity within and across kinds, its basis directions,
//! the experience steps at each end of them, optional labels by a local model; written as
//! report.json, report.md and SVG plots.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::memory::analyze::{analyze, AnalyzeOptions, BankAnalysis};
use engram::memory::experience::read_experiences;
use engram::memory::label::{label_direction, LabelOutcome};
use engram::memory::report::{markdown, write_plots};
use engram::memory::MemoryBank;

use super::ModelArgs;

#[derive(Args)]
pub struct AnalyzeArgs {
    /// The bank to analyse.
    bank: PathBuf,
    /// Experiences (JSON lines) whose steps are projected on the basis directions; the model
    /// (-m) must be the one the bank was distilled with.
    #[arg(long)]
    experiences: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// The directory for report.json, report.md and the plots (created if missing).
    #[arg(short, long)]
    output: PathBuf,
    /// Layers to compare memories at: A-B or a comma list (default: every layer at least two
    /// memories have a direction at).
    #[arg(long)]
    layers: Option<String>,
    /// Layer of the basis directions (default: the layer most memories share).
    #[arg(long)]
    basis_layer: Option<usize>,
    /// Basis directions to report.
    #[arg(long, default_value_t = 3)]
    directions: usize,
    /// Steps listed at each end of a direction.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Context history for experiences, when the bank does not record the one it was made with.
    #[arg(long, default_value_t = 2)]
    history: usize,
    /// Ask the model (-m) to label each direction from its top and bottom steps (needs
    /// --experiences and a chat template).
    #[arg(long)]
    label: bool,
    /// Sampled retries when a label answer is not valid JSON with every field.
    #[arg(long, default_value_t = 2)]
    label_retries: usize,
    /// Report malformed experience lines and skip them instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    /// Sequences run together when experiences are captured.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

fn parse_layers(text: &str) -> Result<Vec<usize>> {
    let mut layers = Vec::new();
    for part in text.split(',').map(str::trim) {
        if let Some((a, b)) = engram::steer::plan::parse_range(part) {
            if a > b {
                bail!("--layers: range {part} is backwards");
            }
            layers.extend(a..=b);
        } else {
            layers.push(part.parse().with_context(|| format!("--layers: '{part}' is not a layer number or A-B range"))?);
        }
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

fn print_summary(analysis: &BankAnalysis) {
    println!("{:>5} {:>8} {:>16} {:>16}", "layer", "memories", "within (pairs)", "across (pairs)");
    for l in &analysis.layers {
        let cell = |s: &Option<engram::memory::analyze::Summary>| s.as_ref().map_or("-".to_string(), |s| format!("{:+.3} ({})", s.mean, s.count));
        println!("{:>5} {:>8} {:>16} {:>16}", l.layer, l.memories.len(), cell(&l.within_summary), cell(&l.across_summary));
    }
    println!("basis at layer {}:", analysis.basis_layer);
    for d in &analysis.directions {
        let steps = d.steps.as_ref().map_or(String::new(), |s| {
            format!(
                " | success AUC {:.3} | top success {:.2}, bottom {:.2} | top actions {}",
                s.success_auc,
                s.top.success_rate,
                s.bottom.success_rate,
                s.top.action_types.iter().take(3).map(|(t, n)| format!("{t}×{n}")).collect::<Vec<_>>().join(" ")
            )
        });
        println!("  direction {} explains {:.1}% (cumulative {:.1}%){steps}", d.index, 100.0 * d.explained, 100.0 * d.cumulative);
    }
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let bank = MemoryBank::read(&args.bank)?;
    if args.label && args.experiences.is_none() {
        bail!("--label needs --experiences (labels are read off the steps at each end of a direction)");
    }
    let options = AnalyzeOptions {
        layers: args.layers.as_deref().map(parse_layers).transpose()?,
        basis_layer: args.basis_layer,
        directions: args.directions,
        top: args.top,
        history: args.history,
        batch: args.batch,
    };
    let mut labels: Vec<Option<LabelOutcome>> = Vec::new();
    let analysis = match &args.experiences {
        None => analyze::<engram::backend::cpu::CpuBackend>(&bank, None, &options, |_, _| {}).with_context(|| format!("analysing {}", args.bank.display()))?,
        Some(path) => {
            let (episodes, warnings) = read_experiences(path, args.skip_bad)?;
            for w in &warnings {
                eprintln!("warning: skipped {w}");
            }
            let model = args.model.load()?;
            bank.check_fits(model.config.hidden_size, model.config.num_hidden_layers)
                .with_context(|| format!("{} does not fit {}", args.bank.display(), args.model.model.display()))?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(indicatif::ProgressStyle::with_template("capturing steps [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})").expect("valid template"));
            let analysis = analyze(&bank, Some((&model, &episodes)), &options, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })
            .with_context(|| format!("analysing {} with {}", args.bank.display(), path.display()))?;
            bar.finish_and_clear();
            if args.label {
                for d in &analysis.directions {
                    eprintln!("labelling direction {} ...", d.index);
                    let outcome = label_direction(&model, d, args.label_retries, 160)?;
                    match &outcome.label {
                        Some(l) => eprintln!("  {} ({}, confidence {:.2})", l.label, l.polarity, l.confidence),
                        None => eprintln!("  no valid label after {} attempts", outcome.attempts),
                    }
                    labels.push(Some(outcome));
                }
            }
            analysis
        }
    };
    std::fs::create_dir_all(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    let json = serde_json::json!({
        "bank": args.bank.display().to_string(),
        "experiences": args.experiences.as_ref().map(|p| p.display().to_string()),
        "analysis": &analysis,
        "labels": &labels,
    });
    let json_path = args.output.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", json_path.display()))?;
    let bank_name = args.bank.file_name().map_or_else(|| args.bank.display().to_string(), |n| n.to_string_lossy().into_owned());
    let experiences_name = args.experiences.as_ref().map(|p| p.display().to_string());
    let md_path = args.output.join("report.md");
    std::fs::write(&md_path, markdown(&analysis, &bank_name, experiences_name.as_deref(), &labels)).with_context(|| format!("writing {}", md_path.display()))?;
    let plots = write_plots(&analysis, &args.output)?;
    print_summary(&analysis);
    println!("wrote report.json, report.md and {} to {}", plots.join(", "), args.output.display());
    Ok(())
}
