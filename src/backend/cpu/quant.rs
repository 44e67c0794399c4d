//! Block-quantized weight matrices (Q8_0, Q4_0, Q4_1) repacked for the CPU, and their dot
//! products with activations quantized to 8 bits.
//!
//! As in llama.cpp, the activation row is quantized once per matrix product to 8-bit blocks of
//! 32 (scale `dx` in f32 and `dx·Σq`), and each weight block meets it in integer multiply-adds:
//! AVX-512 VNNI `vpdpbusd` on two blocks per 512-bit instruction, the AVX2 `vpmaddubsw` +
//! `vpmaddwd` pair, or the scalar reference every SIMD path is tested against. Per block, with `Σ`
//! over its 32 elements:
//!
//! * Q8_0 `w = q·d`:        `d·dx·Σ q·qx`
//! * Q4_0 `w = (q − 8)·d`:  `d·dx·Σ q·qx − 8·d·(dx·Σ qx)`
//! * Q4_1 `w = q·d + m`:    `d·dx·Σ q·qx + m·(dx·Σ qx)`
//!
//! The integer sums are exact; the only rounding beyond f32 accumulation is the activation's own
//! quantization (relative error about 1/254 of the block's largest value).
//!
//! ## Packed layout ([`BlockMatrix`])
//! GGUF interleaves each block's f16 scale with its quants, which costs the kernels a scalar
//! load, widening and broadcast per block. At load the CPU backend splits every row into
//! separate arrays (the same bytes, rearranged; `row_to_f32` gives back the file's values
//! exactly):
//! * the scales `d` (f16), and for Q4_1 the minimums `m` (f16), contiguous per row, so that 16
//!   of them widen in one instruction and the offset terms become one FMA per 16 blocks;
//! * Q8_0 quants stored as `q + 128` (unsigned), the operand `vpdpbusd` takes without a sign
//!   trick (AVX-512 has no 512-bit `vpsignb`); the `128·Σ qx` this adds is removed like Q4_0's 8;
//! * Q4 nibbles of blocks `2p` and `2p + 1` in one 32-byte group: byte `j` holds element `j` of
//!   block `2p` in its low nibble and element `j` of block `2p + 1` in its high nibble, so that a
//!   mask and a shift give both blocks in element order.
//!
//! Rows are padded to an even number of blocks (zero scales, zero activations) so the kernels
//! always take blocks in pairs.

use half::f16;

use crate::model::quant::{GgmlType, BLOCK_Q4_0_BYTES, BLOCK_Q4_1_BYTES, BLOCK_Q8_0_BYTES, QK};

use super::simd::SimdLevel;

/// The block layouts engram computes on directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl BlockFormat {
    pub fn from_ggml(ty: GgmlType) -> Option<BlockFormat> {
        match ty {
            GgmlType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlType::Q4_1 => Some(BlockFormat::Q4_1),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            BlockFormat::Q8_0 => GgmlType::Q8_0,
            BlockFormat::Q4_0 => GgmlType::Q4_0,
            BlockFormat::Q4_1 => GgmlType::Q4_1,
        }
    }

    /// Bytes per block of 32 elements in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK_Q8_0_BYTES,
            BlockFormat::Q4_0 => BLOCK_Q4_0_BYTES,
            BlockFormat::Q4_1 => BLOCK_Q4_1_BYTES,
        }
    }

    /// Bytes of quants per block in the packed layout.
    fn quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => QK,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => QK / 2,
        }
    }

    /// What multiplies `Σ_blocks offset_scale·(dx·Σ qx)`: the Q4_1 minimums enter as they are,
    /// Q4_0's `−8·d` and Q8_0's stored `+128` are removed with `d` as the offset scale.
    fn offset_factor(self) -> f32 {
        match self {
            BlockFormat::Q8_0 => -128.0,
            BlockFormat::Q4_0 => -8.0,
            BlockFormat::Q4_1 => 1.0,
        }
    }
}

/// A `[rows, cols]` block-quantized matrix in the packed layout (see the module docs).
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row, rounded up to even.
    blocks: usize,
    /// f16 bits, `rows × blocks`.
    scales: Vec<u16>,
    /// Q4_1 minimums as f16 bits, `rows × blocks`; empty for the other formats.
    minimums: Vec<u16>,
    /// `rows × blocks × quant_bytes`.
    quants: Vec<u8>,
}

/// One packed weight row.
#[derive(Debug, Clone, Copy)]
pub struct PackedRow<'a> {
    pub scales: &'a [u16],
    pub minimums: &'a [u16],
    pub quants: &'a [u8],
}

impl BlockMatrix {
    /// Repacks GGUF blocks (`rows` rows of `cols / 32` blocks each, row after row).
    pub fn pack(format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> BlockMatrix {
        let file_blocks = cols / QK;
        let block_bytes = format.block_bytes();
        assert!(cols.is_multiple_of(QK) && bytes.len() == rows * file_blocks * block_bytes, "packing: byte count does not match the shape");
        let blocks = file_blocks.next_multiple_of(2);
        let quant_bytes = format.quant_bytes();
        let mut scales = vec![0u16; rows * blocks];
        let mut minimums = if format == BlockFormat::Q4_1 { vec![0u16; rows * blocks] } else { Vec::new() };
        // Pad quants: Q8_0 stores q + 128, so 0x80 is a zero weight; Q4 pads are zero nibbles.
        let pad = if format == BlockFormat::Q8_0 { 0x80 } else { 0 };
        let mut quants = vec![pad; rows * blocks * quant_bytes];
        for (i, block) in bytes.chunks_exact(block_bytes).enumerate() {
            let (r, b) = (i / file_blocks, i % file_blocks);
            let at = r * blocks + b;
            scales[at] = u16::from_le_bytes([block[0], block[1]]);
            match format {
                BlockFormat::Q8_0 => {
                    for (q, &v) in quants[at * QK..(at + 1) * QK].iter_mut().zip(&block[2..]) {
                        *q = v ^ 0x80;
                    }
                }
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let nibbles = &block[block_bytes - QK / 2..];
                    if format == BlockFormat::Q4_1 {
                        minimums[at] = u16::from_le_bytes([block[2], block[3]]);
                    }
                    let group = &mut quants[(at - b % 2) * QK / 2..][..QK];
                    let shift = 4 * (b % 2);
                    for (j, &q) in nibbles.iter().enumerate() {
                        group[j] |= (q & 0x0F) << shift;
                        group[j + QK / 2] |= (q >> 4) << shift;
                    }
                }
            }
        }
        BlockMatrix { format, rows, cols, blocks, scales, minimums, quants }
    }

    /// Blocks per row as the kernels see them (even; pads have zero scales).
    pub fn padded_blocks(&self) -> usize {
        self.blocks
    }

    pub fn row(&self, r: usize) -> PackedRow<'_> {
        let b = self.blocks;
        let q = b * self.format.quant_bytes();
        PackedRow {
            scales: &self.scales[r * b..(r + 1) * b],
            minimums: if self.minimums.is_empty() { &[] } else { &self.minimums[r * b..(r + 1) * b] },
            quants: &self.quants[r * q..(r + 1) * q],
        }
    }

    /// Row `r` decoded to f32 into `out` (`cols` values): the file's values exactly, with
    /// ggml's arithmetic (`q·d`, `(q − 8)·d`, `q·d + m`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        for (b, o) in out[..self.cols].chunks_exact_mut(QK).enumerate() {
            let d = f16::from_bits(row.scales[b]).to_f32();
            match self.format {
                BlockFormat::Q8_0 => {
                    for (v, &q) in o.iter_mut().zip(&row.quants[b * QK..(b + 1) * QK]) {
                        *v = ((q ^ 0x80) as i8) as f32 * d;
                    }
                }
                BlockFormat::Q4_0 => {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = (nibble(row.quants, b, j) as i32 - 8) as f32 * d;
                    }
                }
                BlockFormat::Q4_1 => {
                    let m = f16::from_bits(row.minimums[b]).to_f32();
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = nibble(row.quants, b, j) as f32 * d + m;
                    }
                }
            }
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        2 * (self.scales.len() + self.minimums.len()) + self.quants.len()
    }
}

/// Element `j` of block `b` in a packed Q4 row.
fn nibble(quants: &[u8], b: usize, j: usize) -> u8 {
    (quants[(b / 2) * QK + j] >> (4 * (b % 2))) & 0x0F
}

/// Which integer dot-product implementation runs (tests run every one the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantKernel {
    Scalar,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, one block per 256-bit step.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd`, two blocks per 512-bit step.
    Vnni,
}

impl QuantKernel {
    /// The best kernel allowed by `level` (the backend's cap) on this CPU.
    pub fn for_level(level: SimdLevel) -> QuantKernel {
        match level {
            SimdLevel::Avx512 if has_vnni() => QuantKernel::Vnni,
            SimdLevel::Avx512 | SimdLevel::Avx2 => QuantKernel::Avx2,
            SimdLevel::Scalar => QuantKernel::Scalar,
        }
    }

    /// Every kernel this CPU can run, lowest first.
    pub fn all_supported() -> Vec<QuantKernel> {
        let best = QuantKernel::for_level(SimdLevel::detect());
        [QuantKernel::Scalar, QuantKernel::Avx2, QuantKernel::Vnni].into_iter().filter(|&k| k <= best).collect()
    }
}

impl std::fmt::Display for QuantKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantKernel::Scalar => "scalar",
            QuantKernel::Avx2 => "avx2",
            QuantKernel::Vnni => "avx512-vnni",
        })
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activation rows quantized to 8-bit blocks, padded like the weights to an even block count,
/// kept as separate arrays so that the SIMD loops load contiguous bytes.
#[derive(Debug, Clone, Default)]
pub struct Q8Activations {
    /// Blocks per row (even; pad blocks are zero).
    pub blocks: usize,
    /// Quantized values, row after row.
    pub qs: Vec<i8>,
    /// Per block: the scale `dx` (value = q · dx).
    pub scales: Vec<f32>,
    /// Per block: `dx · Σ q`, the block sum the offsets and minimums multiply.
    pub scaled_sums: Vec<f32>,
}

impl Q8Activations {
    /// Quantizes `rows` rows of `cols` values (`d = max|x| / 127` as in ggml; values rounded to
    /// nearest, ties to even, as ggml's SIMD quantizers round).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Q8Activations {
        assert!(cols.is_multiple_of(QK) && x.len() >= rows * cols, "activations must be whole blocks of 32");
        let file_blocks = cols / QK;
        let blocks = file_blocks.next_multiple_of(2);
        let mut out =
            Q8Activations { blocks, qs: vec![0; rows * blocks * QK], scales: vec![0.0; rows * blocks], scaled_sums: vec![0.0; rows * blocks] };
        for (i, chunk) in x[..rows * cols].chunks_exact(QK).enumerate() {
            let b = (i / file_blocks) * blocks + i % file_blocks;
            let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            // Adding and subtracting 1.5·2²³ rounds |v| < 2²² to the nearest integer (ties to
            // even) in plain SSE2 arithmetic, which the compiler vectorizes; `f32::round` is a
            // libm call per element (8% of a prefill in perf).
            const ROUNDER: f32 = 12_582_912.0;
            let mut sum = 0i32;
            for (q, v) in out.qs[b * QK..(b + 1) * QK].iter_mut().zip(chunk) {
                *q = ((v * inverse + ROUNDER) - ROUNDER) as i8;
                sum += *q as i32;
            }
            out.scales[b] = d;
            out.scaled_sums[b] = d * sum as f32;
        }
        out
    }

    /// Row `r` as the slices a dot product takes.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let b = self.blocks;
        Q8Row {
            qs: &self.qs[r * b * QK..(r + 1) * b * QK],
            scales: &self.scales[r * b..(r + 1) * b],
            scaled_sums: &self.scaled_sums[r * b..(r + 1) * b],
        }
    }
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub scaled_sums: &'a [f32],
}

/// `out[i] = Σ_k w[first + i, k]·x[k]` for every `i < out.len()`: consecutive weight rows of
/// `weights` against one activation row of the same width.
pub fn dot_rows(kernel: QuantKernel, weights: &BlockMatrix, first: usize, x: Q8Row<'_>, out: &mut [f32]) {
    let blocks = weights.blocks;
    assert!(
        first + out.len() <= weights.rows && x.scales.len() == blocks && x.qs.len() == blocks * QK && x.scaled_sums.len() == blocks,
        "quantized dot operands disagree in length"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: kernels other than Scalar are only chosen when their features were detected
        // (QuantKernel::for_level / all_supported); every packed row and the activation row hold
        // `blocks` (even) blocks, checked above and by construction.
        QuantKernel::Avx2 => unsafe { x86::dot_rows_avx2(weights, first, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        QuantKernel::Vnni => unsafe { x86::dot_rows_vnni::<1>(weights, first, out.len(), [x], &mut [out]) },
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = scalar::dot(weights.format, weights.row(first + i), x);
            }
        }
    }
}

/// Rows of activations `dot_rows4` takes at once.
pub const ROWS_AT_ONCE: usize = 4;

/// [`dot_rows`] for four activation rows at once (`out[t][i]` for row `x[t]`), with AVX-512
/// VNNI: each weight block is unpacked once for the four. `None` when this CPU or `kernel`
/// lacks VNNI (callers then take another path).
pub fn dot_rows4(kernel: QuantKernel, weights: &BlockMatrix, first: usize, count: usize, x: [Q8Row<'_>; ROWS_AT_ONCE], out: &mut [&mut [f32]; ROWS_AT_ONCE]) -> Option<()> {
    let blocks = weights.blocks;
    assert!(
        first + count <= weights.rows
            && x.iter().all(|r| r.scales.len() == blocks && r.qs.len() == blocks * QK && r.scaled_sums.len() == blocks)
            && out.iter().all(|o| o.len() >= count),
        "quantized dot operands disagree in length"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Vnni is only chosen when its features were detected; lengths checked above.
        QuantKernel::Vnni => {
            unsafe { x86::dot_rows_vnni::<ROWS_AT_ONCE>(weights, first, count, x, out) };
            Some(())
        }
        _ => None,
    }
}

/// Σ w_i x_i for row `r` of `weights` and one activation row of the same width.
pub fn dot(kernel: QuantKernel, weights: &BlockMatrix, r: usize, x: Q8Row<'_>) -> f32 {
    let mut out = [0.0f32];
    dot_rows(kernel, weights, r, x, &mut out);
    out[0]
}

pub mod scalar {
    //! The reference: integer sums per block of the stored values, scaled in f32.
    use super::*;

    pub fn dot(format: BlockFormat, w: PackedRow<'_>, x: Q8Row<'_>) -> f32 {
        let mut total = 0.0f32;
        for b in 0..x.scales.len() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let d = f16::from_bits(w.scales[b]).to_f32();
            let dx = x.scales[b];
            total += match format {
                BlockFormat::Q8_0 => {
                    let quants = &w.quants[b * QK..(b + 1) * QK];
                    let sum: i32 = quants.iter().zip(xq).map(|(&u, &v)| ((u ^ 0x80) as i8) as i32 * v as i32).sum();
                    d * dx * sum as f32
                }
                BlockFormat::Q4_0 => d * dx * nibble_sum(w.quants, b, xq) as f32 - 8.0 * d * x.scaled_sums[b],
                BlockFormat::Q4_1 => d * dx * nibble_sum(w.quants, b, xq) as f32 + f16::from_bits(w.minimums[b]).to_f32() * x.scaled_sums[b],
            };
        }
        total
    }

    fn nibble_sum(quants: &[u8], b: usize, xq: &[i8]) -> i32 {
        xq.iter().enumerate().map(|(j, &v)| nibble(quants, b, j) as i32 * v as i32).sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels on the packed layout, blocks in pairs. The block format is matched
    //! outside the loops, so each arm compiles to its own loop.
    use std::arch::x86_64::*;

    use super::{BlockFormat, BlockMatrix, PackedRow, Q8Row, QK};

    /// `out[t][i] = Σ_k w[first + i, k]·x_t[k]` for `i < count` and each of the `T` activation
    /// rows: the weights of a pair of blocks are unpacked once and meet every activation row
    /// (`T = 1` for decode, 4 for prefill, where the reuse saves the unpacking and the scale
    /// widening per token).
    ///
    /// Safety: AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be present; rows `first..first +
    /// count` of `weights` and every `x_t` hold the same even number of blocks; every `out[t]`
    /// holds at least `count` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_rows_vnni<const T: usize>(weights: &BlockMatrix, first: usize, count: usize, x: [Q8Row<'_>; T], out: &mut [&mut [f32]; T]) {
        let format = weights.format;
        let blocks = x[0].scales.len();
        // `$weights` gives the 64 unsigned bytes of blocks `$b`, `$b + 1` of row `$w`.
        macro_rules! rows {
            (|$w:ident, $b:ident| $weights:expr) => {{
                let two = _mm512_set1_epi32(2);
                // Picks the scale of a pair's first block for lanes 0-7, its second for 8-15.
                let first_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
                let factor = _mm512_set1_ps(format.offset_factor());
                for i in 0..count {
                    let $w: PackedRow<'_> = weights.row(first + i);
                    // Two accumulators per activation row, alternating by pair, hide the FMA latency.
                    let mut acc0 = [_mm512_setzero_ps(); T];
                    let mut acc1 = [_mm512_setzero_ps(); T];
                    let mut offsets = [_mm512_setzero_ps(); T];
                    let mut chunk = 0;
                    while chunk < blocks {
                        // Sixteen blocks' scales at a time: one widening, and per activation row
                        // one scale product and one offset FMA.
                        let n = (blocks - chunk).min(16);
                        let mask: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
                        let d = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, $w.scales.as_ptr().add(chunk) as *const i16));
                        let offset_scale = if format == BlockFormat::Q4_1 {
                            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, $w.minimums.as_ptr().add(chunk) as *const i16))
                        } else {
                            d
                        };
                        let mut scale = [_mm512_setzero_ps(); T];
                        for t in 0..T {
                            let sums = _mm512_maskz_loadu_ps(mask, x[t].scaled_sums.as_ptr().add(chunk));
                            offsets[t] = _mm512_fmadd_ps(offset_scale, sums, offsets[t]);
                            scale[t] = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(mask, x[t].scales.as_ptr().add(chunk)));
                        }
                        let mut index = first_pair;
                        let mut p = 0;
                        while p < n {
                            let $b = chunk + p;
                            let u = $weights;
                            for t in 0..T {
                                let xv = _mm512_loadu_si512(x[t].qs.as_ptr().add($b * QK) as *const __m512i);
                                let products = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
                                let pair_scale = _mm512_permutexvar_ps(index, scale[t]);
                                acc0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(products), pair_scale, acc0[t]);
                            }
                            std::mem::swap(&mut acc0, &mut acc1);
                            index = _mm512_add_epi32(index, two);
                            p += 2;
                        }
                        chunk += 16;
                    }
                    for t in 0..T {
                        // One reduction per output: the offset terms join the products first.
                        let total = _mm512_fmadd_ps(offsets[t], factor, _mm512_add_ps(acc0[t], acc1[t]));
                        *out[t].get_unchecked_mut(i) = _mm512_reduce_add_ps(total);
                    }
                }
            }};
        }
        match format {
            BlockFormat::Q8_0 => rows!(|w, b| _mm512_loadu_si512(w.quants.as_ptr().add(b * QK) as *const __m512i)),
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => rows!(|w, b| {
                let raw = _mm256_loadu_si256(w.quants.as_ptr().add(b * QK / 2) as *const __m256i);
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(raw), _mm256_srli_epi16::<4>(raw));
                _mm512_and_si512(both, _mm512_set1_epi8(0x0F))
            }),
        }
    }

    /// Safety: AVX2, FMA and F16C must be present; rows `first..first + out.len()` of `weights`
    /// and `x` hold the same even number of blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2(weights: &BlockMatrix, first: usize, x: Q8Row<'_>, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = dot_avx2(weights.format, weights.row(first + i), x);
        }
    }

    /// Safety: as for `dot_rows_avx2`, for one row `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(format: BlockFormat, w: PackedRow<'_>, x: Q8Row<'_>) -> f32 {
        let ones = _mm256_set1_epi16(1);
        // Eight i32 sums of u·s (u unsigned, s signed bytes; pairs of products must fit i16).
        let products = |u: __m256i, s: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones);
        let blocks = x.scales.len();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut offsets = _mm_setzero_ps();
        let mut b = 0;
        while b < blocks {
            let d = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(w.scales.as_ptr().add(b) as *const i32)));
            let dx = _mm_castpd_ps(_mm_load_sd(x.scales.as_ptr().add(b) as *const f64));
            let sums = _mm_castpd_ps(_mm_load_sd(x.scaled_sums.as_ptr().add(b) as *const f64));
            let offset_scale = if format == BlockFormat::Q4_1 {
                _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(w.minimums.as_ptr().add(b) as *const i32)))
            } else {
                d
            };
            offsets = _mm_fmadd_ps(offset_scale, sums, offsets);
            let scale = _mm_mul_ps(d, dx);
            let x0 = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
            let x1 = _mm256_loadu_si256(x.qs.as_ptr().add((b + 1) * QK) as *const __m256i);
            let (p0, p1) = match format {
                BlockFormat::Q8_0 => {
                    // 255·127·2 overflows vpmaddubsw's i16, so undo the +128 and use
                    // |w| · (x with w's sign) instead.
                    let flip = _mm256_set1_epi8(-128);
                    let w0 = _mm256_xor_si256(_mm256_loadu_si256(w.quants.as_ptr().add(b * QK) as *const __m256i), flip);
                    let w1 = _mm256_xor_si256(_mm256_loadu_si256(w.quants.as_ptr().add((b + 1) * QK) as *const __m256i), flip);
                    (products(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x0, w0)), products(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x1, w1)))
                }
                BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                    let raw = _mm256_loadu_si256(w.quants.as_ptr().add(b * QK / 2) as *const __m256i);
                    let low = _mm256_set1_epi8(0x0F);
                    (products(_mm256_and_si256(raw, low), x0), products(_mm256_and_si256(_mm256_srli_epi16::<4>(raw), low), x1))
                }
            };
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcastss_ps(scale), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcastss_ps(_mm_movehdup_ps(scale)), acc1);
            b += 2;
        }
        let v = _mm256_add_ps(acc0, acc1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        // Q8_0 was turned back into signed weights above: nothing to remove.
        let factor = if format == BlockFormat::Q8_0 { 0.0 } else { format.offset_factor() };
        _mm_cvtss_f32(s) + factor * _mm_cvtss_f32(_mm_add_ss(offsets, _mm_movehdup_ps(offsets)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{dequantize, quantize};
    use rand::{Rng, SeedableRng};

    const FORMATS: [BlockFormat; 3] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1];

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random_bool(0.05) { 8.0 } else { 1.0 }).collect()
    }

    #[test]
    fn packing_keeps_the_file_values_exactly() {
        for &blocks in &[1usize, 2, 3, 17, 18] {
            let (rows, cols) = (3, blocks * QK);
            let values = random(rows * cols, blocks as u64);
            for format in FORMATS {
                let bytes = quantize(format.ggml(), &values).unwrap();
                let packed = BlockMatrix::pack(format, rows, cols, &bytes);
                assert_eq!(packed.padded_blocks(), blocks.next_multiple_of(2));
                let expected = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
                let mut row = vec![f32::NAN; cols];
                for r in 0..rows {
                    packed.row_to_f32(r, &mut row);
                    assert_eq!(row, expected[r * cols..(r + 1) * cols], "{format:?} {blocks} blocks, row {r}");
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_scalar_reference_and_the_float_product() {
        // Odd counts exercise the pad block, 33 and 48 the partial and whole 16-block chunks.
        for &blocks in &[1usize, 2, 3, 17, 18, 33, 48] {
            let (rows, cols) = (2, blocks * QK);
            let w = random(rows * cols, blocks as u64);
            let mut x = random(cols, 100 + blocks as u64);
            x[5] = 0.0;
            if blocks > 1 {
                x[QK..2 * QK].fill(0.0); // an all-zero block
            }
            let activations = Q8Activations::quantize(&x, 1, cols);
            for format in FORMATS {
                let bytes = quantize(format.ggml(), &w).unwrap();
                let packed = BlockMatrix::pack(format, rows, cols, &bytes);
                let dequantized = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
                for r in 0..rows {
                    let weights_row = &dequantized[r * cols..(r + 1) * cols];
                    let exact: f64 = weights_row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let magnitude: f64 = weights_row.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    let reference = scalar::dot(format, packed.row(r), activations.row(0));
                    // The activation's 8-bit rounding bounds the gap to the float product.
                    assert!((reference as f64 - exact).abs() <= 0.02 * magnitude + 1e-4, "{format:?} {blocks}: {reference} vs {exact}");
                    for kernel in QuantKernel::all_supported() {
                        let got = dot(kernel, &packed, r, activations.row(0));
                        // Only f32 rounding differs (order of sums; Q8_0's +128 removed afterwards).
                        let tolerance = 1e-5 * magnitude as f32 + 1e-6;
                        assert!((got - reference).abs() <= tolerance, "{format:?} {kernel} {blocks}: {got} vs {reference}");
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_bytes_do_not_overflow_the_simd_paths() {
        // Q8_0 weights of -128 (legal in a file, never produced by the quantizer) and ±127
        // activations: the sign trick and the +128 form must still give exact products.
        let cols = 2 * QK;
        let mut bytes = Vec::new();
        for _ in 0..2 {
            bytes.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
            bytes.extend((0..QK).map(|i| if i % 2 == 0 { 0x80u8 } else { 0x7F }));
        }
        let packed = BlockMatrix::pack(BlockFormat::Q8_0, 1, cols, &bytes);
        let x: Vec<f32> = (0..cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let activations = Q8Activations::quantize(&x, 1, cols);
        let reference = scalar::dot(BlockFormat::Q8_0, packed.row(0), activations.row(0));
        let exact: f32 = (0..cols).map(|i| 0.5 * if i % 2 == 0 { -128.0 } else { 127.0 } * x[i]).sum();
        assert!((reference - exact).abs() < 1e-3, "{reference} vs {exact}");
        for kernel in QuantKernel::all_supported() {
            assert!((dot(kernel, &packed, 0, activations.row(0)) - reference).abs() < 1e-3, "{kernel}");
        }
    }

    #[test]
    fn activation_rows_are_quantized_per_block_and_padded() {
        let x = random(3 * 96, 9);
        let a = Q8Activations::quantize(&x, 3, 96);
        assert_eq!(a.blocks, 4);
        for r in 0..3 {
            let row = a.row(r);
            for b in 0..3 {
                let chunk = &x[r * 96 + b * QK..r * 96 + (b + 1) * QK];
                let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(row.scales[b], amax / 127.0);
                let q = &row.qs[b * QK..(b + 1) * QK];
                assert!(q.iter().any(|&v| v.unsigned_abs() == 127));
                let sum: i32 = q.iter().map(|&v| v as i32).sum();
                assert_eq!(row.scaled_sums[b], row.scales[b] * sum as f32);
            }
            assert!(row.qs[3 * QK..].iter().all(|&q| q == 0) && row.scales[3] == 0.0 && row.scaled_sums[3] == 0.0);
        }
    }
}
