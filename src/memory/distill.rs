//! Distillation: every step of every episode through the engine with a capture, grouped by
//! memory key (task kind or task), turned into per-layer success-minus-failure directions, a
//! retrieval key and a workflow text, collected in a [`MemoryBank`].

use std::collections::BTreeMap;

use super::checkpoint::Checkpoint;
use super::bank::{name_from, Counts, LayerStats, Memory, MemoryBank, MemoryMeta};
use super::context::{action_ids, prompt_ids, step_message, Position};
use super::experience::Episode;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::session::{LogitRequest, Model, SequenceInput, Session, SessionOptions};
use crate::steer::collect::{capture_prompts, PromptReduction};
use crate::steer::compute::{compute_direction, cross_validate, Activations, DirectionOptions, Method};
use crate::steer::{CapturePlan, CapturePositions, Point, SteeringVector};

/// How many layers `auto` keeps when no number is given.
pub const DEFAULT_AUTO_LAYERS: usize = 8;
/// Folds of the held-out AUC (fewer when a side has fewer rows; none below two).
pub const DEFAULT_FOLDS: usize = 5;

/// Which episodes share a memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// One memory per task kind.
    Kind,
    /// One memory per task (the instruction stands in for an empty task).
    Task,
}

impl std::str::FromStr for GroupBy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kind" => Ok(GroupBy::Kind),
            "task" => Ok(GroupBy::Task),
            other => Err(Error::InvalidInput(format!("--by '{other}' (expected kind or task)"))),
        }
    }
}

/// Which layers get directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerChoice {
    /// Every layer of `first..=last`.
    Range(usize, usize),
    /// All layers are computed; the `n` with the best held-out AUC (in-sample AUC when a side
    /// is too small to cross-validate) are kept.
    Auto(usize),
}

impl std::str::FromStr for LayerChoice {
    type Err = Error;
    /// `A-B`, `N`, `auto` (keeps [`DEFAULT_AUTO_LAYERS`]) or `auto:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidInput(format!("layers '{s}' (expected A-B, N, auto or auto:N)"));
        if s == "auto" {
            return Ok(LayerChoice::Auto(DEFAULT_AUTO_LAYERS));
        }
        if let Some(n) = s.strip_prefix("auto:") {
            let n: usize = n.parse().map_err(|_| bad())?;
            return if n == 0 { Err(bad()) } else { Ok(LayerChoice::Auto(n)) };
        }
        if let Ok(n) = s.parse::<usize>() {
            return Ok(LayerChoice::Range(n, n));
        }
        let (a, b) = crate::steer::plan::parse_range(s).ok_or_else(bad)?;
        Ok(LayerChoice::Range(a, b))
    }
}

/// Parameters of [`distill`].
#[derive(Debug, Clone)]
pub struct DistillOptions {
    pub by: GroupBy,
    pub method: Method,
    pub layers: LayerChoice,
    pub position: Position,
    /// Earlier steps shown in each context.
    pub history: usize,
    /// Layer of the retrieval key; `None` is the middle layer (`layers / 2`).
    pub key_layer: Option<usize>,
    pub folds: usize,
    /// Sequences run together.
    pub batch: usize,
    /// Where captured activations are kept as they are made, so that an interrupted run resumes
    /// ([`super::checkpoint`]); `None` keeps them in memory only.
    pub checkpoint: Option<std::path::PathBuf>,
    /// Steps captured between two writes of the checkpoint.
    pub checkpoint_block: usize,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            by: GroupBy::Kind,
            method: Method::Mean,
            layers: LayerChoice::Auto(DEFAULT_AUTO_LAYERS),
            position: Position::ContextLast,
            history: 2,
            key_layer: None,
            folds: DEFAULT_FOLDS,
            batch: 8,
            checkpoint: None,
            checkpoint_block: 256,
        }
    }
}

/// What [`distill`] made: the bank, and the keys that could not be distilled (name, problem).
#[derive(Debug)]
pub struct DistillReport {
    pub bank: MemoryBank,
    pub errors: Vec<(String, String)>,
    /// Steps whose activations were read back from the checkpoint instead of captured.
    pub resumed_steps: usize,
    /// What happened to an existing checkpoint (resumed, or made from other inputs).
    pub checkpoint_note: Option<String>,
}

/// The retrieval key of an instruction: the mean residual over its tokens after the first, at
/// the output of block `layer` (no special tokens beyond the tokenizer's defaults).
pub fn instruction_key<B: Backend>(model: &Model<B>, instruction: &str, layer: usize) -> Result<Vec<f32>> {
    let ids = model.tokenizer.encode(instruction, true)?;
    instruction_keys(model, &[ids], layer, 1)
}

/// [`instruction_key`] of many tokenized instructions, `[instructions, hidden]`, batched.
///
/// The first token is left out of the mean: it carries massive activations (it is where
/// attention sinks), so with it the mean is dominated by `first / len` and keys of different
/// tasks differ mostly by instruction length. By causality the first token's residual does not
/// depend on what follows, so a one-token pass gives it exactly, and it is subtracted from the
/// mean over all tokens.
pub fn instruction_keys<B: Backend>(model: &Model<B>, ids: &[Vec<u32>], layer: usize, batch: usize) -> Result<Vec<f32>> {
    let hidden = model.config.hidden_size;
    let means = capture_prompts(model, ids, &[layer], PromptReduction::Mean, batch.max(1), |_| {})?.remove(0).values;
    let firsts: Vec<Vec<u32>> = ids.iter().map(|t| t[..t.len().min(1)].to_vec()).collect();
    let firsts = capture_prompts(model, &firsts, &[layer], PromptReduction::Last, batch.max(1), |_| {})?.remove(0).values;
    let mut keys = means;
    for (i, tokens) in ids.iter().enumerate() {
        let n = tokens.len() as f32;
        if tokens.len() > 1 {
            let (key, first) = (&mut keys[i * hidden..(i + 1) * hidden], &firsts[i * hidden..(i + 1) * hidden]);
            for (k, f) in key.iter_mut().zip(first) {
                *k = (n * *k - f) / (n - 1.0);
            }
        }
    }
    Ok(keys)
}

/// The workflow text of a group: the first episode's explicit `workflow`, else the actions of
/// the shortest successful episode, numbered one a line (`1. action`); empty when none succeeded.
pub fn workflow_text(episodes: &[&Episode]) -> String {
    if let Some(w) = episodes.iter().find_map(|e| e.workflow.as_ref().filter(|w| !w.trim().is_empty())) {
        return w.clone();
    }
    let Some(best) = episodes.iter().filter(|e| e.success).min_by_key(|e| e.steps.len()) else { return String::new() };
    best.steps.iter().enumerate().map(|(i, s)| format!("{}. {}", i + 1, s.action.trim())).collect::<Vec<_>>().join("\n")
}

/// Runs each `(tokens, start)` and returns, per layer, `[items, hidden]` means of the block
/// output over positions `start..tokens.len()`.
pub fn capture_spans<B: Backend>(model: &Model<B>, items: &[(Vec<u32>, usize)], layers: &[usize], batch: usize, mut progress: impl FnMut(usize)) -> Result<Vec<Vec<f32>>> {
    let hidden = model.config.hidden_size;
    let longest = items.iter().map(|(t, _)| t.len()).max().unwrap_or(1);
    if longest > model.config.max_position_embeddings {
        return Err(Error::InvalidInput(format!("a context of {longest} tokens exceeds the model's {} positions", model.config.max_position_embeddings)));
    }
    let slots = batch.max(1).min(items.len().max(1));
    let mut session = Session::new(model, SessionOptions::new(slots, longest))?;
    let points: Vec<Point> = layers.iter().map(|&l| Point::Block(l)).collect();
    session.set_capture(Some(CapturePlan { points: points.clone(), positions: CapturePositions::All }))?;
    let mut sums = vec![vec![0.0f64; items.len() * hidden]; layers.len()];
    let mut counts = vec![vec![0usize; items.len()]; layers.len()];
    for (c, chunk) in items.chunks(slots).enumerate() {
        for slot in 0..chunk.len() {
            session.reset(slot)?;
        }
        let inputs: Vec<SequenceInput> = chunk.iter().enumerate().map(|(slot, (tokens, _))| SequenceInput { slot, tokens, logits: LogitRequest::None }).collect();
        session.step(&inputs)?;
        for record in session.take_captures() {
            let Some(k) = points.iter().position(|&p| p == record.point) else { continue };
            let item = c * slots + record.slot;
            if record.positions.first().is_some_and(|&p| p >= chunk[record.slot].1) {
                counts[k][item] += 1;
                for (s, &v) in sums[k][item * hidden..(item + 1) * hidden].iter_mut().zip(&record.values) {
                    *s += v as f64;
                }
            }
        }
        progress((c * slots + chunk.len()).min(items.len()));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (k, (sum, count)) in sums.into_iter().zip(counts).enumerate() {
        if let Some(i) = count.iter().position(|&n| n == 0) {
            return Err(Error::InvalidInput(format!("layer {}: item {i} captured no rows", layers[k])));
        }
        out.push(sum.chunks(hidden).zip(&count).flat_map(|(row, &n)| row.iter().map(move |&s| (s / n as f64) as f32)).collect());
    }
    Ok(out)
}

/// `(items, owners)`: each step's `(tokens, span start)` and its `(episode, step)`.
pub type StepSpans = (Vec<(Vec<u32>, usize)>, Vec<(usize, usize)>);

/// The token ids of every step's agent prompt ([`step_message`] through [`prompt_ids`], exactly
/// what the agent runner shows the model; plus the action for [`Position::ActionMean`]), each with
/// the index where the span whose activations stand for the step starts, and the (episode, step)
/// each item belongs to, in episode then step order: the input of [`capture_spans`].
pub fn step_spans<B: Backend>(model: &Model<B>, episodes: &[Episode], position: Position, history: usize) -> Result<StepSpans> {
    let mut items = Vec::new();
    let mut owner = Vec::new();
    for (i, e) in episodes.iter().enumerate() {
        for j in 0..e.steps.len() {
            let mut tokens = prompt_ids(model, &step_message(e, j, history))?;
            let start = match position {
                Position::ContextLast => tokens.len() - 1,
                Position::ActionMean => {
                    // The action's tokens as the runner scores them (with the end of the turn).
                    let n = tokens.len();
                    tokens.extend(action_ids(model, &e.steps[j].action)?);
                    n
                }
            };
            if start >= tokens.len() {
                return Err(Error::InvalidInput(format!("episode {} step {}: the action has no tokens", i + 1, j + 1)));
            }
            items.push((tokens, start));
            owner.push((i, j));
        }
    }
    Ok((items, owner))
}

/// Distils `episodes` into a bank for `model`. `progress(done, total)` counts steps. A key whose
/// episodes have no successes or no failures is reported in [`DistillReport::errors`] and left
/// out; the others are still distilled. Errors of the run itself (tokenizer, engine) end it.
pub fn distill<B: Backend>(model: &Model<B>, episodes: &[Episode], options: &DistillOptions, mut progress: impl FnMut(usize, usize)) -> Result<DistillReport> {
    let config = &model.config;
    let (hidden, layer_count) = (config.hidden_size, config.num_hidden_layers);
    let layers: Vec<usize> = match options.layers {
        LayerChoice::Range(a, b) if a > b || b >= layer_count => {
            return Err(Error::InvalidInput(format!("layers {a}-{b} for a model of {layer_count} layers (0-{})", layer_count - 1)))
        }
        LayerChoice::Range(a, b) => (a..=b).collect(),
        LayerChoice::Auto(_) => (0..layer_count).collect(),
    };
    let key_layer = options.key_layer.unwrap_or(layer_count / 2);
    if key_layer >= layer_count {
        return Err(Error::InvalidInput(format!("key layer {key_layer} for a model of {layer_count} layers")));
    }
    if episodes.is_empty() {
        return Err(Error::InvalidInput("no episodes to distil".into()));
    }
    // Groups in key order; each holds episode indices.
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in episodes.iter().enumerate() {
        let key = match options.by {
            GroupBy::Kind => e.kind.clone(),
            GroupBy::Task if e.task.trim().is_empty() => e.instruction.clone(),
            GroupBy::Task => e.task.clone(),
        };
        groups.entry(key).or_default().push(i);
    }
    let (items, owner) = step_spans(model, episodes, options.position, options.history)?;
    let owner: Vec<usize> = owner.into_iter().map(|(episode, _)| episode).collect();
    let total = items.len();
    let mut rows_of_episode = vec![Vec::new(); episodes.len()];
    for (r, &i) in owner.iter().enumerate() {
        rows_of_episode[i].push(r);
    }
    let (mut resumed_steps, mut checkpoint_note) = (0, None);
    let activations = match &options.checkpoint {
        None => capture_spans(model, &items, &layers, options.batch, |done| progress(done, total))?,
        Some(path) => {
            let block = options.checkpoint_block.max(1);
            let mut checkpoint = Checkpoint::open(path, &items, &layers, hidden, block)?;
            (resumed_steps, checkpoint_note) = (checkpoint.done, checkpoint.note.take());
            let mut activations = std::mem::take(&mut checkpoint.stored);
            progress(checkpoint.done, total);
            while checkpoint.done < total {
                let start = checkpoint.done;
                let block_activations = capture_spans(model, &items[start..(start + block).min(total)], &layers, options.batch, |done| progress(start + done, total))?;
                checkpoint.append(&block_activations)?;
                for (all, part) in activations.iter_mut().zip(block_activations) {
                    all.extend(part);
                }
            }
            activations
        }
    };
    // Every episode's instruction key, `[episodes, hidden]`, in one batched capture.
    let instruction_ids = episodes.iter().map(|e| model.tokenizer.encode(&e.instruction, true)).collect::<Result<Vec<_>>>()?;
    let instruction_keys = instruction_keys(model, &instruction_ids, key_layer, options.batch)?;
    let mut bank = MemoryBank::new(Some(config.architecture.model_type().to_string()), hidden, layer_count);
    let mut errors = Vec::new();
    let direction_options = DirectionOptions::new(options.method);
    for (group_key, members) in &groups {
        let name = name_from(group_key);
        let group: Vec<&Episode> = members.iter().map(|&i| &episodes[i]).collect();
        let rows_of = |success: bool| -> Vec<usize> { members.iter().flat_map(|&i| rows_of_episode[i].clone()).filter(|&r| episodes[owner[r]].success == success).collect() };
        let (pos_rows, neg_rows) = (rows_of(true), rows_of(false));
        let counts = Counts {
            episodes: group.len(),
            steps: pos_rows.len() + neg_rows.len(),
            successes: group.iter().filter(|e| e.success).count(),
            failures: group.iter().filter(|e| !e.success).count(),
            success_steps: pos_rows.len(),
            failure_steps: neg_rows.len(),
        };
        if counts.successes == 0 || counts.failures == 0 {
            let side = if counts.successes == 0 { "no successful episodes" } else { "no failed episodes" };
            errors.push((name, format!("'{group_key}' has {side} ({} episodes); a direction needs both", counts.episodes)));
            continue;
        }
        let folds = options.folds.min(pos_rows.len()).min(neg_rows.len());
        let mut stats = Vec::new();
        let mut directions = Vec::new();
        for (k, &layer) in layers.iter().enumerate() {
            let gather = |rows: &[usize]| -> Vec<f32> { rows.iter().flat_map(|&r| activations[k][r * hidden..(r + 1) * hidden].iter().copied()).collect() };
            let (pos_data, neg_data) = (gather(&pos_rows), gather(&neg_rows));
            let (pos, neg) = (Activations::new(&pos_data, hidden)?, Activations::new(&neg_data, hidden)?);
            let fit = compute_direction(&pos, &neg, &direction_options).map_err(|e| Error::InvalidInput(format!("memory '{name}' layer {layer}: {e}")))?;
            let held_out = if folds >= 2 { Some(cross_validate(&pos, &neg, &direction_options, folds)?.auc) } else { None };
            let norm = fit.direction.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            stats.push(LayerStats { layer, norm, auc: fit.separation.auc, held_out_auc: held_out, selected: true });
            directions.push(fit.direction);
        }
        if let LayerChoice::Auto(n) = options.layers {
            let score = |s: &LayerStats| s.held_out_auc.unwrap_or(s.auc);
            let mut order: Vec<usize> = (0..stats.len()).collect();
            order.sort_by(|&a, &b| score(&stats[b]).total_cmp(&score(&stats[a])).then(a.cmp(&b)));
            for &i in order.iter().skip(n) {
                stats[i].selected = false;
            }
        }
        let mut direction = SteeringVector::new(hidden, layer_count);
        for (s, d) in stats.iter().zip(directions) {
            if s.selected {
                direction.set(s.layer, d)?;
            }
        }
        // Key: the mean of the group's instruction keys.
        let mut key = vec![0.0f64; hidden];
        for &i in members {
            let row = &instruction_keys[i * hidden..(i + 1) * hidden];
            for (a, &v) in key.iter_mut().zip(row) {
                *a += v as f64 / members.len() as f64;
            }
        }
        let kind = group[0].kind.clone();
        let description = format!(
            "{} episodes of '{group_key}' ({} succeeded, {} failed); e.g. \"{}\"",
            counts.episodes, counts.successes, counts.failures, group[0].instruction
        );
        let meta = MemoryMeta {
            name: name.clone(),
            kind,
            description,
            workflow: workflow_text(&group),
            counts,
            layers: stats,
            key_layer,
            method: options.method,
            position: options.position,
            history: Some(options.history),
            sources: group.iter().map(|e| e.source()).collect::<Option<Vec<_>>>().map(|mut s| {
                s.sort();
                s.dedup();
                s
            }),
        };
        bank.add(Memory { meta, direction, key: key.into_iter().map(|v| v as f32).collect() })?;
    }
    Ok(DistillReport { bank, errors, resumed_steps, checkpoint_note })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::memory::experience::Step;
    use crate::model::config::Architecture;
    use crate::model::random::{tiny_config, write_random_model};
    use crate::model::ModelFiles;
    use crate::DType;

    /// A span's mean equals the mean of the last-token captures of each prefix ending in the span
    /// (causality), whatever the batch; a one-row span equals the last-token capture.
    #[test]
    fn span_means_match_prefix_captures() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::F32, 5).unwrap();
        let model = Model::load(CpuBackend::new(2, None).unwrap(), ModelFiles::open(dir.path()).unwrap(), DType::F32, |_, _| {}).unwrap();
        let hidden = model.config.hidden_size;
        let seq = |n: usize, seed: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 37 + seed * 11) % 250 + 3).collect() };
        let items = vec![(seq(9, 1), 5), (seq(4, 2), 3), (seq(12, 3), 7)];
        let layers = [0, 2];
        let batched = capture_spans(&model, &items, &layers, 2, |_| {}).unwrap();
        let single = capture_spans(&model, &items, &layers, 1, |_| {}).unwrap();
        for (k, &layer) in layers.iter().enumerate() {
            for (i, (tokens, start)) in items.iter().enumerate() {
                let prefixes: Vec<Vec<u32>> = (*start..tokens.len()).map(|p| tokens[..=p].to_vec()).collect();
                let lasts = capture_prompts(&model, &prefixes, &[layer], PromptReduction::Last, 4, |_| {}).unwrap().remove(0).values;
                for h in 0..hidden {
                    let expect = (0..prefixes.len()).map(|p| lasts[p * hidden + h] as f64).sum::<f64>() / prefixes.len() as f64;
                    for got in [batched[k][i * hidden + h], single[k][i * hidden + h]] {
                        assert!((got as f64 - expect).abs() < 1e-4 * (1.0 + expect.abs()), "layer {layer} item {i} element {h}: {got} vs {expect}");
                    }
                }
            }
        }
    }

    #[test]
    fn parses_options_and_builds_workflows() {
        assert_eq!("auto".parse::<LayerChoice>().unwrap(), LayerChoice::Auto(DEFAULT_AUTO_LAYERS));
        assert_eq!("auto:3".parse::<LayerChoice>().unwrap(), LayerChoice::Auto(3));
        assert_eq!("1-2".parse::<LayerChoice>().unwrap(), LayerChoice::Range(1, 2));
        assert_eq!("4".parse::<LayerChoice>().unwrap(), LayerChoice::Range(4, 4));
        assert!("auto:0".parse::<LayerChoice>().is_err());
        let step = |a: &str| Step { observation: "o".into(), action: a.into(), valid_actions: None };
        let e = |success: bool, actions: &[&str]| Episode {
            task: String::new(),
            kind: "k".into(),
            instruction: "i".into(),
            success,
            score: None,
            steps: actions.iter().map(|a| step(a)).collect(),
            workflow: None,
            variation: None,
            split: None,
        };
        let (long, short, failed) = (e(true, &["a", "b", "c"]), e(true, &["x", "y"]), e(false, &["z"]));
        assert_eq!(workflow_text(&[&long, &short, &failed]), "1. x\n2. y");
        assert_eq!(workflow_text(&[&failed]), "");
        let mut explicit = failed.clone();
        explicit.workflow = Some("do things".into());
        assert_eq!(workflow_text(&[&long, &explicit]), "do things");
    }
}
