//! A loaded model ([`Model`]) and the inference state that runs it ([`Session`]): KV cache, RoPE
//! tables and scratch buffers, all allocated when the session is created.

use crate::backend::{Backend, KvPrecision};
use crate::error::{Error, Result};
use std::sync::Arc;

use crate::forward::{self, BatchRows, FusedTables, ForwardScratch, RopeTables};
use crate::steer::capture::MeanAccumulator;
use crate::steer::tables::{all_points, DirectionPool, FusedPoint, RowTerm, TermMode, NO_DIRECTION};
use crate::steer::{CapturePlan, CapturePositions, CaptureRecord, Point, ReadoutPlan, ReadoutRecord, SteeringMode, SteeringPlan};
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
    /// How the KV cache stores its entries; `None` takes the backend's default (the CPU's is
    /// f16 unless set otherwise, CUDA's f32).
    pub kv_precision: Option<KvPrecision>,
}

impl SessionOptions {
    pub fn new(slots: usize, context: usize) -> Self {
        SessionOptions { slots, context, max_batch_rows: 512, max_logit_rows: slots.max(1), kv_precision: None }
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

/// Logits returned by a step: for each input, the rows it asked for, `[rows, vocab]`; and the
/// readouts of every row at every readout point, in row then point order.
#[derive(Debug, Default)]
pub struct StepLogits {
    pub vocab: usize,
    pub per_input: Vec<Vec<f32>>,
    pub readouts: Vec<ReadoutRecord>,
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
    /// Each slot's steering plan.
    plans: Vec<Option<Arc<SteeringPlan>>>,
    /// Each slot's prompt length once generation has begun (rows at or past it are generated).
    prompt_lens: Vec<Option<usize>>,
    capture: Option<CapturePlan>,
    readout: Option<ReadoutPlan>,
    pool: DirectionPool,
    pool_buffer: B::Buffer,
    pool_uploaded: usize,
    points: Vec<FusedPoint>,
    captured: Vec<CaptureRecord>,
    means: MeanAccumulator,
    /// Host copy of the readout and capture buffers, sized with them, reused every step.
    staging: Vec<f32>,
}

/// One token row of a step.
#[derive(Debug, Clone, Copy)]
struct Row {
    input: usize,
    token: u32,
    slot: u32,
    position: u32,
    wants_logits: bool,
}

impl<'m, B: Backend> Session<'m, B> {
    /// Downloads the chunk's readouts and captures into records.
    fn collect_outputs(&mut self, chunk: &[Row], readout_len: usize, capture_rows: usize, readouts: &mut Vec<ReadoutRecord>) -> Result<()> {
        let hidden = self.model.config.hidden_size;
        if readout_len > 0 {
            let values = &mut self.staging[..readout_len];
            self.model.backend.download(&self.scratch.readout, values)?;
            let probes = self.readout.as_ref().map_or(0, |r| r.probes.len());
            let mut records = Vec::with_capacity(chunk.len() * self.points.len());
            for (k, row) in chunk.iter().enumerate() {
                for point in all_points(self.model.config.num_hidden_layers) {
                    if let Some(offset) = self.points[point.index()].readout_offset {
                        let at = offset + k * (1 + probes);
                        records.push(ReadoutRecord {
                            slot: row.slot as usize,
                            position: row.position as usize,
                            layer: point.layer(),
                            attention: matches!(point, Point::Attention(_)),
                            norm: values[at],
                            projections: values[at + 1..at + 1 + probes].to_vec(),
                        });
                    }
                }
            }
            readouts.extend(records);
        }
        if capture_rows > 0 {
            let values = &mut self.staging[..capture_rows * hidden];
            self.model.backend.download(&self.scratch.capture, values)?;
            let mean = self.capture.as_ref().is_some_and(|c| c.positions == CapturePositions::MeanPrompt);
            for point in all_points(self.model.config.num_hidden_layers) {
                for &(k, dest) in &self.points[point.index()].capture {
                    let row = chunk[k as usize];
                    let data = &values[dest as usize * hidden..(dest as usize + 1) * hidden];
                    if mean {
                        self.means.add(row.slot as usize, point, row.position as usize, data);
                    } else {
                        self.captured.push(CaptureRecord { slot: row.slot as usize, point, positions: vec![row.position as usize], values: data.to_vec() });
                    }
                }
            }
        }
        Ok(())
    }

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
        let layers = model.config.num_hidden_layers;
        let mut session = Session {
            model,
            kv: KvCache::new(backend, &model.config, options.slots, options.context, options.kv_precision.unwrap_or_else(|| backend.default_kv_precision()))?,
            scratch: ForwardScratch::new(backend, &model.config, options.max_batch_rows, options.max_logit_rows)?,
            rope: RopeTables::new(backend, &model.config, options.context)?,
            options,
            plans: vec![None; options.slots],
            prompt_lens: vec![None; options.slots],
            capture: None,
            readout: None,
            pool: DirectionPool::new(model.config.hidden_size),
            pool_buffer: backend.buffer(0)?,
            pool_uploaded: 0,
            points: vec![FusedPoint::default(); 2 * layers],
            captured: Vec::new(),
            means: MeanAccumulator::default(),
            staging: Vec::new(),
        };
        session.size_outputs()?;
        Ok(session)
    }

    /// Steers `slot` with `plan` (None or an empty plan: no steering) from its next step on.
    pub fn set_steering(&mut self, slot: usize, plan: Option<SteeringPlan>) -> Result<()> {
        self.check_slot(slot)?;
        let plan = plan.filter(|p| !p.is_empty());
        if let Some(plan) = &plan {
            plan.validate(self.model.config.hidden_size, self.model.config.num_hidden_layers)?;
            for term in &plan.terms {
                for layer in term.vector.layers() {
                    self.pool.intern(&term.vector, layer, matches!(term.mode, SteeringMode::Clamp { .. }));
                }
            }
        }
        self.plans[slot] = plan.map(Arc::new);
        self.upload_pool()
    }

    /// Records residual rows as `plan` says, for every slot (None: stop capturing).
    pub fn set_capture(&mut self, plan: Option<CapturePlan>) -> Result<()> {
        if let Some(plan) = &plan {
            if let Some(p) = plan.points.iter().find(|p| p.layer() >= self.model.config.num_hidden_layers) {
                return Err(Error::InvalidInput(format!("capture point {} beyond the model's layers", p.name())));
            }
        }
        self.capture = plan.filter(|p| !p.points.is_empty());
        self.size_outputs()
    }

    /// Computes readouts as `plan` says, for every slot (None: no readouts).
    pub fn set_readout(&mut self, plan: Option<ReadoutPlan>) -> Result<()> {
        if let Some(plan) = &plan {
            for (name, probe) in &plan.probes {
                probe.check_fits(self.model.config.hidden_size, self.model.config.num_hidden_layers, name)?;
                for layer in probe.layers() {
                    self.pool.intern(probe, layer, true);
                }
            }
        }
        self.readout = plan.filter(|p| !p.points.is_empty());
        self.size_outputs()?;
        self.upload_pool()
    }

    /// Marks the end of `slot`'s prompt: its later rows are generated rows for schedules and capture.
    pub fn begin_generation(&mut self, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        self.prompt_lens[slot] = Some(self.kv.len(slot));
        Ok(())
    }

    /// Forgets `slot`'s sequence (its steering plan stays).
    pub fn reset(&mut self, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        self.kv.reset(slot);
        self.prompt_lens[slot] = None;
        Ok(())
    }

    /// Continues `from`'s first `positions` cached tokens in each slot of `to`: their KV entries
    /// are copied, their lengths set to `positions`, and they count as prompt (not generated)
    /// rows. A prompt shared by many continuations is then computed once.
    pub fn fork_prefix(&mut self, from: usize, to: &[usize], positions: usize) -> Result<()> {
        self.kv.fork_prefix(&self.model.backend, from, to, positions)?;
        for &target in to {
            if target != from {
                self.prompt_lens[target] = None;
            }
        }
        Ok(())
    }

    /// Everything captured so far (means of `mean` capture included); the store is emptied.
    pub fn take_captures(&mut self) -> Vec<CaptureRecord> {
        let mut records = std::mem::take(&mut self.captured);
        records.extend(self.means.take());
        records
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.plans.len() {
            return Err(Error::InvalidInput(format!("slot {slot} outside the session's {} slots", self.plans.len())));
        }
        Ok(())
    }

    fn size_outputs(&mut self) -> Result<()> {
        let rows = self.options.max_batch_rows;
        let readout_len = self.readout.as_ref().map_or(0, |r| r.points.len() * rows * (1 + r.probes.len()));
        let capture_len = self.capture.as_ref().map_or(0, |c| c.points.len() * rows * self.model.config.hidden_size);
        self.scratch.size_outputs(&self.model.backend, readout_len, capture_len)?;
        // Poisoned at set-up: every value is written before it is read, so a missed write shows
        // as NaN; and the pages are touched here, not on the first step that captures.
        self.staging = vec![f32::NAN; readout_len.max(capture_len)];
        self.model.backend.upload(&self.staging[..readout_len], &mut self.scratch.readout)?;
        self.model.backend.upload(&self.staging[..capture_len], &mut self.scratch.capture)
    }

    fn upload_pool(&mut self) -> Result<()> {
        if self.pool.len() != self.pool_uploaded {
            let mut buffer = self.model.backend.buffer(self.pool.values.len())?;
            self.model.backend.upload(&self.pool.values, &mut buffer)?;
            self.pool_buffer = buffer;
            self.pool_uploaded = self.pool.len();
        }
        Ok(())
    }

    /// Fills the per-point tables for one chunk of rows `(input, token, slot, position, logits)`,
    /// where `last_of_input[k]` tells whether row k is the last row of its input.
    /// Returns the readout and capture lengths used.
    fn resolve(&mut self, chunk: &[Row], last_of_input: &[bool]) -> (usize, usize) {
        let layers = self.model.config.num_hidden_layers;
        let steering = chunk.iter().any(|r| self.plans[r.slot as usize].is_some());
        let mut readout_len = 0;
        let mut capture_rows = 0;
        for point in all_points(layers) {
            let table = &mut self.points[point.index()];
            table.clear();
            if steering {
                table.row_offsets.push(0);
                for row in chunk {
                    if let Some(plan) = &self.plans[row.slot as usize] {
                        let prompt_len = self.prompt_lens[row.slot as usize];
                        for term in &plan.terms {
                            if term.direction_at(point).is_none() {
                                continue;
                            }
                            let coefficient = term.scale * term.schedule.factor(row.position as usize, prompt_len);
                            if coefficient == 0.0 {
                                continue; // scale 0 leaves h untouched, bit for bit
                            }
                            let unit = matches!(term.mode, SteeringMode::Clamp { .. });
                            let Some(direction) = self.pool.intern(&term.vector, point.layer(), unit) else { continue };
                            let (coefficient, mode) = match term.mode {
                                SteeringMode::Add => (coefficient, TermMode::Add),
                                SteeringMode::Relative => (coefficient / self.pool.norms[direction as usize], TermMode::NormScaled),
                                SteeringMode::Clamp { target } => (coefficient, TermMode::Clamp { target }),
                            };
                            table.terms.push(RowTerm { direction, coefficient, mode });
                        }
                    }
                    table.row_offsets.push(table.terms.len() as u32);
                }
                if table.terms.is_empty() {
                    table.row_offsets.clear();
                }
            }
            if let Some(readout) = &self.readout {
                if readout.points.contains(&point) {
                    table.readout_offset = Some(readout_len);
                    for (_, probe) in &readout.probes {
                        table.probes.push(self.pool.intern(probe, point.layer(), true).unwrap_or(NO_DIRECTION));
                    }
                    readout_len += chunk.len() * (1 + readout.probes.len());
                }
            }
            if let Some(capture) = &self.capture {
                if capture.points.contains(&point) {
                    for (k, row) in chunk.iter().enumerate() {
                        let generating = self.prompt_lens[row.slot as usize].is_some();
                        let position = row.position as usize;
                        let wanted = match capture.positions {
                            CapturePositions::LastPrompt => !generating && last_of_input[k],
                            CapturePositions::AllPrompt | CapturePositions::MeanPrompt => !generating,
                            CapturePositions::Generated => generating,
                            CapturePositions::Range { start, end } => position >= start && position <= end,
                            CapturePositions::All => true,
                        };
                        if wanted {
                            table.capture.push((k as u32, capture_rows as u32));
                            capture_rows += 1;
                        }
                    }
                }
            }
        }
        (readout_len, capture_rows)
    }

    pub fn options(&self) -> SessionOptions {
        self.options
    }

    /// How this session's KV cache stores its entries (the options' choice or the backend's).
    pub fn kv_precision(&self) -> KvPrecision {
        self.kv.precision()
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
        // Flatten into rows.
        let mut rows = Vec::new();
        let mut last_of_input = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let start = self.kv.len(input.slot);
            let n = input.tokens.len();
            for (j, &token) in input.tokens.iter().enumerate() {
                let wants_logits = match input.logits {
                    LogitRequest::None => false,
                    LogitRequest::Last => j + 1 == n,
                    LogitRequest::All => true,
                };
                rows.push(Row { input: i, token, slot: input.slot as u32, position: (start + j) as u32, wants_logits });
                last_of_input.push(j + 1 == n);
            }
        }
        let mut out = StepLogits { vocab, per_input: vec![Vec::new(); inputs.len()], readouts: Vec::new() };
        let (max_rows, max_logits) = (self.options.max_batch_rows, self.options.max_logit_rows);
        let mut begin = 0;
        while begin < rows.len() {
            // A chunk ends at max_rows rows or max_logits logit rows, whichever comes first.
            let mut end = begin;
            let mut logit_count = 0;
            while end < rows.len() && end - begin < max_rows && (logit_count < max_logits || !rows[end].wants_logits) {
                logit_count += usize::from(rows[end].wants_logits);
                end += 1;
            }
            let chunk = &rows[begin..end];
            let (readout_len, capture_rows) = self.resolve(chunk, &last_of_input[begin..end]);
            self.upload_pool()?;
            let tokens: Vec<u32> = chunk.iter().map(|r| r.token).collect();
            let slots: Vec<u32> = chunk.iter().map(|r| r.slot).collect();
            let positions: Vec<u32> = chunk.iter().map(|r| r.position).collect();
            let logit_rows: Vec<u32> = chunk.iter().enumerate().filter(|(_, r)| r.wants_logits).map(|(k, _)| k as u32).collect();
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
                &FusedTables { points: &self.points, directions: &self.pool_buffer },
                &mut logits,
            )?;
            for (k, &row) in logit_rows.iter().enumerate() {
                out.per_input[chunk[row as usize].input].extend_from_slice(&logits[k * vocab..(k + 1) * vocab]);
            }
            self.collect_outputs(chunk, readout_len, capture_rows, &mut out.readouts)?;
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
