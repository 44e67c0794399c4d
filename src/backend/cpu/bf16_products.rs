//! Products with bf16 weights: activations rounded to bf16 at the product's input, and the
//! prefill product on AVX-512 BF16 (`vdpbf16ps`) where the CPU has it and runs it faster than
//! f32 FMA (see [`dot_rate_over_fma`]).
//!
//! bf16 weights meet bf16 activations, as llama.cpp's bf16 path and cuBLAS do: a product of two
//! bf16 values is exact in f32, so every path (this kernel, the f32 GEMV of decode, the widening
//! fallback, the scalar reference) computes the same products and differs only in the order of
//! its f32 sums. That keeps a batched prefill equal to the same sequence decoded alone, and lets
//! `vdpbf16ps` do two multiply-adds per f32 lane, twice the rate of f32 FMA. Loading a bf16 file
//! with `--dtype f32` keeps f32 activations (the weights widen exactly).
//!
//! The kernel takes tiles of 4 weight rows × 4 activation rows straight from their row-major
//! storage, 16 accumulators of 16 lanes each summing along k, reduced at the end by one shuffle
//! tree: no packing pass, so nothing is repeated per task.

use rayon::prelude::*;

use super::simd::scalar::bf16_bits_to_f32 as widen_bf16;
use super::simd::SimdLevel;

/// f32 → bf16 bits, rounding to nearest even; subnormals become zero of the same sign, NaN
/// stays a (quiet) NaN, as `vcvtneps2bf16` rounds.
pub fn bf16_bits_of(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return (bits >> 16) as u16 | 0x0040;
    }
    if bits & 0x7f80_0000 == 0 {
        return (bits >> 16) as u16 & 0x8000;
    }
    // Finite values near f32::MAX carry into the exponent and round to ±inf, as they should.
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest bf16 value, kept as f32 (see [`bf16_bits_of`]).
pub fn round_to_bf16_value(x: f32) -> f32 {
    widen_bf16(bf16_bits_of(x))
}

/// Whether this CPU has the AVX-512 BF16 instructions (besides the AVX-512 F/BW the kernel uses).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// How many times f32 FMA's multiply-add rate `vdpbf16ps` reaches on this core (`None` without
/// AVX-512 BF16): 24 register-only chains of each (fewer leave `vdpbf16ps` latency-bound on
/// Sapphire Rapids: 0.50x at 12), alternated, best of three (~1 ms).
/// Zen 4 issues `vdpbf16ps` as fast as FMA, so it does twice the multiply-adds; a core that
/// issues it at half FMA's rate gains nothing from it, and there the tiled kernel below loses
/// to the panel gemm's FMA tiles (Sapphire Rapids: 9.8 against 5.7 ms at gate|up, 512 rows).
pub fn dot_rate_over_fma() -> Option<f64> {
    if !has_avx512_bf16() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        const STEPS: usize = 40_000;
        let time = |f: &dyn Fn() -> f32| {
            let start = std::time::Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        };
        let mut best = [f64::INFINITY; 2];
        for _ in 0..3 {
            // SAFETY: has_avx512_bf16 checked AVX-512 F, BW and BF16.
            best[0] = best[0].min(time(&|| unsafe { x86::dot_chains(std::hint::black_box(STEPS)) }));
            best[1] = best[1].min(time(&|| unsafe { x86::fma_chains(std::hint::black_box(STEPS)) }));
        }
        // 32 multiply-adds a `vdpbf16ps`, 16 an FMA.
        Some(2.0 * best[1] / best[0].max(1e-9))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`dot_rate_over_fma`] from which prefill takes the `vdpbf16ps` kernel rather than FMA panels.
pub const DOT_PAYS_FROM_RATE: f64 = 1.4;

/// Whether bf16 products at `level` can take the `vdpbf16ps` kernel.
pub fn bf16_kernel_available(level: SimdLevel) -> bool {
    level == SimdLevel::Avx512 && has_avx512_bf16()
}

/// `x` rounded to bf16 values in place (the GEMV and widening paths keep them as f32).
pub fn round_in_place(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = round_to_bf16_value(*v);
    }
}

/// `x` rounded to bf16 bits, row-major like `x`; split over the calling pool.
pub fn to_bf16_bits(level: SimdLevel, x: &[f32], out: &mut [u16]) {
    assert_eq!(x.len(), out.len(), "bf16 conversion lengths differ");
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, v)| {
        #[cfg(target_arch = "x86_64")]
        if bf16_kernel_available(level) {
            // SAFETY: bf16_kernel_available checked AVX-512 F, BW and BF16.
            unsafe { x86::to_bf16_bits(v, o) };
            return;
        }
        let _ = level;
        for (b, &f) in o.iter_mut().zip(v) {
            *b = bf16_bits_of(f);
        }
    });
}

/// Activation rows per tile, and weight rows per tile.
const TILE: usize = 4;
/// Weight rows a task keeps in L2 while its activation rows pass over them.
const WEIGHT_BLOCK: usize = 64;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with both operands bf16 bits and f32 sums, on the calling
/// pool's threads. Needs [`bf16_kernel_available`]; panics otherwise (callers check).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(level: SimdLevel, threads: usize, x: &[u16], m: usize, k: usize, w: &[u16], n: usize, out: &mut [f32]) {
    assert!(bf16_kernel_available(level), "the bf16 gemm needs AVX-512 BF16");
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "bf16 gemm operands too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    // Tasks own whole output rows (so they write disjoint slices) and read all of w, which the
    // other tasks then find in L3; a few per thread so a slow core does not hold up the rest.
    let rows_per_task = m.div_ceil(threads.max(1) * 2).next_multiple_of(TILE);
    out[..m * n].par_chunks_mut(rows_per_task * n).enumerate().for_each(|(t, out_rows)| {
        let first = t * rows_per_task;
        let rows = out_rows.len() / n;
        for block in (0..n).step_by(WEIGHT_BLOCK) {
            let block_end = (block + WEIGHT_BLOCK).min(n);
            for a0 in (0..rows).step_by(TILE) {
                let a_take = (rows - a0).min(TILE);
                // Short tiles repeat their last row; only the real rows are stored.
                let x_rows: [&[u16]; TILE] = std::array::from_fn(|i| {
                    let r = first + a0 + i.min(a_take - 1);
                    &x[r * k..(r + 1) * k]
                });
                for r0 in (block..block_end).step_by(TILE) {
                    let r_take = (block_end - r0).min(TILE);
                    let w_rows: [&[u16]; TILE] = std::array::from_fn(|i| {
                        let r = r0 + i.min(r_take - 1);
                        &w[r * k..(r + 1) * k]
                    });
                    let sums = tile(w_rows, x_rows);
                    for a in 0..a_take {
                        let row = &mut out_rows[(a0 + a) * n + r0..][..r_take];
                        row.copy_from_slice(&sums[a * TILE..a * TILE + r_take]);
                    }
                }
            }
        }
    });
}

/// `sums[a * 4 + r] = w_rows[r] · x_rows[a]` (all rows of one length).
fn tile(w_rows: [&[u16]; TILE], x_rows: [&[u16]; TILE]) -> [f32; TILE * TILE] {
    let k = w_rows[0].len();
    assert!(w_rows.iter().chain(&x_rows).all(|r| r.len() == k), "bf16 tile rows differ in length");
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(has_avx512_bf16());
        // SAFETY: only `gemm_bf16` calls this, after bf16_kernel_available; the rows all hold
        // k values.
        unsafe { x86::tile_bf16(w_rows.map(|r| r.as_ptr()), x_rows.map(|r| r.as_ptr()), k) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        tile_reference_bf16(w_rows, x_rows)
    }
}

/// The scalar reference of a bf16 tile: widened products summed in f32.
pub fn tile_reference_bf16(w_rows: [&[u16]; TILE], x_rows: [&[u16]; TILE]) -> [f32; TILE * TILE] {
    std::array::from_fn(|i| {
        let (a, r) = (i / TILE, i % TILE);
        w_rows[r].iter().zip(x_rows[a]).map(|(&wv, &xv)| widen_bf16(wv) * widen_bf16(xv)).sum()
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::TILE;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn to_bf16_bits(x: &[f32], out: &mut [u16]) {
        let mut i = 0;
        while i + 16 <= x.len() {
            let halves: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i))));
            _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut __m256i, halves);
            i += 16;
        }
        if i < x.len() {
            let mask: __mmask16 = (1u16 << (x.len() - i)) - 1;
            let halves: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x.as_ptr().add(i))));
            _mm256_mask_storeu_epi16(out.as_mut_ptr().add(i) as *mut i16, mask, halves);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn bh(v: __m512i) -> __m512bh {
        std::mem::transmute(v)
    }

    /// 24 dependent chains of `steps` `vdpbf16ps` each (the rate probe).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn dot_chains(steps: usize) -> f32 {
        let ones = bh(std::hint::black_box(_mm512_set1_epi32(0x3f80_3f80)));
        let mut acc = [_mm512_setzero_ps(); 24];
        for _ in 0..steps {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, ones, ones);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// 24 dependent chains of `steps` f32 FMAs each (the rate probe).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_chains(steps: usize) -> f32 {
        let (a, b) = std::hint::black_box((_mm512_set1_ps(1.0), _mm512_set1_ps(0.5)));
        let mut acc = [_mm512_setzero_ps(); 24];
        for _ in 0..steps {
            for s in acc.iter_mut() {
                *s = _mm512_fmadd_ps(a, b, *s);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// Sixteen dot products of `k` bf16 pairs; `w[r]`, `x[a]` point at `k` values each.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn tile_bf16(w: [*const u16; TILE], x: [*const u16; TILE], k: usize) -> [f32; TILE * TILE] {
        // acc[r * 4 + a] sums w[r] · x[a] in 16 lanes.
        let mut acc = [_mm512_setzero_ps(); TILE * TILE];
        let mut step = |load: &dyn Fn(*const u16) -> __m512i| {
            let wv: [__m512i; TILE] = std::array::from_fn(|r| load(w[r]));
            let xv: [__m512i; TILE] = std::array::from_fn(|a| load(x[a]));
            for r in 0..TILE {
                for a in 0..TILE {
                    acc[r * TILE + a] = _mm512_dpbf16_ps(acc[r * TILE + a], bh(wv[r]), bh(xv[a]));
                }
            }
        };
        let whole = k / 32 * 32;
        let mut at = 0;
        while at < whole {
            step(&|p: *const u16| _mm512_loadu_si512(p.add(at) as *const _));
            at += 32;
        }
        if at < k {
            // The last pairs: both operands zero past k, so the pad adds nothing.
            let mask: __mmask32 = (1u32 << (k - at)) - 1;
            step(&|p: *const u16| _mm512_maskz_loadu_epi16(mask, p.add(at) as *const i16));
        }
        reduce_tile(acc)
    }

    /// `acc[r * 4 + a]` (16 lanes each) summed to `out[a * 4 + r]`: halves, then quarters
    /// (128-bit lanes), then within lanes, one shuffle tree for all sixteen.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce_tile(v: [__m512; TILE * TILE]) -> [f32; TILE * TILE] {
        let x1: [__m512; 8] = std::array::from_fn(|j| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(v[2 * j], v[2 * j + 1]), _mm512_shuffle_f32x4::<0xEE>(v[2 * j], v[2 * j + 1]))
        });
        let y: [__m512; 4] = std::array::from_fn(|j| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x1[2 * j], x1[2 * j + 1]), _mm512_shuffle_f32x4::<0xDD>(x1[2 * j], x1[2 * j + 1]))
        });
        let z: [__m512; 2] = std::array::from_fn(|j| {
            _mm512_add_ps(_mm512_shuffle_ps::<0x44>(y[2 * j], y[2 * j + 1]), _mm512_shuffle_ps::<0xEE>(y[2 * j], y[2 * j + 1]))
        });
        let sums = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(z[0], z[1]), _mm512_shuffle_ps::<0xDD>(z[0], z[1]));
        // Element 4a + p of `sums` is v[4p + a]: row-major by input already.
        let mut out = [0.0f32; TILE * TILE];
        _mm512_storeu_ps(out.as_mut_ptr(), sums);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rounding_matches_the_hardware_conversion_and_its_stated_rules() {
        let specials = [
            0.0f32, -0.0, 1.0, -1.0, 1.0 + f32::EPSILON, 1.00390625, 1.005859375, 1.0078125 + 0.00390625,
            f32::MAX, -f32::MAX, f32::MIN_POSITIVE, f32::MIN_POSITIVE / 2.0, -1e-40, f32::INFINITY, f32::NEG_INFINITY,
            3.0e38, 65504.0, 1e-30,
        ];
        // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(round_to_bf16_value(1.00390625), 1.0);
        assert_eq!(round_to_bf16_value(1.01171875), 1.015625);
        assert_eq!(round_to_bf16_value(-1e-40).to_bits(), 0x8000_0000, "subnormals flush to signed zero");
        assert_eq!(round_to_bf16_value(f32::MAX), f32::INFINITY);
        assert!(round_to_bf16_value(f32::NAN).is_nan());
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut values: Vec<f32> = specials.to_vec();
        values.extend((0..4000).map(|_| f32::from_bits(rng.random::<u32>())).filter(|v| !v.is_nan()));
        values.extend((0..1000).map(|_| rng.random_range(-4.0f32..4.0)));
        let expected: Vec<u16> = values.iter().map(|&v| bf16_bits_of(v)).collect();
        for level in SimdLevel::all_supported() {
            let mut got = vec![0u16; values.len()];
            to_bf16_bits(level, &values, &mut got);
            for ((v, g), e) in values.iter().zip(&got).zip(&expected) {
                assert_eq!(g, e, "{level}: {v:e} ({:#010x}) rounded to {g:#06x}, expected {e:#06x}", v.to_bits());
            }
            // Lengths that leave a masked tail.
            let mut short = vec![0u16; 37];
            to_bf16_bits(level, &values[..37], &mut short);
            assert_eq!(short, expected[..37]);
        }
    }

    fn random_bits(rng: &mut rand::rngs::StdRng, len: usize) -> Vec<u16> {
        (0..len).map(|_| bf16_bits_of(rng.random_range(-2.0f32..2.0))).collect()
    }

    const AWKWARD_SIZES: [(usize, usize, usize); 8] =
        [(1, 1, 1), (3, 31, 5), (4, 32, 4), (9, 33, 7), (17, 64, 65), (13, 95, 130), (40, 576, 70), (8, 1536, 9)];

    /// `out[i, j]` against `reference(w row j, x row i)`, within a few ulps of Σ|w·x| (the
    /// kernels sum in another order).
    fn assert_matches<X>(out: &[f32], (m, k, n): (usize, usize, usize), x: &[X], w: &[u16], reference: impl Fn(&[u16], &[X]) -> (f32, f32)) {
        for i in 0..m {
            for j in 0..n {
                let (want, magnitude) = reference(&w[j * k..(j + 1) * k], &x[i * k..(i + 1) * k]);
                let got = out[i * n + j];
                assert!((got - want).abs() <= 1e-5 * (1.0 + magnitude), "m={m} k={k} n={n} ({i},{j}): {got} vs {want}");
            }
        }
    }

    #[test]
    fn the_bf16_kernel_matches_the_scalar_reference_at_awkward_sizes() {
        if !bf16_kernel_available(SimdLevel::detect()) {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for (m, k, n) in AWKWARD_SIZES {
            let x = random_bits(&mut rng, m * k);
            let w = random_bits(&mut rng, n * k);
            let mut out = vec![f32::NAN; m * n];
            pool.install(|| gemm_bf16(SimdLevel::Avx512, 2, &x, m, k, &w, n, &mut out));
            assert_matches(&out, (m, k, n), &x, &w, |w_row, x_row| {
                let magnitude = w_row.iter().zip(x_row).map(|(&a, &b)| (widen_bf16(a) * widen_bf16(b)).abs()).sum();
                (tile_reference_bf16([w_row; TILE], [x_row; TILE])[0], magnitude)
            });
        }
    }

    #[test]
    fn each_sum_lands_at_its_input_row_and_weight_row() {
        let level = SimdLevel::detect();
        if !bf16_kernel_available(level) {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        // Row r of w is all (r + 1), row a of x all 2^a: every sum differs, and all are exact.
        let k = 40;
        let w: Vec<u16> = (0..TILE).flat_map(|r| vec![bf16_bits_of(r as f32 + 1.0); k]).collect();
        let x: Vec<u16> = (0..TILE).flat_map(|a| vec![bf16_bits_of((1 << a) as f32); k]).collect();
        let mut out = vec![f32::NAN; TILE * TILE];
        gemm_bf16(level, 1, &x, TILE, k, &w, TILE, &mut out);
        for a in 0..TILE {
            for r in 0..TILE {
                assert_eq!(out[a * TILE + r], (k * (r + 1) * (1 << a)) as f32, "input {a}, weight row {r}");
            }
        }
    }
}
