//! `engram logits`: float32 logits of a prompt as .npy, for comparison with other implementations.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use engram::session::{LogitRequest, SequenceInput};
use engram::backend::Backend;
use engram::{Model, Session, SessionOptions};

use super::steering::{self, SteerArgs, VectorCache};
use super::{prompts, ModelArgs, ModelTask};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(short, long)]
    prompt: String,
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    system: Option<String>,
    /// Output .npy file: shape [vocab], or [tokens, vocab] with --all-positions.
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long)]
    all_positions: bool,
    #[command(flatten)]
    steering: SteerArgs,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    args.model.clone().with_model(Logits(args))
}

struct Logits(LogitsArgs);

impl ModelTask for Logits {
    type Output = ();
    fn run<B: Backend>(self, model: Model<B>) -> Result<()> {
        logits_with(self.0, model)
    }
}

fn logits_with<B: Backend>(args: LogitsArgs, model: Model<B>) -> Result<()> {
    let ids = prompts::prompt_ids(&model, &args.prompt, args.chat, args.system.as_deref())?;
    let mut options = SessionOptions::new(1, ids.len().min(model.config.max_position_embeddings));
    options.max_logit_rows = if args.all_positions { options.max_batch_rows } else { 1 };
    let mut session = Session::new(&model, options)?;
    let mut vectors = VectorCache::default();
    session.set_steering(0, args.steering.plan(&model, &mut vectors)?)?;
    args.steering.configure(&mut session, &model, &vectors)?;
    let request = if args.all_positions { LogitRequest::All } else { LogitRequest::Last };
    let mut step = session.step(&[SequenceInput { slot: 0, tokens: &ids, logits: request }])?;
    let logits = step.per_input.remove(0);
    args.steering.write_captures(&session.take_captures(), &model.path)?;
    if let Some(path) = &args.steering.readout_out {
        steering::write_readouts(path, &SteerArgs::probe_names(&vectors), step.readouts.iter().map(|r| steering::readout_json(None, r)))?;
    } else if args.steering.readout {
        println!("{}", serde_json::json!({"probes": SteerArgs::probe_names(&vectors)}));
        for r in &step.readouts {
            println!("{}", steering::readout_json(None, r));
        }
    }
    let vocab = model.config.vocab_size as u64;
    let shape: Vec<u64> = if args.all_positions { vec![ids.len() as u64, vocab] } else { vec![vocab] };
    write_npy_f32(&args.output, &shape, &logits)?;
    eprintln!("wrote {} ({} tokens, shape {:?})", args.output.display(), ids.len(), shape);
    Ok(())
}

/// Writes a little-endian float32 .npy file.
pub fn write_npy_f32(path: &std::path::Path, shape: &[u64], data: &[f32]) -> Result<()> {
    use npyz::WriterBuilder;
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = npyz::WriteOptions::new().default_dtype().shape(shape).writer(std::io::BufWriter::new(file)).begin_nd()?;
    writer.extend(data.iter().copied()).with_context(|| format!("writing {}", path.display()))?;
    writer.finish().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
