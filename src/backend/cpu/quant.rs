//! Dot products of GGUF block-quantized weight rows (Q8_0, Q4_0, Q4_1) with activations.
//!
//! As in llama.cpp, the activation row is quantized once per matrix product to 8-bit blocks of
//! 32 (scale `d` in f32 and the block's integer sum), and each weight block meets it in integer
//! multiply-adds: AVX-512 VNNI `vpdpbusd`, the AVX2 `vpmaddubsw` + `vpmaddwd` pair, or the scalar
//! reference every SIMD path is tested against. Per block, with `Σ` over its 32 elements:
//!
//! * Q8_0 `w = q·d`:        `d·dx·Σ q·qx`
//! * Q4_0 `w = (q − 8)·d`:  `d·dx·(Σ q·qx − 8·Σ qx)`
//! * Q4_1 `w = q·d + m`:    `d·dx·Σ q·qx + m·dx·Σ qx`
//!
//! The integer sums are exact; the only rounding beyond f32 accumulation is the activation's own
//! quantization (relative error about 1/254 of the block's largest value).

use crate::model::quant::{f16_at, GgmlType, BLOCK_Q4_0_BYTES, BLOCK_Q4_1_BYTES, BLOCK_Q8_0_BYTES, QK};

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

    /// Bytes per block of 32 elements.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK_Q8_0_BYTES,
            BlockFormat::Q4_0 => BLOCK_Q4_0_BYTES,
            BlockFormat::Q4_1 => BLOCK_Q4_1_BYTES,
        }
    }
}

/// Which integer dot-product implementation runs (tests run every one the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantKernel {
    Scalar,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd` on 256-bit vectors (AVX512-VL).
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
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activation rows quantized to 8-bit blocks, kept as separate arrays so that the SIMD loops
/// load 32 contiguous bytes per block.
#[derive(Debug, Clone, Default)]
pub struct Q8Activations {
    /// Elements per row (a multiple of 32).
    pub cols: usize,
    /// Quantized values, row after row.
    pub qs: Vec<i8>,
    /// Per block: the scale `dx` (value = q · dx).
    pub scales: Vec<f32>,
    /// Per block: `dx · Σ q`, the block sum the Q4 offsets and minimums multiply.
    pub scaled_sums: Vec<f32>,
}

impl Q8Activations {
    /// Quantizes `rows` rows of `cols` values (ggml's Q8 rounding: `d = max|x| / 127`, values
    /// rounded half away from zero).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Q8Activations {
        assert!(cols.is_multiple_of(QK) && x.len() >= rows * cols, "activations must be whole blocks of 32");
        let blocks = rows * cols / QK;
        let mut out = Q8Activations { cols, qs: vec![0; rows * cols], scales: vec![0.0; blocks], scaled_sums: vec![0.0; blocks] };
        for (b, chunk) in x[..rows * cols].chunks_exact(QK).enumerate() {
            let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in out.qs[b * QK..(b + 1) * QK].iter_mut().zip(chunk) {
                *q = (v * inverse).round() as i8;
                sum += *q as i32;
            }
            out.scales[b] = d;
            out.scaled_sums[b] = d * sum as f32;
        }
        out
    }

    /// Row `r` as the slices a dot product takes.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let blocks = self.cols / QK;
        Q8Row {
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
            scales: &self.scales[r * blocks..(r + 1) * blocks],
            scaled_sums: &self.scaled_sums[r * blocks..(r + 1) * blocks],
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

/// Σ w_i x_i for one weight row (`weights` holds exactly the row's blocks) and one activation row.
pub fn dot(kernel: QuantKernel, format: BlockFormat, weights: &[u8], x: Q8Row<'_>) -> f32 {
    let blocks = x.scales.len();
    assert!(
        weights.len() == blocks * format.block_bytes() && x.qs.len() == blocks * QK && x.scaled_sums.len() == blocks,
        "quantized dot operands disagree in length"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: kernels other than Scalar are only chosen when their features were detected
        // (QuantKernel::for_level / all_supported), and the lengths were checked above.
        QuantKernel::Avx2 | QuantKernel::Vnni => unsafe { x86::dot(kernel == QuantKernel::Vnni, format, weights, x) },
        _ => scalar::dot(format, weights, x),
    }
}

pub mod scalar {
    //! The reference: integer sums per block, scaled in f32.
    use super::*;

    pub fn dot(format: BlockFormat, weights: &[u8], x: Q8Row<'_>) -> f32 {
        let mut total = 0.0f32;
        for (b, block) in weights.chunks_exact(format.block_bytes()).enumerate() {
            let xq = &x.qs[b * QK..(b + 1) * QK];
            let dx = x.scales[b];
            total += match format {
                BlockFormat::Q8_0 => {
                    let sum: i32 = block[2..].iter().zip(xq).map(|(&q, &v)| (q as i8) as i32 * v as i32).sum();
                    f16_at(block, 0) * dx * sum as f32
                }
                BlockFormat::Q4_0 => {
                    let sum = nibble_sum(&block[2..], xq);
                    let d = f16_at(block, 0);
                    d * dx * sum as f32 - 8.0 * d * x.scaled_sums[b]
                }
                BlockFormat::Q4_1 => {
                    let sum = nibble_sum(&block[4..], xq);
                    f16_at(block, 0) * dx * sum as f32 + f16_at(block, 2) * x.scaled_sums[b]
                }
            };
        }
        total
    }

    /// Σ q_i·x_i with q the unsigned nibbles (low nibble of byte j = element j, high = j + 16).
    fn nibble_sum(nibbles: &[u8], xq: &[i8]) -> i32 {
        let (lo, hi) = xq.split_at(QK / 2);
        nibbles.iter().zip(lo).zip(hi).map(|((&q, &l), &h)| (q & 0x0F) as i32 * l as i32 + (q >> 4) as i32 * h as i32).sum()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! 256-bit kernels: one block of 32 products per step, two accumulators in flight. The loop
    //! is a macro so that each instantiation sits inside a function compiled for its features
    //! (and inlines the intrinsics) with the block format fixed outside the loop.
    use std::arch::x86_64::*;

    use super::{BlockFormat, Q8Row, QK};

    /// 32 unsigned nibbles of a Q4 block (16 bytes at `p`), in element order.
    macro_rules! unpack_nibbles {
        ($p:expr) => {{
            let raw = _mm_loadu_si128($p as *const __m128i);
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F))
        }};
    }

    /// The f16 at `p` widened with F16C.
    macro_rules! scale_at {
        ($p:expr) => {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned($p as *const u16) as i32)))
        };
    }

    /// Eight i32 partial sums of `u·s` (u unsigned bytes, s signed bytes).
    macro_rules! products_avx2 {
        ($u:expr, $s:expr) => {
            _mm256_madd_epi16(_mm256_maddubs_epi16($u, $s), _mm256_set1_epi16(1))
        };
    }

    macro_rules! products_vnni {
        ($u:expr, $s:expr) => {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), $u, $s)
        };
    }

    /// Runs the block loop for one format; `$block` maps (block pointer, x vector, block index)
    /// to (eight i32 sums, their scale) and may add to `offset_terms`. Blocks go in pairs into
    /// two named accumulators (an indexed pair would live on the stack and chain every FMA
    /// through a store and a load).
    macro_rules! block_loop {
        ($weights:expr, $x:expr, $block_bytes:expr, |$blk:ident, $xv:ident, $b:ident, $offset:ident| $body:block) => {{
            let x: Q8Row<'_> = $x;
            let w = $weights.as_ptr();
            let blocks = x.scales.len();
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut $offset = 0.0f32;
            #[allow(unused_mut)] // only the Q4 formats add offset terms
            let mut step = |$b: usize, acc: __m256| -> __m256 {
                let $blk = w.add($b * $block_bytes);
                let $xv = _mm256_loadu_si256(x.qs.as_ptr().add($b * QK) as *const __m256i);
                let (sums, scale): (__m256i, f32) = $body;
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc)
            };
            let mut b = 0;
            while b + 1 < blocks {
                acc0 = step(b, acc0);
                acc1 = step(b + 1, acc1);
                b += 2;
            }
            if b < blocks {
                acc0 = step(b, acc0);
            }
            let v = _mm256_add_ps(acc0, acc1);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s) + $offset
        }};
    }

    macro_rules! dot_body {
        ($products:ident, $format:expr, $weights:expr, $x:expr) => {{
            let x: Q8Row<'_> = $x;
            match $format {
                BlockFormat::Q8_0 => block_loop!($weights, x, 34, |blk, xv, b, _offset| {
                    let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    // |w| · (x with w's sign): the unsigned × signed form the instructions take.
                    ($products!(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xv, wq)), scale_at!(blk) * *x.scales.get_unchecked(b))
                }),
                BlockFormat::Q4_0 => block_loop!($weights, x, 18, |blk, xv, b, offset| {
                    let d = scale_at!(blk);
                    offset -= 8.0 * d * *x.scaled_sums.get_unchecked(b);
                    ($products!(unpack_nibbles!(blk.add(2)), xv), d * *x.scales.get_unchecked(b))
                }),
                BlockFormat::Q4_1 => block_loop!($weights, x, 20, |blk, xv, b, offset| {
                    offset += scale_at!(blk.add(2)) * *x.scaled_sums.get_unchecked(b);
                    ($products!(unpack_nibbles!(blk.add(4)), xv), scale_at!(blk) * *x.scales.get_unchecked(b))
                }),
            }
        }};
    }

    /// Safety: AVX2, FMA and F16C (and AVX-512 VNNI/VL/BW when `vnni`) must be present, and
    /// `weights` must hold `x.scales.len()` blocks of `format` (the caller checks lengths).
    pub unsafe fn dot(vnni: bool, format: BlockFormat, weights: &[u8], x: Q8Row<'_>) -> f32 {
        if vnni {
            dot_vnni(format, weights, x)
        } else {
            dot_avx2(format, weights, x)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(format: BlockFormat, weights: &[u8], x: Q8Row<'_>) -> f32 {
        dot_body!(products_avx2, format, weights, x)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw")]
    unsafe fn dot_vnni(format: BlockFormat, weights: &[u8], x: Q8Row<'_>) -> f32 {
        dot_body!(products_vnni, format, weights, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::quantize;
    use half::f16;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random_bool(0.05) { 8.0 } else { 1.0 }).collect()
    }

    #[test]
    fn every_kernel_matches_the_scalar_reference_and_the_float_product() {
        for &blocks in &[1usize, 2, 3, 17, 48] {
            let cols = blocks * QK;
            let w = random(cols, blocks as u64);
            let mut x = random(cols, 100 + blocks as u64);
            x[5] = 0.0;
            if blocks > 1 {
                x[QK..2 * QK].fill(0.0); // an all-zero block
            }
            let activations = Q8Activations::quantize(&x, 1, cols);
            for format in [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1] {
                let bytes = quantize(format.ggml(), &w).unwrap();
                let dequantized = crate::model::quant::dequantize(format.ggml(), &bytes, cols).unwrap();
                let exact: f64 = dequantized.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let magnitude: f64 = dequantized.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                let reference = scalar::dot(format, &bytes, activations.row(0));
                // The activation's 8-bit rounding bounds the gap to the float product.
                assert!((reference as f64 - exact).abs() <= 0.02 * magnitude + 1e-4, "{format:?} {blocks}: {reference} vs {exact}");
                for kernel in QuantKernel::all_supported() {
                    let got = dot(kernel, format, &bytes, activations.row(0));
                    assert!((got - reference).abs() <= 1e-4 * (1.0 + reference.abs()), "{format:?} {kernel} {blocks}: {got} vs {reference}");
                }
            }
        }
    }

    #[test]
    fn extreme_bytes_do_not_overflow_the_simd_paths() {
        // Q8_0 weights of -128 (legal in a file, never produced by the quantizer) and ±127
        // activations: the sign trick must still give exact products.
        let cols = 2 * QK;
        let mut bytes = Vec::new();
        for _ in 0..2 {
            bytes.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
            bytes.extend((0..QK).map(|i| if i % 2 == 0 { 0x80u8 } else { 0x7F }));
        }
        let x: Vec<f32> = (0..cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let activations = Q8Activations::quantize(&x, 1, cols);
        let reference = scalar::dot(BlockFormat::Q8_0, &bytes, activations.row(0));
        let exact: f32 = (0..cols).map(|i| 0.5 * if i % 2 == 0 { -128.0 } else { 127.0 } * x[i]).sum();
        assert!((reference - exact).abs() < 1e-3, "{reference} vs {exact}");
        for kernel in QuantKernel::all_supported() {
            assert_eq!(dot(kernel, BlockFormat::Q8_0, &bytes, activations.row(0)), reference, "{kernel}");
        }
    }

    #[test]
    fn activation_rows_are_quantized_per_block() {
        let x = random(3 * 64, 9);
        let a = Q8Activations::quantize(&x, 3, 64);
        for r in 0..3 {
            let row = a.row(r);
            for b in 0..2 {
                let chunk = &x[r * 64 + b * QK..r * 64 + (b + 1) * QK];
                let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(row.scales[b], amax / 127.0);
                let q = &row.qs[b * QK..(b + 1) * QK];
                assert!(q.iter().any(|&v| v.unsigned_abs() == 127));
                let sum: i32 = q.iter().map(|&v| v as i32).sum();
                assert_eq!(row.scaled_sums[b], row.scales[b] * sum as f32);
            }
        }
    }
}
