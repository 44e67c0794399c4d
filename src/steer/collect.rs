//! Activations of many prompts at chosen layers, gathered through the fused capture: the input
//! of contrastive vector computation (and of memory distillation).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::session::{LogitRequest, Model, SequenceInput, Session, SessionOptions};
use crate::steer::{CapturePlan, CapturePositions, Point};

/// Which row of each prompt stands for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptReduction {
    /// The residual at the last prompt token.
    Last,
    /// The mean of the residual over all prompt tokens.
    Mean,
}

impl std::str::FromStr for PromptReduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(PromptReduction::Last),
            "mean" => Ok(PromptReduction::Mean),
            other => Err(Error::InvalidInput(format!("positions '{other}' (expected last or mean)"))),
        }
    }
}

/// One layer's activations of every prompt: `[prompts, hidden]` row-major, in prompt order.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerActivations {
    pub layer: usize,
    pub values: Vec<f32>,
}

/// Runs every prompt (token ids) through `model` with a capture at the block output of `layers`
/// and returns one [`LayerActivations`] per layer, in `layers` order. Prompts run `batch` at a
/// time as one batch of rows; `progress(done)` is called after each batch.
pub fn capture_prompts<B: Backend>(
    model: &Model<B>,
    prompts: &[Vec<u32>],
    layers: &[usize],
    reduction: PromptReduction,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<LayerActivations>> {
    let config = &model.config;
    if let Some(&bad) = layers.iter().find(|&&l| l >= config.num_hidden_layers) {
        return Err(Error::InvalidInput(format!("layer {bad} but the model has {} layers", config.num_hidden_layers)));
    }
    if layers.is_empty() || batch == 0 {
        return Err(Error::InvalidInput("capture needs at least one layer and a positive batch".into()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::InvalidInput(format!("prompt {i} has no tokens")));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    if longest > config.max_position_embeddings {
        return Err(Error::InvalidInput(format!("a prompt of {longest} tokens exceeds the model's {} positions", config.max_position_embeddings)));
    }
    let slots = batch.min(prompts.len().max(1));
    let mut session = Session::new(model, SessionOptions::new(slots, longest))?;
    let positions = match reduction {
        PromptReduction::Last => CapturePositions::LastPrompt,
        PromptReduction::Mean => CapturePositions::MeanPrompt,
    };
    let points: Vec<Point> = layers.iter().map(|&l| Point::Block(l)).collect();
    session.set_capture(Some(CapturePlan { points: points.clone(), positions }))?;
    let hidden = config.hidden_size;
    let mut out: Vec<LayerActivations> = layers.iter().map(|&layer| LayerActivations { layer, values: vec![f32::NAN; prompts.len() * hidden] }).collect();
    for (chunk_index, chunk) in prompts.chunks(slots).enumerate() {
        for slot in 0..chunk.len() {
            session.reset(slot)?;
        }
        let inputs: Vec<SequenceInput> = chunk.iter().enumerate().map(|(slot, tokens)| SequenceInput { slot, tokens, logits: LogitRequest::None }).collect();
        session.step(&inputs)?;
        for record in session.take_captures() {
            let Some(k) = points.iter().position(|&p| p == record.point) else { continue };
            let prompt = chunk_index * slots + record.slot;
            out[k].values[prompt * hidden..(prompt + 1) * hidden].copy_from_slice(&record.values);
        }
        progress((chunk_index * slots + chunk.len()).min(prompts.len()));
    }
    // Every row must have been written: a missing capture is a bug, never a silent NaN row.
    for layer in &out {
        if let Some(i) = layer.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!("layer {}: prompt {} has a non-finite activation", layer.layer, i / hidden)));
        }
    }
    Ok(out)
}
