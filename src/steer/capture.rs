//! Captured activations and readouts as they come out of a session, and the files they are
//! written to (safetensors with one tensor per point and positions in metadata, or .npy).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use super::Point;
use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// One captured residual row (or the mean of several, for `mean` capture).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureRecord {
    pub slot: usize,
    pub point: Point,
    /// The position captured, or every position averaged.
    pub positions: Vec<usize>,
    pub values: Vec<f32>,
}

/// One row's readout at one point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReadoutRecord {
    pub slot: usize,
    pub position: usize,
    pub layer: usize,
    /// `true` for the post-attention point of the layer.
    pub attention: bool,
    pub norm: f32,
    /// Projection on each probe's unit direction (NaN where the probe has no direction).
    pub projections: Vec<f32>,
}

/// Running sums for `mean` capture, keyed by (slot, point).
#[derive(Debug, Default)]
pub struct MeanAccumulator {
    sums: BTreeMap<(usize, Point), (Vec<f64>, Vec<usize>)>,
}

impl MeanAccumulator {
    pub fn add(&mut self, slot: usize, point: Point, position: usize, row: &[f32]) {
        let (sum, positions) = self.sums.entry((slot, point)).or_insert_with(|| (vec![0.0; row.len()], Vec::new()));
        for (s, v) in sum.iter_mut().zip(row) {
            *s += *v as f64;
        }
        positions.push(position);
    }

    /// The means, in (slot, point) order; the accumulator is emptied.
    pub fn take(&mut self) -> Vec<CaptureRecord> {
        std::mem::take(&mut self.sums)
            .into_iter()
            .map(|((slot, point), (sum, positions))| {
                let n = positions.len() as f64;
                CaptureRecord { slot, point, values: sum.iter().map(|s| (s / n) as f32).collect(), positions }
            })
            .collect()
    }
}

/// Groups records by point, each group ordered by (slot, first position).
fn by_point(records: &[CaptureRecord]) -> BTreeMap<Point, Vec<&CaptureRecord>> {
    let mut groups: BTreeMap<Point, Vec<&CaptureRecord>> = BTreeMap::new();
    for r in records {
        groups.entry(r.point).or_default().push(r);
    }
    for group in groups.values_mut() {
        group.sort_by_key(|r| (r.slot, r.positions.first().copied()));
    }
    groups
}

/// Writes captures as safetensors: one `[rows, hidden]` tensor per point (`layer.{i}` or
/// `attn.{i}`); metadata `rows.{name}` holds each row's `[slot, positions...]` as JSON.
pub fn write_safetensors(path: &Path, records: &[CaptureRecord], extra: HashMap<String, String>) -> Result<()> {
    if records.is_empty() {
        return Err(Error::InvalidInput("nothing was captured".into()));
    }
    let mut tensors = Vec::new();
    let mut metadata = extra;
    for (point, group) in by_point(records) {
        let hidden = group[0].values.len();
        let data: Vec<f32> = group.iter().flat_map(|r| r.values.iter().copied()).collect();
        tensors.push((point.name(), HostTensor::from_f32(vec![group.len(), hidden], data)?));
        let rows: Vec<serde_json::Value> = group.iter().map(|r| serde_json::json!({"slot": r.slot, "positions": r.positions})).collect();
        metadata.insert(format!("rows.{}", point.name()), serde_json::Value::Array(rows).to_string());
    }
    crate::model::safetensors::write_safetensors(path, &tensors, Some(metadata))
}

/// Writes captures as one `.npy` of shape `[points, rows, hidden]` (every point must hold the
/// same rows, which a single CapturePlan guarantees).
pub fn write_npy(path: &Path, records: &[CaptureRecord]) -> Result<()> {
    use npyz::WriterBuilder;
    let groups = by_point(records);
    let Some(first) = groups.values().next() else {
        return Err(Error::InvalidInput("nothing was captured".into()));
    };
    let (rows, hidden) = (first.len(), first[0].values.len());
    if groups.values().any(|g| g.len() != rows) {
        return Err(Error::Shape("captured points hold different numbers of rows; use .safetensors".into()));
    }
    let shape = [groups.len() as u64, rows as u64, hidden as u64];
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .map_err(|e| Error::io(path, e))?;
    for group in groups.values() {
        for r in group {
            writer.extend(r.values.iter().copied()).map_err(|e| Error::io(path, e))?;
        }
    }
    writer.finish().map_err(|e| Error::io(path, e))
}
