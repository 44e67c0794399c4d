//! Plans resolved into per-batch tables the fused residual step reads: for each residual point,
//! the steering terms of every row, the probe directions of the readout and the rows to capture.
//! Built on the host once per batch, so the kernel never branches on user options.

use std::collections::HashMap;
use std::sync::Arc;

use super::{SteeringVector, Point};

/// How a row's term turns into the amount of its direction added to `h` (all from `h` before
/// any steering at this point).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TermMode {
    /// `amount = coefficient`.
    Add,
    /// `amount = coefficient · |h|` (the coefficient already holds `1/|v|`).
    NormScaled,
    /// `amount = coefficient · max(0, target − ⟨h, d⟩)`, `d` a unit direction.
    Clamp { target: f32 },
}

/// One steering term on one row at one point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowTerm {
    /// Index of the direction in the [`DirectionPool`].
    pub direction: u32,
    pub coefficient: f32,
    pub mode: TermMode,
}

/// Marks a probe without a direction at a point (its readout is NaN).
pub const NO_DIRECTION: u32 = u32::MAX;

/// Everything the residual step at one point does beyond `h += delta; x = rmsnorm(h)`.
#[derive(Debug, Clone, Default)]
pub struct FusedPoint {
    /// Row `r`'s terms are `terms[row_offsets[r]..row_offsets[r + 1]]` (empty: no steering).
    pub row_offsets: Vec<u32>,
    pub terms: Vec<RowTerm>,
    /// Readout: for every row, `|h|` then `⟨h, u_j⟩` for each probe direction (unit vectors in
    /// the pool, or [`NO_DIRECTION`]), written at `readout_offset + row · (1 + probes.len())`.
    pub readout_offset: Option<usize>,
    pub probes: Vec<u32>,
    /// Rows to capture and the row of the capture buffer each goes to.
    pub capture: Vec<(u32, u32)>,
}

impl FusedPoint {
    pub fn clear(&mut self) {
        self.row_offsets.clear();
        self.terms.clear();
        self.readout_offset = None;
        self.probes.clear();
        self.capture.clear();
    }

    pub fn has_steering(&self) -> bool {
        !self.terms.is_empty()
    }

    /// The terms of row `r`.
    pub fn row_terms(&self, r: usize) -> &[RowTerm] {
        if self.row_offsets.is_empty() {
            return &[];
        }
        &self.terms[self.row_offsets[r] as usize..self.row_offsets[r + 1] as usize]
    }

    /// Nothing to do beyond the plain residual step.
    pub fn is_plain(&self) -> bool {
        self.terms.is_empty() && self.readout_offset.is_none() && self.capture.is_empty()
    }
}

/// Every distinct direction any plan uses, raw and unit-normalized, stored once:
/// `[directions, hidden]` row-major.
#[derive(Debug, Default)]
pub struct DirectionPool {
    pub hidden: usize,
    pub values: Vec<f32>,
    pub norms: Vec<f32>,
    index: HashMap<(usize, usize, bool), u32>,
}

impl DirectionPool {
    pub fn new(hidden: usize) -> Self {
        DirectionPool { hidden, ..Default::default() }
    }

    pub fn len(&self) -> usize {
        self.norms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    /// The pool index of `vector`'s direction at `layer` (unit-normalized if `unit`), adding it
    /// on first use. `None` when the vector has no (non-zero) direction there.
    pub fn intern(&mut self, vector: &Arc<SteeringVector>, layer: usize, unit: bool) -> Option<u32> {
        let direction = vector.get(layer)?;
        let key = (Arc::as_ptr(vector) as usize, layer, unit);
        if let Some(&i) = self.index.get(&key) {
            return Some(i);
        }
        let norm = direction.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt() as f32;
        if norm == 0.0 {
            return None;
        }
        let i = self.norms.len() as u32;
        if unit {
            self.values.extend(direction.iter().map(|v| v / norm));
            self.norms.push(1.0);
        } else {
            self.values.extend_from_slice(direction);
            self.norms.push(norm);
        }
        self.index.insert(key, i);
        Some(i)
    }

    pub fn direction(&self, i: u32) -> &[f32] {
        &self.values[i as usize * self.hidden..(i as usize + 1) * self.hidden]
    }
}

/// One row's description for resolution: which point set it steers with and its position.
pub fn point_count(layers: usize) -> usize {
    2 * layers
}

/// All points in forward order.
pub fn all_points(layers: usize) -> impl Iterator<Item = Point> {
    (0..layers).flat_map(|l| [Point::Attention(l), Point::Block(l)])
}
