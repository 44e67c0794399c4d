//! The episode runner: which episodes a run covers (a deterministic schedule over tasks and
//! variations), the actors that choose actions (the model, the scripted expert, random, and the
//! expert with random deviations), and one episode driven through an [`Environment`], where a
//! failing environment ends the episode with the reason and is restarted for the next one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::policy::{filter_actions, Agent, PromptInput};
use super::protocol::{EnvError, EnvResult, EnvState, Environment};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::memory::{Episode, EpisodeSource, Step};

/// One episode to run: a task's variation in a split.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EpisodeSpec {
    pub task: String,
    pub variation: u64,
    pub split: String,
}

impl EpisodeSpec {
    pub fn source(&self) -> EpisodeSource {
        EpisodeSource { task: self.task.clone(), variation: self.variation, split: self.split.clone() }
    }

    /// A seed for this episode's random choices, derived from the run's seed.
    pub fn seed(&self, seed: u64) -> u64 {
        // FNV-1a over the identity, so the same episode gets the same choices on a rerun.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in self.task.bytes().chain(self.variation.to_le_bytes()).chain(self.split.bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        h
    }
}

/// The episodes of a run: the first `count` of the split's order, and the rest of that order
/// as spares, from which an episode the environment refuses to start is replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub episodes: Vec<EpisodeSpec>,
    spares: Vec<EpisodeSpec>,
}

impl Schedule {
    /// The next unused variation of `task` (removed from the spares), if any.
    pub fn replacement(&mut self, task: &str) -> Option<EpisodeSpec> {
        let index = self.spares.iter().position(|s| s.task == task)?;
        Some(self.spares.remove(index))
    }
}

/// The first `count` episodes of `split`: tasks in turn (the environment's order, or `tasks`
/// when given), each task's variations in order, so a short run still covers every task.
pub fn schedule(env: &mut dyn Environment, tasks: &[String], split: &str, count: usize) -> EnvResult<Schedule> {
    let info = env.info()?;
    let tasks: Vec<String> = if tasks.is_empty() { info.tasks } else { tasks.to_vec() };
    let mut lists = Vec::new();
    for task in &tasks {
        lists.push(env.variations(task, split)?);
    }
    let mut order = Vec::new();
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..longest {
        for (task, variations) in tasks.iter().zip(&lists) {
            if let Some(&variation) = variations.get(round) {
                order.push(EpisodeSpec { task: task.clone(), variation, split: split.to_string() });
            }
        }
    }
    let spares = order.split_off(count.min(order.len()));
    Ok(Schedule { episodes: order, spares })
}

/// What an actor sees at a step.
#[derive(Debug, Clone, Copy)]
pub struct StepView<'a> {
    pub instruction: &'a str,
    pub observation: &'a str,
    /// Earlier (observation, action) pairs, oldest first.
    pub history: &'a [(String, String)],
    /// The (filtered) valid actions.
    pub candidates: &'a [String],
}

/// Something that chooses actions.
pub trait Actor {
    /// Whether [`Actor::begin`] should get the environment's expert actions.
    fn wants_gold(&self) -> bool {
        false
    }
    /// A new episode of `instruction` begins.
    fn begin(&mut self, spec: &EpisodeSpec, instruction: &str, gold: Option<Vec<String>>) -> Result<()>;
    /// The next action (it need not be a candidate: the expert's may not be).
    fn act(&mut self, view: &StepView<'_>) -> Result<String>;
}

/// The environment's expert, with an optional probability of a random candidate instead of the
/// expert's action at each step (`mixed`: successes and failures of the same kinds).
pub struct GoldActor {
    deviation: f64,
    seed: u64,
    gold: Vec<String>,
    next: usize,
    rng: StdRng,
}

impl GoldActor {
    pub fn new(deviation: f64, seed: u64) -> Self {
        GoldActor { deviation, seed, gold: Vec::new(), next: 0, rng: StdRng::seed_from_u64(seed) }
    }
}

impl Actor for GoldActor {
    fn wants_gold(&self) -> bool {
        true
    }
    fn begin(&mut self, spec: &EpisodeSpec, _: &str, gold: Option<Vec<String>>) -> Result<()> {
        self.gold = gold.unwrap_or_default();
        self.next = 0;
        self.rng = StdRng::seed_from_u64(spec.seed(self.seed));
        Ok(())
    }
    fn act(&mut self, view: &StepView<'_>) -> Result<String> {
        let expert = self.gold.get(self.next).cloned();
        let deviate = expert.is_none() || (self.deviation > 0.0 && self.rng.random_bool(self.deviation.min(1.0)));
        if deviate && !view.candidates.is_empty() {
            let action = view.candidates[self.rng.random_range(0..view.candidates.len())].clone();
            // A deviation that happens to be the expert's action is the expert's action.
            if expert.as_deref() == Some(action.as_str()) {
                self.next += 1;
            }
            return Ok(action);
        }
        self.next += 1;
        expert.ok_or_else(|| Error::InvalidInput("the expert has no action left and there are no valid actions".into()))
    }
}

/// A uniformly random candidate each step.
pub struct RandomActor {
    seed: u64,
    rng: StdRng,
}

impl RandomActor {
    pub fn new(seed: u64) -> Self {
        RandomActor { seed, rng: StdRng::seed_from_u64(seed) }
    }
}

impl Actor for RandomActor {
    fn begin(&mut self, spec: &EpisodeSpec, _: &str, _: Option<Vec<String>>) -> Result<()> {
        self.rng = StdRng::seed_from_u64(spec.seed(self.seed));
        Ok(())
    }
    fn act(&mut self, view: &StepView<'_>) -> Result<String> {
        if view.candidates.is_empty() {
            return Err(Error::InvalidInput("no valid actions to choose from".into()));
        }
        Ok(view.candidates[self.rng.random_range(0..view.candidates.len())].clone())
    }
}

/// The model acting through an [`Agent`], with a memory's workflow text in the prompt when set.
pub struct ModelActor<'a, 'm, B: Backend> {
    pub agent: &'a mut Agent<'m, B>,
    pub workflow: Option<String>,
}

impl<B: Backend> Actor for ModelActor<'_, '_, B> {
    fn begin(&mut self, _: &EpisodeSpec, _: &str, _: Option<Vec<String>>) -> Result<()> {
        Ok(())
    }
    fn act(&mut self, view: &StepView<'_>) -> Result<String> {
        let input = PromptInput { instruction: view.instruction, workflow: self.workflow.as_deref(), history: view.history, observation: view.observation, actions: view.candidates };
        let choice = self.agent.choose(&input)?;
        Ok(view.candidates[choice.index].clone())
    }
}

/// How an episode ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "end", content = "reason")]
pub enum EpisodeEnd {
    /// The environment said the task was completed.
    Success,
    /// The environment ended the episode without success (a dead end, its own step limit).
    Failed,
    /// The runner's step limit was reached first.
    StepLimit,
    /// The environment failed (crashed, hung, answered garbage, refused a step); the reason.
    EnvError(String),
    /// The environment refused to start this (task, variation): a run replaces it by the
    /// task's next variation (see [`Schedule::replacement`]).
    ResetRefused(String),
}

impl EpisodeEnd {
    pub fn name(&self) -> &'static str {
        match self {
            EpisodeEnd::Success => "success",
            EpisodeEnd::Failed => "failed",
            EpisodeEnd::StepLimit => "step-limit",
            EpisodeEnd::EnvError(_) => "env-error",
            EpisodeEnd::ResetRefused(_) => "reset-refused",
        }
    }
}

/// What one episode did.
#[derive(Debug, Clone)]
pub struct EpisodeOutcome {
    pub spec: EpisodeSpec,
    pub instruction: String,
    pub kind: String,
    pub success: bool,
    pub score: f64,
    pub steps: Vec<Step>,
    pub end: EpisodeEnd,
    /// The environment's `info` of the last state.
    pub info: Value,
}

impl EpisodeOutcome {
    /// The episode in the experiences format (None when it has no step to record).
    pub fn to_episode(&self) -> Option<Episode> {
        if self.steps.is_empty() || self.instruction.trim().is_empty() || self.kind.trim().is_empty() {
            return None;
        }
        Some(Episode {
            task: self.spec.task.clone(),
            kind: self.kind.clone(),
            instruction: self.instruction.clone(),
            success: self.success,
            score: Some(self.score),
            steps: self.steps.clone(),
            workflow: None,
            variation: Some(self.spec.variation),
            split: Some(self.spec.split.clone()),
        })
    }
}

/// Limits of a run.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    /// Actions at most per episode.
    pub max_steps: usize,
    /// Candidates at most after the valid-action filter.
    pub max_candidates: usize,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits { max_steps: 30, max_candidates: 64 }
    }
}

/// Runs one episode. An environment failure ends it with [`EpisodeEnd::EnvError`] (the
/// environment is restarted for the next episode); an actor's error (the engine's) is returned.
pub fn run_episode(env: &mut dyn Environment, spec: &EpisodeSpec, actor: &mut dyn Actor, limits: RunLimits) -> Result<EpisodeOutcome> {
    let mut outcome = EpisodeOutcome {
        spec: spec.clone(),
        instruction: String::new(),
        kind: String::new(),
        success: false,
        score: 0.0,
        steps: Vec::new(),
        end: EpisodeEnd::Failed,
        info: Value::Null,
    };
    match drive(env, spec, actor, limits, &mut outcome) {
        Ok(()) => Ok(outcome),
        Err(Driven::Engine(e)) => Err(e),
        Err(Driven::ResetRefused(e)) => {
            outcome.end = EpisodeEnd::ResetRefused(e.to_string());
            Ok(outcome)
        }
        Err(Driven::Env(e)) => {
            outcome.success = false;
            outcome.end = EpisodeEnd::EnvError(e.to_string());
            if e.needs_restart() {
                // A restart that fails shows again, with its reason, on the next episode.
                let _ = env.restart();
            }
            Ok(outcome)
        }
    }
}

enum Driven {
    Env(EnvError),
    /// The environment answered the reset with a refusal (the process is still usable).
    ResetRefused(EnvError),
    Engine(Error),
}

impl From<EnvError> for Driven {
    fn from(e: EnvError) -> Self {
        Driven::Env(e)
    }
}

impl From<Error> for Driven {
    fn from(e: Error) -> Self {
        Driven::Engine(e)
    }
}

fn drive(env: &mut dyn Environment, spec: &EpisodeSpec, actor: &mut dyn Actor, limits: RunLimits, outcome: &mut EpisodeOutcome) -> std::result::Result<(), Driven> {
    let mut state: EnvState = env.reset(&spec.task, spec.variation, &spec.split).map_err(|e| match e {
        EnvError::Refused { .. } => Driven::ResetRefused(e),
        e => Driven::Env(e),
    })?;
    outcome.instruction = state.instruction.clone();
    outcome.kind = state.kind.clone();
    let gold = if actor.wants_gold() { Some(env.gold()?) } else { None };
    actor.begin(spec, &state.instruction, gold)?;
    let mut history: Vec<(String, String)> = Vec::new();
    loop {
        outcome.score = state.score;
        outcome.info = state.info.clone();
        if state.done {
            outcome.success = state.success;
            outcome.end = if state.success { EpisodeEnd::Success } else { EpisodeEnd::Failed };
            return Ok(());
        }
        if outcome.steps.len() >= limits.max_steps {
            outcome.end = EpisodeEnd::StepLimit;
            return Ok(());
        }
        let context = format!("{}\n{}", state.instruction, state.observation);
        let candidates = filter_actions(&state.valid_actions, &context, limits.max_candidates);
        if candidates.is_empty() {
            outcome.end = EpisodeEnd::EnvError(format!("environment `{}` offered no valid actions in an episode that is not done", env.describe()));
            return Ok(());
        }
        let view = StepView { instruction: &state.instruction, observation: &state.observation, history: &history, candidates: &candidates };
        let action = actor.act(&view)?;
        outcome.steps.push(Step { observation: state.observation.clone(), action: action.clone(), valid_actions: Some(candidates) });
        history.push((state.observation.clone(), action.clone()));
        state = env.step(&action)?;
    }
}
