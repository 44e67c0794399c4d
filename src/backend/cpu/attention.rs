//! Causal attention over the preallocated KV cache on the CPU (GQA-aware, one task per row×head).

use rayon::prelude::*;

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
}

/// Writes each row's k and v into the cache, then attends. `out` is `[rows, q_dim]`.
pub fn attention(level: SimdLevel, qkv: &[f32], rows: usize, layout: AttentionLayout, kv: &mut CpuKvStore, layer: usize, table: RowTable<'_>, out: &mut [f32]) {
    let (q_dim, kv_dim, hd) = (layout.q_dim(), layout.kv_dim(), layout.head_dim);
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
    let group = layout.heads / layout.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let kv = &*kv;
    out[..rows * q_dim].par_chunks_mut(hd).enumerate().for_each(|(task, head_out)| {
        let (r, h) = (task / layout.heads, task % layout.heads);
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
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        head_out.fill(0.0);
        for (t, s) in scores.iter().enumerate() {
            let v = &kv.values[first + t * kv_dim + kv_off..first + t * kv_dim + kv_off + hd];
            simd::axpy(level, s / total, v, head_out);
        }
    });
}
