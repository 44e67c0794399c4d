//! Contrastive steering directions from one layer's activations (mean difference, PCA of
//! differences, logistic-regression probe) and how well a direction separates the two sets.
//!
//! Everything here is a pure function over f32 activations, computed in f64, deterministic
//! (parallel sums are reduced in a fixed order, so the thread count does not change a bit).
//!
//! **Scale convention**, shared by all three methods: the returned direction is a unit vector `û`
//! times `(μ₊ − μ₋)·û`, the length of the mean difference's projection on it. Adding it once
//! (scale 1 in `--steer FILE:SCALE`) moves the negatives' mean projection onto the positives'.
//! For [`Method::Mean`] that is exactly `μ₊ − μ₋`. The sign is fixed so that positives project
//! higher than negatives on average (`(μ₊ − μ₋)·û ≥ 0`).
//!
//! **In-sample separation is optimistic**: a direction fitted to the same activations it is scored
//! on separates even pure noise when the width is large next to the sample count (the mean
//! difference of 200 + 200 noise vectors in 64 dimensions scores an AUC near 0.7). Choose layers
//! with [`cross_validate`], which scores each fold with a direction fitted to the other folds.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Rows handled per parallel task; fixed so that the summation order never depends on threads.
const CHUNK_ROWS: usize = 64;

/// One layer's activations for one set: `len()` rows of width `hidden`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Activations<'a> {
    data: &'a [f32],
    hidden: usize,
}

impl<'a> Activations<'a> {
    /// Wraps `data` as rows of width `hidden` (an empty slice is an empty set, refused later by
    /// [`compute_direction`] with a clear message).
    pub fn new(data: &'a [f32], hidden: usize) -> Result<Self> {
        if hidden == 0 {
            return Err(Error::InvalidInput("activations of width 0".into()));
        }
        if !data.len().is_multiple_of(hidden) {
            return Err(Error::Shape(format!("{} activation values are not whole rows of width {hidden}", data.len())));
        }
        Ok(Activations { data, hidden })
    }

    /// Number of rows (samples).
    pub fn len(&self) -> usize {
        self.data.len() / self.hidden
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Width of every row.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.hidden..(i + 1) * self.hidden]
    }

    /// The flat row-major data.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }
}

/// Flattens rows of equal width into one row-major buffer for [`Activations::new`]; returns the
/// buffer and the width. `what` names the set in errors.
pub fn flatten_rows(rows: &[Vec<f32>], what: &str) -> Result<(Vec<f32>, usize)> {
    let hidden = rows.first().map_or(0, Vec::len);
    let mut flat = Vec::with_capacity(rows.len() * hidden);
    for (i, r) in rows.iter().enumerate() {
        if r.len() != hidden {
            return Err(Error::Shape(format!("{what}: row {i} has width {} but row 0 has width {hidden}", r.len())));
        }
        flat.extend_from_slice(r);
    }
    Ok((flat, hidden))
}

/// How to turn positive and negative activations into a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `mean(pos) − mean(neg)`.
    Mean,
    /// First principal component of the (uncentered) differences, see [`pca_direction`].
    Pca,
    /// L2-regularized logistic regression on standardized features, see [`probe_direction`].
    Probe,
}

impl Method {
    /// The lowercase name (`mean`, `pca`, `probe`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Mean => "mean",
            Method::Pca => "pca",
            Method::Probe => "probe",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mean" | "mean-diff" | "mean_diff" => Ok(Method::Mean),
            "pca" => Ok(Method::Pca),
            "probe" | "logistic" => Ok(Method::Probe),
            other => Err(Error::InvalidInput(format!("unknown direction method '{other}' (expected mean, pca or probe)"))),
        }
    }
}

/// Parameters of [`compute_direction`].
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionOptions {
    /// Which method.
    pub method: Method,
    /// `pos[i]` and `neg[i]` are a pair (same prompt, different outcome); both sets must then have
    /// the same length. Used by [`Method::Pca`]; the mean difference is the same either way and
    /// the probe ignores pairing.
    pub paired: bool,
    /// Power-iteration cap for [`Method::Pca`].
    pub pca_max_iterations: usize,
    /// Power iteration stops when the unit vector moves less than this (L2) in one step.
    pub pca_tolerance: f64,
    /// L2 penalty `λ` of the probe (on standardized features, class-balanced mean log-loss).
    pub probe_l2: f64,
    /// Gradient-descent cap for [`Method::Probe`].
    pub probe_max_iterations: usize,
    /// The probe stops when the gradient's L2 norm falls below this.
    pub probe_tolerance: f64,
}

impl Default for DirectionOptions {
    fn default() -> Self {
        DirectionOptions {
            method: Method::Mean,
            paired: false,
            pca_max_iterations: 500,
            pca_tolerance: 1e-9,
            probe_l2: 0.1,
            probe_max_iterations: 500,
            probe_tolerance: 1e-7,
        }
    }
}

impl DirectionOptions {
    /// Default options for `method`.
    pub fn new(method: Method) -> Self {
        DirectionOptions { method, ..Default::default() }
    }
}

/// How well projections on a direction separate positives from negatives.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Separation {
    /// Probability that a random positive projects higher than a random negative (ties count
    /// half): the Mann–Whitney U statistic over `n₊·n₋`. 0.5 is chance, 1 perfect.
    pub auc: f64,
    /// `(mean₊ − mean₋) / pooled std` of the projections (Cohen's d); ±infinity when the pooled
    /// std is 0 and the means differ, 0 when both are 0.
    pub cohens_d: f64,
    /// Mean projection of the positives (on the unit direction).
    pub pos_mean: f64,
    /// Mean projection of the negatives (on the unit direction).
    pub neg_mean: f64,
    /// Pooled within-set standard deviation of the projections (divisor `n₊ + n₋ − 2`).
    pub pooled_std: f64,
}

impl Separation {
    /// `pos_mean − neg_mean`, the projection gap.
    pub fn gap(&self) -> f64 {
        self.pos_mean - self.neg_mean
    }
}

/// A direction for one layer and how it was found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerDirection {
    /// The direction, scaled as the module docs say.
    pub direction: Vec<f32>,
    /// The method that produced it.
    pub method: Method,
    /// In-sample separation along it (optimistic; see [`cross_validate`]).
    pub separation: Separation,
    /// [`Method::Pca`]: the fraction of the differences' second moment along the direction.
    pub explained: Option<f64>,
    /// Iterations used (0 for the mean difference).
    pub iterations: usize,
    /// Whether the iterative method met its tolerance within its cap (always true for the mean).
    pub converged: bool,
}

/// Checks two sets are usable together; `paired` also requires equal lengths.
fn validate(pos: &Activations<'_>, neg: &Activations<'_>, paired: bool) -> Result<()> {
    for (set, what) in [(pos, "positive"), (neg, "negative")] {
        if set.is_empty() {
            return Err(Error::InvalidInput(format!(
                "the {what} set is empty: a direction needs at least one positive and one negative activation"
            )));
        }
        if let Some(i) = set.data.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "{what} activations: non-finite value {} at row {}, element {}",
                set.data[i],
                i / set.hidden,
                i % set.hidden
            )));
        }
    }
    if pos.hidden != neg.hidden {
        return Err(Error::Shape(format!("positive activations have width {} but negative ones {}", pos.hidden, neg.hidden)));
    }
    if paired && pos.len() != neg.len() {
        return Err(Error::Shape(format!("paired sets of different sizes: {} positive, {} negative", pos.len(), neg.len())));
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dot_f32(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(&x, y)| x as f64 * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Sums per-chunk partial vectors computed in parallel, in chunk order (deterministic).
fn chunked_sum(rows: usize, width: usize, f: impl Fn(std::ops::Range<usize>, &mut [f64]) + Sync) -> Vec<f64> {
    let chunks: Vec<usize> = (0..rows.div_ceil(CHUNK_ROWS)).collect();
    let partials: Vec<Vec<f64>> = chunks
        .par_iter()
        .map(|&c| {
            let mut acc = vec![0.0; width];
            f(c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(rows), &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0.0; width];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(t, x)| *t += x);
    }
    total
}

/// Column means in f64.
fn mean(set: &Activations<'_>) -> Vec<f64> {
    let mut m = chunked_sum(set.len(), set.hidden, |range, acc| {
        for i in range {
            acc.iter_mut().zip(set.row(i)).for_each(|(a, &x)| *a += x as f64);
        }
    });
    let n = set.len() as f64;
    m.iter_mut().for_each(|v| *v /= n);
    m
}

/// Unit vector along `v` with the sign making `(μ₊ − μ₋)·û ≥ 0`, scaled to that projection
/// length; a zero `v` gives a zero direction.
fn finish_direction(v: &[f64], mean_diff: &[f64]) -> Vec<f32> {
    let n = norm(v);
    if n == 0.0 || !n.is_finite() {
        return vec![0.0; v.len()];
    }
    let proj = dot(v, mean_diff) / n;
    // (proj / n) * v == |proj| * û with the sign fixed: if proj < 0 the product flips v.
    let scale = proj.abs() / n * if proj < 0.0 { -1.0 } else { 1.0 };
    v.iter().map(|&x| (x * scale) as f32).collect()
}

/// `mean(pos) − mean(neg)`.
pub fn mean_difference(pos: &Activations<'_>, neg: &Activations<'_>) -> Result<Vec<f32>> {
    validate(pos, neg, false)?;
    let (mp, mn) = (mean(pos), mean(neg));
    Ok(mp.iter().zip(&mn).map(|(a, b)| (a - b) as f32).collect())
}

/// The differences PCA works on: paired, `pos[i] − neg[i]`; unpaired, each positive minus the
/// negatives' mean and the positives' mean minus each negative (so every difference points from
/// the negative side to the positive side, and a shared offset cancels in both cases).
struct Differences<'a> {
    pos: Activations<'a>,
    neg: Activations<'a>,
    paired: bool,
    mean_pos: Vec<f64>,
    mean_neg: Vec<f64>,
}

impl Differences<'_> {
    fn rows(&self) -> usize {
        if self.paired {
            self.pos.len()
        } else {
            self.pos.len() + self.neg.len()
        }
    }

    fn row_into(&self, k: usize, out: &mut [f64]) {
        if self.paired {
            for ((o, &p), &n) in out.iter_mut().zip(self.pos.row(k)).zip(self.neg.row(k)) {
                *o = p as f64 - n as f64;
            }
        } else if k < self.pos.len() {
            for ((o, &p), &m) in out.iter_mut().zip(self.pos.row(k)).zip(&self.mean_neg) {
                *o = p as f64 - m;
            }
        } else {
            for ((o, &n), &m) in out.iter_mut().zip(self.neg.row(k - self.pos.len())).zip(&self.mean_pos) {
                *o = m - n as f64;
            }
        }
    }

    /// `M v` with `M = (1/m) Σ dₖ dₖᵀ`, without forming `M`.
    fn apply(&self, v: &[f64]) -> Vec<f64> {
        let h = v.len();
        let mut out = chunked_sum(self.rows(), h, |range, acc| {
            let mut d = vec![0.0; h];
            for k in range {
                self.row_into(k, &mut d);
                let s = dot(&d, v);
                acc.iter_mut().zip(&d).for_each(|(a, x)| *a += s * x);
            }
        });
        let m = self.rows() as f64;
        out.iter_mut().for_each(|x| *x /= m);
        out
    }

    /// `trace(M)`, the mean squared length of the differences.
    fn trace(&self) -> f64 {
        let h = self.pos.hidden;
        let t = chunked_sum(self.rows(), 1, |range, acc| {
            let mut d = vec![0.0; h];
            for k in range {
                self.row_into(k, &mut d);
                acc[0] += dot(&d, &d);
            }
        });
        t[0] / self.rows() as f64
    }
}

/// PCA direction: the top eigenvector of the **uncentered** second moment `(1/m) Σ dₖ dₖᵀ` of the
/// differences, by power iteration started from the mean difference. Paired, `dₖ = pos[k] −
/// neg[k]`; unpaired, each positive minus the negatives' mean and the positives' mean minus each
/// negative (every difference points from the negative side to the positive side, and an offset
/// shared by both sets cancels either way).
///
/// Why uncentered: centering subtracts the mean difference, so a shift that every pair shares
/// contributes nothing and only its pair-to-pair variation is found (sklearn's PCA, as repeng's
/// `pca_diff` uses it, centers). The uncentered moment is, in expectation, the centered covariance
/// of the differences with a random sign per pair, which is what Representation Engineering
/// (Zou et al. 2023) gets by shuffling the order within each pair, here without the randomness;
/// llama.cpp's cvector-generator also iterates on the uncentered `DᵀD` (but leaves the sign
/// random). The top eigenvector is the axis along which pairs differ most in mean square: the
/// mean difference when that dominates, a consistent axis of varying magnitude otherwise.
///
/// Caveat: with fewer differences `m` than dimensions `h` and a weak concept, the top eigenvector
/// is noise: a noise variance `σ²` per dimension already gives sample eigenvalues up to about
/// `σ²(1 + √(h/m))²`, and a concept whose share is below that is not found (1000 pairs in 4096
/// dimensions, a shift of one noise std along one axis: mean difference AUC 0.98, PCA 0.54).
/// `converged == false` and a low held-out AUC are the signs; the mean difference is the robust
/// choice there.
///
/// Returns (direction scaled per the module docs, explained fraction = `λ₁ / trace`, iterations,
/// converged).
pub fn pca_direction(
    pos: &Activations<'_>,
    neg: &Activations<'_>,
    paired: bool,
    max_iterations: usize,
    tolerance: f64,
) -> Result<(Vec<f32>, f64, usize, bool)> {
    validate(pos, neg, paired)?;
    let h = pos.hidden;
    let diffs = Differences { pos: *pos, neg: *neg, paired, mean_pos: mean(pos), mean_neg: mean(neg) };
    let mean_diff: Vec<f64> = diffs.mean_pos.iter().zip(&diffs.mean_neg).map(|(a, b)| a - b).collect();
    let trace = diffs.trace();
    if trace == 0.0 {
        // Every difference is zero: no direction exists.
        return Ok((vec![0.0; h], 0.0, 0, true));
    }
    // Start from the mean difference (usually close), or a fixed generic vector if it is zero.
    let mut v = if norm(&mean_diff) > 0.0 {
        mean_diff.clone()
    } else {
        (0..h).map(|j| 1.0 + 0.37 * ((j * 7919) % 101) as f64 / 101.0).collect()
    };
    let n0 = norm(&v);
    v.iter_mut().for_each(|x| *x /= n0);
    let mut iterations = 0;
    let mut converged = false;
    let mut eigenvalue = 0.0;
    while iterations < max_iterations {
        iterations += 1;
        let w = diffs.apply(&v);
        let nw = norm(&w);
        if nw == 0.0 {
            // v lies in M's null space (only possible from the fallback start); nothing better.
            converged = true;
            break;
        }
        eigenvalue = dot(&v, &w);
        let w: Vec<f64> = w.iter().map(|x| x / nw).collect();
        let step = w.iter().zip(&v).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        v = w;
        if step < tolerance {
            converged = true;
            eigenvalue = dot(&v, &diffs.apply(&v));
            break;
        }
    }
    let explained = (eigenvalue / trace).clamp(0.0, 1.0);
    Ok((finish_direction(&v, &mean_diff), explained, iterations, converged))
}

/// Logistic-regression probe direction.
///
/// Features are standardized: centred on the midpoint of the two means and divided, per
/// dimension, by the pooled **within-set** standard deviation (the class difference itself does
/// not inflate the scale; a dimension constant within both sets gets the floor `1e-3 ×` the RMS
/// scale, or 1). The loss is the class-balanced mean log-loss (each set weighs one half, so an
/// imbalance of successes and failures does not tilt the bias) plus `λ/2 ‖w‖²` on the weights (not
/// the bias), minimized by gradient descent with Armijo backtracking from `w = 0`. The weights
/// are mapped back to the raw space (`wⱼ / sⱼ`) and scaled per the module docs. With a large `λ`
/// the direction tends to the mean difference over the per-dimension variance.
///
/// Returns (direction, iterations, converged).
pub fn probe_direction(
    pos: &Activations<'_>,
    neg: &Activations<'_>,
    l2: f64,
    max_iterations: usize,
    tolerance: f64,
) -> Result<(Vec<f32>, usize, bool)> {
    validate(pos, neg, false)?;
    if !(l2 > 0.0 && l2.is_finite()) {
        return Err(Error::InvalidInput(format!("probe L2 penalty must be positive and finite, got {l2}")));
    }
    let h = pos.hidden;
    let (mp, mn) = (mean(pos), mean(neg));
    let center: Vec<f64> = mp.iter().zip(&mn).map(|(a, b)| 0.5 * (a + b)).collect();
    let sq = |set: &Activations<'_>, m: &[f64]| {
        chunked_sum(set.len(), h, |range, acc| {
            for i in range {
                for ((a, &x), &mu) in acc.iter_mut().zip(set.row(i)).zip(m) {
                    let d = x as f64 - mu;
                    *a += d * d;
                }
            }
        })
    };
    let (sp, sn) = (sq(pos, &mp), sq(neg, &mn));
    let dof = (pos.len() + neg.len()).saturating_sub(2).max(1) as f64;
    let mut scale: Vec<f64> = sp.iter().zip(&sn).map(|(a, b)| ((a + b) / dof).sqrt()).collect();
    let rms = (scale.iter().map(|s| s * s).sum::<f64>() / h as f64).sqrt();
    let floor = if rms > 0.0 { 1e-3 * rms } else { 1.0 };
    scale.iter_mut().for_each(|s| *s = s.max(floor));

    // Standardized rows (f32 to halve memory; sums stay f64), positives first; y = +1 / −1.
    let n = pos.len() + neg.len();
    let mut z = vec![0f32; n * h];
    for i in 0..n {
        let row = if i < pos.len() { pos.row(i) } else { neg.row(i - pos.len()) };
        for (j, zv) in z[i * h..(i + 1) * h].iter_mut().enumerate() {
            *zv = ((row[j] as f64 - center[j]) / scale[j]) as f32;
        }
    }
    let label = |i: usize| if i < pos.len() { 1.0 } else { -1.0 };
    let weight = |i: usize| if i < pos.len() { 0.5 / pos.len() as f64 } else { 0.5 / neg.len() as f64 };
    let margins = |w: &[f64], b: f64| -> Vec<f64> {
        let chunks: Vec<usize> = (0..n.div_ceil(CHUNK_ROWS)).collect();
        chunks
            .par_iter()
            .flat_map_iter(|&c| {
                let range = c * CHUNK_ROWS..((c + 1) * CHUNK_ROWS).min(n);
                range.map(|i| label(i) * (dot_f32(&z[i * h..(i + 1) * h], w) + b)).collect::<Vec<_>>()
            })
            .collect()
    };
    // log(1 + e^{−m}) computed stably.
    let softplus_neg = |m: f64| if m > 0.0 { (-m).exp().ln_1p() } else { -m + m.exp().ln_1p() };
    let loss = |w: &[f64], m: &[f64]| -> f64 {
        m.iter().enumerate().map(|(i, &mi)| weight(i) * softplus_neg(mi)).sum::<f64>() + 0.5 * l2 * dot(w, w)
    };
    let gradient = |w: &[f64], m: &[f64]| -> (Vec<f64>, f64) {
        // d/dm log(1+e^{−m}) = −σ(−m); coefficient on zᵢ is −yᵢ σ(−mᵢ) weightᵢ.
        let coef: Vec<f64> = m.iter().enumerate().map(|(i, &mi)| -label(i) * weight(i) / (1.0 + mi.exp())).collect();
        let mut g = chunked_sum(n, h, |range, acc| {
            for i in range {
                let c = coef[i];
                acc.iter_mut().zip(&z[i * h..(i + 1) * h]).for_each(|(a, &x)| *a += c * x as f64);
            }
        });
        g.iter_mut().zip(w).for_each(|(gj, wj)| *gj += l2 * wj);
        (g, coef.iter().sum())
    };

    let mut w = vec![0.0; h];
    let mut b = 0.0;
    let mut m = margins(&w, b);
    let mut f = loss(&w, &m);
    let mut step = 1.0;
    let mut iterations = 0;
    let mut converged = false;
    while iterations < max_iterations {
        let (g, gb) = gradient(&w, &m);
        let gnorm2 = dot(&g, &g) + gb * gb;
        if gnorm2.sqrt() < tolerance {
            converged = true;
            break;
        }
        iterations += 1;
        loop {
            let w_new: Vec<f64> = w.iter().zip(&g).map(|(wj, gj)| wj - step * gj).collect();
            let b_new = b - step * gb;
            let m_new = margins(&w_new, b_new);
            let f_new = loss(&w_new, &m_new);
            if f_new <= f - 0.5 * step * gnorm2 {
                (w, b, m, f) = (w_new, b_new, m_new, f_new);
                step *= 2.0;
                break;
            }
            step *= 0.5;
            if step < 1e-20 {
                // No decrease possible at machine precision: at the optimum for all practical purposes.
                converged = true;
                break;
            }
        }
        if converged {
            break;
        }
    }
    let raw: Vec<f64> = w.iter().zip(&scale).map(|(wj, s)| wj / s).collect();
    let mean_diff: Vec<f64> = mp.iter().zip(&mn).map(|(a, b)| a - b).collect();
    Ok((finish_direction(&raw, &mean_diff), iterations, converged))
}

/// Projections of every row on the unit vector along `direction` (all 0 for a zero direction).
pub fn project(set: &Activations<'_>, direction: &[f32]) -> Result<Vec<f64>> {
    if direction.len() != set.hidden {
        return Err(Error::Shape(format!("direction of width {} for activations of width {}", direction.len(), set.hidden)));
    }
    let d: Vec<f64> = direction.iter().map(|&x| x as f64).collect();
    let n = norm(&d);
    let unit: Vec<f64> = if n > 0.0 { d.iter().map(|x| x / n).collect() } else { vec![0.0; d.len()] };
    Ok((0..set.len()).into_par_iter().map(|i| dot_f32(set.row(i), &unit)).collect())
}

/// Area under the ROC curve of `pos_scores` against `neg_scores`: the Mann–Whitney U statistic
/// over `n₊·n₋`, with tied scores given their average rank (a tie counts half). NaN if either
/// side is empty or any score is NaN.
pub fn auc(pos_scores: &[f64], neg_scores: &[f64]) -> f64 {
    if pos_scores.is_empty() || neg_scores.is_empty() || pos_scores.iter().chain(neg_scores).any(|s| s.is_nan()) {
        return f64::NAN;
    }
    let mut all: Vec<(f64, bool)> =
        pos_scores.iter().map(|&s| (s, true)).chain(neg_scores.iter().map(|&s| (s, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let avg = (i + j + 2) as f64 / 2.0;
        rank_sum_pos += avg * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (np, nn) = (pos_scores.len() as f64, neg_scores.len() as f64);
    (rank_sum_pos - np * (np + 1.0) / 2.0) / (np * nn)
}

fn mean_and_ss(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    (m, xs.iter().map(|x| (x - m) * (x - m)).sum())
}

/// Cohen's d of two score sets: mean gap over the pooled std (divisor `n₊ + n₋ − 2`, at least 1).
/// NaN if either side is empty.
pub fn cohens_d(pos_scores: &[f64], neg_scores: &[f64]) -> f64 {
    separation_of_scores(pos_scores, neg_scores).cohens_d
}

/// [`Separation`] of two score sets.
pub fn separation_of_scores(pos_scores: &[f64], neg_scores: &[f64]) -> Separation {
    if pos_scores.is_empty() || neg_scores.is_empty() {
        return Separation { auc: f64::NAN, cohens_d: f64::NAN, pos_mean: f64::NAN, neg_mean: f64::NAN, pooled_std: f64::NAN };
    }
    let (mp, ssp) = mean_and_ss(pos_scores);
    let (mn, ssn) = mean_and_ss(neg_scores);
    let dof = (pos_scores.len() + neg_scores.len()).saturating_sub(2).max(1) as f64;
    let pooled = ((ssp + ssn) / dof).sqrt();
    let gap = mp - mn;
    let d = if pooled > 0.0 {
        gap / pooled
    } else if gap == 0.0 {
        0.0
    } else {
        gap.signum() * f64::INFINITY
    };
    Separation { auc: auc(pos_scores, neg_scores), cohens_d: d, pos_mean: mp, neg_mean: mn, pooled_std: pooled }
}

/// Separation of `pos` and `neg` along `direction` (projections on its unit vector).
pub fn separation(pos: &Activations<'_>, neg: &Activations<'_>, direction: &[f32]) -> Result<Separation> {
    validate(pos, neg, false)?;
    Ok(separation_of_scores(&project(pos, direction)?, &project(neg, direction)?))
}

/// Computes one layer's direction with `options.method`, and its in-sample separation.
pub fn compute_direction(pos: &Activations<'_>, neg: &Activations<'_>, options: &DirectionOptions) -> Result<LayerDirection> {
    validate(pos, neg, options.paired)?;
    let (direction, explained, iterations, converged) = match options.method {
        Method::Mean => (mean_difference(pos, neg)?, None, 0, true),
        Method::Pca => {
            let (d, e, it, c) = pca_direction(pos, neg, options.paired, options.pca_max_iterations, options.pca_tolerance)?;
            (d, Some(e), it, c)
        }
        Method::Probe => {
            let (d, it, c) = probe_direction(pos, neg, options.probe_l2, options.probe_max_iterations, options.probe_tolerance)?;
            (d, None, it, c)
        }
    };
    let separation = separation(pos, neg, &direction)?;
    Ok(LayerDirection { direction, method: options.method, separation, explained, iterations, converged })
}

/// Held-out separation: rows are dealt into `folds` folds by index (`i % folds`, so pairs stay
/// together), each fold is scored along a direction fitted to the other folds, and the pooled
/// held-out scores are summarized. Needs at least `folds` rows in each set and `folds ≥ 2`.
pub fn cross_validate(pos: &Activations<'_>, neg: &Activations<'_>, options: &DirectionOptions, folds: usize) -> Result<Separation> {
    validate(pos, neg, options.paired)?;
    if folds < 2 {
        return Err(Error::InvalidInput(format!("cross-validation needs at least 2 folds, got {folds}")));
    }
    if pos.len() < folds || neg.len() < folds {
        return Err(Error::InvalidInput(format!(
            "cross-validation with {folds} folds needs at least {folds} rows per set ({} positive, {} negative)",
            pos.len(),
            neg.len()
        )));
    }
    let h = pos.hidden;
    let split = |set: &Activations<'_>, k: usize| {
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for i in 0..set.len() {
            if i % folds == k { &mut test } else { &mut train }.extend_from_slice(set.row(i));
        }
        (train, test)
    };
    let (mut pos_scores, mut neg_scores) = (Vec::with_capacity(pos.len()), Vec::with_capacity(neg.len()));
    for k in 0..folds {
        let (ptrain, ptest) = split(pos, k);
        let (ntrain, ntest) = split(neg, k);
        let fit = compute_direction(&Activations::new(&ptrain, h)?, &Activations::new(&ntrain, h)?, options)?;
        pos_scores.extend(project(&Activations::new(&ptest, h)?, &fit.direction)?);
        neg_scores.extend(project(&Activations::new(&ntest, h)?, &fit.direction)?);
    }
    Ok(separation_of_scores(&pos_scores, &neg_scores))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gaussian(rng: &mut StdRng) -> f64 {
        // Box–Muller; 1 − u keeps the log argument in (0, 1].
        let u: f64 = 1.0 - rng.random::<f64>();
        let v: f64 = rng.random::<f64>();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    fn unit(rng: &mut StdRng, h: usize) -> Vec<f64> {
        let v: Vec<f64> = (0..h).map(|_| gaussian(rng)).collect();
        let n = norm(&v);
        v.iter().map(|x| x / n).collect()
    }

    /// `n` rows of `offset + sign·a·u + σ·noise`.
    fn planted(rng: &mut StdRng, n: usize, offset: &[f64], u: &[f64], a: f64, sigma: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * u.len());
        for _ in 0..n {
            for (o, ui) in offset.iter().zip(u) {
                out.push((o + a * ui + sigma * gaussian(rng)) as f32);
            }
        }
        out
    }

    fn cosine(a: &[f32], b: &[f64]) -> f64 {
        let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
        dot(&a, b) / (norm(&a) * norm(b))
    }

    #[test]
    fn planted_direction_is_recovered_by_every_method() {
        for (h, n, seed) in [(64, 300, 1u64), (576, 800, 2)] {
            let mut rng = StdRng::seed_from_u64(seed);
            let u = unit(&mut rng, h);
            // A large shared offset (like the residual stream's mean) that must cancel out.
            let offset: Vec<f64> = (0..h).map(|_| 5.0 * gaussian(&mut rng)).collect();
            let pos = planted(&mut rng, n, &offset, &u, 3.0, 0.5);
            let neg = planted(&mut rng, n, &offset, &u, -3.0, 0.5);
            let (p, q) = (Activations::new(&pos, h).unwrap(), Activations::new(&neg, h).unwrap());
            let md = mean_difference(&p, &q).unwrap();
            for (method, paired) in [(Method::Mean, false), (Method::Pca, true), (Method::Pca, false), (Method::Probe, false)] {
                let opts = DirectionOptions { paired, ..DirectionOptions::new(method) };
                let r = compute_direction(&p, &q, &opts).unwrap();
                let c = cosine(&r.direction, &u);
                assert!(c > 0.99, "h={h} {method} paired={paired}: cosine {c}");
                assert!(r.converged, "h={h} {method}: not converged in {} iterations", r.iterations);
                assert!(r.separation.auc > 0.999, "h={h} {method}: auc {}", r.separation.auc);
                assert!(r.separation.cohens_d > 5.0, "h={h} {method}: d {}", r.separation.cohens_d);
                // Scale convention: length = the mean difference's projection on the direction.
                let dn = r.direction.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                let proj = r.direction.iter().zip(&md).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() / dn;
                assert!((dn - proj).abs() < 1e-4 * dn, "h={h} {method}: length {dn} vs projection {proj}");
                if method == Method::Pca {
                    // Paired differences: 2a·u + noise of variance 2σ² per dimension, so the
                    // expected share along u is (4a² + 2σ²) / (4a² + 2σ²h); unpaired is higher.
                    let expected = (36.0 + 0.5) / (36.0 + 0.5 * h as f64);
                    let e = r.explained.unwrap();
                    assert!(e > 0.9 * expected && e < 1.0, "h={h} paired={paired}: explained {e}, expected about {expected}");
                }
            }
            // The sign is fixed: swapping the sets flips the direction.
            for method in [Method::Pca, Method::Probe] {
                let r = compute_direction(&q, &p, &DirectionOptions::new(method)).unwrap();
                assert!(cosine(&r.direction, &u) < -0.99, "{method} swapped");
            }
        }
    }

    #[test]
    fn mean_is_exact_and_deterministic() {
        let pos = [1.0f32, 2.0, 3.0, 5.0];
        let neg = [0.5f32, 0.5];
        let r = compute_direction(&Activations::new(&pos, 2).unwrap(), &Activations::new(&neg, 2).unwrap(), &DirectionOptions::default())
            .unwrap();
        assert_eq!(r.direction, vec![1.5, 3.0]);
        let mut rng = StdRng::seed_from_u64(9);
        let h = 96;
        let u = unit(&mut rng, h);
        let zero = vec![0.0; h];
        let a = planted(&mut rng, 500, &zero, &u, 1.0, 1.0);
        let b = planted(&mut rng, 500, &zero, &u, -1.0, 1.0);
        let (p, q) = (Activations::new(&a, h).unwrap(), Activations::new(&b, h).unwrap());
        for m in [Method::Pca, Method::Probe] {
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let r1 = one.install(|| compute_direction(&p, &q, &DirectionOptions::new(m)).unwrap());
            let r2 = compute_direction(&p, &q, &DirectionOptions::new(m)).unwrap();
            assert_eq!(r1, r2, "{m} depends on the thread count");
        }
    }

    #[test]
    fn pure_noise_separates_at_chance_when_held_out() {
        let mut rng = StdRng::seed_from_u64(7);
        let h = 64;
        let offset: Vec<f64> = (0..h).map(|_| gaussian(&mut rng)).collect();
        let zero = vec![0.0; h];
        let pos = planted(&mut rng, 300, &offset, &zero, 0.0, 1.0);
        let neg = planted(&mut rng, 300, &offset, &zero, 0.0, 1.0);
        let (p, q) = (Activations::new(&pos, h).unwrap(), Activations::new(&neg, h).unwrap());
        for method in [Method::Mean, Method::Pca, Method::Probe] {
            let opts = DirectionOptions { paired: true, ..DirectionOptions::new(method) };
            let cv = cross_validate(&p, &q, &opts, 5).unwrap();
            assert!((cv.auc - 0.5).abs() < 0.08, "{method}: held-out auc {}", cv.auc);
            assert!(cv.cohens_d.abs() < 0.3, "{method}: held-out d {}", cv.cohens_d);
        }
        // In-sample is optimistic, as the module docs warn.
        let r = compute_direction(&p, &q, &DirectionOptions::new(Method::Mean)).unwrap();
        assert!(r.separation.auc > 0.6, "in-sample auc {}", r.separation.auc);
        // Along a fixed direction unrelated to the data, noise scores at chance.
        let fixed: Vec<f32> = unit(&mut rng, h).iter().map(|&x| x as f32).collect();
        let s = separation(&p, &q, &fixed).unwrap();
        assert!((s.auc - 0.5).abs() < 0.08, "fixed-direction auc {}", s.auc);
    }

    #[test]
    fn auc_counts_ties_half() {
        assert_eq!(auc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auc(&[1.0, 2.0], &[3.0, 4.0]), 0.0);
        assert_eq!(auc(&[1.0, 1.0], &[1.0, 1.0, 1.0]), 0.5);
        // Pairs: (2>1) (2=2)->½ (2<3); (3>1) (3>2) (3=3)->½ => 4/6.
        assert!((auc(&[2.0, 3.0], &[1.0, 2.0, 3.0]) - 4.0 / 6.0).abs() < 1e-15);
        assert!(auc(&[], &[1.0]).is_nan());
        assert!(auc(&[f64::NAN], &[1.0]).is_nan());
        // Brute-force agreement on random scores with many ties.
        let mut rng = StdRng::seed_from_u64(3);
        let a: Vec<f64> = (0..57).map(|_| rng.random_range(0..10) as f64).collect();
        let b: Vec<f64> = (0..41).map(|_| rng.random_range(0..10) as f64).collect();
        let brute = a
            .iter()
            .flat_map(|x| b.iter().map(move |y| if x > y { 1.0 } else if x == y { 0.5 } else { 0.0 }))
            .sum::<f64>()
            / (a.len() * b.len()) as f64;
        assert!((auc(&a, &b) - brute).abs() < 1e-12);
        let s = separation_of_scores(&[1.0, 3.0], &[0.0, 2.0]);
        assert_eq!((s.gap(), s.pooled_std), (1.0, 2f64.sqrt()));
        assert_eq!(cohens_d(&[1.0, 1.0], &[1.0]), 0.0);
        assert_eq!(cohens_d(&[2.0, 2.0], &[1.0]), f64::INFINITY);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let some = [1.0f32, 2.0, 3.0, 4.0];
        let empty: [f32; 0] = [];
        let p = Activations::new(&some, 2).unwrap();
        let e = Activations::new(&empty, 2).unwrap();
        for method in [Method::Mean, Method::Pca, Method::Probe] {
            let opts = DirectionOptions::new(method);
            let msg = compute_direction(&p, &e, &opts).unwrap_err().to_string();
            assert!(msg.contains("negative set is empty"), "{msg}");
            let msg = compute_direction(&e, &p, &opts).unwrap_err().to_string();
            assert!(msg.contains("positive set is empty"), "{msg}");
            let nan = [1.0f32, f32::NAN, 0.0, 0.0];
            let msg = compute_direction(&Activations::new(&nan, 2).unwrap(), &p, &opts).unwrap_err().to_string();
            assert!(msg.contains("positive") && msg.contains("row 0, element 1"), "{msg}");
            let inf = [1.0f32, 0.0, 0.0, f32::NEG_INFINITY];
            let msg = compute_direction(&p, &Activations::new(&inf, 2).unwrap(), &opts).unwrap_err().to_string();
            assert!(msg.contains("negative") && msg.contains("row 1"), "{msg}");
        }
        assert!(Activations::new(&some, 3).is_err());
        assert!(Activations::new(&some, 0).is_err());
        let three = [1.0f32; 6];
        let paired = DirectionOptions { paired: true, ..DirectionOptions::new(Method::Pca) };
        assert!(compute_direction(&p, &Activations::new(&three, 2).unwrap(), &paired).is_err());
        assert!(compute_direction(&p, &Activations::new(&three, 3).unwrap(), &DirectionOptions::default()).is_err());
        assert!(flatten_rows(&[vec![1.0, 2.0], vec![1.0]], "positive").is_err());
        assert_eq!(flatten_rows(&[vec![1.0, 2.0], vec![3.0, 4.0]], "positive").unwrap(), (some.to_vec(), 2));
        let bad_l2 = DirectionOptions { probe_l2: 0.0, ..DirectionOptions::new(Method::Probe) };
        assert!(compute_direction(&p, &p, &bad_l2).is_err());
        assert!(cross_validate(&p, &p, &DirectionOptions::default(), 3).is_err());
        // Identical sets: every direction is zero, separation is chance, nothing divides by zero.
        for method in [Method::Mean, Method::Pca, Method::Probe] {
            let r = compute_direction(&p, &p, &DirectionOptions::new(method)).unwrap();
            assert!(r.direction.iter().all(|&x| x == 0.0), "{method}: {:?}", r.direction);
            assert_eq!((r.separation.auc, r.separation.cohens_d), (0.5, 0.0));
        }
        assert_eq!("PCA".parse::<Method>().unwrap(), Method::Pca);
        assert!("svm".parse::<Method>().is_err());
    }
}
