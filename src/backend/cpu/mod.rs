//! The CPU backend: f32 activations (rounded to bf16 where they meet bf16 weights), f32/bf16/f16
//! or Q8_0/Q4_0/Q4_1 block-quantized weights, AVX-512/AVX2/scalar chosen at run time, and a rayon
//! pool of its own (no global pool).

pub mod attention;
pub mod attention_simd;
pub mod bf16_products;
pub mod buffer;
pub mod matmul;
pub mod panel_gemm;
pub mod quant;
pub mod simd;
pub mod tune;
pub mod warm;

use rayon::prelude::*;

use self::attention::CpuKvStore;
use self::matmul::CpuMatrix;
use self::simd::SimdLevel;
use super::{AttentionLayout, Backend, FusedArgs, KvPrecision, RowTable};
use crate::steer::tables::{RowTerm, TermMode, NO_DIRECTION};
use crate::error::{Error, Result};
use crate::tensor::HostTensor;

/// Rows per parallel task in row-wise element operations (norms, residual step).
const ROWS_PER_TASK: usize = 16;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    level: SimdLevel,
    /// Where prefill gemms widen 16-bit weights (or pack panels, see `panel_gemm`), kept between calls: a fresh
    /// allocation per product cost page faults and zeroing of up to 16 MiB each time.
    widen_scratch: std::sync::Mutex<Vec<f32>>,
    /// The cache precision sessions get when their options name none.
    kv_precision: KvPrecision,
    /// How weight rows are prefetched in decode, per weight class, timed on the loaded model.
    prefetch: tune::PrefetchPlans,
    /// `vdpbf16ps`'s multiply-add rate over f32 FMA's on this core (measured at start, `None`
    /// without AVX-512 BF16 at this level): bf16 prefill takes the `vdpbf16ps` kernel only
    /// where it clearly outruns FMA panels.
    bf16_dot_rate: Option<f64>,
}

impl CpuBackend {
    /// `threads == 0` means one per available core. `max_level` caps the SIMD level (for tests
    /// and for comparing paths); the detected level is used when it is higher.
    pub fn new(threads: usize, max_level: Option<SimdLevel>) -> Result<Self> {
        let threads = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("engram-cpu-{i}"))
            .build()
            .map_err(|e| Error::InvalidInput(format!("cannot start {threads} CPU threads: {e}")))?;
        let detected = SimdLevel::detect();
        let level = max_level.map_or(detected, |cap| detected.at_most(cap));
        let bf16_dot_rate = if bf16_products::bf16_kernel_available(level) { bf16_products::dot_rate_over_fma() } else { None };
        Ok(CpuBackend {
            pool,
            threads,
            level,
            widen_scratch: std::sync::Mutex::new(Vec::new()),
            kv_precision: KvPrecision::F16,
            prefetch: tune::PrefetchPlans::default(),
            bf16_dot_rate,
        })
    }

    /// Sets the KV cache precision of sessions whose options name none (f16 unless set: half
    /// the bytes that long-context decode reads; f32 keeps the projections exactly).
    pub fn with_kv_precision(mut self, precision: KvPrecision) -> Self {
        self.kv_precision = precision;
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn simd_level(&self) -> SimdLevel {
        self.level
    }

    /// Which kernel bf16 prefill takes, and why (`None` where the CPU has no choice).
    pub fn bf16_prefill_choice(&self) -> Option<String> {
        self.bf16_dot_rate.map(|rate| {
            let kernel = if self.bf16_dot_prefill() { "vdpbf16ps tiles" } else { "f32 FMA panels" };
            format!("{kernel} (vdpbf16ps multiply-adds at {rate:.2}x the f32 FMA rate on this core; the tiles from {:.1}x)", bf16_products::DOT_PAYS_FROM_RATE)
        })
    }

    fn bf16_dot_prefill(&self) -> bool {
        self.bf16_dot_rate.is_some_and(|rate| rate >= bf16_products::DOT_PAYS_FROM_RATE)
    }

    /// What the prefetch timing at load measured, per weight class timed (see [`tune`]).
    pub fn prefetch_tunings(&self) -> Vec<tune::Tuning> {
        self.prefetch.tunings()
    }
}

fn rms_scale(level: SimdLevel, row: &[f32], eps: f32) -> f32 {
    let mean = simd::sum_squares(level, row) / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

/// Adds a row's steering terms; every amount is computed from `h` before any of them is added.
fn steer_row(level: SimdLevel, h: &mut [f32], terms: &[RowTerm], directions: &[f32], dim: usize) {
    let direction = |t: &RowTerm| &directions[t.direction as usize * dim..(t.direction as usize + 1) * dim];
    let needs_norm = terms.iter().any(|t| t.mode == TermMode::NormScaled);
    let norm = if needs_norm { simd::sum_squares(level, h).sqrt() } else { 0.0 };
    // Few terms per row: a small fixed buffer avoids allocating in the hot loop.
    let mut small = [0.0f32; 16];
    let mut large = Vec::new();
    let amounts: &mut [f32] = if terms.len() <= small.len() {
        &mut small[..terms.len()]
    } else {
        large.resize(terms.len(), 0.0);
        &mut large
    };
    for (a, t) in amounts.iter_mut().zip(terms) {
        *a = match t.mode {
            TermMode::Add => t.coefficient,
            TermMode::NormScaled => t.coefficient * norm,
            TermMode::Clamp { target } => t.coefficient * (target - simd::dot_f32(level, h, direction(t))).max(0.0),
        };
    }
    for (a, t) in amounts.iter().zip(terms) {
        if *a != 0.0 {
            simd::axpy(level, *a, direction(t), h);
        }
    }
}

fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (first, second) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (first[i], second[i]);
        first[i] = a * cos[i] - b * sin[i];
        second[i] = b * cos[i] + a * sin[i];
    }
}

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;
    type Matrix = CpuMatrix;
    type KvStore = CpuKvStore;

    fn name(&self) -> String {
        format!("cpu ({} threads, {})", self.threads, self.level)
    }

    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        self.pool.install(|| warm::with_threads_awake(work))
    }

    fn matrix(&self, tensor: &HostTensor) -> Result<CpuMatrix> {
        let mut matrices = self.matrices(vec![tensor.clone()])?;
        Ok(matrices.pop().expect("one matrix per tensor"))
    }

    fn matrices(&self, tensors: Vec<HostTensor>) -> Result<Vec<CpuMatrix>> {
        let mut matrices = tensors.into_iter().map(CpuMatrix::on_heap).collect::<Result<Vec<_>>>()?;
        let bytes: usize = matrices.iter().map(CpuMatrix::size_in_bytes).sum();
        let mut buffers: Vec<&mut dyn buffer::Placeable> = matrices.iter_mut().flat_map(CpuMatrix::buffers_mut).collect();
        buffer::share_mapping(&mut buffers).map_err(|e| Error::InvalidInput(format!("cannot allocate {bytes} bytes of weight memory: {e}")))?;
        Ok(matrices)
    }

    fn tune(&self, decode_order: &[&CpuMatrix]) {
        self.run(|| self.prefetch.tune(self.level, self.threads, decode_order, tune::MIN_TUNING_BYTES, tune::MAX_TUNING_BYTES));
    }

    fn matrix_shape(&self, matrix: &CpuMatrix) -> (usize, usize) {
        (matrix.rows, matrix.cols)
    }

    fn buffer(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32], dst: &mut Vec<f32>) -> Result<()> {
        if dst.len() < data.len() {
            return Err(Error::Shape(format!("upload of {} values into a buffer of {}", data.len(), dst.len())));
        }
        dst[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn download(&self, src: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        if src.len() < out.len() {
            return Err(Error::Shape(format!("download of {} values from a buffer of {}", out.len(), src.len())));
        }
        out.copy_from_slice(&src[..out.len()]);
        Ok(())
    }

    fn kv_store(&self, layers: usize, slots: usize, max_positions: usize, layout: AttentionLayout, precision: KvPrecision) -> Result<CpuKvStore> {
        CpuKvStore::new(layers, slots, max_positions, layout, precision)
    }

    fn default_kv_precision(&self) -> KvPrecision {
        self.kv_precision
    }

    fn copy_kv_prefix(&self, kv: &mut CpuKvStore, from_slot: usize, to_slot: usize, positions: usize) {
        kv.copy_prefix(from_slot, to_slot, positions);
    }

    fn embed(&self, table: &CpuMatrix, tokens: &[u32], out: &mut Vec<f32>) {
        let dim = table.cols;
        for (r, &t) in tokens.iter().enumerate() {
            table.row_to_f32(t as usize, &mut out[r * dim..(r + 1) * dim]);
        }
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &Vec<f32>, eps: f32, rows: usize, dim: usize, out: &mut Vec<f32>) {
        let level = self.level;
        out[..rows * dim].par_chunks_mut(dim * ROWS_PER_TASK).enumerate().for_each(|(c, block)| {
            for (i, o) in block.chunks_mut(dim).enumerate() {
                let r = c * ROWS_PER_TASK + i;
                let row = &x[r * dim..(r + 1) * dim];
                let s = rms_scale(level, row, eps);
                for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight.iter()) {
                    *o = v * s * w;
                }
            }
        });
    }

    fn matmul(&self, x: &Vec<f32>, rows: usize, w: &CpuMatrix, out: &mut Vec<f32>) {
        // A product running beside another one on the same backend gets its own scratch.
        match self.widen_scratch.try_lock() {
            Ok(mut scratch) => matmul::matmul_with_scratch(self.level, self.prefetch.for_matrix(w), self.bf16_dot_prefill(), self.threads, x, rows, w, out, &mut scratch),
            Err(_) => matmul::matmul_with_scratch(self.level, self.prefetch.for_matrix(w), self.bf16_dot_prefill(), self.threads, x, rows, w, out, &mut Vec::new()),
        }
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, dim: usize) {
        for row in x[..rows * dim].chunks_mut(dim) {
            for (v, b) in row.iter_mut().zip(bias.iter()) {
                *v += b;
            }
        }
    }

    fn head_rms_norm(&self, qkv: &mut Vec<f32>, rows: usize, layout: AttentionLayout, q_weight: &Vec<f32>, k_weight: &Vec<f32>, eps: f32) {
        let (hd, width) = (layout.head_dim, layout.qkv_dim());
        let heads_q = layout.heads;
        let level = self.level;
        qkv[..rows * width].par_chunks_mut(width).for_each(|row| {
            for (h, head) in row[..(heads_q + layout.kv_heads) * hd].chunks_mut(hd).enumerate() {
                let weight = if h < heads_q { q_weight } else { k_weight };
                let s = rms_scale(level, head, eps);
                for (v, &w) in head.iter_mut().zip(weight.iter()) {
                    *v = *v * s * w;
                }
            }
        });
    }

    fn rope(&self, qkv: &mut Vec<f32>, rows: usize, layout: AttentionLayout, positions: &[u32], cos: &Vec<f32>, sin: &Vec<f32>) {
        let (hd, width) = (layout.head_dim, layout.qkv_dim());
        let half = hd / 2;
        let rotated = (layout.heads + layout.kv_heads) * hd;
        qkv[..rows * width].par_chunks_mut(width).enumerate().for_each(|(r, row)| {
            let p = positions[r] as usize;
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for head in row[..rotated].chunks_mut(hd) {
                rope_row(head, c, s);
            }
        });
    }

    fn attention(&self, qkv: &Vec<f32>, rows: usize, layout: AttentionLayout, kv: &mut CpuKvStore, layer: usize, table: RowTable<'_>, out: &mut Vec<f32>) {
        attention::attention(self.level, qkv, rows, layout, kv, layer, table, out);
    }

    fn silu_mul(&self, gate_up: &Vec<f32>, rows: usize, ffn: usize, out: &mut Vec<f32>) {
        let level = self.level;
        out[..rows * ffn].par_chunks_mut(ffn).enumerate().for_each(|(r, o)| {
            let row = &gate_up[r * 2 * ffn..(r + 1) * 2 * ffn];
            let (gate, up) = row.split_at(ffn);
            simd::silu_mul(level, gate, up, o);
        });
    }

    fn residual_step(&self, h: &mut Vec<f32>, delta: &Vec<f32>, rows: usize, dim: usize, norm_weight: &Vec<f32>, eps: f32, x_out: &mut Vec<f32>, fused: FusedArgs<'_, Self>) {
        let level = self.level;
        let point = fused.point;
        let directions = &fused.directions[..];
        let probes = point.probes.len();
        let step = |r: usize, hr: &mut [f32], xr: &mut [f32], readout: Option<&mut [f32]>, capture: Option<&mut [f32]>| {
            let d = &delta[r * dim..(r + 1) * dim];
            for (hv, dv) in hr.iter_mut().zip(d) {
                *hv += dv;
            }
            let terms = point.row_terms(r);
            if !terms.is_empty() {
                steer_row(level, hr, terms, directions, dim);
            }
            if let Some(out) = readout {
                out[0] = simd::sum_squares(level, hr).sqrt();
                for (o, &p) in out[1..].iter_mut().zip(&point.probes) {
                    *o = if p == NO_DIRECTION { f32::NAN } else { simd::dot_f32(level, hr, &directions[p as usize * dim..(p as usize + 1) * dim]) };
                }
            }
            // Captured while the row is in cache, by the thread that owns it.
            if let Some(dst) = capture {
                dst.copy_from_slice(hr);
            }
            let s = rms_scale(level, hr, eps);
            for ((x, &hv), &w) in xr.iter_mut().zip(hr.iter()).zip(norm_weight.iter()) {
                *x = hv * s * w;
            }
        };
        let width = 1 + probes;
        let mut readout_rows: Vec<Option<&mut [f32]>> = match point.readout_offset {
            Some(offset) => fused.readout[offset..offset + rows * width].chunks_mut(width).map(Some).collect(),
            None => (0..rows).map(|_| None).collect(),
        };
        // Each captured row's destination: capture rows are distinct, so the chunks are disjoint.
        let mut capture_rows: Vec<Option<&mut [f32]>> = (0..rows).map(|_| None).collect();
        if !point.capture.is_empty() {
            let mut dest_of: Vec<Option<usize>> = vec![None; point.capture.iter().map(|&(_, d)| d as usize + 1).max().unwrap_or(0)];
            for &(row, dest) in &point.capture {
                dest_of[dest as usize] = Some(row as usize);
            }
            for (dest, chunk) in fused.capture[..dest_of.len() * dim].chunks_mut(dim).enumerate() {
                if let Some(row) = dest_of[dest] {
                    capture_rows[row] = Some(chunk);
                }
            }
        }
        if rows == 1 {
            step(0, &mut h[..dim], &mut x_out[..dim], readout_rows.pop().flatten(), capture_rows.pop().flatten());
        } else {
            h[..rows * dim]
                .par_chunks_mut(dim)
                .zip(x_out[..rows * dim].par_chunks_mut(dim))
                .zip(readout_rows.into_par_iter())
                .zip(capture_rows.into_par_iter())
                .enumerate()
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(r, (((hr, xr), ro), ca))| step(r, hr, xr, ro, ca));
        }
    }

    fn gather_rows(&self, src: &Vec<f32>, rows: &[u32], dim: usize, dst: &mut Vec<f32>) {
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            dst[i * dim..(i + 1) * dim].copy_from_slice(&src[r * dim..(r + 1) * dim]);
        }
    }
}
