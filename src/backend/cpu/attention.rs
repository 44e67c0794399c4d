//! Causal attention over the preallocated KV cache on the CPU (GQA-aware, one task per row×head).

use rayon::prelude::*;

use super::matmul::{gemm_strided, MatRef};
use super::simd::{self, SimdLevel};
use crate::backend::{AttentionLayout, RowTable};

/// K and V of every layer, slot and position, allocated once: `[layer][slot][position][kv_dim]`.
#[derive(Debug)]
pub struct CpuKvStore {
    pub layers: usize,
    pub slots: usize,
    pub max_positions: usize,
    pub kv_dim: usize,
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl CpuKvStore {
    pub fn new(layers: usize, slots: usize, max_positions: usize, kv_dim: usize) -> Self {
        let len = layers * slots * max_positions * kv_dim;
        CpuKvStore { layers, slots, max_positions, kv_dim, keys: vec![0.0; len], values: vec![0.0; len] }
    }

    fn offset(&self, layer: usize, slot: usize, position: usize) -> usize {
        ((layer * self.slots + slot) * self.max_positions + position) * self.kv_dim
    }

    /// Copies positions `0..positions` of every layer's K and V from `from` to `to`.
    pub fn copy_prefix(&mut self, from: usize, to: usize, positions: usize) {
        assert!(from < self.slots && to < self.slots && positions <= self.max_positions, "KV prefix copy outside the cache");
        if from == to || positions == 0 {
            return;
        }
        let len = positions * self.kv_dim;
        for layer in 0..self.layers {
            let (src, dst) = (self.offset(layer, from, 0), self.offset(layer, to, 0));
            self.keys.copy_within(src..src + len, dst);
            self.values.copy_within(src..src + len, dst);
        }
    }
}

/// Rows in a run at least this long (same slot, consecutive positions) use the gemm path.
const GEMM_RUN_MIN_ROWS: usize = 8;

/// Writes each row's k and v into the cache, then attends. `out` is `[rows, q_dim]`.
///
/// Decode rows (one per sequence) take one dot product per cached position. Prefill runs
/// (many consecutive positions of one sequence) compute, per head, `S = Q·Kᵀ` and `O = P·V` as
/// matrix products over strided views of the cache: one gemm instead of a dot call per
/// (row, head, position).
pub fn attention(level: SimdLevel, qkv: &[f32], rows: usize, layout: AttentionLayout, kv: &mut CpuKvStore, layer: usize, table: RowTable<'_>, out: &mut [f32]) {
    let (q_dim, kv_dim) = (layout.q_dim(), layout.kv_dim());
    let width = layout.qkv_dim();
    assert_eq!(kv.kv_dim, kv_dim, "KV cache width differs from the attention layout");
    for r in 0..rows {
        let (slot, pos) = (table.slots[r] as usize, table.positions[r] as usize);
        assert!(slot < kv.slots && pos < kv.max_positions && layer < kv.layers, "row outside the KV cache");
        let base = kv.offset(layer, slot, pos);
        let row = &qkv[r * width..(r + 1) * width];
        kv.keys[base..base + kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
        kv.values[base..base + kv_dim].copy_from_slice(&row[q_dim + kv_dim..]);
    }
    let kv = &*kv;
    let mut begin = 0;
    while begin < rows {
        let mut end = begin + 1;
        while end < rows && table.slots[end] == table.slots[begin] && table.positions[end] == table.positions[end - 1] + 1 {
            end += 1;
        }
        let run_out = &mut out[begin * q_dim..end * q_dim];
        if end - begin >= GEMM_RUN_MIN_ROWS {
            attend_run(qkv, begin, end, layout, kv, layer, table, run_out);
        } else {
            attend_rows(level, qkv, begin, layout, kv, layer, table, run_out);
        }
        begin = end;
    }
}

/// One task per (row, head): a dot product per cached position, softmax, weighted sum of V.
#[allow(clippy::too_many_arguments)]
fn attend_rows(level: SimdLevel, qkv: &[f32], begin: usize, layout: AttentionLayout, kv: &CpuKvStore, layer: usize, table: RowTable<'_>, out: &mut [f32]) {
    let (kv_dim, hd, width) = (layout.kv_dim(), layout.head_dim, layout.qkv_dim());
    let group = layout.heads / layout.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(task, head_out)| {
        let (r, h) = (begin + task / layout.heads, task % layout.heads);
        let (slot, pos) = (table.slots[r] as usize, table.positions[r] as usize);
        let q = &qkv[r * width + h * hd..r * width + (h + 1) * hd];
        let kv_off = (h / group) * hd;
        let first = kv.offset(layer, slot, 0);
        let mut scores: Vec<f32> = (0..=pos)
            .map(|t| {
                let k = &kv.keys[first + t * kv_dim + kv_off..first + t * kv_dim + kv_off + hd];
                simd::dot_f32(level, q, k) * scale
            })
            .collect();
        softmax_in_place(&mut scores);
        head_out.fill(0.0);
        for (t, p) in scores.iter().enumerate() {
            let v = &kv.values[first + t * kv_dim + kv_off..first + t * kv_dim + kv_off + hd];
            simd::axpy(level, *p, v, head_out);
        }
    });
}

fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    let inv = 1.0 / total;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// A run of consecutive positions of one slot: per head, two gemms over the cache.
#[allow(clippy::too_many_arguments)]
fn attend_run(qkv: &[f32], begin: usize, end: usize, layout: AttentionLayout, kv: &CpuKvStore, layer: usize, table: RowTable<'_>, out: &mut [f32]) {
    let (q_dim, kv_dim, hd, width) = (layout.q_dim(), layout.kv_dim(), layout.head_dim, layout.qkv_dim());
    let group = layout.heads / layout.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = end - begin;
    let slot = table.slots[begin] as usize;
    let first_pos = table.positions[begin] as usize;
    let context = first_pos + n;
    let first = kv.offset(layer, slot, 0);
    let keys = &kv.keys[first..first + context * kv_dim];
    let values = &kv.values[first..first + context * kv_dim];
    let heads: Vec<Vec<f32>> = (0..layout.heads)
        .into_par_iter()
        .map(|h| {
            let kv_off = (h / group) * hd;
            let q = MatRef { data: &qkv[begin * width + h * hd..], rows: n, cols: hd, row_stride: width, col_stride: 1 };
            let k_t = MatRef { data: &keys[kv_off..], rows: context, cols: hd, row_stride: kv_dim, col_stride: 1 }.transposed();
            let mut scores = vec![0.0f32; n * context];
            gemm_strided(1, q, k_t, &mut scores, context, false);
            for (i, row) in scores.chunks_mut(context).enumerate() {
                let visible = first_pos + i + 1;
                for s in row[..visible].iter_mut() {
                    *s *= scale;
                }
                softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            let p = MatRef::dense(&scores, n, context);
            let v = MatRef { data: &values[kv_off..], rows: context, cols: hd, row_stride: kv_dim, col_stride: 1 };
            let mut head_out = vec![0.0f32; n * hd];
            gemm_strided(1, p, v, &mut head_out, hd, false);
            head_out
        })
        .collect();
    for (h, head_out) in heads.iter().enumerate() {
        for i in 0..n {
            out[i * q_dim + h * hd..i * q_dim + (h + 1) * hd].copy_from_slice(&head_out[i * hd..(i + 1) * hd]);
        }
    }
}
