//! `--memory BANK` on `generate`: retrieve each prompt's procedural memory and apply it as a
//! steering term (per sequence, in the same batch), as workflow text in the prompt, or both.
//! The retrieval and its application live in [`engram::memory::apply`] (the agent uses it too).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::backend::Backend;
use engram::memory::apply::{prompt_with_workflow, retrieve_for_task, MemoryMode, RetrievalOptions};
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
    fn mode(&self) -> Result<MemoryMode> {
        self.memory_mode.parse().map_err(|_| anyhow::anyhow!("--memory-mode '{}' (expected steer, text or both)", self.memory_mode))
    }

    /// Retrieval settings from the command line (checked).
    pub fn retrieval(&self) -> Result<RetrievalOptions> {
        if !self.memory_scale.is_finite() {
            bail!("--memory-scale must be finite");
        }
        let layers = match &self.memory_layers {
            Some(layers) => Some(parse_range(layers).with_context(|| format!("--memory-layers '{layers}' (expected A-B)"))?),
            None => None,
        };
        Ok(RetrievalOptions { top_k: self.memory_top_k, threshold: self.memory_threshold, scale: self.memory_scale, layers })
    }

    /// The bank, checked against the model (None without --memory).
    pub fn load<B: Backend>(&self, model: &Model<B>) -> Result<Option<MemoryBank>> {
        let Some(path) = &self.memory else { return Ok(None) };
        self.mode()?;
        self.retrieval()?;
        Ok(Some(load_bank(path, model)?))
    }

    /// Retrieves for one task (the prompt text) and builds what the chosen mode applies.
    pub fn apply<B: Backend>(&self, model: &Model<B>, bank: &MemoryBank, bank_path: &Path, task: &str) -> Result<AppliedMemory> {
        let mode = self.mode()?;
        let memory = retrieve_for_task(model, bank, task, &self.retrieval()?)?;
        let term = memory.term(mode).with_context(|| format!("blending memories of {}", bank_path.display()))?;
        let prompt = match memory.workflow_for(mode) {
            Some(workflow) => prompt_with_workflow(workflow, task),
            None => task.to_string(),
        };
        Ok(AppliedMemory { retrieved: memory.retrieved, term, prompt })
    }
}

/// Reads a memory bank and refuses one made for another model or holding no memories.
pub fn load_bank<B: Backend>(path: &Path, model: &Model<B>) -> Result<MemoryBank> {
    let bank = MemoryBank::read(path).with_context(|| format!("reading memory bank {}", path.display()))?;
    bank.check_fits(model.config.hidden_size, model.config.num_hidden_layers).with_context(|| format!("memory bank {}", path.display()))?;
    if bank.memories.is_empty() {
        bail!("memory bank {} holds no memories", path.display());
    }
    Ok(bank)
}
