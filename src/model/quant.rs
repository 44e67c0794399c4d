//! ggml tensor types: their block layouts, dequantizers to f32 and reference quantizers from f32.
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
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
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
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1
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
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => {
            out.resize(n_elements, 0.0);
            dequantize_blocks_into(ty, bytes, &mut out);
        }
        _ => unreachable!("can_dequantize() checked above"),
    }
    Ok(out)
}

fn check_whole_blocks(what: &str, len: usize) -> Result<()> {
    if !len.is_multiple_of(QK) {
        return Err(Error::Shape(format!("{what}: {len} values is not a multiple of the block size {QK}")));
    }
    Ok(())
}

/// Quantizes to Q8_0 with ggml's reference rounding (`quantize_row_q8_0_ref`).
pub fn quantize_q8_0(values: &[f32]) -> Result<Vec<BlockQ8_0>> {
    check_whole_blocks("Q8_0", values.len())?;
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

/// Quantizes to Q4_0 with ggml's reference rounding (`quantize_row_q4_0_ref`).
pub fn quantize_q4_0(values: &[f32]) -> Result<Vec<BlockQ4_0>> {
    check_whole_blocks("Q4_0", values.len())?;
    Ok(values
        .chunks_exact(QK)
        .map(|x| {
            let mut amax = 0.0f32;
            let mut max = 0.0f32;
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
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
    check_whole_blocks("Q4_1", values.len())?;
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

/// Encodes f32 values as the bytes of a tensor of type `ty` (F32, F16, BF16, Q8_0, Q4_0, Q4_1),
/// rounding to nearest-even for the 16-bit float types.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        GgmlType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
        GgmlType::Q8_0 => bytemuck::cast_slice(&quantize_q8_0(values)?).to_vec(),
        GgmlType::Q4_0 => bytemuck::cast_slice(&quantize_q4_0(values)?).to_vec(),
        GgmlType::Q4_1 => bytemuck::cast_slice(&quantize_q4_1(values)?).to_vec(),
        other => {
            return Err(Error::Unsupported(format!("quantizing to ggml type {} (id {})", other.name(), other.id())))
        }
    })
}

/// Index of the first element whose block has a non-finite scale or minimum (for Q8_0, Q4_0,
/// Q4_1 blocks; `None` for other types, whose values are checked after dequantization).
pub fn first_non_finite(ty: GgmlType, bytes: &[u8]) -> Option<usize> {
    let (block_bytes, halves) = match ty {
        GgmlType::Q8_0 => (BLOCK_Q8_0_BYTES, 1),
        GgmlType::Q4_0 => (BLOCK_Q4_0_BYTES, 1),
        GgmlType::Q4_1 => (BLOCK_Q4_1_BYTES, 2),
        _ => return None,
    };
    bytes
        .chunks_exact(block_bytes)
        .position(|b| (0..halves).any(|h| !f16_at(b, 2 * h).is_finite()))
        .map(|block| block * QK)
}

/// Decodes whole Q8_0/Q4_0/Q4_1 blocks into `out` (one value per element, `out.len()` a whole
/// number of blocks) without allocating; the same arithmetic as [`dequantize`].
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
        other => panic!("dequantize_blocks_into: {other} is not a 32-element block type"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn block_dequantizer_matches_the_allocating_one() {
        let values = random_values(5 * QK, 3);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
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
        for (ty, seed) in [(GgmlType::Q8_0, 2), (GgmlType::Q4_0, 3), (GgmlType::Q4_1, 4)] {
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
        assert!(matches!(dequantize(GgmlType::Q4_K, &[0u8; 144], 256), Err(Error::Unsupported(_))));
        assert!(matches!(quantize(GgmlType::Q4_1, &[1.0; 33]), Err(Error::Shape(_))));
        assert!(matches!(quantize(GgmlType::Q6_K, &[1.0; 256]), Err(Error::Unsupported(_))));
    }
}
