//! Analysis of a memory bank: per-layer cosine similarity of its memories within and across task
//! kinds, the bank's basis directions (SVD of the stacked unit directions) with their explained
//! variance, and, given experiences, the steps that project most and least on each direction.

use std::collections::BTreeMap;

use serde::Serialize;

use super::bank::MemoryBank;
use super::distill::{capture_spans, step_spans};
use super::experience::Episode;
use super::retrieve::cosine;
use super::Position;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::session::Model;
use crate::steer::compute::auc;

/// Parameters of [`analyze`].
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Layers to compare memories at; `None`: every layer where at least two memories have a
    /// direction (or the one layer the bank has, when it holds a single memory).
    pub layers: Option<Vec<usize>>,
    /// Layer of the basis directions; `None`: the layer most memories share, ties broken by the
    /// higher mean held-out AUC of its directions.
    pub basis_layer: Option<usize>,
    /// Basis directions to report.
    pub directions: usize,
    /// Steps listed at each end of a direction.
    pub top: usize,
    /// Context history for experiences when the bank does not record it.
    pub history: usize,
    /// Sequences run together when experiences are captured.
    pub batch: usize,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions { layers: None, basis_layer: None, directions: 3, top: 10, history: 2, batch: 8 }
    }
}

/// Count, mean, standard deviation and quantiles of a set of cosines.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for an empty set.
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        let median = if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) };
        Some(Summary { count: n, mean, std: var.sqrt(), min: sorted[0], median, max: sorted[n - 1] })
    }
}

/// The cosine similarity of every pair of memories that have a direction at one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSimilarity {
    pub layer: usize,
    /// Names of the memories compared, in bank order.
    pub memories: Vec<String>,
    /// Their kinds, in the same order.
    pub kinds: Vec<String>,
    /// `cosine[i][j]`, symmetric with ones on the diagonal.
    pub cosine: Vec<Vec<f64>>,
    /// Cosines of pairs of memories of the same kind.
    pub within: Vec<f64>,
    /// Cosines of pairs of memories of different kinds.
    pub across: Vec<f64>,
    pub within_summary: Option<Summary>,
    pub across_summary: Option<Summary>,
}

/// The share of the stacked unit directions' energy along each basis direction, at one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSpectrum {
    pub layer: usize,
    pub explained: Vec<f64>,
}

/// One step of the experiences, as listed at an end of a direction.
#[derive(Debug, Clone, Serialize)]
pub struct StepRef {
    /// Episode index in the experiences file (0-based, after skipped lines).
    pub episode: usize,
    pub step: usize,
    pub kind: String,
    pub instruction: String,
    pub observation: String,
    pub action: String,
    /// Whether the step's episode succeeded.
    pub success: bool,
    /// Projection of the step's activation (minus the mean over all steps) on the direction.
    pub projection: f64,
}

/// Steps at one end of a direction and what they have in common.
#[derive(Debug, Clone, Serialize)]
pub struct StepGroup {
    pub steps: Vec<StepRef>,
    /// Fraction of the steps whose episode succeeded.
    pub success_rate: f64,
    /// Action types (the action's first word, lower-cased) with their counts, most common first.
    pub action_types: Vec<(String, usize)>,
}

/// How the experience steps spread along a direction.
#[derive(Debug, Clone, Serialize)]
pub struct DirectionSteps {
    pub top: StepGroup,
    pub bottom: StepGroup,
    /// AUC of the projection for steps of successful vs failed episodes (0.5: no relation).
    pub success_auc: f64,
    /// Mean projection per kind, in kind order.
    pub kind_means: Vec<(String, f64)>,
}

/// One basis direction of the bank at the basis layer.
#[derive(Debug, Clone, Serialize)]
pub struct BasisDirection {
    pub index: usize,
    pub singular_value: f64,
    /// `σ²/Σσ²` of the stacked unit directions.
    pub explained: f64,
    pub cumulative: f64,
    /// Each memory's coordinate on the direction (its unit direction's projection), bank order.
    /// The sign is chosen so that the coordinates sum to a non-negative number: the positive end
    /// points where the bank's success directions point on average.
    pub loadings: Vec<(String, f64)>,
    /// The unit direction itself (not written to report.json).
    #[serde(skip)]
    pub vector: Vec<f32>,
    pub steps: Option<DirectionSteps>,
}

/// Every experience step's coordinates on the first two basis directions (for the scatter plot).
#[derive(Debug, Clone, Serialize)]
pub struct StepCoordinates {
    pub kinds: Vec<String>,
    pub success: Vec<bool>,
    pub first: Vec<f64>,
    pub second: Vec<f64>,
}

/// The whole analysis, as written to report.json.
#[derive(Debug, Clone, Serialize)]
pub struct BankAnalysis {
    pub memories: Vec<String>,
    pub kinds: Vec<String>,
    pub layers: Vec<LayerSimilarity>,
    /// Within-kind and across-kind cosines pooled over all analysed layers.
    pub within_all: Option<Summary>,
    pub across_all: Option<Summary>,
    pub spectra: Vec<LayerSpectrum>,
    pub basis_layer: usize,
    pub directions: Vec<BasisDirection>,
    /// Experience steps analysed (0 without experiences).
    pub steps: usize,
    pub position: Option<Position>,
    pub history: Option<usize>,
    #[serde(skip)]
    pub coordinates: Option<StepCoordinates>,
}

/// Eigen-decomposition of a small symmetric matrix by cyclic Jacobi rotations: returns the
/// eigenvalues in descending order and the matching unit eigenvectors (`vectors[k]`).
/// A bank holds tens of memories, so the Gram matrix is tiny and Jacobi is exact to rounding.
pub fn symmetric_eigen(matrix: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = matrix.len();
    let mut a: Vec<Vec<f64>> = matrix.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    let scale: f64 = a.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i][j] * a[i][j]).sum::<f64>().sqrt();
        if off <= 1e-15 * scale.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Golub & Van Loan, symmetric Schur).
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (upper, lower) = a.split_at_mut(q);
                for (apk, aqk) in upper[p].iter_mut().zip(lower[0].iter_mut()) {
                    let (x, y) = (*apk, *aqk);
                    *apk = c * x - s * y;
                    *aqk = s * x + c * y;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    let values = order.iter().map(|&k| a[k][k]).collect();
    let vectors = order.iter().map(|&k| (0..n).map(|i| v[i][k]).collect()).collect();
    (values, vectors)
}

/// Memories (index, unit direction) with a direction at `layer`; zero directions are left out.
fn unit_directions(bank: &MemoryBank, layer: usize) -> Vec<(usize, Vec<f64>)> {
    bank.memories
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let d = m.direction.get(layer)?;
            let norm = d.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            (norm > 0.0 && norm.is_finite()).then(|| (i, d.iter().map(|&x| x as f64 / norm).collect()))
        })
        .collect()
}

/// Cosine similarities at `layer`, split into within-kind and across-kind pairs.
pub fn layer_similarity(bank: &MemoryBank, layer: usize) -> LayerSimilarity {
    let members: Vec<usize> = bank.memories.iter().enumerate().filter(|(_, m)| m.direction.get(layer).is_some()).map(|(i, _)| i).collect();
    let n = members.len();
    let mut matrix = vec![vec![0.0; n]; n];
    let (mut within, mut across) = (Vec::new(), Vec::new());
    for a in 0..n {
        matrix[a][a] = 1.0;
        for b in a + 1..n {
            let (ma, mb) = (&bank.memories[members[a]], &bank.memories[members[b]]);
            let c = cosine(ma.direction.get(layer).expect("member"), mb.direction.get(layer).expect("member"));
            matrix[a][b] = c;
            matrix[b][a] = c;
            if ma.meta.kind == mb.meta.kind {
                within.push(c);
            } else {
                across.push(c);
            }
        }
    }
    LayerSimilarity {
        layer,
        memories: members.iter().map(|&i| bank.memories[i].meta.name.clone()).collect(),
        kinds: members.iter().map(|&i| bank.memories[i].meta.kind.clone()).collect(),
        cosine: matrix,
        within_summary: Summary::of(&within),
        across_summary: Summary::of(&across),
        within,
        across,
    }
}

/// The basis of the memories' unit directions at one layer.
struct Basis {
    singular_values: Vec<f64>,
    /// Unit directions in the hidden space.
    directions: Vec<Vec<f64>>,
    /// `[direction][member]`: each member's coordinate.
    loadings: Vec<Vec<f64>>,
    /// Bank indices of the memories with a direction at the layer.
    members: Vec<usize>,
}

/// The basis of the memories' unit directions at `layer`; directions with a negligible singular
/// value are dropped.
fn basis(bank: &MemoryBank, layer: usize) -> Basis {
    let units = unit_directions(bank, layer);
    let n = units.len();
    let gram: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| units[i].1.iter().zip(&units[j].1).map(|(a, b)| a * b).sum()).collect()).collect();
    let (values, vectors) = symmetric_eigen(&gram);
    let top = values.first().copied().unwrap_or(0.0);
    let hidden = bank.hidden_size;
    let (mut sigmas, mut directions, mut loadings) = (Vec::new(), Vec::new(), Vec::new());
    for (lambda, w) in values.into_iter().zip(vectors) {
        if lambda <= 1e-10 * top.max(f64::MIN_POSITIVE) {
            break;
        }
        let sigma = lambda.sqrt();
        // u = Xᵀw / σ, and memory i's coordinate on u is x_i·u = σ w_i.
        let mut u = vec![0.0; hidden];
        for (wi, (_, x)) in w.iter().zip(&units) {
            for (a, b) in u.iter_mut().zip(x) {
                *a += wi * b / sigma;
            }
        }
        let mut load: Vec<f64> = w.iter().map(|wi| sigma * wi).collect();
        if load.iter().sum::<f64>() < 0.0 {
            u.iter_mut().for_each(|x| *x = -*x);
            load.iter_mut().for_each(|x| *x = -*x);
        }
        sigmas.push(sigma);
        directions.push(u);
        loadings.push(load);
    }
    Basis { singular_values: sigmas, directions, loadings, members: units.into_iter().map(|(i, _)| i).collect() }
}

/// The action type of an action: its first word, lower-cased (`"-"` for an empty action).
pub fn action_type(action: &str) -> String {
    action.split_whitespace().next().map(str::to_lowercase).unwrap_or_else(|| "-".into())
}

fn step_group(steps: Vec<StepRef>) -> StepGroup {
    let success_rate = if steps.is_empty() { f64::NAN } else { steps.iter().filter(|s| s.success).count() as f64 / steps.len() as f64 };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in &steps {
        *counts.entry(action_type(&s.action)).or_default() += 1;
    }
    let mut action_types: Vec<(String, usize)> = counts.into_iter().collect();
    action_types.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    StepGroup { steps, success_rate, action_types }
}

/// The default layers: every layer where at least two memories have a direction, or, with
/// fewer than two memories, every layer the bank has a direction at.
fn default_layers(bank: &MemoryBank) -> Vec<usize> {
    let mut counts = vec![0usize; bank.layer_count];
    for m in &bank.memories {
        for l in m.direction.layers() {
            counts[l] += 1;
        }
    }
    let need = if bank.memories.len() >= 2 { 2 } else { 1 };
    (0..bank.layer_count).filter(|&l| counts[l] >= need).collect()
}

/// The layer most memories have a direction at; ties go to the higher mean held-out AUC.
fn default_basis_layer(bank: &MemoryBank, layers: &[usize]) -> Option<usize> {
    let score = |l: usize| -> (usize, f64) {
        let members: Vec<f64> = bank
            .memories
            .iter()
            .filter(|m| m.direction.get(l).is_some())
            .filter_map(|m| m.meta.layers.iter().find(|s| s.layer == l).map(|s| s.held_out_auc.unwrap_or(s.auc)))
            .collect();
        let count = bank.memories.iter().filter(|m| m.direction.get(l).is_some()).count();
        (count, if members.is_empty() { 0.0 } else { members.iter().sum::<f64>() / members.len() as f64 })
    };
    layers.iter().copied().max_by(|&a, &b| {
        let (sa, sb) = (score(a), score(b));
        sa.0.cmp(&sb.0).then(sa.1.total_cmp(&sb.1)).then(b.cmp(&a))
    })
}

/// Shortens `text` to at most `max` characters (on a character boundary), marking the cut.
pub fn shorten(text: &str, max: usize) -> String {
    let text = text.trim();
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// Analyses `bank`. With `experiences` (and the `model` the bank was made for), every step is
/// run through the model to find the steps that project most and least on each basis direction.
/// `progress(done, total)` counts captured steps.
pub fn analyze<B: Backend>(
    bank: &MemoryBank,
    experiences: Option<(&Model<B>, &[Episode])>,
    options: &AnalyzeOptions,
    progress: impl FnMut(usize, usize),
) -> Result<BankAnalysis> {
    if bank.memories.is_empty() {
        return Err(Error::InvalidInput("the bank holds no memories".into()));
    }
    if options.directions == 0 || options.top == 0 {
        return Err(Error::InvalidInput("--directions and --top must be at least 1".into()));
    }
    let layers = match &options.layers {
        Some(layers) => {
            if let Some(&bad) = layers.iter().find(|&&l| l >= bank.layer_count) {
                return Err(Error::InvalidInput(format!("layer {bad} but the bank's model has {} layers", bank.layer_count)));
            }
            layers.clone()
        }
        None => default_layers(bank),
    };
    if layers.is_empty() {
        return Err(Error::InvalidInput("no layer has a direction in the bank".into()));
    }
    let similarities: Vec<LayerSimilarity> = layers.iter().map(|&l| layer_similarity(bank, l)).collect();
    let pooled = |f: fn(&LayerSimilarity) -> &Vec<f64>| -> Vec<f64> { similarities.iter().flat_map(|s| f(s).iter().copied()).collect() };
    let (within_all, across_all) = (Summary::of(&pooled(|s| &s.within)), Summary::of(&pooled(|s| &s.across)));
    let spectra = layers
        .iter()
        .map(|&l| {
            let sigmas = basis(bank, l).singular_values;
            let total: f64 = sigmas.iter().map(|s| s * s).sum();
            LayerSpectrum { layer: l, explained: sigmas.iter().map(|s| s * s / total).collect() }
        })
        .collect();
    let basis_layer = match options.basis_layer {
        Some(l) if l >= bank.layer_count => return Err(Error::InvalidInput(format!("basis layer {l} but the bank's model has {} layers", bank.layer_count))),
        Some(l) => l,
        None => default_basis_layer(bank, &layers).expect("layers is not empty"),
    };
    let Basis { singular_values: sigmas, directions: units, loadings, members } = basis(bank, basis_layer);
    if sigmas.is_empty() {
        return Err(Error::InvalidInput(format!("no memory has a non-zero direction at layer {basis_layer}")));
    }
    let total: f64 = sigmas.iter().map(|s| s * s).sum();
    let mut cumulative = 0.0;
    let mut directions: Vec<BasisDirection> = sigmas
        .iter()
        .zip(&units)
        .zip(&loadings)
        .take(options.directions)
        .enumerate()
        .map(|(index, ((&sigma, u), load))| {
            let explained = sigma * sigma / total;
            cumulative += explained;
            BasisDirection {
                index,
                singular_value: sigma,
                explained,
                cumulative,
                loadings: members.iter().zip(load).map(|(&i, &x)| (bank.memories[i].meta.name.clone(), x)).collect(),
                vector: u.iter().map(|&x| x as f32).collect(),
                steps: None,
            }
        })
        .collect();

    let (mut position, mut history, mut steps, mut coordinates) = (None, None, 0, None);
    if let Some((model, episodes)) = experiences {
        bank.check_fits(model.config.hidden_size, model.config.num_hidden_layers)?;
        // Read steps the way the memories were distilled (the first memory's settings; a bank
        // that mixes them is analysed with those, as the report states).
        let first = &bank.memories[0].meta;
        let pos = first.position;
        let hist = first.history.unwrap_or(options.history);
        let (items, owners) = step_spans(model, episodes, pos, hist)?;
        if items.is_empty() {
            return Err(Error::InvalidInput("the experiences have no steps".into()));
        }
        let mut progress = progress;
        let total_steps = items.len();
        let activations = capture_spans(model, &items, &[basis_layer], options.batch, |done| progress(done, total_steps))?.remove(0);
        let hidden = bank.hidden_size;
        let rows = items.len();
        let mut mean = vec![0.0f64; hidden];
        for row in activations.chunks(hidden) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64 / rows as f64;
            }
        }
        let projections: Vec<Vec<f64>> = directions
            .iter()
            .map(|d| activations.chunks(hidden).map(|row| row.iter().zip(&mean).zip(&d.vector).map(|((&x, m), &u)| (x as f64 - m) * u as f64).sum()).collect())
            .collect();
        let success: Vec<bool> = owners.iter().map(|&(e, _)| episodes[e].success).collect();
        let kinds_of_steps: Vec<String> = owners.iter().map(|&(e, _)| episodes[e].kind.clone()).collect();
        for (d, scores) in directions.iter_mut().zip(&projections) {
            let mut order: Vec<usize> = (0..rows).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let take = options.top.min(rows / 2).max(1);
            let step_ref = |r: usize| {
                let (e, s) = owners[r];
                let ep = &episodes[e];
                StepRef {
                    episode: e,
                    step: s,
                    kind: ep.kind.clone(),
                    instruction: ep.instruction.clone(),
                    observation: ep.steps[s].observation.clone(),
                    action: ep.steps[s].action.clone(),
                    success: ep.success,
                    projection: scores[r],
                }
            };
            let top = step_group(order.iter().take(take).map(|&r| step_ref(r)).collect());
            let bottom = step_group(order.iter().rev().take(take).map(|&r| step_ref(r)).collect());
            let pos_scores: Vec<f64> = (0..rows).filter(|&r| success[r]).map(|r| scores[r]).collect();
            let neg_scores: Vec<f64> = (0..rows).filter(|&r| !success[r]).map(|r| scores[r]).collect();
            let success_auc = if pos_scores.is_empty() || neg_scores.is_empty() { f64::NAN } else { auc(&pos_scores, &neg_scores) };
            let mut by_kind: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
            for r in 0..rows {
                let entry = by_kind.entry(&kinds_of_steps[r]).or_default();
                entry.0 += scores[r];
                entry.1 += 1;
            }
            let kind_means = by_kind.into_iter().map(|(k, (sum, n))| (k.to_string(), sum / n as f64)).collect();
            d.steps = Some(DirectionSteps { top, bottom, success_auc, kind_means });
        }
        coordinates = Some(StepCoordinates {
            kinds: kinds_of_steps,
            success,
            first: projections[0].clone(),
            second: projections.get(1).cloned().unwrap_or_else(|| vec![0.0; rows]),
        });
        (position, history, steps) = (Some(pos), Some(hist), rows);
    }
    Ok(BankAnalysis {
        memories: bank.memories.iter().map(|m| m.meta.name.clone()).collect(),
        kinds: bank.memories.iter().map(|m| m.meta.kind.clone()).collect(),
        layers: similarities,
        within_all,
        across_all,
        spectra,
        basis_layer,
        directions,
        steps,
        position,
        history,
        coordinates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix() {
        let a = vec![vec![4.0, 1.0, -2.0, 0.5], vec![1.0, 3.0, 0.0, 1.5], vec![-2.0, 0.0, 5.0, -1.0], vec![0.5, 1.5, -1.0, 2.0]];
        let (values, vectors) = symmetric_eigen(&a);
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "descending: {values:?}");
        assert!((values.iter().sum::<f64>() - 14.0).abs() < 1e-10, "trace");
        for i in 0..4 {
            for j in 0..4 {
                let rebuilt: f64 = (0..4).map(|k| values[k] * vectors[k][i] * vectors[k][j]).sum();
                assert!((rebuilt - a[i][j]).abs() < 1e-10, "({i},{j}): {rebuilt} vs {}", a[i][j]);
                let dot: f64 = (0..4).map(|k| vectors[i][k] * vectors[j][k]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn summaries_and_action_types() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.count, s.min, s.median, s.max), (4, 1.0, 2.5, 10.0));
        assert!((s.mean - 4.0).abs() < 1e-12);
        assert!(Summary::of(&[]).is_none());
        assert_eq!(action_type("  Open the door"), "open");
        assert_eq!(action_type(""), "-");
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("é", 4), "é");
    }

    #[test]
    fn basis_of_two_kinds_splits_them() {
        use crate::memory::bank::tests::memory;
        let mut bank = MemoryBank::new(None, 8, 3);
        // Two near-parallel memories and one orthogonal-ish one at layer 1.
        for (name, seed) in [("a", 0.0), ("b", 0.05), ("c", 2.0)] {
            bank.add(memory(name, 8, 3, seed)).unwrap();
        }
        let analysis = analyze::<crate::backend::cpu::CpuBackend>(&bank, None, &AnalyzeOptions::default(), |_, _| {}).unwrap();
        assert_eq!(analysis.basis_layer, 1);
        let total: f64 = analysis.spectra[0].explained.iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
        let first = &analysis.directions[0];
        assert!(first.explained > 0.5, "{}", first.explained);
        // Loadings are the memories' coordinates: each unit direction has squared coordinates
        // summing to at most 1 over all directions.
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let sq: f64 = analysis.directions.iter().map(|d| d.loadings[i].1.powi(2)).sum();
            assert!(sq <= 1.0 + 1e-9 && sq > 0.99, "{name}: {sq}");
        }
        let sim = &analysis.layers[0];
        assert!(sim.cosine[0][1] > sim.cosine[0][2]);
        assert_eq!(sim.across.len(), 3);
        assert!(sim.within.is_empty());
    }
}
