//! A loaded model ([`Model`]) and the inference state that runs it ([`Session`]): KV cache, RoPE
//! tables and scratch buffers, all allocated when the session is created.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::forward::{self, BatchRows, ForwardScratch, RopeTables};
use crate::kv::KvCache;
use crate::model::chat::ChatTemplate;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::TextTokenizer;
use crate::model::{ModelFiles, ModelFormat};
use crate::tensor::DType;
use crate::weights::ModelWeights;

/// A model's weights on a backend, with its tokenizer and chat template.
pub struct Model<B: Backend> {
    pub backend: B,
    pub config: ModelConfig,
    pub weights: ModelWeights<B>,
    pub tokenizer: TextTokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub eos_ids: Vec<u32>,
    pub path: std::path::PathBuf,
    pub format: ModelFormat,
}

impl<B: Backend> Model<B> {
    /// Loads the weights of `files` onto `backend` with matrices in `dtype`.
    pub fn load(backend: B, files: ModelFiles, dtype: DType, progress: impl FnMut(usize, usize)) -> Result<Self> {
        let weights = ModelWeights::load(&backend, &files.config, files.source.as_ref(), dtype, progress)?;
        Ok(Model {
            backend,
            config: files.config,
            weights,
            tokenizer: files.tokenizer,
            chat_template: files.chat_template,
            eos_ids: files.eos_ids,
            path: files.path,
            format: files.format,
        })
    }
}

/// Sizes of a session's preallocated state.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Sequences that can be in flight at once (KV slots).
    pub slots: usize,
    /// Positions per slot.
    pub context: usize,
    /// Rows per forward call; longer inputs are split into chunks of this many.
    pub max_batch_rows: usize,
    /// Rows of logits per forward call.
    pub max_logit_rows: usize,
}

impl SessionOptions {
    pub fn new(slots: usize, context: usize) -> Self {
        SessionOptions { slots, context, max_batch_rows: 512, max_logit_rows: slots.max(1) }
    }
}

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRequest {
    None,
    Last,
    All,
}

/// New tokens for one sequence.
#[derive(Debug, Clone, Copy)]
pub struct SequenceInput<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
    pub logits: LogitRequest,
}

/// Logits returned by a step: for each input, the rows it asked for, `[rows, vocab]`.
#[derive(Debug, Default)]
pub struct StepLogits {
    pub vocab: usize,
    pub per_input: Vec<Vec<f32>>,
}

impl StepLogits {
    /// The last row of input `i` (panics if it requested none).
    pub fn last(&self, i: usize) -> &[f32] {
        let rows = &self.per_input[i];
        &rows[rows.len() - self.vocab..]
    }
}

pub struct Session<'m, B: Backend> {
    pub model: &'m Model<B>,
    pub kv: KvCache<B>,
    scratch: ForwardScratch<B>,
    rope: RopeTables<B>,
    options: SessionOptions,
}

impl<'m, B: Backend> Session<'m, B> {
    pub fn new(model: &'m Model<B>, options: SessionOptions) -> Result<Self> {
        let max_context = model.config.max_position_embeddings;
        if options.context > max_context {
            return Err(Error::InvalidInput(format!("context {} exceeds the model's maximum of {max_context} positions", options.context)));
        }
        if let Some(window) = model.config.sliding_window {
            if options.context > window {
                return Err(Error::Unsupported(format!("context {} exceeds the sliding window of {window}; engram implements full attention only", options.context)));
            }
        }
        if options.max_batch_rows == 0 || options.max_logit_rows == 0 {
            return Err(Error::InvalidInput("max_batch_rows and max_logit_rows must be positive".into()));
        }
        let backend = &model.backend;
        Ok(Session {
            model,
            kv: KvCache::new(backend, &model.config, options.slots, options.context)?,
            scratch: ForwardScratch::new(backend, &model.config, options.max_batch_rows, options.max_logit_rows)?,
            rope: RopeTables::new(backend, &model.config, options.context)?,
            options,
        })
    }

    pub fn options(&self) -> SessionOptions {
        self.options
    }

    /// Appends each input's tokens to its slot and returns the requested logits. All inputs run
    /// as one batch of rows (split into chunks of `max_batch_rows`).
    pub fn step(&mut self, inputs: &[SequenceInput<'_>]) -> Result<StepLogits> {
        let vocab = self.model.config.vocab_size;
        let mut seen = vec![false; self.kv.slots()];
        for input in inputs {
            self.kv.check_room(input.slot, input.tokens.len())?;
            if std::mem::replace(&mut seen[input.slot], true) {
                return Err(Error::InvalidInput(format!("slot {} appears twice in one step", input.slot)));
            }
            if input.tokens.is_empty() {
                return Err(Error::InvalidInput(format!("empty input for slot {}", input.slot)));
            }
        }
        // Flatten into rows: (input index, token, slot, position, wants logits).
        let mut rows = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let start = self.kv.len(input.slot);
            let n = input.tokens.len();
            for (j, &t) in input.tokens.iter().enumerate() {
                let wants = match input.logits {
                    LogitRequest::None => false,
                    LogitRequest::Last => j + 1 == n,
                    LogitRequest::All => true,
                };
                rows.push((i, t, input.slot as u32, (start + j) as u32, wants));
            }
        }
        let mut out = StepLogits { vocab, per_input: vec![Vec::new(); inputs.len()] };
        let (max_rows, max_logits) = (self.options.max_batch_rows, self.options.max_logit_rows);
        let mut begin = 0;
        while begin < rows.len() {
            // A chunk ends at max_rows rows or max_logits logit rows, whichever comes first.
            let mut end = begin;
            let mut logit_count = 0;
            while end < rows.len() && end - begin < max_rows && (logit_count < max_logits || !rows[end].4) {
                logit_count += usize::from(rows[end].4);
                end += 1;
            }
            let chunk = &rows[begin..end];
            let tokens: Vec<u32> = chunk.iter().map(|r| r.1).collect();
            let slots: Vec<u32> = chunk.iter().map(|r| r.2).collect();
            let positions: Vec<u32> = chunk.iter().map(|r| r.3).collect();
            let logit_rows: Vec<u32> = chunk.iter().enumerate().filter(|(_, r)| r.4).map(|(k, _)| k as u32).collect();
            let mut logits = vec![0.0f32; logit_rows.len() * vocab];
            let m = self.model;
            forward::forward(
                &m.backend,
                &m.config,
                &m.weights,
                &self.rope,
                &mut self.kv.store,
                &mut self.scratch,
                BatchRows { tokens: &tokens, slots: &slots, positions: &positions, logit_rows: &logit_rows },
                &mut logits,
            )?;
            for (k, &row) in logit_rows.iter().enumerate() {
                out.per_input[chunk[row as usize].0].extend_from_slice(&logits[k * vocab..(k + 1) * vocab]);
            }
            begin = end;
        }
        for input in inputs {
            self.kv.advance(input.slot, input.tokens.len());
        }
        if let Some(bad) = out.per_input.iter().flatten().position(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!("the model produced a non-finite logit (value {bad}); the weights or inputs are broken")));
        }
        Ok(out)
    }
}
