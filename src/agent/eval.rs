//! Evaluation: the same episodes under each memory condition (none, text, steer, both), the
//! per-condition summaries with intervals, the paired comparisons between conditions, the
//! refusal of episodes a bank was distilled from, and the report as a table, JSON and markdown.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::Serialize;

use super::policy::Agent;
use super::protocol::Environment;
use super::runner::{run_episode, Actor, EpisodeEnd, EpisodeSpec, ModelActor, RunLimits, Schedule, StepView};
use super::stats::{mcnemar_exact, mean_t_interval, paired_bootstrap_interval, wilson_interval, Z95};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::memory::apply::{retrieve_for_task, MemoryMode, RetrievalOptions, RetrievedMemory};
use crate::memory::MemoryBank;

/// What memory an episode runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// No memory.
    None,
    /// The retrieved memory applied in this mode.
    Memory(MemoryMode),
}

impl Condition {
    pub fn name(self) -> &'static str {
        match self {
            Condition::None => "none",
            Condition::Memory(mode) => mode.name(),
        }
    }
}

/// `none,text,steer,both` (any subset, in the given order, no repeats).
pub fn parse_conditions(text: &str) -> Result<Vec<Condition>> {
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let condition = match name {
            "none" => Condition::None,
            other => Condition::Memory(other.parse().map_err(|_| Error::InvalidInput(format!("unknown condition '{other}' (expected none, text, steer or both)")))?),
        };
        if out.contains(&condition) {
            return Err(Error::InvalidInput(format!("condition '{name}' is listed twice")));
        }
        out.push(condition);
    }
    if out.is_empty() {
        return Err(Error::InvalidInput("no conditions given (expected some of none, text, steer, both)".into()));
    }
    Ok(out)
}

/// Whether a bank's provenance could be checked against the evaluated episodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlapCheck {
    /// Every memory lists its source episodes and none is evaluated.
    Checked,
    /// These memories do not list their source episodes (older banks, or experiences without
    /// variation and split), so overlap could not be checked for them.
    Unchecked(Vec<String>),
}

/// Refuses to evaluate episodes (task, variation, split) any memory of `bank` was distilled from.
pub fn check_overlap(bank: &MemoryBank, specs: &[EpisodeSpec]) -> Result<OverlapCheck> {
    let mut unchecked = Vec::new();
    let mut seen = BTreeSet::new();
    for memory in &bank.memories {
        match &memory.meta.sources {
            Some(sources) => seen.extend(sources.iter().cloned()),
            None => unchecked.push(memory.meta.name.clone()),
        }
    }
    let overlap: Vec<String> = specs.iter().map(EpisodeSpec::source).filter(|s| seen.contains(s)).map(|s| s.to_string()).collect();
    if !overlap.is_empty() {
        let shown = overlap.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        let more = if overlap.len() > 5 { format!(" and {} more", overlap.len() - 5) } else { String::new() };
        return Err(Error::InvalidInput(format!(
            "the memory bank was distilled from {} of the episodes to evaluate ({shown}{more}); evaluate on another split or on episodes the bank has not seen",
            overlap.len()
        )));
    }
    Ok(if unchecked.is_empty() { OverlapCheck::Checked } else { OverlapCheck::Unchecked(unchecked) })
}

/// One episode under one condition.
#[derive(Debug, Clone, Serialize)]
pub struct EpisodeResult {
    pub task: String,
    pub variation: u64,
    pub split: String,
    pub condition: String,
    pub success: bool,
    pub score: f64,
    pub steps: usize,
    /// success, failed, step-limit, env-error or reset-refused.
    pub end: String,
    /// The environment's failure, for env-error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The memories retrieved (name, similarity), for memory conditions.
    pub retrieved: Vec<(String, f64)>,
    pub actions: Vec<String>,
    pub tokens: u64,
    pub seconds: f64,
}

/// The model actor with a memory condition: retrieval happens once per episode from its
/// instruction (cached, so every condition of an episode uses the same retrieval).
struct MemoryActor<'a, 'm, B: Backend> {
    inner: ModelActor<'a, 'm, B>,
    bank: Option<&'a MemoryBank>,
    retrieval: RetrievalOptions,
    condition: Condition,
    cache: HashMap<String, RetrievedMemory>,
    retrieved: Vec<(String, f64)>,
}

impl<B: Backend> Actor for MemoryActor<'_, '_, B> {
    fn begin(&mut self, spec: &EpisodeSpec, instruction: &str, gold: Option<Vec<String>>) -> Result<()> {
        self.retrieved.clear();
        self.inner.workflow = None;
        let mode = match self.condition {
            Condition::None => {
                self.inner.agent.set_steering(None)?;
                return self.inner.begin(spec, instruction, gold);
            }
            Condition::Memory(mode) => mode,
        };
        let bank = self.bank.ok_or_else(|| Error::InvalidInput(format!("condition '{}' needs a memory bank (--memory)", mode.name())))?;
        if !self.cache.contains_key(instruction) {
            let memory = retrieve_for_task(self.inner.agent.model(), bank, instruction, &self.retrieval)?;
            self.cache.insert(instruction.to_string(), memory);
        }
        let memory = &self.cache[instruction];
        self.retrieved = memory.retrieved.clone();
        self.inner.agent.set_steering(memory.term(mode)?)?;
        self.inner.workflow = memory.workflow_for(mode).map(str::to_string);
        self.inner.begin(spec, instruction, gold)
    }

    fn act(&mut self, view: &StepView<'_>) -> Result<String> {
        self.inner.act(view)
    }
}

/// What an evaluation ran: the episodes (after replacements), every (episode, condition)
/// result in run order, and the episodes the environment refused to start.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub episodes: Vec<EpisodeSpec>,
    pub results: Vec<EpisodeResult>,
    /// Refused episodes with the environment's reason; each was replaced by its task's next
    /// variation where the split had one.
    pub refused: Vec<(EpisodeSpec, String)>,
}

/// Runs every episode of `schedule` under every condition (episode by episode, so running
/// rates stay comparable), calling `on_result` after each with the evaluation so far (an
/// episode joins its `episodes` when its last condition has run). An episode the environment refuses
/// to start is replaced by its task's next variation (not one the bank was distilled from).
/// Other environment failures are results (end `env-error`); engine failures end the evaluation.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    agent: &mut Agent<'_, B>,
    env: &mut dyn Environment,
    schedule: &mut Schedule,
    conditions: &[Condition],
    bank: Option<&MemoryBank>,
    retrieval: &RetrievalOptions,
    limits: RunLimits,
    mut on_result: impl FnMut(&EpisodeResult, &Evaluation),
) -> Result<Evaluation> {
    if bank.is_none() {
        if let Some(c) = conditions.iter().find(|c| **c != Condition::None) {
            return Err(Error::InvalidInput(format!("condition '{}' needs a memory bank (--memory)", c.name())));
        }
    }
    let mut actor = MemoryActor { inner: ModelActor { agent, workflow: None }, bank, retrieval: retrieval.clone(), condition: Condition::None, cache: HashMap::new(), retrieved: Vec::new() };
    let mut evaluation = Evaluation::default();
    let mut queue: VecDeque<EpisodeSpec> = schedule.episodes.iter().cloned().collect();
    'episodes: while let Some(spec) = queue.pop_front() {
        for (k, &condition) in conditions.iter().enumerate() {
            actor.condition = condition;
            let (tokens, seconds) = (actor.inner.agent.tokens, actor.inner.agent.seconds);
            let outcome = run_episode(env, &spec, &mut actor, limits)?;
            if let (0, EpisodeEnd::ResetRefused(reason)) = (k, &outcome.end) {
                evaluation.refused.push((spec.clone(), reason.clone()));
                while let Some(next) = schedule.replacement(&spec.task) {
                    if bank.map_or(true, |bank| check_overlap(bank, std::slice::from_ref(&next)).is_ok()) {
                        queue.push_front(next);
                        break;
                    }
                }
                continue 'episodes;
            }
            let error = match &outcome.end {
                EpisodeEnd::EnvError(reason) | EpisodeEnd::ResetRefused(reason) => Some(reason.clone()),
                _ => None,
            };
            let result = EpisodeResult {
                task: spec.task.clone(),
                variation: spec.variation,
                split: spec.split.clone(),
                condition: condition.name().to_string(),
                success: outcome.success,
                score: outcome.score,
                steps: outcome.steps.len(),
                end: outcome.end.name().to_string(),
                error,
                retrieved: std::mem::take(&mut actor.retrieved),
                actions: outcome.steps.iter().map(|s| s.action.clone()).collect(),
                tokens: actor.inner.agent.tokens - tokens,
                seconds: actor.inner.agent.seconds - seconds,
            };
            evaluation.results.push(result);
            if k + 1 == conditions.len() {
                evaluation.episodes.push(spec.clone());
            }
            on_result(evaluation.results.last().expect("just pushed"), &evaluation);
        }
    }
    Ok(evaluation)
}

/// One condition's summary.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionSummary {
    pub condition: String,
    pub episodes: usize,
    pub successes: usize,
    pub success_rate: f64,
    /// Wilson score interval, 95%.
    pub success_ci95: (f64, f64),
    pub mean_score: f64,
    /// Student-t interval of the mean score, 95%, clipped to [0, 1] (None with fewer than two episodes).
    pub score_ci95: Option<(f64, f64)>,
    pub mean_steps: f64,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Episodes that ended because the environment failed.
    pub env_errors: usize,
}

/// Condition `b` against condition `a` on the same episodes.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub pairs: usize,
    /// Episodes where only `a` succeeded, and where only `b` did.
    pub only_a_succeeded: usize,
    pub only_b_succeeded: usize,
    /// Exact two-sided McNemar p-value on the discordant pairs.
    pub mcnemar_p: f64,
    /// Mean of `score(b) - score(a)` over the pairs.
    pub mean_score_difference: f64,
    /// Paired bootstrap 95% percentile interval of that mean.
    pub score_difference_ci95: Option<(f64, f64)>,
}

/// The methods behind the numbers, written into every report.
#[derive(Debug, Clone, Serialize)]
pub struct Methods {
    pub success_interval: &'static str,
    pub score_interval: &'static str,
    pub paired_success_test: &'static str,
    pub paired_score_interval: String,
}

/// Bootstrap resamples of paired score differences.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

pub fn methods() -> Methods {
    Methods {
        success_interval: "Wilson score interval, 95%",
        score_interval: "Student t interval of the mean, 95%, clipped to [0, 1]",
        paired_success_test: "exact McNemar test (two-sided binomial test on the discordant pairs)",
        paired_score_interval: format!("paired bootstrap percentile interval of the mean difference, 95%, {BOOTSTRAP_RESAMPLES} resamples"),
    }
}

/// Summaries per condition (in `conditions` order) and comparisons of every pair.
pub fn summarize(conditions: &[String], results: &[EpisodeResult], seed: u64) -> (Vec<ConditionSummary>, Vec<Comparison>) {
    let of = |c: &str| -> Vec<&EpisodeResult> { results.iter().filter(|r| r.condition == c).collect() };
    let summaries = conditions
        .iter()
        .map(|c| {
            let rs = of(c);
            let n = rs.len();
            let successes = rs.iter().filter(|r| r.success).count();
            let scores: Vec<f64> = rs.iter().map(|r| r.score).collect();
            let (mean_score, score_ci95) = mean_t_interval(&scores);
            // Scores live in [0, 1] (the protocol normalises them); a t interval of a few
            // episodes can reach past that range, which says nothing more, so it is clipped.
            let score_ci95 = score_ci95.map(|(lo, hi)| (lo.max(0.0), hi.min(1.0)));
            let tokens = rs.iter().map(|r| r.tokens).sum::<u64>();
            let seconds = rs.iter().map(|r| r.seconds).sum::<f64>();
            ConditionSummary {
                condition: c.clone(),
                episodes: n,
                successes,
                success_rate: if n == 0 { f64::NAN } else { successes as f64 / n as f64 },
                success_ci95: wilson_interval(successes, n, Z95),
                mean_score,
                score_ci95,
                mean_steps: if n == 0 { f64::NAN } else { rs.iter().map(|r| r.steps as f64).sum::<f64>() / n as f64 },
                tokens,
                seconds,
                tokens_per_second: if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 },
                env_errors: rs.iter().filter(|r| r.end == "env-error").count(),
            }
        })
        .collect();
    let mut comparisons = Vec::new();
    for (i, a) in conditions.iter().enumerate() {
        for b in &conditions[i + 1..] {
            let by_episode: HashMap<(&str, u64), &EpisodeResult> = of(a).into_iter().map(|r| ((r.task.as_str(), r.variation), r)).collect();
            let pairs: Vec<(&EpisodeResult, &EpisodeResult)> = of(b).into_iter().filter_map(|rb| by_episode.get(&(rb.task.as_str(), rb.variation)).map(|ra| (*ra, rb))).collect();
            let only_a = pairs.iter().filter(|(x, y)| x.success && !y.success).count();
            let only_b = pairs.iter().filter(|(x, y)| !x.success && y.success).count();
            let (sa, sb): (Vec<f64>, Vec<f64>) = pairs.iter().map(|(x, y)| (x.score, y.score)).unzip();
            let mean_diff = if pairs.is_empty() { f64::NAN } else { sa.iter().zip(&sb).map(|(x, y)| y - x).sum::<f64>() / pairs.len() as f64 };
            comparisons.push(Comparison {
                a: a.clone(),
                b: b.clone(),
                pairs: pairs.len(),
                only_a_succeeded: only_a,
                only_b_succeeded: only_b,
                mcnemar_p: mcnemar_exact(only_a, only_b),
                mean_score_difference: mean_diff,
                score_difference_ci95: paired_bootstrap_interval(&sa, &sb, BOOTSTRAP_RESAMPLES, seed),
            });
        }
    }
    (summaries, comparisons)
}

fn interval(ci: Option<(f64, f64)>, digits: usize) -> String {
    match ci {
        Some((lo, hi)) => format!("[{lo:.digits$}, {hi:.digits$}]"),
        None => "-".into(),
    }
}

/// The summaries and comparisons as aligned text (the stdout table).
pub fn text_table(summaries: &[ConditionSummary], comparisons: &[Comparison]) -> String {
    let mut rows = vec![["condition", "episodes", "success", "95% CI (Wilson)", "mean score", "95% CI (t)", "mean steps", "tokens/s", "env errors"].map(String::from).to_vec()];
    for s in summaries {
        rows.push(vec![
            s.condition.clone(),
            s.episodes.to_string(),
            format!("{}/{} = {:.3}", s.successes, s.episodes, s.success_rate),
            interval(Some(s.success_ci95), 3),
            format!("{:.3}", s.mean_score),
            interval(s.score_ci95, 3),
            format!("{:.1}", s.mean_steps),
            format!("{:.0}", s.tokens_per_second),
            s.env_errors.to_string(),
        ]);
    }
    let mut out = align(&rows);
    if !comparisons.is_empty() {
        out.push('\n');
        let mut rows = vec![["b vs a", "pairs", "only a / only b succeeded", "McNemar exact p", "mean score b-a", "95% CI (paired bootstrap)"].map(String::from).to_vec()];
        for c in comparisons {
            rows.push(vec![
                format!("{} vs {}", c.b, c.a),
                c.pairs.to_string(),
                format!("{} / {}", c.only_a_succeeded, c.only_b_succeeded),
                format!("{:.4}", c.mcnemar_p),
                format!("{:+.3}", c.mean_score_difference),
                interval(c.score_difference_ci95, 3),
            ]);
        }
        out.push_str(&align(&rows));
    }
    out
}

fn align(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, &w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The summaries and comparisons as markdown tables.
pub fn markdown_tables(summaries: &[ConditionSummary], comparisons: &[Comparison]) -> String {
    let mut out = String::from("| condition | episodes | success | 95% CI (Wilson) | mean score | 95% CI (t) | mean steps | tokens/s | env errors |\n|---|---|---|---|---|---|---|---|---|\n");
    for s in summaries {
        out.push_str(&format!(
            "| {} | {} | {}/{} = {:.3} | {} | {:.3} | {} | {:.1} | {:.0} | {} |\n",
            s.condition,
            s.episodes,
            s.successes,
            s.episodes,
            s.success_rate,
            interval(Some(s.success_ci95), 3),
            s.mean_score,
            interval(s.score_ci95, 3),
            s.mean_steps,
            s.tokens_per_second,
            s.env_errors
        ));
    }
    if !comparisons.is_empty() {
        out.push_str("\n| b vs a | pairs | only a / only b succeeded | McNemar exact p | mean score b-a | 95% CI (paired bootstrap) |\n|---|---|---|---|---|---|\n");
        for c in comparisons {
            out.push_str(&format!(
                "| {} vs {} | {} | {} / {} | {:.4} | {:+.3} | {} |\n",
                c.b,
                c.a,
                c.pairs,
                c.only_a_succeeded,
                c.only_b_succeeded,
                c.mcnemar_p,
                c.mean_score_difference,
                interval(c.score_difference_ci95, 3)
            ));
        }
    }
    out
}
