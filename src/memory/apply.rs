//! Applying a memory bank to one task: retrieve by the instruction's key, and turn the result
//! into a steering term (steer), a workflow text for the prompt (text), or both. Shared by
//! `engram generate --memory` and the agent runner so that both apply memory the same way.

use std::sync::Arc;

use super::bank::MemoryBank;
use super::distill::instruction_key;
use super::retrieve::{blend, retrieve};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::session::Model;
use crate::steer::{SteeringTerm, SteeringVector};

/// What of the retrieved memory is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// Add the blended memory vector to the residual stream.
    Steer,
    /// Put the memory's workflow text in the prompt.
    Text,
    /// Both.
    Both,
}

impl MemoryMode {
    pub fn steers(self) -> bool {
        matches!(self, MemoryMode::Steer | MemoryMode::Both)
    }
    pub fn shows_text(self) -> bool {
        matches!(self, MemoryMode::Text | MemoryMode::Both)
    }
    pub fn name(self) -> &'static str {
        match self {
            MemoryMode::Steer => "steer",
            MemoryMode::Text => "text",
            MemoryMode::Both => "both",
        }
    }
}

impl std::str::FromStr for MemoryMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "steer" => Ok(MemoryMode::Steer),
            "text" => Ok(MemoryMode::Text),
            "both" => Ok(MemoryMode::Both),
            other => Err(Error::InvalidInput(format!("memory mode '{other}' (expected steer, text or both)"))),
        }
    }
}

/// How retrieval and steering are done.
#[derive(Debug, Clone)]
pub struct RetrievalOptions {
    /// Memories blended per task.
    pub top_k: usize,
    /// Memories less similar than this (centred cosine) are not used.
    pub threshold: f64,
    /// Scale of the steering term.
    pub scale: f32,
    /// Only steer these layers (inclusive).
    pub layers: Option<(usize, usize)>,
}

impl Default for RetrievalOptions {
    fn default() -> Self {
        RetrievalOptions { top_k: 1, threshold: 0.0, scale: 1.0, layers: None }
    }
}

/// The memory retrieved for one task, before a mode picks what to apply.
#[derive(Debug, Clone)]
pub struct RetrievedMemory {
    /// The retrieved memories and their scores, best first.
    pub retrieved: Vec<(String, f64)>,
    /// The blended direction (None when nothing was retrieved).
    pub vector: Option<Arc<SteeringVector>>,
    /// The best memory's workflow text (None when nothing was retrieved or it is empty).
    pub workflow: Option<String>,
    /// Why retrieved memories could not be blended (no positive similarity), for steer modes.
    blend_error: Option<String>,
    scale: f32,
    layers: Option<(usize, usize)>,
}

impl RetrievedMemory {
    /// The steering term of `mode` (None for text mode or when nothing was retrieved); an
    /// error when memories were retrieved but none with a positive similarity to blend.
    pub fn term(&self, mode: MemoryMode) -> Result<Option<SteeringTerm>> {
        if !mode.steers() {
            return Ok(None);
        }
        if let Some(problem) = &self.blend_error {
            return Err(Error::InvalidInput(problem.clone()));
        }
        let Some(vector) = self.vector.clone() else { return Ok(None) };
        let mut term = SteeringTerm::new(vector, self.scale);
        term.layers = self.layers;
        Ok(Some(term))
    }

    /// The workflow text of `mode` (None for steer mode or when there is none).
    pub fn workflow_for(&self, mode: MemoryMode) -> Option<&str> {
        if mode.shows_text() { self.workflow.as_deref() } else { None }
    }
}

/// Retrieves `task`'s memories from `bank` (checked to fit `model` beforehand) and blends them.
pub fn retrieve_for_task<B: Backend>(model: &Model<B>, bank: &MemoryBank, task: &str, options: &RetrievalOptions) -> Result<RetrievedMemory> {
    if !options.scale.is_finite() {
        return Err(Error::InvalidInput("memory scale must be finite".into()));
    }
    let first = bank.memories.first().ok_or_else(|| Error::InvalidInput("the memory bank holds no memories".into()))?;
    let key_layer = first.meta.key_layer;
    let key = instruction_key(model, task, key_layer)?;
    let hits = retrieve(bank, &key, key_layer, options.top_k, options.threshold)?;
    let retrieved: Vec<(String, f64)> = hits.iter().map(|h| (h.name.clone(), h.score)).collect();
    let Some(best) = hits.first() else {
        return Ok(RetrievedMemory { retrieved, vector: None, workflow: None, blend_error: None, scale: options.scale, layers: options.layers });
    };
    let workflow = bank.memories[best.index].meta.workflow.trim();
    let workflow = (!workflow.is_empty()).then(|| workflow.to_string());
    let (vector, blend_error) = match blend(bank, &hits) {
        Ok(v) => (Some(Arc::new(v)), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(RetrievedMemory { retrieved, vector, workflow, blend_error, scale: options.scale, layers: options.layers })
}

/// `task` with a workflow text put before it, as `generate --memory-mode text` prompts it.
pub fn prompt_with_workflow(workflow: &str, task: &str) -> String {
    format!("Workflow that worked for similar tasks:\n{}\n\nTask: {task}", workflow.trim())
}
