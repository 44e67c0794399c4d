//! The one forward pass, written once over the [`Backend`] trait.
//!
//! A batch is a list of token rows; each row names its KV slot and position, so prompts of
//! different lengths and decode steps of different sequences share every matrix product.

use crate::backend::{AttentionLayout, Backend, FusedArgs, RowTable};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::steer::tables::FusedPoint;
use crate::steer::Point;
use crate::weights::ModelWeights;

/// One batch of rows to run.
#[derive(Debug, Clone, Copy)]
pub struct BatchRows<'a> {
    pub tokens: &'a [u32],
    pub slots: &'a [u32],
    pub positions: &'a [u32],
    /// Rows whose logits are wanted, in output order.
    pub logit_rows: &'a [u32],
}

/// Activation buffers for up to `max_rows` rows, allocated once per session.
pub struct ForwardScratch<B: Backend> {
    pub max_rows: usize,
    /// The residual stream `h`.
    hidden: B::Buffer,
    /// The normalized input of the next sub-block.
    normed: B::Buffer,
    qkv: B::Buffer,
    attention: B::Buffer,
    delta: B::Buffer,
    gate_up: B::Buffer,
    activation: B::Buffer,
    logit_inputs: B::Buffer,
    logits: B::Buffer,
    /// Readout values and captured rows of the current batch (sized when plans are set).
    pub readout: B::Buffer,
    pub capture: B::Buffer,
}

impl<B: Backend> ForwardScratch<B> {
    pub fn new(backend: &B, config: &ModelConfig, max_rows: usize, max_logit_rows: usize) -> Result<Self> {
        let layout = attention_layout(config);
        let (hidden, ffn) = (config.hidden_size, config.intermediate_size);
        Ok(ForwardScratch {
            max_rows,
            hidden: backend.buffer(max_rows * hidden)?,
            normed: backend.buffer(max_rows * hidden)?,
            qkv: backend.buffer(max_rows * layout.qkv_dim())?,
            attention: backend.buffer(max_rows * layout.q_dim())?,
            delta: backend.buffer(max_rows * hidden)?,
            gate_up: backend.buffer(max_rows * 2 * ffn)?,
            activation: backend.buffer(max_rows * ffn)?,
            logit_inputs: backend.buffer(max_logit_rows * hidden)?,
            logits: backend.buffer(max_logit_rows * config.vocab_size)?,
            readout: backend.buffer(0)?,
            capture: backend.buffer(0)?,
        })
    }

    /// Allocates the readout and capture outputs (when plans change, never per token).
    pub fn size_outputs(&mut self, backend: &B, readout_len: usize, capture_len: usize) -> Result<()> {
        self.readout = backend.buffer(readout_len)?;
        self.capture = backend.buffer(capture_len)?;
        Ok(())
    }
}

/// The per-point tables of a batch and the direction pool they index.
pub struct FusedTables<'a, B: Backend> {
    /// One per residual point, indexed by [`crate::steer::Point::index`].
    pub points: &'a [FusedPoint],
    pub directions: &'a B::Buffer,
}

/// RoPE cos/sin tables `[positions, head_dim/2]`, computed once per session.
pub struct RopeTables<B: Backend> {
    pub cos: B::Buffer,
    pub sin: B::Buffer,
    pub positions: usize,
}

impl<B: Backend> RopeTables<B> {
    pub fn new(backend: &B, config: &ModelConfig, positions: usize) -> Result<Self> {
        let inv_freq = config.rope_inv_freq();
        let half = inv_freq.len();
        let mut cos = vec![0.0f32; positions * half];
        let mut sin = vec![0.0f32; positions * half];
        for p in 0..positions {
            for (i, &f) in inv_freq.iter().enumerate() {
                // f32 product then f32 cos/sin, as transformers computes them.
                let angle = p as f32 * f;
                cos[p * half + i] = angle.cos();
                sin[p * half + i] = angle.sin();
            }
        }
        let mut cos_buffer = backend.buffer(cos.len())?;
        let mut sin_buffer = backend.buffer(sin.len())?;
        backend.upload(&cos, &mut cos_buffer)?;
        backend.upload(&sin, &mut sin_buffer)?;
        Ok(RopeTables { cos: cos_buffer, sin: sin_buffer, positions })
    }
}

pub fn attention_layout(config: &ModelConfig) -> AttentionLayout {
    AttentionLayout { heads: config.num_attention_heads, kv_heads: config.num_key_value_heads, head_dim: config.head_dim }
}

/// Runs `batch` through the model, appending its k/v to `kv`, and writes the logits of
/// `batch.logit_rows` into `logits` (`[logit_rows, vocab]`).
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    weights: &ModelWeights<B>,
    rope: &RopeTables<B>,
    kv: &mut B::KvStore,
    scratch: &mut ForwardScratch<B>,
    batch: BatchRows<'_>,
    fused: &FusedTables<'_, B>,
    logits: &mut [f32],
) -> Result<()> {
    let rows = batch.tokens.len();
    let vocab = config.vocab_size;
    if rows == 0 || rows > scratch.max_rows || batch.slots.len() != rows || batch.positions.len() != rows {
        return Err(Error::InvalidInput(format!("batch of {rows} rows does not fit the session's {} rows", scratch.max_rows)));
    }
    if logits.len() != batch.logit_rows.len() * vocab || batch.logit_rows.iter().any(|&r| r as usize >= rows) {
        return Err(Error::InvalidInput("logit rows outside the batch or logits buffer of the wrong size".into()));
    }
    if fused.points.len() != 2 * config.num_hidden_layers {
        return Err(Error::InvalidInput("fused tables do not cover every residual point".into()));
    }
    if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidInput(format!("token id {t} outside the vocabulary of {vocab}")));
    }
    if let Some(&p) = batch.positions.iter().find(|&&p| p as usize >= rope.positions) {
        return Err(Error::InvalidInput(format!("position {p} beyond the session's context of {}", rope.positions)));
    }
    let layout = attention_layout(config);
    let (dim, ffn, eps) = (config.hidden_size, config.intermediate_size, config.rms_norm_eps);
    let table = RowTable { slots: batch.slots, positions: batch.positions };
    let s = scratch;
    backend.run(|| {
        backend.embed(&weights.embed, batch.tokens, &mut s.hidden);
        backend.rms_norm(&s.hidden, &weights.layers[0].input_norm, eps, rows, dim, &mut s.normed);
        for (i, layer) in weights.layers.iter().enumerate() {
            // Attention sub-block.
            backend.matmul(&s.normed, rows, &layer.qkv, &mut s.qkv);
            if let Some(bias) = &layer.qkv_bias {
                backend.add_bias(&mut s.qkv, bias, rows, layout.qkv_dim());
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                backend.head_rms_norm(&mut s.qkv, rows, layout, qn, kn, eps);
            }
            backend.rope(&mut s.qkv, rows, layout, batch.positions, &rope.cos, &rope.sin);
            backend.attention(&s.qkv, rows, layout, kv, i, table, &mut s.attention);
            backend.matmul(&s.attention, rows, &layer.o_proj, &mut s.delta);
            let args = FusedArgs { point: &fused.points[Point::Attention(i).index()], directions: fused.directions, readout: &mut s.readout, capture: &mut s.capture };
            backend.residual_step(&mut s.hidden, &s.delta, rows, dim, &layer.post_attention_norm, eps, &mut s.normed, args);
            // MLP sub-block; its residual step normalizes for the next layer (or the output).
            backend.matmul(&s.normed, rows, &layer.gate_up, &mut s.gate_up);
            backend.silu_mul(&s.gate_up, rows, ffn, &mut s.activation);
            backend.matmul(&s.activation, rows, &layer.down, &mut s.delta);
            let next_norm = weights.layers.get(i + 1).map_or(&weights.final_norm, |next| &next.input_norm);
            let args = FusedArgs { point: &fused.points[Point::Block(i).index()], directions: fused.directions, readout: &mut s.readout, capture: &mut s.capture };
            backend.residual_step(&mut s.hidden, &s.delta, rows, dim, next_norm, eps, &mut s.normed, args);
        }
        if !batch.logit_rows.is_empty() {
            backend.gather_rows(&s.normed, batch.logit_rows, dim, &mut s.logit_inputs);
            backend.matmul(&s.logit_inputs, batch.logit_rows.len(), weights.output_matrix(), &mut s.logits);
        }
    });
    if !batch.logit_rows.is_empty() {
        backend.download(&s.logits, logits)?;
    }
    Ok(())
}
