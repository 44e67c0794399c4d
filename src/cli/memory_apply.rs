//! `--memory BANK` on `generate`: retrieve each prompt's procedural memory and apply it as a
//! steering term (per sequence, in the same batch), as workflow text in the prompt, or both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::backend::Backend;
use engram::memory::distill::instruction_key;
use engram::memory::retrieve::{blend, retrieve};
use engram::memory::MemoryBank;
use engram::steer::plan::parse_range;
use engram::steer::SteeringTerm;
use engram::Model;

#[derive(Args, Clone, Default)]
pub struct MemoryOptions {
    /// A memory bank (engram memory distill): each prompt retrieves its nearest memories.
    #[arg(long, value_name = "BANK")]
    pub memory: Option<PathBuf>,
    /// steer (add the blended memory vector), text (put the workflow in the prompt) or both.
    #[arg(long, default_value = "steer", requires = "memory")]
    pub memory_mode: String,
    /// Scale of the memory's steering term.
    #[arg(long, default_value_t = 1.0, requires = "memory", allow_hyphen_values = true)]
    pub memory_scale: f32,
    /// Only steer these layers of the memory (inclusive range A-B).
    #[arg(long, value_name = "A-B", requires = "memory")]
    pub memory_layers: Option<String>,
    /// Memories blended per prompt.
    #[arg(long, default_value_t = 1, requires = "memory")]
    pub memory_top_k: usize,
    /// Memories less similar than this (centred cosine) are not used.
    #[arg(long, default_value_t = 0.0, requires = "memory", allow_hyphen_values = true)]
    pub memory_threshold: f64,
}

/// What the memory gives one prompt.
pub struct AppliedMemory {
    /// The retrieved memories and their scores, best first.
    pub retrieved: Vec<(String, f64)>,
    /// The steering term to add to the sequence's plan (steer and both modes).
    pub term: Option<SteeringTerm>,
    /// The prompt with the workflow text put before it (text and both modes).
    pub prompt: String,
}

impl MemoryOptions {
    fn modes(&self) -> Result<(bool, bool)> {
        match self.memory_mode.as_str() {
            "steer" => Ok((true, false)),
            "text" => Ok((false, true)),
            "both" => Ok((true, true)),
            other => bail!("--memory-mode '{other}' (expected steer, text or both)"),
        }
    }

    /// The bank, checked against the model (None without --memory).
    pub fn load<B: Backend>(&self, model: &Model<B>) -> Result<Option<MemoryBank>> {
        let Some(path) = &self.memory else { return Ok(None) };
        self.modes()?;
        if !self.memory_scale.is_finite() {
            bail!("--memory-scale must be finite");
        }
        let bank = MemoryBank::read(path).with_context(|| format!("reading memory bank {}", path.display()))?;
        bank.check_fits(model.config.hidden_size, model.config.num_hidden_layers).with_context(|| format!("memory bank {}", path.display()))?;
        if bank.memories.is_empty() {
            bail!("memory bank {} holds no memories", path.display());
        }
        Ok(Some(bank))
    }

    /// Retrieves for one task (the prompt text) and builds what the chosen mode applies.
    pub fn apply<B: Backend>(&self, model: &Model<B>, bank: &MemoryBank, bank_path: &Path, task: &str) -> Result<AppliedMemory> {
        let (steer, text) = self.modes()?;
        let key_layer = bank.memories[0].meta.key_layer;
        let key = instruction_key(model, task, key_layer)?;
        let hits = retrieve(bank, &key, key_layer, self.memory_top_k, self.memory_threshold)?;
        let retrieved: Vec<(String, f64)> = hits.iter().map(|h| (h.name.clone(), h.score)).collect();
        if hits.is_empty() {
            return Ok(AppliedMemory { retrieved, term: None, prompt: task.to_string() });
        }
        let term = if steer {
            let mut term = SteeringTerm::new(Arc::new(blend(bank, &hits).with_context(|| format!("blending memories of {}", bank_path.display()))?), self.memory_scale);
            if let Some(layers) = &self.memory_layers {
                term.layers = Some(parse_range(layers).with_context(|| format!("--memory-layers '{layers}' (expected A-B)"))?);
            }
            Some(term)
        } else {
            None
        };
        let workflow = &bank.memories[hits[0].index].meta.workflow;
        let prompt = if text && !workflow.trim().is_empty() { format!("Workflow that worked for similar tasks:\n{}\n\nTask: {task}", workflow.trim()) } else { task.to_string() };
        Ok(AppliedMemory { retrieved, term, prompt })
    }
}
