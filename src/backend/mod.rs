//! The Backend trait: the handful of operations the one forward pass is written in.
//!
//! A backend owns its buffers (activations, weights, KV cache) and runs each operation over a
//! batch of token rows. Rows may belong to different sequences (KV slots) at different positions,
//! which is what lets one batch mix prompts of uneven lengths and decode steps.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::steer::tables::FusedPoint;
use crate::tensor::HostTensor;

/// How the fused q|k|v projection output of one row is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionLayout {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionLayout {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Width of one row of the fused q|k|v buffer.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
}

/// How K and V are stored in the cache. Attention reads every cached entry once per token, so
/// at long contexts the cache, not the weights, sets the decode speed; f16 halves those bytes
/// (as llama.cpp's default cache does) at a rounding of 2^-11 relative per entry; f32 keeps the
/// projections exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPrecision {
    F32,
    F16,
}

impl KvPrecision {
    pub fn bytes_per_value(self) -> usize {
        match self {
            KvPrecision::F32 => 4,
            KvPrecision::F16 => 2,
        }
    }
}

impl std::fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvPrecision::F32 => "f32",
            KvPrecision::F16 => "f16",
        })
    }
}

impl std::str::FromStr for KvPrecision {
    type Err = crate::error::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvPrecision::F32),
            "f16" => Ok(KvPrecision::F16),
            _ => Err(crate::error::Error::InvalidInput(format!("unknown KV cache precision '{text}' (expected f16 or f32)"))),
        }
    }
}

/// Where each row of a batch lives: its sequence slot in the KV cache and its position there.
#[derive(Debug, Clone, Copy)]
pub struct RowTable<'a> {
    pub slots: &'a [u32],
    pub positions: &'a [u32],
}

/// The steering/readout/capture part of one residual step: the host tables of the point, the
/// direction pool on the device, and the device buffers readouts and captures are written to.
pub struct FusedArgs<'a, B: Backend + ?Sized> {
    pub point: &'a FusedPoint,
    pub directions: &'a B::Buffer,
    pub readout: &'a mut B::Buffer,
    pub capture: &'a mut B::Buffer,
}

/// Device operations used by [`crate::forward`]. Buffers hold f32 activations, row-major.
pub trait Backend: Send + Sync {
    /// An f32 activation buffer.
    type Buffer: Send + Sync;
    /// A weight matrix `[out_features, in_features]` in the backend's weight dtype.
    type Matrix: Send + Sync;
    /// The preallocated KV cache of all layers and slots.
    type KvStore: Send + Sync;

    fn name(&self) -> String;

    /// Runs `work` with the backend's threads available (the CPU backend enters its pool once
    /// per forward pass instead of once per operation).
    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R;

    fn matrix(&self, tensor: &HostTensor) -> Result<Self::Matrix>;
    /// [`Backend::matrix`] for each of `tensors`, placed together where that helps: the CPU
    /// backend puts them in one huge-page mapping, as most matrices are smaller than a huge page.
    /// They are taken by value, so that a backend keeping them in host memory can take their
    /// values over instead of copying them.
    fn matrices(&self, tensors: Vec<HostTensor>) -> Result<Vec<Self::Matrix>> {
        tensors.iter().map(|tensor| self.matrix(tensor)).collect()
    }
    /// Chooses the machine-dependent settings of the products by timing them on the loaded
    /// matrices, given in the order a decode step reads them. A setting changes speed, never a
    /// result; backends with nothing to choose do nothing.
    fn tune(&self, _decode_order: &[&Self::Matrix]) {}
    /// `(out_features, in_features)`.
    fn matrix_shape(&self, matrix: &Self::Matrix) -> (usize, usize);
    fn buffer(&self, len: usize) -> Result<Self::Buffer>;
    fn upload(&self, data: &[f32], dst: &mut Self::Buffer) -> Result<()>;
    /// Copies the first `out.len()` values of `src` to the host.
    fn download(&self, src: &Self::Buffer, out: &mut [f32]) -> Result<()>;
    /// The cache for `layers` × `slots` × `max_positions` K and V rows of `layout`'s KV heads,
    /// stored at `precision` (each backend lays them out as its attention reads them best; a
    /// precision it does not implement is an error).
    fn kv_store(&self, layers: usize, slots: usize, max_positions: usize, layout: AttentionLayout, precision: KvPrecision) -> Result<Self::KvStore>;
    /// The precision a session's cache takes when its options name none.
    fn default_kv_precision(&self) -> KvPrecision;
    /// Copies the first `positions` K and V entries of every layer from `from_slot` to
    /// `to_slot` (a shared prompt prefix computed once and continued in several slots).
    fn copy_kv_prefix(&self, kv: &mut Self::KvStore, from_slot: usize, to_slot: usize, positions: usize);

    /// `out[r] = table[tokens[r]]`, widened to f32.
    fn embed(&self, table: &Self::Matrix, tokens: &[u32], out: &mut Self::Buffer);
    /// `out[r] = x[r] / rms(x[r]) * weight` for `rows` rows of width `weight.len()`.
    fn rms_norm(&self, x: &Self::Buffer, weight: &Self::Buffer, eps: f32, rows: usize, dim: usize, out: &mut Self::Buffer);
    /// `out[rows, out_features] = x[rows, in_features] · wᵀ`.
    fn matmul(&self, x: &Self::Buffer, rows: usize, w: &Self::Matrix, out: &mut Self::Buffer);
    /// `x[r] += bias` for `rows` rows of width `dim`.
    fn add_bias(&self, x: &mut Self::Buffer, bias: &Self::Buffer, rows: usize, dim: usize);
    /// RMSNorm over each head of q and of k inside the fused q|k|v rows (Qwen3).
    fn head_rms_norm(&self, qkv: &mut Self::Buffer, rows: usize, layout: AttentionLayout, q_weight: &Self::Buffer, k_weight: &Self::Buffer, eps: f32);
    /// Rotary embedding of q and k (rotate-half convention) using a `[positions, head_dim/2]` cos|sin table.
    fn rope(&self, qkv: &mut Self::Buffer, rows: usize, layout: AttentionLayout, positions: &[u32], cos: &Self::Buffer, sin: &Self::Buffer);
    /// Stores each row's k, v in the cache at (layer, slot, position), then computes causal
    /// attention of each row over its slot's positions `0..=position`; writes `[rows, q_dim]`.
    fn attention(&self, qkv: &Self::Buffer, rows: usize, layout: AttentionLayout, kv: &mut Self::KvStore, layer: usize, table: RowTable<'_>, out: &mut Self::Buffer);
    /// `out[r] = silu(gate_up[r][..ffn]) * gate_up[r][ffn..]`.
    fn silu_mul(&self, gate_up: &Self::Buffer, rows: usize, ffn: usize, out: &mut Self::Buffer);
    /// The fused residual step that ends every sub-block, one read and one write of each row:
    /// `h += delta`; `h += Σ amount_k · d_k` for the row's steering terms (amounts from `h`
    /// before steering); readout `|h|`, `⟨h, u_j⟩`; capture `h`; `x = rmsnorm(h) · norm_weight`.
    /// With a plain `fused` it is exactly `h += delta; x = rmsnorm(h) · w` (bit for bit).
    #[allow(clippy::too_many_arguments)]
    fn residual_step(&self, h: &mut Self::Buffer, delta: &Self::Buffer, rows: usize, dim: usize, norm_weight: &Self::Buffer, eps: f32, x_out: &mut Self::Buffer, fused: FusedArgs<'_, Self>);
    /// `dst[i] = src[rows[i]]` for rows of width `dim`.
    fn gather_rows(&self, src: &Self::Buffer, rows: &[u32], dim: usize, dst: &mut Self::Buffer);
}
