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
//! GGUF stores a row's blocks one after another, each with its f16 scale. Dotting one row at a
//! time costs a widening, a scale product and a horizontal sum per row, all float work around
//! few integer products. At load the CPU backend instead interleaves groups of
//! [`ROW_GROUP`] = 16 rows, block by block (the same bytes, rearranged; `row_to_f32` gives back
//! the file's values exactly):
//! * for block `b` of a group, the 16 rows' scales `d` (f16) side by side, and for Q4_1 their
//!   minimums `m`: one widening gives a vector with one lane per row;
//! * their quants as 8 vectors of 64 bytes, vector `k` holding elements `4k..4k+4` of the 16
//!   rows (4 bytes per row). `vpdpbusd` against the activation's 4 bytes `4k..4k+4` broadcast
//!   then sums each row's products in its own lane: after the 8 vectors, lane `i` holds row
//!   `i`'s integer dot product for the block, and one convert and one FMA with the scales
//!   finish 16 rows at once. No horizontal sums, and the float work is per block, not per pair.
//! * Q8_0 quants are stored as `q + 128` (the unsigned operand `vpdpbusd` takes); the
//!   `128·Σ qx` this adds is removed like Q4_0's 8. Q4 blocks keep the file's nibble bytes:
//!   byte `j` has element `j` in its low nibble and `j + 16` in its high one, so vector `j`
//!   (bytes `4j..4j+4` of each row) yields elements `4j..` under a mask and `16 + 4j..` under a
//!   shift, which is vector `j + 4` of the scheme above.
//!
//! Rows are padded to a whole group with zero scales; their outputs are never written.

use half::f16;

use crate::model::quant::{dequantize_blocks_into, GgmlType, BLOCK_Q4_0_BYTES, BLOCK_Q4_1_BYTES, BLOCK_Q8_0_BYTES, QK};

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

    /// Bytes of quants of one block of a whole row group in the packed layout.
    fn group_block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => ROW_GROUP * QK,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => ROW_GROUP * QK / 2,
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

/// Rows interleaved in the packed layout (one 32-bit lane per row in a 512-bit vector).
pub const ROW_GROUP: usize = 16;

/// A `[rows, cols]` block-quantized matrix in the packed layout (see the module docs).
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row.
    blocks: usize,
    /// f16 bits, `[group][block][16]`.
    scales: Vec<u16>,
    /// Q4_1 minimums as f16 bits, `[group][block][16]`; empty for the other formats.
    minimums: Vec<u16>,
    /// `[group][block]` units of `format.group_block_bytes()`.
    quants: Vec<u8>,
}

impl BlockMatrix {
    /// Repacks GGUF blocks (`rows` rows of `cols / 32` blocks each, row after row).
    pub fn pack(format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> BlockMatrix {
        let blocks = cols / QK;
        let block_bytes = format.block_bytes();
        assert!(cols.is_multiple_of(QK) && bytes.len() == rows * blocks * block_bytes, "packing: byte count does not match the shape");
        let units = rows.div_ceil(ROW_GROUP) * blocks;
        let unit_bytes = format.group_block_bytes();
        let mut scales = vec![0u16; units * ROW_GROUP];
        let mut minimums = if format == BlockFormat::Q4_1 { vec![0u16; units * ROW_GROUP] } else { Vec::new() };
        // Pads: Q8_0 stores q + 128, so 0x80 is a zero weight; Q4 pads are zero nibbles (and
        // every pad row has a zero scale anyway).
        let pad = if format == BlockFormat::Q8_0 { 0x80 } else { 0 };
        let mut quants = vec![pad; units * unit_bytes];
        for (index, block) in bytes.chunks_exact(block_bytes).enumerate() {
            let (row, b) = (index / blocks, index % blocks);
            let (group, lane) = (row / ROW_GROUP, row % ROW_GROUP);
            let unit = group * blocks + b;
            scales[unit * ROW_GROUP + lane] = u16::from_le_bytes([block[0], block[1]]);
            let unit_quants = &mut quants[unit * unit_bytes..(unit + 1) * unit_bytes];
            // Vector k of the unit holds bytes 4k..4k+4 of every lane.
            let (stored, flip): (&[u8], u8) = match format {
                BlockFormat::Q8_0 => (&block[2..], 0x80),
                BlockFormat::Q4_0 => (&block[2..], 0),
                BlockFormat::Q4_1 => {
                    minimums[unit * ROW_GROUP + lane] = u16::from_le_bytes([block[2], block[3]]);
                    (&block[4..], 0)
                }
            };
            for (k, four) in stored.chunks_exact(4).enumerate() {
                for (m, &byte) in four.iter().enumerate() {
                    unit_quants[k * 4 * ROW_GROUP + lane * 4 + m] = byte ^ flip;
                }
            }
        }
        BlockMatrix { format, rows, cols, blocks, scales, minimums, quants }
    }

    /// Row groups (the last may be partly padding).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(ROW_GROUP)
    }

    fn unit(&self, row: usize, b: usize) -> usize {
        (row / ROW_GROUP) * self.blocks + b
    }

    /// The stored f16 scale of block `b` of `row`.
    fn scale(&self, row: usize, b: usize) -> f32 {
        f16::from_bits(self.scales[self.unit(row, b) * ROW_GROUP + row % ROW_GROUP]).to_f32()
    }

    /// The Q4_1 minimum of block `b` of `row`.
    fn minimum(&self, row: usize, b: usize) -> f32 {
        f16::from_bits(self.minimums[self.unit(row, b) * ROW_GROUP + row % ROW_GROUP]).to_f32()
    }

    /// The integer of element `e` of block `b` of `row`: Q8_0's signed `q`, Q4's nibble.
    fn quant(&self, row: usize, b: usize, e: usize) -> i32 {
        let unit = &self.quants[self.unit(row, b) * self.format.group_block_bytes()..];
        let lane = row % ROW_GROUP;
        match self.format {
            BlockFormat::Q8_0 => (unit[(e / 4) * 4 * ROW_GROUP + lane * 4 + e % 4] ^ 0x80) as i8 as i32,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let j = e % (QK / 2);
                let byte = unit[(j / 4) * 4 * ROW_GROUP + lane * 4 + j % 4];
                (if e < QK / 2 { byte & 0x0F } else { byte >> 4 }) as i32
            }
        }
    }

    /// Block `b` of `row` reassembled as the file stored it (the first `format.block_bytes()`
    /// bytes of the returned buffer): the inverse of [`BlockMatrix::pack`].
    fn file_block(&self, row: usize, b: usize) -> [u8; BLOCK_Q8_0_BYTES] {
        let mut block = [0u8; BLOCK_Q8_0_BYTES];
        let at = self.unit(row, b) * ROW_GROUP + row % ROW_GROUP;
        block[..2].copy_from_slice(&self.scales[at].to_le_bytes());
        let quants = match self.format {
            BlockFormat::Q8_0 => {
                for (e, q) in block[2..].iter_mut().enumerate() {
                    *q = self.quant(row, b, e) as i8 as u8;
                }
                return block;
            }
            BlockFormat::Q4_0 => &mut block[2..BLOCK_Q4_0_BYTES],
            BlockFormat::Q4_1 => {
                block[2..4].copy_from_slice(&self.minimums[at].to_le_bytes());
                &mut block[4..BLOCK_Q4_1_BYTES]
            }
        };
        for (j, q) in quants.iter_mut().enumerate() {
            *q = (self.quant(row, b, j) | self.quant(row, b, j + QK / 2) << 4) as u8;
        }
        block
    }

    /// Row `r` decoded to f32 into `out` (`cols` values): each block reassembled as the file
    /// stored it and decoded by the same code as every GGUF block, so the values are the file's.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let block_bytes = self.format.block_bytes();
        for (b, o) in out[..self.cols].chunks_exact_mut(QK).enumerate() {
            dequantize_blocks_into(self.format.ggml(), &self.file_block(r, b)[..block_bytes], o);
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        2 * (self.scales.len() + self.minimums.len()) + self.quants.len()
    }
}

/// Which integer dot-product implementation runs (tests run every one the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantKernel {
    Scalar,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, a row group as two halves of 8 lanes.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd`, a row group per 512-bit vector.
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

/// Activation rows quantized to 8-bit blocks, kept as separate arrays so that the SIMD loops
/// load contiguous bytes.
#[derive(Debug, Clone, Default)]
pub struct Q8Activations {
    /// Blocks per row.
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
        let blocks = cols / QK;
        let mut out = Q8Activations { blocks, qs: vec![0; rows * cols], scales: vec![0.0; rows * blocks], scaled_sums: vec![0.0; rows * blocks] };
        for (b, chunk) in x[..rows * cols].chunks_exact(QK).enumerate() {
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
        Q8Row { qs: &self.qs[r * b * QK..(r + 1) * b * QK], scales: &self.scales[r * b..(r + 1) * b], scaled_sums: &self.scaled_sums[r * b..(r + 1) * b] }
    }
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub scaled_sums: &'a [f32],
}

/// Activation rows the prefill path hands the kernels at once (each unpacked weight vector then
/// meets four rows).
pub const ROWS_AT_ONCE: usize = 4;

/// `out[t][i] = Σ_k w[groups.start·16 + i, k] · x_t[k]` for the rows of the row groups
/// `groups` (padding rows excluded: `out[t]` holds exactly the real rows) and each of the `T`
/// activation rows.
pub fn dot_groups<const T: usize>(kernel: QuantKernel, weights: &BlockMatrix, groups: std::ops::Range<usize>, x: [Q8Row<'_>; T], out: &mut [&mut [f32]; T]) {
    let blocks = weights.blocks;
    let real_rows = (groups.end * ROW_GROUP).min(weights.rows).saturating_sub(groups.start * ROW_GROUP);
    assert!(
        groups.start <= groups.end
            && groups.end <= weights.groups()
            && x.iter().all(|r| r.scales.len() == blocks && r.qs.len() == blocks * QK && r.scaled_sums.len() == blocks)
            && out.iter().all(|o| o.len() == real_rows),
        "quantized dot operands disagree in length"
    );
    for g in groups.clone() {
        let lanes: [[f32; ROW_GROUP]; T] = match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: kernels other than Scalar are only chosen when their features were
            // detected (QuantKernel::for_level / all_supported); `g` is a group of `weights` and
            // every activation row holds `weights.blocks` blocks (checked above).
            QuantKernel::Vnni => unsafe { x86::group_vnni(weights, g, &x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            QuantKernel::Avx2 => unsafe { x86::group_avx2(weights, g, &x) },
            _ => std::array::from_fn(|t| scalar::group(weights, g, x[t])),
        };
        let first = (g - groups.start) * ROW_GROUP;
        let count = ROW_GROUP.min(real_rows - first);
        for (o, lane) in out.iter_mut().zip(&lanes) {
            o[first..first + count].copy_from_slice(&lane[..count]);
        }
    }
}

pub mod scalar {
    //! The reference: integer sums per block of the stored values, scaled in f32.
    use super::*;

    /// The 16 rows of group `g` (padding rows give 0).
    pub fn group(w: &BlockMatrix, g: usize, x: Q8Row<'_>) -> [f32; ROW_GROUP] {
        std::array::from_fn(|lane| {
            let row = g * ROW_GROUP + lane;
            if row >= w.rows {
                return 0.0;
            }
            let mut total = 0.0f32;
            for b in 0..w.blocks {
                let xq = &x.qs[b * QK..(b + 1) * QK];
                let sum: i32 = xq.iter().enumerate().map(|(e, &v)| w.quant(row, b, e) * v as i32).sum();
                let d = w.scale(row, b);
                total += d * x.scales[b] * sum as f32
                    + match w.format {
                        BlockFormat::Q8_0 => 0.0,
                        BlockFormat::Q4_0 => -8.0 * d * x.scaled_sums[b],
                        BlockFormat::Q4_1 => w.minimum(row, b) * x.scaled_sums[b],
                    };
            }
            total
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels on the packed layout: one row group per call, every activation row.
    use std::arch::x86_64::*;

    use super::{BlockFormat, BlockMatrix, Q8Row, QK, ROW_GROUP};

    /// Safety: AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be present; `g` is a row group of
    /// `w`, and every `x[t]` holds `w.blocks` blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn group_vnni<const T: usize>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T]) -> [[f32; ROW_GROUP]; T] {
        let format = w.format;
        let unit_bytes = format.group_block_bytes();
        let mut sums = [_mm512_setzero_ps(); T];
        let mut offsets = [_mm512_setzero_ps(); T];
        // `$load(k)` gives weight vector k (elements 4k..4k+4 of the 16 rows, unsigned bytes).
        macro_rules! blocks {
            (|$unit:ident| $vectors:expr) => {{
                for b in 0..w.blocks {
                    let unit = g * w.blocks + b;
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(w.scales.as_ptr().add(unit * ROW_GROUP) as *const __m256i));
                    let offset_scale = if format == BlockFormat::Q4_1 {
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.minimums.as_ptr().add(unit * ROW_GROUP) as *const __m256i))
                    } else {
                        d
                    };
                    let $unit = w.quants.as_ptr().add(unit * unit_bytes);
                    let vectors: [__m512i; 8] = $vectors;
                    for t in 0..T {
                        // Four activation bytes at a time, broadcast to every row's lane.
                        let xp = x[t].qs.as_ptr().add(b * QK) as *const i32;
                        // Two chains of four keep the vpdpbusd latency off the critical path.
                        let mut even = _mm512_setzero_si512();
                        let mut odd = _mm512_setzero_si512();
                        for k in (0..8).step_by(2) {
                            even = _mm512_dpbusd_epi32(even, vectors[k], _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(k))));
                            odd = _mm512_dpbusd_epi32(odd, vectors[k + 1], _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(k + 1))));
                        }
                        let products = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                        sums[t] = _mm512_fmadd_ps(products, _mm512_mul_ps(d, _mm512_set1_ps(*x[t].scales.get_unchecked(b))), sums[t]);
                        offsets[t] = _mm512_fmadd_ps(offset_scale, _mm512_set1_ps(*x[t].scaled_sums.get_unchecked(b)), offsets[t]);
                    }
                }
            }};
        }
        match format {
            BlockFormat::Q8_0 => blocks!(|unit| std::array::from_fn(|k| _mm512_loadu_si512(unit.add(k * 64) as *const __m512i))),
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => blocks!(|unit| {
                let low = _mm512_set1_epi8(0x0F);
                let raw: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(unit.add(j * 64) as *const __m512i));
                // Low nibbles are elements 4j.., high nibbles 16 + 4j.. (vector j + 4).
                std::array::from_fn(|k| if k < 4 { _mm512_and_si512(raw[k], low) } else { _mm512_and_si512(_mm512_srli_epi16::<4>(raw[k - 4]), low) })
            }),
        }
        let factor = _mm512_set1_ps(format.offset_factor());
        let mut out = [[0.0f32; ROW_GROUP]; T];
        for t in 0..T {
            _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_fmadd_ps(offsets[t], factor, sums[t]));
        }
        out
    }

    /// Safety: AVX2, FMA and F16C must be present; `g` is a row group of `w`, and every `x[t]`
    /// holds `w.blocks` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2<const T: usize>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T]) -> [[f32; ROW_GROUP]; T] {
        let format = w.format;
        let unit_bytes = format.group_block_bytes();
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let mut out = [[0.0f32; ROW_GROUP]; T];
        // The group as two halves of 8 rows (32 bytes of every 64-byte vector).
        for half in 0..2 {
            let mut sums = [_mm256_setzero_ps(); T];
            let mut offsets = [_mm256_setzero_ps(); T];
            for b in 0..w.blocks {
                let unit = g * w.blocks + b;
                let lanes = unit * ROW_GROUP + half * 8;
                let d = _mm256_cvtph_ps(_mm_loadu_si128(w.scales.as_ptr().add(lanes) as *const __m128i));
                let offset_scale =
                    if format == BlockFormat::Q4_1 { _mm256_cvtph_ps(_mm_loadu_si128(w.minimums.as_ptr().add(lanes) as *const __m128i)) } else { d };
                let base = w.quants.as_ptr().add(unit * unit_bytes + half * 32);
                let vectors: [__m256i; 8] = match format {
                    // Back to signed weights: 255·127·2 would overflow vpmaddubsw's i16.
                    BlockFormat::Q8_0 => std::array::from_fn(|k| _mm256_xor_si256(_mm256_loadu_si256(base.add(k * 64) as *const __m256i), flip)),
                    BlockFormat::Q4_0 | BlockFormat::Q4_1 => std::array::from_fn(|k| {
                        let raw = _mm256_loadu_si256(base.add((k % 4) * 64) as *const __m256i);
                        if k < 4 {
                            _mm256_and_si256(raw, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low)
                        }
                    }),
                };
                for t in 0..T {
                    let xp = x[t].qs.as_ptr().add(b * QK) as *const i32;
                    let mut acc = _mm256_setzero_si256();
                    for (k, &v) in vectors.iter().enumerate() {
                        let xv = _mm256_set1_epi32(std::ptr::read_unaligned(xp.add(k)));
                        let pairs = if format == BlockFormat::Q8_0 {
                            // |w| · (x with w's sign): the unsigned × signed form vpmaddubsw takes.
                            _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v))
                        } else {
                            _mm256_maddubs_epi16(v, xv)
                        };
                        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
                    }
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x[t].scales.get_unchecked(b)));
                    sums[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), scale, sums[t]);
                    offsets[t] = _mm256_fmadd_ps(offset_scale, _mm256_set1_ps(*x[t].scaled_sums.get_unchecked(b)), offsets[t]);
                }
            }
            // Q8_0 was turned back into signed weights above: nothing to remove.
            let factor = _mm256_set1_ps(if format == BlockFormat::Q8_0 { 0.0 } else { format.offset_factor() });
            for t in 0..T {
                _mm256_storeu_ps(out[t].as_mut_ptr().add(half * 8), _mm256_fmadd_ps(offsets[t], factor, sums[t]));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{dequantize, quantize};
    use rand::{Rng, SeedableRng};

    const FORMATS: [BlockFormat; 3] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1];

    /// Σ w_i x_i for row `r` of `weights` and one activation row of the same width.
    fn dot(kernel: QuantKernel, weights: &BlockMatrix, r: usize, x: Q8Row<'_>) -> f32 {
        let group = r / ROW_GROUP;
        let real = (weights.rows - group * ROW_GROUP).min(ROW_GROUP);
        let mut lanes = [0.0f32; ROW_GROUP];
        dot_groups(kernel, weights, group..group + 1, [x], &mut [&mut lanes[..real]]);
        lanes[r % ROW_GROUP]
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random_bool(0.05) { 8.0 } else { 1.0 }).collect()
    }

    #[test]
    fn packing_keeps_the_file_values_exactly() {
        // 3 and 21 rows: a partial group; 32: two whole groups.
        for &(rows, blocks) in &[(3usize, 1usize), (21, 3), (32, 18)] {
            let cols = blocks * QK;
            let values = random(rows * cols, blocks as u64);
            for format in FORMATS {
                let bytes = quantize(format.ggml(), &values).unwrap();
                let packed = BlockMatrix::pack(format, rows, cols, &bytes);
                let expected = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
                let mut row = vec![f32::NAN; cols];
                for r in 0..rows {
                    packed.row_to_f32(r, &mut row);
                    assert_eq!(row, expected[r * cols..(r + 1) * cols], "{format:?} {rows}x{blocks} blocks, row {r}");
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_scalar_reference_and_the_float_product() {
        for &(rows, blocks) in &[(1usize, 1usize), (5, 2), (16, 3), (21, 17), (37, 18)] {
            let cols = blocks * QK;
            let w = random(rows * cols, blocks as u64);
            let x: Vec<f32> = (0..ROWS_AT_ONCE).flat_map(|t| random(cols, 100 + (blocks * 7 + t) as u64)).collect();
            let mut x = x;
            x[5] = 0.0;
            if blocks > 1 {
                x[QK..2 * QK].fill(0.0); // an all-zero block
            }
            let activations = Q8Activations::quantize(&x, ROWS_AT_ONCE, cols);
            let groups = rows.div_ceil(ROW_GROUP);
            for format in FORMATS {
                let bytes = quantize(format.ggml(), &w).unwrap();
                let packed = BlockMatrix::pack(format, rows, cols, &bytes);
                let dequantized = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
                let x_rows: [Q8Row; ROWS_AT_ONCE] = std::array::from_fn(|t| activations.row(t));
                for kernel in QuantKernel::all_supported() {
                    // Four rows at once, and one row at a time, over every group.
                    let mut four = vec![vec![f32::NAN; rows]; ROWS_AT_ONCE];
                    {
                        let mut outs: [&mut [f32]; ROWS_AT_ONCE] = {
                            let mut it = four.iter_mut();
                            std::array::from_fn(|_| it.next().unwrap().as_mut_slice())
                        };
                        dot_groups(kernel, &packed, 0..groups, x_rows, &mut outs);
                    }
                    for (t, four_row) in four.iter().enumerate() {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let mut one = vec![f32::NAN; rows];
                        dot_groups(kernel, &packed, 0..groups, [activations.row(t)], &mut [&mut one[..]]);
                        for r in 0..rows {
                            let weights_row = &dequantized[r * cols..(r + 1) * cols];
                            let exact: f64 = weights_row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let magnitude: f64 = weights_row.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                            let reference = scalar::group(&packed, r / ROW_GROUP, activations.row(t))[r % ROW_GROUP];
                            // The activation's 8-bit rounding bounds the gap to the float product.
                            assert!((reference as f64 - exact).abs() <= 0.02 * magnitude + 1e-4, "{format:?} {rows}x{blocks}: {reference} vs {exact}");
                            // Only f32 rounding differs (order of sums; Q8_0's +128 removed afterwards).
                            let tolerance = 1e-5 * magnitude as f32 + 1e-6;
                            for (name, got) in [("one row", one[r]), ("four rows", four_row[r])] {
                                assert!((got - reference).abs() <= tolerance, "{format:?} {kernel} {name} {rows}x{blocks} row {r}: {got} vs {reference}");
                            }
                            assert_eq!(dot(kernel, &packed, r, activations.row(t)), one[r], "{format:?} {kernel}: dot of one row");
                        }
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
        let reference = scalar::group(&packed, 0, activations.row(0))[0];
        let exact: f32 = (0..cols).map(|i| 0.5 * if i % 2 == 0 { -128.0 } else { 127.0 } * x[i]).sum();
        assert!((reference - exact).abs() < 1e-3, "{reference} vs {exact}");
        for kernel in QuantKernel::all_supported() {
            assert!((dot(kernel, &packed, 0, activations.row(0)) - reference).abs() < 1e-3, "{kernel}");
        }
    }

    #[test]
    fn activation_rows_are_quantized_per_block() {
        let x = random(3 * 96, 9);
        let a = Q8Activations::quantize(&x, 3, 96);
        assert_eq!(a.blocks, 3);
        for r in 0..3 {
            let row = a.row(r);
            for b in 0..3 {
                let chunk = &x[r * 96 + b * QK..r * 96 + (b + 1) * QK];
                let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(row.scales[b], amax / 127.0);
                let q = &row.qs[b * QK..(b + 1) * QK];
                assert!(q.iter().any(|&v| v.unsigned_abs() == 127));
                for (&v, &xv) in q.iter().zip(chunk) {
                    assert!((v as f32 - xv / row.scales[b]).abs() <= 0.5 + 1e-4, "rounded to nearest");
                }
                let sum: i32 = q.iter().map(|&v| v as i32).sum();
                assert_eq!(row.scaled_sums[b], row.scales[b] * sum as f32);
            }
        }
    }
}
