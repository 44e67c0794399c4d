//! ggml tensor types: their block layouts, dequantizers to f32 and quantizers from f32 (ggml's
//! reference rounding for the 32-element types; a direct, non-searching one for the K types).
//!
//! The block structs mirror ggml's C structs byte for byte (little-endian, packed without
//! padding), so code that computes directly on quantized weights can reinterpret tensor bytes as
//! slices of blocks with [`blocks_from_bytes`]. Dequantization reproduces ggml (and gguf-py's
//! `gguf.quants.dequantize`) bit for bit: f16 scales are widened to f32 and every product and sum
//! is done once in f32, without fused multiply-add.

use std::borrow::Cow;

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

use crate::error::{Error, Result};

/// Elements in one block of the 32-element quantized types (Q8_0, Q4_0, Q4_1).
pub const QK: usize = 32;

/// Q8_0: one f16 scale `d` and 32 signed bytes; value = q * d.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quantized values, element order.
    pub qs: [i8; QK],
}

/// Q4_0: one f16 scale `d` and 16 bytes of nibbles; the low nibble of byte j is element j, the
/// high nibble element j + 16; value = (q - 8) * d.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Nibbles: low = element j, high = element j + 16.
    pub qs: [u8; QK / 2],
}

/// Q4_1: f16 scale `d`, f16 minimum `m` and 16 bytes of nibbles laid out as in Q4_0;
/// value = q * d + m.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Nibbles: low = element j, high = element j + 16.
    pub qs: [u8; QK / 2],
}

/// Elements in one super-block of the K types (Q4_K, Q6_K).
pub const QK_K: usize = 256;
/// Bytes of one Q4_K super-block: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and minimums,
/// 128 bytes of nibbles.
pub const BLOCK_Q4_K_BYTES: usize = 144;
/// Bytes of one Q6_K super-block: 128 bytes of low nibbles `ql`, 64 bytes of high bit pairs
/// `qh`, 16 signed 8-bit scales, f16 `d`.
pub const BLOCK_Q6_K_BYTES: usize = 210;

/// Bytes of one Q5_0 block: f16 `d`, 4 bytes of high bits (bit `j` of the little-endian u32
/// is element `j`'s), 16 bytes of low nibbles laid out as in Q4_0; value = (q − 16)·d.
pub const BLOCK_Q5_0_BYTES: usize = 22;
/// Bytes of one [`BlockQ8_0`].
pub const BLOCK_Q8_0_BYTES: usize = 34;
/// Bytes of one [`BlockQ4_0`].
pub const BLOCK_Q4_0_BYTES: usize = 18;
/// Bytes of one [`BlockQ4_1`].
pub const BLOCK_Q4_1_BYTES: usize = 20;

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == BLOCK_Q8_0_BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == BLOCK_Q4_0_BYTES);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == BLOCK_Q4_1_BYTES);

/// A ggml tensor type, by the numeric id used in GGUF files.
///
/// All types ggml defines are listed so that a file holding, say, Q4_K tensors can still be
/// opened and described; [`GgmlType::can_dequantize`] says which ones engram can decode.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, id, name, elements per block, bytes per block) for every known ggml type.
const TYPE_TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", QK, BLOCK_Q4_0_BYTES),
    (GgmlType::Q4_1, 3, "Q4_1", QK, BLOCK_Q4_1_BYTES),
    (GgmlType::Q5_0, 6, "Q5_0", QK, BLOCK_Q5_0_BYTES),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", QK, BLOCK_Q8_0_BYTES),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
];

impl GgmlType {
    fn row(self) -> &'static (GgmlType, u32, &'static str, usize, usize) {
        // Every variant has exactly one row; the fallback is never taken.
        TYPE_TABLE.iter().find(|r| r.0 == self).unwrap_or(&TYPE_TABLE[0])
    }

    /// The type with this GGUF/ggml id, or `None` for ids ggml does not define.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPE_TABLE.iter().find(|r| r.1 == id).map(|r| r.0)
    }

    /// The type called `name` ("Q4_1", "f16", ...; case-insensitive).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPE_TABLE.iter().find(|r| r.2.eq_ignore_ascii_case(name)).map(|r| r.0)
    }

    /// Numeric id as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self.row().1
    }

    /// ggml's name of the type ("Q4_1").
    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block (1 for the plain float/int types).
    pub fn block_size(self) -> usize {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }

    /// Whether [`dequantize`] and the writer support this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q4_K
                | GgmlType::Q6_K
        )
    }

    /// Bytes needed for `n_elements` elements, or `None` if `n_elements` is not a multiple of the
    /// block size or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reinterprets `bytes` as blocks, borrowing when the bytes are suitably aligned and copying
/// otherwise. Fails if the length is not a whole number of blocks.
pub fn blocks_from_bytes<B: Pod>(bytes: &[u8]) -> Result<Cow<'_, [B]>> {
    let size = std::mem::size_of::<B>();
    if size == 0 || !bytes.len().is_multiple_of(size) {
        return Err(Error::Shape(format!("{} bytes is not a whole number of {size}-byte blocks", bytes.len())));
    }
    match bytemuck::try_cast_slice::<u8, B>(bytes) {
        Ok(blocks) => Ok(Cow::Borrowed(blocks)),
        Err(_) => Ok(Cow::Owned(bytes.chunks_exact(size).map(bytemuck::pod_read_unaligned::<B>).collect())),
    }
}

/// The little-endian f16 at byte `at`, widened to f32.
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Decodes `bytes` of type `ty` into `n_elements` f32 values.
///
/// Errors with [`Error::Unsupported`] for types engram cannot decode and [`Error::Shape`] when the
/// byte length does not match `n_elements`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !ty.can_dequantize() {
        return Err(Error::Unsupported(format!("dequantizing ggml type {} (id {})", ty.name(), ty.id())));
    }
    let expected = ty.bytes_for(n_elements as u64);
    if expected != Some(bytes.len() as u64) {
        return Err(Error::Shape(format!(
            "{} {} elements need {} bytes, got {}",
            n_elements,
            ty.name(),
            expected.map_or_else(|| "a whole number of blocks and".to_string(), |e| e.to_string()),
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(n_elements);
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => {
            out.extend(bytes.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
        }
        GgmlType::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
        }
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q4_K | GgmlType::Q6_K => {
            out.resize(n_elements, 0.0);
            dequantize_blocks_into(ty, bytes, &mut out);
        }
        _ => unreachable!("can_dequantize() checked above"),
    }
    Ok(out)
}

fn check_whole_blocks(what: &str, len: usize, block: usize) -> Result<()> {
    if !len.is_multiple_of(block) {
        return Err(Error::Shape(format!("{what}: {len} values is not a multiple of the block size {block}")));
    }
    Ok(())
}

/// Quantizes to Q8_0 with ggml's reference rounding (`quantize_row_q8_0_ref`).
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<BlockQ8_0>> {
    check_whole_blocks("Q8_0", values.len(), QK)?;
    Ok(values
        .chunks_exact(QK)
        .map(|x| {
            let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK];
            for (q, v) in qs.iter_mut().zip(x) {
                // `round` rounds half away from zero, like C's roundf.
                *q = (v * id).round() as i8;
            }
            BlockQ8_0 { d: f16::from_f32(d), qs }
        })
        .collect())
}

/// The value of largest magnitude, sign kept (the first of equal magnitudes, as ggml's loop).
fn signed_extreme(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Quantizes to Q4_0 with ggml's reference rounding (`quantize_row_q4_0_ref`).
pub fn quantize_q4_0(values: &[f32]) -> Result<Vec<BlockQ4_0>> {
    check_whole_blocks("Q4_0", values.len(), QK)?;
    Ok(values
        .chunks_exact(QK)
        .map(|x| {
            let d = signed_extreme(x) / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0u8; QK / 2];
            for (j, q) in qs.iter_mut().enumerate() {
                // C truncates the float to int8 then clamps to 15.
                let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
                let hi = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
                *q = lo | (hi << 4);
            }
            BlockQ4_0 { d: f16::from_f32(d), qs }
        })
        .collect())
}

/// Quantizes to Q4_1 with ggml's reference rounding (`quantize_row_q4_1_ref`).
pub fn quantize_q4_1(values: &[f32]) -> Result<Vec<BlockQ4_1>> {
    check_whole_blocks("Q4_1", values.len(), QK)?;
    Ok(values
        .chunks_exact(QK)
        .map(|x| {
            let min = x.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a });
            let max = x.iter().fold(-f32::MAX, |a, &v| if v > a { v } else { a });
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0u8; QK / 2];
            for (j, q) in qs.iter_mut().enumerate() {
                let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
                let hi = (((x[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
                *q = lo | (hi << 4);
            }
            BlockQ4_1 { d: f16::from_f32(d), m: f16::from_f32(min), qs }
        })
        .collect())
}

/// Quantizes to Q5_0 with ggml's reference rounding (`quantize_row_q5_0_ref`).
pub fn quantize_q5_0(values: &[f32]) -> Result<Vec<u8>> {
    check_whole_blocks("Q5_0", values.len(), QK)?;
    let mut out = Vec::with_capacity(values.len() / QK * BLOCK_Q5_0_BYTES);
    for x in values.chunks_exact(QK) {
        let d = signed_extreme(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut high = 0u32;
        let mut qs = [0u8; QK / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            // C truncates the float to int8 then clamps to 31.
            let lo = ((x[j] * id + 16.5) as i8).min(31) as u32;
            let hi = ((x[j + QK / 2] * id + 16.5) as i8).min(31) as u32;
            *q = ((lo & 0x0F) | ((hi & 0x0F) << 4)) as u8;
            high |= ((lo & 0x10) >> 4) << j;
            high |= ((hi & 0x10) >> 4) << (j + QK / 2);
        }
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend_from_slice(&high.to_le_bytes());
        out.extend_from_slice(&qs);
    }
    Ok(out)
}

/// The 6-bit scale and minimum of sub-block `sub` (0..8) of a Q4_K super-block, from its 12
/// packed bytes (ggml's `get_scale_min_k4`): sub-blocks 0..4 in the low 6 bits of bytes 0..4
/// and 4..8, sub-blocks 4..8 as nibbles of bytes 8..12 plus the top 2 bits of bytes 0..8.
pub fn q4_k_scale_min(scales: &[u8], sub: usize) -> (u8, u8) {
    if sub < 4 {
        (scales[sub] & 63, scales[sub + 4] & 63)
    } else {
        ((scales[sub + 4] & 0x0F) | ((scales[sub - 4] >> 6) << 4), (scales[sub + 4] >> 4) | ((scales[sub] >> 6) << 4))
    }
}

/// Where element `e` (0..256) of a Q6_K super-block keeps its bits: (index into `ql`, nibble
/// shift, index into `qh`, bit-pair shift). Each half of 128 elements uses 64 bytes of `ql` and
/// 32 of `qh`; its four runs of 32 take the low nibbles of `ql[0..32]`, of `ql[32..64]`, then
/// the high nibbles, and bit pairs 0, 1, 2, 3 of `qh`.
fn q6_k_position(e: usize) -> (usize, u32, usize, u32) {
    let (half, run, l) = (e / 128, (e % 128) / 32, e % 32);
    (half * 64 + (run % 2) * 32 + l, 4 * (run / 2) as u32, half * 32 + l, 2 * run as u32)
}

/// The unsigned 6-bit quant (0..64; the value is `q − 32`) of element `e` of a Q6_K super-block.
pub fn q6_k_quant(block: &[u8], e: usize) -> u8 {
    let (ql, shift, qh, pair) = q6_k_position(e);
    ((block[ql] >> shift) & 0x0F) | (((block[128 + qh] >> pair) & 3) << 4)
}

/// Nearest integer to `v` clamped to `lo..=hi` (NaN gives `lo`).
fn clamped_round(v: f32, lo: i32, hi: i32) -> i32 {
    (v.round() as i32).clamp(lo, hi)
}

/// Quantizes to Q4_K. Per sub-block of 32 the range `[min(0, lowest), highest]` is split in
/// 15 steps, then the eight step sizes and minimums are themselves quantized to 6 bits against
/// the super-block's largest (f16 `d`, `dmin`), and each value is rounded with the step it will
/// be decoded with. Not ggml's searching quantizer (`make_qkx2_quants`): its rounding differs,
/// the format is the same.
pub fn quantize_q4_k(values: &[f32]) -> Result<Vec<u8>> {
    check_whole_blocks("Q4_K", values.len(), QK_K)?;
    let mut out = Vec::with_capacity(values.len() / QK_K * BLOCK_Q4_K_BYTES);
    for x in values.chunks_exact(QK_K) {
        let mut steps = [0.0f32; 8];
        let mut minimums = [0.0f32; 8];
        for (sub, chunk) in x.chunks_exact(QK).enumerate() {
            let low = chunk.iter().fold(0.0f32, |a, &v| a.min(v));
            let high = chunk.iter().fold(f32::MIN, |a, &v| a.max(v));
            steps[sub] = (high - low) / 15.0;
            minimums[sub] = -low;
        }
        let d = f16::from_f32(steps.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
        let dmin = f16::from_f32(minimums.iter().fold(0.0f32, |a, &v| a.max(v)) / 63.0);
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let six_bits = |v: f32, unit: f32| if unit > 0.0 { clamped_round(v / unit, 0, 63) as u8 } else { 0 };
        let sc: [u8; 8] = std::array::from_fn(|j| six_bits(steps[j], df));
        let m: [u8; 8] = std::array::from_fn(|j| six_bits(minimums[j], dminf));
        let mut block = [0u8; BLOCK_Q4_K_BYTES];
        block[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
        block[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
        let scales = &mut block[4..16];
        for j in 0..8 {
            if j < 4 {
                scales[j] = sc[j];
                scales[j + 4] = m[j];
            } else {
                scales[j + 4] = (sc[j] & 0x0F) | ((m[j] & 0x0F) << 4);
                scales[j - 4] |= (sc[j] >> 4) << 6;
                scales[j] |= (m[j] >> 4) << 6;
            }
        }
        for (sub, chunk) in x.chunks_exact(QK).enumerate() {
            let (step, offset) = (df * sc[sub] as f32, dminf * m[sub] as f32);
            let inverse = if step > 0.0 { 1.0 / step } else { 0.0 };
            for (l, &v) in chunk.iter().enumerate() {
                let q = clamped_round((v + offset) * inverse, 0, 15) as u8;
                block[16 + (sub / 2) * 32 + l] |= q << (4 * (sub % 2));
            }
        }
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// Quantizes to Q6_K. Per sub-block of 16 the value of largest magnitude maps to −32 (the
/// fuller side of −32..31); the sixteen scales are quantized to signed 8 bits against the
/// largest (f16 `d`), and each value is rounded with the scale it will be decoded with. Not
/// ggml's searching quantizer (`make_qx_quants`): its rounding differs, the format is the same.
pub fn quantize_q6_k(values: &[f32]) -> Result<Vec<u8>> {
    check_whole_blocks("Q6_K", values.len(), QK_K)?;
    let mut out = Vec::with_capacity(values.len() / QK_K * BLOCK_Q6_K_BYTES);
    for x in values.chunks_exact(QK_K) {
        let mut scales = [0.0f32; 16];
        for (sub, chunk) in x.chunks_exact(16).enumerate() {
            scales[sub] = signed_extreme(chunk) / -32.0;
        }
        let largest = signed_extreme(&scales);
        let d = f16::from_f32(largest / -128.0);
        let df = d.to_f32();
        let sc: [i8; 16] = std::array::from_fn(|j| if df != 0.0 { clamped_round(scales[j] / df, -128, 127) as i8 } else { 0 });
        let mut block = [0u8; BLOCK_Q6_K_BYTES];
        for (e, &v) in x.iter().enumerate() {
            let step = df * sc[e / 16] as f32;
            let q = if step != 0.0 { clamped_round(v / step, -32, 31) } else { 0 };
            let q = (q + 32) as u8;
            let (ql, shift, qh, pair) = q6_k_position(e);
            block[ql] |= (q & 0x0F) << shift;
            block[128 + qh] |= (q >> 4) << pair;
        }
        for (s, &v) in block[192..208].iter_mut().zip(&sc) {
            *s = v as u8;
        }
        block[208..210].copy_from_slice(&d.to_bits().to_le_bytes());
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// Encodes f32 values as the bytes of a tensor of type `ty` (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
/// Q5_0, Q4_K, Q6_K),
/// rounding to nearest-even for the 16-bit float types.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        GgmlType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        GgmlType::Q8_0 => bytemuck::cast_slice(&quantize_q8_0(values)?).to_vec(),
        GgmlType::Q4_0 => bytemuck::cast_slice(&quantize_q4_0(values)?).to_vec(),
        GgmlType::Q4_1 => bytemuck::cast_slice(&quantize_q4_1(values)?).to_vec(),
        GgmlType::Q5_0 => quantize_q5_0(values)?,
        GgmlType::Q4_K => quantize_q4_k(values)?,
        GgmlType::Q6_K => quantize_q6_k(values)?,
        other => {
            return Err(Error::Unsupported(format!("quantizing to ggml type {} (id {})", other.name(), other.id())))
        }
    })
}

/// Index of the first element of the first block whose scale or minimum is not finite (for the
/// block-quantized types; `None` for other types, whose values are checked after decoding).
pub fn first_non_finite(ty: GgmlType, bytes: &[u8]) -> Option<usize> {
    let (block_bytes, halves) = match ty {
        GgmlType::Q8_0 => (BLOCK_Q8_0_BYTES, 1),
        GgmlType::Q4_0 => (BLOCK_Q4_0_BYTES, 1),
        GgmlType::Q4_1 => (BLOCK_Q4_1_BYTES, 2),
        GgmlType::Q5_0 => (BLOCK_Q5_0_BYTES, 1),
        // d and dmin lead a Q4_K super-block; Q6_K's d closes it.
        GgmlType::Q4_K => {
            return bytes.chunks_exact(BLOCK_Q4_K_BYTES).position(|b| !(f16_at(b, 0).is_finite() && f16_at(b, 2).is_finite())).map(|s| s * QK_K)
        }
        GgmlType::Q6_K => return bytes.chunks_exact(BLOCK_Q6_K_BYTES).position(|b| !f16_at(b, BLOCK_Q6_K_BYTES - 2).is_finite()).map(|s| s * QK_K),
        _ => return None,
    };
    bytes
        .chunks_exact(block_bytes)
        .position(|b| (0..halves).any(|h| !f16_at(b, 2 * h).is_finite()))
        .map(|block| block * QK)
}

/// Decodes whole Q8_0/Q4_0/Q4_1/Q5_0 blocks or Q4_K/Q6_K super-blocks into `out` (one value per
/// element, `out.len()` a whole number of blocks) without allocating; the same arithmetic as
/// [`dequantize`].
pub fn dequantize_blocks_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::Q8_0 => {
            for (b, o) in bytes.chunks_exact(BLOCK_Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..]) {
                    *v = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in bytes.chunks_exact(BLOCK_Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..]) {
                    *l = ((q & 0x0F) as i32 - 8) as f32 * d;
                    *h = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in bytes.chunks_exact(BLOCK_Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..]) {
                    *l = (q & 0x0F) as f32 * d + m;
                    *h = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, o) in bytes.chunks_exact(BLOCK_Q5_0_BYTES).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for (j, ((l, h), &q)) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[6..]).enumerate() {
                    let bit = |e: usize| (((high >> e) & 1) << 4) as i32;
                    *l = (((q & 0x0F) as i32 | bit(j)) - 16) as f32 * d;
                    *h = (((q >> 4) as i32 | bit(j + QK / 2)) - 16) as f32 * d;
                }
            }
        }
        GgmlType::Q4_K => {
            for (b, o) in bytes.chunks_exact(BLOCK_Q4_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..]);
                for (sub, values) in o.chunks_exact_mut(QK).enumerate() {
                    let (sc, m) = q4_k_scale_min(scales, sub);
                    // ggml: y = (d·sc)·q − dmin·m, each product rounded to f32.
                    let (scale, offset) = (d * sc as f32, dmin * m as f32);
                    // Sub-blocks 2i and 2i+1 share bytes 32i..32i+32: low and high nibbles.
                    let bytes = &qs[(sub / 2) * 32..(sub / 2) * 32 + 32];
                    let shift = 4 * (sub % 2);
                    for (v, &q) in values.iter_mut().zip(bytes) {
                        *v = scale * ((q >> shift) & 0x0F) as f32 - offset;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            for (b, o) in bytes.chunks_exact(BLOCK_Q6_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(b, BLOCK_Q6_K_BYTES - 2);
                for (e, v) in o.iter_mut().enumerate() {
                    let sc = b[192 + e / 16] as i8;
                    // ggml: y = (d·sc)·(q − 32).
                    *v = d * sc as f32 * (q6_k_quant(b, e) as i32 - 32) as f32;
                }
            }
        }
        other => panic!("dequantize_blocks_into: {other} is not a block-quantized type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn block_dequantizer_matches_the_allocating_one() {
        let values = random_values(5 * QK, 3);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0] {
            let bytes = quantize(ty, &values).unwrap();
            let mut out = vec![f32::NAN; values.len()];
            dequantize_blocks_into(ty, &bytes, &mut out);
            assert_eq!(out, dequantize(ty, &bytes, values.len()).unwrap(), "{ty}");
            assert_eq!(first_non_finite(ty, &bytes), None);
        }
        let mut bytes = quantize(GgmlType::Q4_1, &values).unwrap();
        bytes[2 * BLOCK_Q4_1_BYTES + 2..2 * BLOCK_Q4_1_BYTES + 4].copy_from_slice(&f16::NAN.to_bits().to_le_bytes());
        assert_eq!(first_non_finite(GgmlType::Q4_1, &bytes), Some(2 * QK));
    }

    fn random_values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Offset away from zero so that no block is all zeros, with a spread of magnitudes.
        (0..n).map(|i| rng.random_range(-1.0f32..1.0) * (1.0 + (i % 7) as f32) + 0.01).collect()
    }

    #[test]
    fn type_table_is_consistent() {
        for &(ty, id, name, bs, ts) in TYPE_TABLE {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(GgmlType::from_name(name), Some(ty));
            assert_eq!((ty.id(), ty.name(), ty.block_size(), ty.type_size()), (id, name, bs, ts));
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(1000), None);
    }

    #[test]
    fn float_types_round_trip() {
        let v = random_values(37, 1);
        assert_eq!(dequantize(GgmlType::F32, &quantize(GgmlType::F32, &v).unwrap(), 37).unwrap(), v);
        let h = dequantize(GgmlType::F16, &quantize(GgmlType::F16, &v).unwrap(), 37).unwrap();
        let b = dequantize(GgmlType::BF16, &quantize(GgmlType::BF16, &v).unwrap(), 37).unwrap();
        for i in 0..37 {
            assert_eq!(h[i], f16::from_f32(v[i]).to_f32());
            assert_eq!(b[i], bf16::from_f32(v[i]).to_f32());
        }
    }

    /// Error bound of each quantizer: half a step (Q8_0) or one step (4-bit, which clamps) of the
    /// block's scale, plus f16 rounding of the scale.
    #[test]
    fn quantizers_round_trip_within_a_step() {
        for (ty, seed) in [(GgmlType::Q8_0, 2), (GgmlType::Q4_0, 3), (GgmlType::Q4_1, 4), (GgmlType::Q5_0, 7)] {
            for blocks in [1usize, 3, 17] {
                let v = random_values(blocks * QK, seed + blocks as u64);
                let bytes = quantize(ty, &v).unwrap();
                assert_eq!(bytes.len(), blocks * ty.type_size());
                let back = dequantize(ty, &bytes, v.len()).unwrap();
                for (block, (x, y)) in v.chunks(QK).zip(back.chunks(QK)).enumerate() {
                    let amax = x.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                    let range = x.iter().cloned().fold(f32::MIN, f32::max) - x.iter().cloned().fold(f32::MAX, f32::min);
                    let step = match ty {
                        GgmlType::Q8_0 => amax / 127.0 * 0.51,
                        GgmlType::Q4_0 => amax / 8.0 * 1.01,
                        GgmlType::Q5_0 => amax / 16.0 * 1.01,
                        _ => range / 15.0 * 0.51,
                    } + amax * 2e-3;
                    for (a, b) in x.iter().zip(y) {
                        assert!((a - b).abs() <= step, "{ty} block {block}: {a} vs {b} (step {step})");
                    }
                }
            }
        }
    }

    #[test]
    fn nibble_layout_matches_ggml() {
        // Element j in the low nibble of byte j, element j + 16 in the high nibble.
        let mut block = BlockQ4_1 { d: f16::from_f32(1.0), m: f16::from_f32(0.5), qs: [0; 16] };
        for j in 0..16 {
            block.qs[j] = (j as u8) | (((15 - j) as u8) << 4);
        }
        let out = dequantize(GgmlType::Q4_1, bytemuck::bytes_of(&block), 32).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], j as f32 + 0.5);
            assert_eq!(out[j + 16], (15 - j) as f32 + 0.5);
        }
        let b0 = BlockQ4_0 { d: f16::from_f32(2.0), qs: [0x9F; 16] };
        let out = dequantize(GgmlType::Q4_0, bytemuck::bytes_of(&b0), 32).unwrap();
        assert_eq!(out[0], 14.0);
        assert_eq!(out[16], 2.0);
        // Q5_0: high bit j of the u32 is element j; here elements 1 and 17 have it.
        let mut b5 = f16::from_f32(1.0).to_bits().to_le_bytes().to_vec();
        b5.extend_from_slice(&((1u32 << 1) | (1u32 << 17)).to_le_bytes());
        b5.extend_from_slice(&[0x21; 16]);
        let out = dequantize(GgmlType::Q5_0, &b5, 32).unwrap();
        assert_eq!((out[0], out[1], out[16], out[17]), (1.0 - 16.0, 17.0 - 16.0, 2.0 - 16.0, 18.0 - 16.0));
        let b8 = BlockQ8_0 { d: f16::from_f32(0.5), qs: [-3; 32] };
        assert_eq!(dequantize(GgmlType::Q8_0, bytemuck::bytes_of(&b8), 32).unwrap(), vec![-1.5; 32]);
    }

    #[test]
    fn blocks_from_bytes_handles_misalignment() {
        let v = random_values(64, 9);
        let bytes = quantize(GgmlType::Q4_1, &v).unwrap();
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&bytes);
        let a = blocks_from_bytes::<BlockQ4_1>(&bytes).unwrap();
        let b = blocks_from_bytes::<BlockQ4_1>(&shifted[1..]).unwrap();
        assert_eq!(a.as_ref(), b.as_ref());
        assert_eq!(a.len(), 2);
        assert!(matches!(blocks_from_bytes::<BlockQ4_1>(&bytes[..21]), Err(Error::Shape(_))));
    }

    #[test]
    fn wrong_lengths_and_types_are_errors() {
        assert!(matches!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32), Err(Error::Shape(_))));
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31), Err(Error::Shape(_))));
        assert!(matches!(dequantize(GgmlType::F32, &[0u8; 7], 2), Err(Error::Shape(_))));
        assert!(matches!(dequantize(GgmlType::Q5_K, &[0u8; 176], 256), Err(Error::Unsupported(_))));
        assert!(matches!(dequantize(GgmlType::Q4_K, &[0u8; 144], 32), Err(Error::Shape(_))));
        assert!(matches!(quantize(GgmlType::Q6_K, &[1.0; 288]), Err(Error::Shape(_))));
        assert!(matches!(quantize(GgmlType::Q4_1, &[1.0; 33]), Err(Error::Shape(_))));
        assert!(matches!(quantize(GgmlType::Q5_K, &[1.0; 256]), Err(Error::Unsupported(_))));
    }

    /// ggml's `dequantize_row_q4_K` loop as written there (pairs of sub-blocks per 32 bytes),
    /// an independent statement of the layout [`dequantize`] decodes.
    fn ggml_q4_k_loop(block: &[u8]) -> Vec<f32> {
        let (d, min) = (f16_at(block, 0), f16_at(block, 2));
        let (scales, mut q) = (&block[4..16], &block[16..]);
        let mut y = Vec::new();
        let mut is = 0;
        for _ in (0..QK_K).step_by(64) {
            let (sc, m) = q4_k_scale_min(scales, is);
            let (d1, m1) = (d * sc as f32, min * m as f32);
            let (sc, m) = q4_k_scale_min(scales, is + 1);
            let (d2, m2) = (d * sc as f32, min * m as f32);
            y.extend((0..32).map(|l| d1 * (q[l] & 0xF) as f32 - m1));
            y.extend((0..32).map(|l| d2 * (q[l] >> 4) as f32 - m2));
            q = &q[32..];
            is += 2;
        }
        y
    }

    /// ggml's `dequantize_row_q6_K` loop as written there (four runs of 32 per half).
    fn ggml_q6_k_loop(block: &[u8]) -> Vec<f32> {
        let d = f16_at(block, 208);
        let mut y = vec![0.0f32; QK_K];
        for (n, (ql, qh)) in [(0usize, (0usize, 128usize)), (128, (64, 160))] {
            let sc = |i: usize| block[192 + n / 16 + i] as i8 as f32;
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((block[ql + l] & 0xF) | ((block[qh + l] & 3) << 4)) as i32 - 32;
                let q2 = ((block[ql + l + 32] & 0xF) | (((block[qh + l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((block[ql + l] >> 4) | (((block[qh + l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((block[ql + l + 32] >> 4) | (((block[qh + l] >> 6) & 3) << 4)) as i32 - 32;
                y[n + l] = d * sc(is) * q1 as f32;
                y[n + l + 32] = d * sc(is + 2) * q2 as f32;
                y[n + l + 64] = d * sc(is + 4) * q3 as f32;
                y[n + l + 96] = d * sc(is + 6) * q4 as f32;
            }
        }
        y
    }

    #[test]
    fn k_dequantizers_follow_ggml_layouts() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..20 {
            let mut q4k: Vec<u8> = (0..2 * BLOCK_Q4_K_BYTES).map(|_| rng.random()).collect();
            let mut q6k: Vec<u8> = (0..2 * BLOCK_Q6_K_BYTES).map(|_| rng.random()).collect();
            // Random bytes as scales could be NaN or huge: keep d, dmin ordinary.
            for b in 0..2 {
                q4k[b * BLOCK_Q4_K_BYTES..b * BLOCK_Q4_K_BYTES + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
                q4k[b * BLOCK_Q4_K_BYTES + 2..b * BLOCK_Q4_K_BYTES + 4].copy_from_slice(&f16::from_f32(0.003).to_bits().to_le_bytes());
                q6k[b * BLOCK_Q6_K_BYTES + 208..(b + 1) * BLOCK_Q6_K_BYTES].copy_from_slice(&f16::from_f32(-0.002).to_bits().to_le_bytes());
            }
            let expected: Vec<f32> = q4k.chunks_exact(BLOCK_Q4_K_BYTES).flat_map(ggml_q4_k_loop).collect();
            assert_eq!(dequantize(GgmlType::Q4_K, &q4k, 2 * QK_K).unwrap(), expected);
            let expected: Vec<f32> = q6k.chunks_exact(BLOCK_Q6_K_BYTES).flat_map(ggml_q6_k_loop).collect();
            assert_eq!(dequantize(GgmlType::Q6_K, &q6k, 2 * QK_K).unwrap(), expected);
        }
    }

    /// The K quantizers' error stays within about one step of each sub-block (plus the
    /// quantization of the steps themselves to 6 or 8 bits against the super-block's largest).
    #[test]
    fn k_quantizers_round_trip_closely() {
        for (ty, sub, seed) in [(GgmlType::Q4_K, 32usize, 5u64), (GgmlType::Q6_K, 16, 6)] {
            let v = random_values(3 * QK_K, seed);
            let bytes = quantize(ty, &v).unwrap();
            assert_eq!(bytes.len(), 3 * ty.type_size());
            let back = dequantize(ty, &bytes, v.len()).unwrap();
            for (x, y) in v.chunks(QK_K).zip(back.chunks(QK_K)) {
                let amax = x.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                // Q4_K: 15 steps over a range up to 2·amax, sub-block steps rounded to 1/63 of
                // the largest; Q6_K: 32 steps per amax, scales to 1/128.
                let bound = match ty {
                    GgmlType::Q4_K => 2.0 * amax / 15.0 * 0.5 + 2.0 * amax / 63.0,
                    _ => amax / 32.0 * 0.5 + amax / 128.0,
                };
                let mut worst = 0.0f32;
                for (c, (a, b)) in x.chunks(sub).zip(y.chunks(sub)).enumerate() {
                    for (p, q) in a.iter().zip(b) {
                        assert!((p - q).abs() <= bound, "{ty} sub-block {c}: {p} vs {q} (bound {bound})");
                        worst = worst.max((p - q).abs());
                    }
                }
                assert!(worst > 0.0, "{ty}: lossless on random values is implausible");
            }
            // Zeros stay zeros; a constant block is representable without NaN.
            for input in [vec![0.0f32; QK_K], vec![0.5f32; QK_K], vec![-0.25f32; QK_K]] {
                let back = dequantize(ty, &quantize(ty, &input).unwrap(), QK_K).unwrap();
                for (a, b) in input.iter().zip(&back) {
                    assert!((a - b).abs() <= 0.02 * a.abs() + 1e-6, "{ty}: {a} vs {b}");
                }
            }
        }
    }
}
