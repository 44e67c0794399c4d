//! Sampling, stop conditions and the generation loop over a batch of sequences.
//!
//! All prompts are prefilled together as one batch of rows; then every step decodes one token
//! for each unfinished sequence, again as one batch.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::session::{LogitRequest, SequenceInput, Session};
use crate::steer::ReadoutRecord;

/// How the next token is chosen. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidInput(format!("temperature must be a finite number >= 0, got {}", self.temperature)));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(Error::InvalidInput(format!("top-p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Chooses tokens from logits; holds the seeded random state of one sequence.
pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler { params, rng: rand::rngs::StdRng::seed_from_u64(params.seed) })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(p.top_k);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs.iter().position(|&q| {
                cumulative += q;
                cumulative >= p.top_p
            });
            let keep = keep.map_or(probs.len(), |k| k + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &q) in probs.iter().enumerate() {
            r -= q;
            if r <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// When a sequence stops.
#[derive(Debug, Clone, Default)]
pub struct StopParams {
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    /// Readouts of every row of this sequence (prompt and generated), when the session has a
    /// readout plan.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub readouts: Vec<ReadoutRecord>,
}

/// Timing of a batch: prefill covers all prompts, decode every later step.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GenerationTiming {
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    /// Tokens produced by decode steps (the first token of each sequence comes from prefill).
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

impl GenerationTiming {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Streams text as it is produced: called with (sequence index, new text).
pub trait TokenSink {
    fn on_text(&mut self, sequence: usize, text: &str);
}

impl<F: FnMut(usize, &str)> TokenSink for F {
    fn on_text(&mut self, sequence: usize, text: &str) {
        self(sequence, text)
    }
}

struct Running {
    sampler: Sampler,
    generated: Vec<u32>,
    /// Text already handed to the sink.
    emitted: usize,
    finish: Option<FinishReason>,
    text: String,
    readouts: Vec<ReadoutRecord>,
}

/// Hands each readout to the sequence of its slot (sequence i runs in slot i).
fn collect_readouts(running: &mut [Running], readouts: Vec<ReadoutRecord>) {
    for record in readouts {
        if let Some(state) = running.get_mut(record.slot) {
            state.readouts.push(record);
        }
    }
}

/// Generates for every request as one batch, using slots `0..requests.len()` of `session`
/// (which are reset first).
pub fn generate<B: Backend>(session: &mut Session<'_, B>, requests: &[GenerationRequest], sink: &mut dyn TokenSink) -> Result<(Vec<GenerationOutput>, GenerationTiming)> {
    if requests.is_empty() {
        return Err(Error::InvalidInput("no prompts to generate from".into()));
    }
    if requests.len() > session.kv.slots() {
        return Err(Error::InvalidInput(format!("{} prompts but the session has {} slots", requests.len(), session.kv.slots())));
    }
    let model = session.model;
    let mut running = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        if request.prompt_ids.is_empty() {
            return Err(Error::InvalidInput(format!("prompt {i} is empty")));
        }
        // Check the whole generation fits before spending any time on it.
        session.reset(i)?;
        session.kv.check_room(i, request.prompt_ids.len() + request.stop.max_tokens.saturating_sub(1))?;
        running.push(Running { sampler: Sampler::new(request.sampling)?, generated: Vec::new(), emitted: 0, finish: None, text: String::new(), readouts: Vec::new() });
    }
    let mut timing = GenerationTiming { prompt_tokens: requests.iter().map(|r| r.prompt_ids.len()).sum(), ..Default::default() };

    let started = Instant::now();
    let inputs: Vec<SequenceInput> = requests.iter().enumerate().map(|(i, r)| SequenceInput { slot: i, tokens: &r.prompt_ids, logits: LogitRequest::Last }).collect();
    let mut logits = session.step(&inputs)?;
    timing.prefill_seconds = started.elapsed().as_secs_f64();
    for i in 0..requests.len() {
        session.begin_generation(i)?;
    }
    collect_readouts(&mut running, std::mem::take(&mut logits.readouts));
    for (i, state) in running.iter_mut().enumerate() {
        accept(state, &requests[i], logits.last(i), &model.eos_ids, &model.tokenizer, i, sink)?;
    }

    let decode_start = Instant::now();
    loop {
        let active: Vec<usize> = (0..running.len()).filter(|&i| running[i].finish.is_none()).collect();
        if active.is_empty() {
            break;
        }
        let last_tokens: Vec<[u32; 1]> = active.iter().map(|&i| [*running[i].generated.last().expect("one token after prefill")]).collect();
        let inputs: Vec<SequenceInput> = active.iter().zip(&last_tokens).map(|(&i, t)| SequenceInput { slot: i, tokens: t, logits: LogitRequest::Last }).collect();
        let mut logits = session.step(&inputs)?;
        timing.decode_tokens += active.len();
        collect_readouts(&mut running, std::mem::take(&mut logits.readouts));
        for (k, &i) in active.iter().enumerate() {
            accept(&mut running[i], &requests[i], logits.last(k), &model.eos_ids, &model.tokenizer, i, sink)?;
        }
    }
    timing.decode_seconds = decode_start.elapsed().as_secs_f64();

    let outputs = running
        .into_iter()
        .zip(requests)
        .map(|(state, request)| GenerationOutput {
            prompt_ids: request.prompt_ids.clone(),
            generated_ids: state.generated,
            text: state.text,
            finish_reason: state.finish.unwrap_or(FinishReason::Length),
            readouts: state.readouts,
        })
        .collect();
    Ok((outputs, timing))
}

/// Samples the next token of one sequence, updates its text and decides whether it stops.
fn accept(state: &mut Running, request: &GenerationRequest, logits: &[f32], eos_ids: &[u32], tokenizer: &crate::model::tokenizer::TextTokenizer, index: usize, sink: &mut dyn TokenSink) -> Result<()> {
    let token = state.sampler.sample(logits);
    let is_eos = eos_ids.contains(&token) && !request.stop.ignore_eos;
    if !is_eos {
        state.generated.push(token);
    }
    let mut text = tokenizer.decode(&state.generated, true)?;
    if let Some((at, _)) = request.stop.stop_strings.iter().filter_map(|s| text.find(s.as_str()).map(|at| (at, s))).min_by_key(|(at, _)| *at) {
        text.truncate(at);
        state.finish = Some(FinishReason::Stop);
    } else if is_eos {
        state.finish = Some(FinishReason::Eos);
    } else if state.generated.len() >= request.stop.max_tokens {
        state.finish = Some(FinishReason::Length);
    }
    // Hold back text that may still become a stop string or an incomplete UTF-8 character.
    let mut safe_end = text.len();
    if state.finish.is_none() {
        if text.ends_with('\u{FFFD}') {
            safe_end = text.trim_end_matches('\u{FFFD}').len();
        }
        for stop in &request.stop.stop_strings {
            for k in (1..stop.len()).rev() {
                if stop.is_char_boundary(k) && text[..safe_end].ends_with(&stop[..k]) {
                    safe_end = safe_end.min(text.len() - k);
                    break;
                }
            }
        }
    }
    if safe_end > state.emitted && text.is_char_boundary(state.emitted) && text.is_char_boundary(safe_end) {
        sink.on_text(index, &text[state.emitted..safe_end]);
        state.emitted = safe_end;
    }
    state.text = text;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 }).unwrap();
        assert_eq!(s.sample(&logits), argmax(&logits));
        let params = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, seed: 42 };
        let a: Vec<u32> = { let mut s = Sampler::new(params).unwrap(); (0..20).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(params).unwrap(); (0..20).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "sampling at temperature 0.8 should vary");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds almost all the mass: a small top-p must always return it.
        let mut logits = vec![0.0f32; 10];
        logits[4] = 10.0;
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 1 }).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 4);
        }
    }

    #[test]
    fn invalid_sampling_parameters_are_refused() {
        assert!(Sampler::new(SamplingParams { temperature: f32::NAN, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
    }
}
