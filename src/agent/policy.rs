//! The model's policy: the agent prompt (chat template, instruction, optional workflow, recent
//! history, current observation, valid actions), the valid-action filter for long lists, and the
//! two ways of acting — scoring each candidate action by its log-likelihood (the shared prompt
//! computed once and forked into candidate slots) or generating and mapping to the nearest
//! valid action.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::generate::argmax;
use crate::memory::context::{action_ids, prompt_ids};
pub use crate::memory::context::{filter_actions, prompt_message, PromptInput};
use crate::session::{LogitRequest, Model, SequenceInput, Session, SessionOptions};
use crate::steer::{SteeringPlan, SteeringTerm};

/// How the model picks an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionPolicy {
    /// Log-likelihood of every candidate action given the prompt; the best one.
    Score,
    /// Greedy generation, mapped to the nearest valid action.
    Generate,
}

impl std::str::FromStr for ActionPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "score" => Ok(ActionPolicy::Score),
            "generate" => Ok(ActionPolicy::Generate),
            other => Err(Error::InvalidInput(format!("policy '{other}' (expected score or generate)"))),
        }
    }
}

/// How a candidate's token log-probabilities are reduced to its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreReduction {
    /// Mean per token: long actions are not penalised for their length.
    Mean,
    /// Sum: the log-probability of the whole action.
    Sum,
}

impl std::str::FromStr for ScoreReduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(ScoreReduction::Mean),
            "sum" => Ok(ScoreReduction::Sum),
            other => Err(Error::InvalidInput(format!("score reduction '{other}' (expected mean or sum)"))),
        }
    }
}

/// Settings of the model policy.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub policy: ActionPolicy,
    pub reduction: ScoreReduction,
    /// Earlier observation/action pairs shown in the prompt.
    pub history: usize,
    /// Candidate actions scored in one batch (KV slots besides the prompt's).
    pub batch: usize,
    /// Positions per KV slot.
    pub context: usize,
    /// Tokens generated at most by the generate policy.
    pub max_action_tokens: usize,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions { policy: ActionPolicy::Score, reduction: ScoreReduction::Mean, history: 2, batch: 8, context: 1024, max_action_tokens: 16 }
    }
}

/// What the prompt of one step shows.
/// Levenshtein distance over characters divided by the longer length (0 = equal, 1 = nothing shared).
pub fn normalised_edit_distance(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 0.0;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            current[j + 1] = (previous[j] + usize::from(ca != cb)).min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()] as f64 / longest as f64
}

/// The valid action nearest to `text` (normalised edit distance, case and outer space ignored;
/// ties go to the earlier action). None for an empty list.
pub fn nearest_action(text: &str, actions: &[String]) -> Option<usize> {
    let text = text.trim().to_lowercase();
    let mut best: Option<(usize, f64)> = None;
    for (i, action) in actions.iter().enumerate() {
        let d = normalised_edit_distance(&text, &action.trim().to_lowercase());
        if best.is_none_or(|(_, b)| d < b) {
            best = Some((i, d));
        }
    }
    best.map(|(i, _)| i)
}

/// `log softmax(logits)[token]`.
fn log_prob(logits: &[f32], token: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    logits[token as usize] as f64 - max - sum.ln()
}

/// The action the policy took and why.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Index into the candidate list.
    pub index: usize,
    /// Each candidate's score (score policy).
    pub scores: Vec<f64>,
    /// The generated text (generate policy).
    pub generated: Option<String>,
}

/// A model acting in an environment: one session whose slot 0 holds the prompt and whose other
/// slots continue it with candidate actions.
pub struct Agent<'m, B: Backend> {
    model: &'m Model<B>,
    session: Session<'m, B>,
    options: AgentOptions,
    /// Tokens run through the model so far (prompts and candidates).
    pub tokens: u64,
    /// Seconds spent in the model so far.
    pub seconds: f64,
}

impl<'m, B: Backend> Agent<'m, B> {
    pub fn new(model: &'m Model<B>, options: AgentOptions) -> Result<Self> {
        if options.batch == 0 {
            return Err(Error::InvalidInput("the candidate batch must be at least 1".into()));
        }
        let context = options.context.min(model.config.max_position_embeddings);
        let mut session_options = SessionOptions::new(options.batch + 1, context);
        session_options.max_logit_rows = 64;
        let session = Session::new(model, session_options)?;
        Ok(Agent { model, session, options, tokens: 0, seconds: 0.0 })
    }

    pub fn model(&self) -> &'m Model<B> {
        self.model
    }

    pub fn options(&self) -> &AgentOptions {
        &self.options
    }

    /// Steers every slot with `term` (None: no steering) from the next step on.
    pub fn set_steering(&mut self, term: Option<SteeringTerm>) -> Result<()> {
        for slot in 0..self.options.batch + 1 {
            let plan = term.clone().map(|t| SteeringPlan { terms: vec![t] });
            self.session.set_steering(slot, plan)?;
        }
        Ok(())
    }

    /// The prompt's token ids ([`crate::memory::context::prompt_ids`], shared with distillation).
    fn prompt_ids(&self, message: &str) -> Result<Vec<u32>> {
        prompt_ids(self.model, message)
    }

    /// A candidate's token ids as they follow the prompt ([`crate::memory::context::action_ids`]).
    fn candidate_ids(&self, action: &str) -> Result<Vec<u32>> {
        action_ids(self.model, action)
    }

    /// Picks one of `input.actions`. History is shortened (oldest first) when the prompt and
    /// the longest candidate would not fit the context.
    pub fn choose(&mut self, input: &PromptInput<'_>) -> Result<Choice> {
        if input.actions.is_empty() {
            return Err(Error::InvalidInput("no candidate actions to choose from".into()));
        }
        let started = Instant::now();
        let candidates: Vec<Vec<u32>> = input.actions.iter().map(|a| self.candidate_ids(a)).collect::<Result<_>>()?;
        if let Some(i) = candidates.iter().position(|c| c.is_empty()) {
            return Err(Error::InvalidInput(format!("candidate action {:?} has no tokens", input.actions[i])));
        }
        let room = match self.options.policy {
            ActionPolicy::Score => candidates.iter().map(Vec::len).max().unwrap_or(0),
            ActionPolicy::Generate => self.options.max_action_tokens,
        };
        let capacity = self.session.options().context;
        let mut history = self.options.history.min(input.history.len());
        let prompt = loop {
            let ids = self.prompt_ids(&prompt_message(input, history))?;
            if ids.len() + room <= capacity {
                break ids;
            }
            if history == 0 {
                return Err(Error::InvalidInput(format!(
                    "the agent prompt needs {} tokens plus {room} for the action, beyond the context of {capacity} (raise --context)",
                    ids.len()
                )));
            }
            history -= 1;
        };
        let choice = match self.options.policy {
            ActionPolicy::Score => self.score(&prompt, &candidates)?,
            ActionPolicy::Generate => self.generate(&prompt, input.actions)?,
        };
        self.seconds += started.elapsed().as_secs_f64();
        Ok(choice)
    }

    /// Log-likelihood scoring: the prompt runs once in slot 0, is forked into the candidate
    /// slots, and each candidate's tokens but the last run there as one batch.
    fn score(&mut self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Choice> {
        self.session.reset(0)?;
        let first = self.session.step(&[SequenceInput { slot: 0, tokens: prompt, logits: LogitRequest::Last }])?;
        self.tokens += prompt.len() as u64;
        let after_prompt = first.last(0).to_vec();
        let mut scores = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(self.options.batch) {
            let slots: Vec<usize> = (1..=chunk.len()).collect();
            self.session.fork_prefix(0, &slots, prompt.len())?;
            let inputs: Vec<SequenceInput> =
                chunk.iter().zip(&slots).filter(|(c, _)| c.len() > 1).map(|(c, &slot)| SequenceInput { slot, tokens: &c[..c.len() - 1], logits: LogitRequest::All }).collect();
            let logits = if inputs.is_empty() { None } else { Some(self.session.step(&inputs)?) };
            self.tokens += inputs.iter().map(|i| i.tokens.len() as u64).sum::<u64>();
            let vocab = self.model.config.vocab_size;
            let mut input_index = 0;
            for candidate in chunk {
                let mut total = log_prob(&after_prompt, candidate[0]);
                if candidate.len() > 1 {
                    let rows = &logits.as_ref().expect("inputs were run").per_input[input_index];
                    for (k, &token) in candidate[1..].iter().enumerate() {
                        total += log_prob(&rows[k * vocab..(k + 1) * vocab], token);
                    }
                    input_index += 1;
                }
                scores.push(match self.options.reduction {
                    ScoreReduction::Mean => total / candidate.len() as f64,
                    ScoreReduction::Sum => total,
                });
            }
        }
        // The first best on ties, so the choice does not depend on float noise ordering.
        let index = scores.iter().enumerate().fold(0, |best, (i, &s)| if s > scores[best] { i } else { best });
        Ok(Choice { index, scores, generated: None })
    }

    /// Greedy generation until the end of the turn or a newline, mapped to the nearest action.
    fn generate(&mut self, prompt: &[u32], actions: &[String]) -> Result<Choice> {
        self.session.reset(0)?;
        let mut logits = self.session.step(&[SequenceInput { slot: 0, tokens: prompt, logits: LogitRequest::Last }])?.last(0).to_vec();
        self.tokens += prompt.len() as u64;
        self.session.begin_generation(0)?;
        let mut generated = Vec::new();
        for _ in 0..self.options.max_action_tokens {
            let token = argmax(&logits);
            if self.model.eos_ids.contains(&token) {
                break;
            }
            generated.push(token);
            if self.model.tokenizer.decode(&generated, true)?.contains('\n') {
                break;
            }
            if generated.len() == self.options.max_action_tokens {
                break;
            }
            logits = self.session.step(&[SequenceInput { slot: 0, tokens: &[token], logits: LogitRequest::Last }])?.last(0).to_vec();
            self.tokens += 1;
        }
        let text = self.model.tokenizer.decode(&generated, true)?;
        let text = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
        let index = nearest_action(&text, actions).expect("actions checked non-empty");
        Ok(Choice { index, scores: Vec::new(), generated: Some(text) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_action_by_edit_distance() {
        assert_eq!(normalised_edit_distance("kitten", "sitting"), 3.0 / 7.0);
        assert_eq!(normalised_edit_distance("", ""), 0.0);
        let actions: Vec<String> = ["open fridge", "take egg", "turn on stove"].map(String::from).to_vec();
        assert_eq!(nearest_action("Take the egg", &actions), Some(1));
        assert_eq!(nearest_action("turn stove on", &actions), Some(2));
        assert_eq!(nearest_action("x", &[]), None);
    }
}
