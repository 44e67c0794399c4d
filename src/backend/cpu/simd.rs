//! Run-time dispatched SIMD primitives (AVX-512, AVX2+FMA+F16C, scalar reference) for the CPU backend.
//!
//! Every routine has a scalar reference in this file and a test comparing each SIMD path to it on
//! random inputs of awkward lengths. The `unsafe` is confined to the `#[target_feature]` bodies;
//! the public functions are safe because they only call a body whose features were detected.

/// The instruction-set level chosen at run time (never at compile time: binaries are portable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F, BW and VL (+ the AVX2 set): every AVX-512 CPU since Skylake-SP and Zen 4.
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl");
            if avx2 && avx512 {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// Every level this CPU can run, lowest first (tests run all of them).
    pub fn all_supported() -> Vec<SimdLevel> {
        let best = SimdLevel::detect();
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= best).collect()
    }

    /// Clamps a requested level to what the CPU supports.
    pub fn at_most(self, requested: SimdLevel) -> SimdLevel {
        self.min(requested)
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        })
    }
}

// ---------------------------------------------------------------- scalar references

pub mod scalar {
    //! Plain loops: the references every SIMD path is tested against.

    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    pub fn bf16_bits_to_f32(bits: u16) -> f32 {
        f32::from_bits((bits as u32) << 16)
    }

    pub fn f16_bits_to_f32(bits: u16) -> f32 {
        half::f16::from_bits(bits).to_f32()
    }

    pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(&b, y)| bf16_bits_to_f32(b) * y).sum()
    }

    pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(&b, y)| f16_bits_to_f32(b) * y).sum()
    }

    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * xi;
        }
    }

    pub fn sum_squares(x: &[f32]) -> f32 {
        x.iter().map(|v| v * v).sum()
    }

    pub fn exp_scaled_in_place(values: &mut [f32], scale: f32, shift: f32) -> f32 {
        let mut total = 0.0f32;
        for v in values.iter_mut() {
            *v = (*v * scale - shift).exp();
            total += *v;
        }
        total
    }

    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

// ---------------------------------------------------------------- safe dispatchers

fn check_len(a: usize, b: usize) {
    assert_eq!(a, b, "SIMD operands must have equal lengths");
}

/// Σ a_i b_i.
pub fn dot_f32(level: SimdLevel, a: &[f32], b: &[f32]) -> f32 {
    check_len(a.len(), b.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level is only ever Avx512/Avx2 when `detect` found those features.
        SimdLevel::Avx512 => unsafe { x86::dot_f32_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot_f32_avx2(a, b) },
        _ => scalar::dot_f32(a, b),
    }
}

/// Σ bf16(w_i) x_i, with the bf16 values given as raw bits.
pub fn dot_bf16(level: SimdLevel, w: &[u16], x: &[f32]) -> f32 {
    check_len(w.len(), x.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::dot_bf16_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot_bf16_avx2(w, x) },
        _ => scalar::dot_bf16(w, x),
    }
}

/// Σ f16(w_i) x_i, with the f16 values given as raw bits.
pub fn dot_f16(level: SimdLevel, w: &[u16], x: &[f32]) -> f32 {
    check_len(w.len(), x.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::dot_f16_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot_f16_avx2(w, x) },
        _ => scalar::dot_f16(w, x),
    }
}

/// Dots of four weight rows with one input, the rows streamed together: decode keeps four
/// load streams in flight per core instead of one row's chain, and loads each input vector once
/// for four rows. Rows in different 4 KiB pages stream fastest (see `CpuMatrix::dot_rows`).
/// `prefetch` says how far ahead the AVX-512 and AVX2 kernels ask for lines (the scalar
/// reference leaves it to the hardware).
pub fn dot4_f32(level: SimdLevel, prefetch: StreamPrefetch, rows: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    rows.iter().for_each(|row| check_len(row.len(), x.len()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::dot4_f32_avx512(prefetch, rows, x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot4_f32_avx2(prefetch, rows, x) },
        _ => rows.map(|row| dot_f32(level, row, x)),
    }
}

/// [`dot4_f32`] on bf16 rows (raw bits).
pub fn dot4_bf16(level: SimdLevel, prefetch: StreamPrefetch, rows: [&[u16]; 4], x: &[f32]) -> [f32; 4] {
    rows.iter().for_each(|row| check_len(row.len(), x.len()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::dot4_bf16_avx512(prefetch, rows, x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot4_bf16_avx2(prefetch, rows, x) },
        _ => rows.map(|row| dot_bf16(level, row, x)),
    }
}

/// [`dot4_f32`] on f16 rows (raw bits).
pub fn dot4_f16(level: SimdLevel, prefetch: StreamPrefetch, rows: [&[u16]; 4], x: &[f32]) -> [f32; 4] {
    rows.iter().for_each(|row| check_len(row.len(), x.len()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::dot4_f16_avx512(prefetch, rows, x) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot4_f16_avx2(prefetch, rows, x) },
        _ => rows.map(|row| dot_f16(level, row, x)),
    }
}

/// y += a x.
pub fn axpy(level: SimdLevel, a: f32, x: &[f32], y: &mut [f32]) {
    check_len(x.len(), y.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::axpy_avx512(a, x, y) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::axpy_avx2(a, x, y) },
        _ => scalar::axpy(a, x, y),
    }
}

/// `v = exp(v·scale − shift)` for every element, returning their sum: the exponentials of a
/// softmax (arguments at most 0 there; results below about 1e-38 may come back as that floor).
pub fn exp_scaled_in_place(level: SimdLevel, values: &mut [f32], scale: f32, shift: f32) -> f32 {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::exp_scaled_in_place_avx512(values, scale, shift) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx2 => unsafe { x86::exp_scaled_in_place_avx2(values, scale, shift) },
        _ => scalar::exp_scaled_in_place(values, scale, shift),
    }
}

/// `out_i = silu(gate_i) · up_i` with `silu(g) = g / (1 + e^-g)`: the MLP's gate. Prefill spent
/// 5-6% of its time in the scalar `expf` of this loop before it had a vector path.
pub fn silu_mul(level: SimdLevel, gate: &[f32], up: &[f32], out: &mut [f32]) {
    check_len(gate.len(), up.len());
    check_len(gate.len(), out.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx512 => unsafe { x86::silu_mul_avx512(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see dot_f32.
        SimdLevel::Avx2 => unsafe { x86::silu_mul_avx2(gate, up, out) },
        _ => scalar::silu_mul(gate, up, out),
    }
}

/// The largest of `x` (−∞ when empty; NaNs are skipped). Sixteen running maxima that the
/// compiler keeps in one vector register, where a plain `fold(f32::max)` stays scalar.
pub fn max_f32(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Σ x_i².
pub fn sum_squares(level: SimdLevel, x: &[f32]) -> f32 {
    dot_f32(level, x, x)
}

/// How far ahead of the entries it reads decode attention asks for the next cache lines: into
/// L1 a little ahead, and into L2 further ahead (see `attention_simd`). Also the weight kernels'
/// [`StreamPrefetch::NEAR_AND_FAR`].
pub const NEAR_PREFETCH_BYTES: usize = 1024;
pub const FAR_PREFETCH_BYTES: usize = 8192;

/// How far ahead of each of its four row streams `dot4_*` asks for the next cache lines (a
/// hint: no plan changes a result). Which plan streams fastest depends on the machine, and on
/// one machine from hour to hour, by more than the plans differ elsewhere, so the backend times
/// them on the loaded model and keeps the fastest for each weight type (`CpuBackend::tune`).
/// Per-token A/Bs, decode step time against `NEAR_AND_FAR`:
///
/// | machine | F32 | F16 |
/// |---|---|---|
/// | Intel Xeon VM, 15-28 GB/s | `NEAR` 1.06-1.10 | `NEAR` 1.0-1.03 |
/// | AMD EPYC VM, 53-94 GB/s | `NONE` 0.84-0.88, `NEAR` 0.92-0.93 | `NONE` 0.92-0.94, `NEAR` 0.84-0.85 |
///
/// On the first each L1 prefetch holds a fill buffer for a whole memory latency, which caps the
/// lines in flight, and asking L2 for lines further ahead pays; on the second the L2 streamer
/// keeps up alone and the extra requests only compete with it. `NEAR` is the default, the
/// plan least far from the best on both (at most 1.10x its step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPrefetch {
    /// Bytes ahead of each load into L1 (0: none).
    pub near: usize,
    /// Bytes ahead into L2 (0: none).
    pub far: usize,
}

impl StreamPrefetch {
    /// The hardware prefetchers alone.
    pub const NONE: StreamPrefetch = StreamPrefetch { near: 0, far: 0 };
    /// 2 KiB ahead into L1.
    pub const NEAR: StreamPrefetch = StreamPrefetch { near: 2048, far: 0 };
    /// 1 KiB ahead into L1 and 8 KiB ahead into L2.
    pub const NEAR_AND_FAR: StreamPrefetch = StreamPrefetch { near: NEAR_PREFETCH_BYTES, far: FAR_PREFETCH_BYTES };
    /// What the backend times, in the order it reports them.
    pub const CANDIDATES: [StreamPrefetch; 3] = [StreamPrefetch::NONE, StreamPrefetch::NEAR, StreamPrefetch::NEAR_AND_FAR];
    /// The plan before (or without) tuning, and kept unless another times clearly faster.
    pub const DEFAULT: StreamPrefetch = StreamPrefetch::NEAR;
}

impl std::fmt::Display for StreamPrefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.near, self.far) {
            (0, 0) => write!(f, "none"),
            (near, 0) => write!(f, "L1 {} KiB", near / 1024),
            (0, far) => write!(f, "L2 {} KiB", far / 1024),
            (near, far) => write!(f, "L1 {} KiB + L2 {} KiB", near / 1024, far / 1024),
        }
    }
}

/// How much of each stream's start `dot_rows` prefetches before the first dot: the kernels'
/// own prefetches, a fixed distance ahead of each load, never ask for it.
pub const STREAM_START_BYTES: usize = 2048;

/// Asks for the cache lines of `values` ahead of their use, into L1 (a hint: it never
/// faults and changes no value; nothing on other architectures). For the start of a stream,
/// which the kernels' own prefetches (a fixed distance ahead of each load) never cover.
pub fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    x86::prefetch_lines(values.as_ptr() as *const u8, size_of_val(values));
}

/// Widens raw bf16 bits to f32 (exact).
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    check_len(src.len(), dst.len());
    // A shift per element: the compiler vectorizes this loop at the baseline level.
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = scalar::bf16_bits_to_f32(s);
    }
}

/// Widens raw f16 bits to f32 (exact; `half` uses F16C when the CPU has it).
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    check_len(src.len(), dst.len());
    let halves: &[half::f16] = bytemuck::cast_slice(src);
    halves.convert_to_f32_slice(dst);
}

/// Narrows f32 values to f16 bits, rounding to nearest and saturating at ±65504 (the largest
/// f16): a cached key past that range would otherwise become infinite and turn every score it
/// touches into NaN. NaN stays NaN.
pub fn f32_to_f16_saturating(src: &[f32], dst: &mut [u16]) {
    use half::slice::HalfFloatSliceExt;
    check_len(src.len(), dst.len());
    const F16_MAX: f32 = 65504.0;
    let mut clamped = [0.0f32; 64];
    for (s, d) in src.chunks(64).zip(dst.chunks_mut(64)) {
        let c = &mut clamped[..s.len()];
        for (c, &v) in c.iter_mut().zip(s) {
            *c = v.clamp(-F16_MAX, F16_MAX);
        }
        let halves: &mut [half::f16] = bytemuck::cast_slice_mut(d);
        halves.convert_from_f32_slice(c);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The `#[target_feature]` bodies. Four independent accumulators hide the FMA latency.
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                let off = i + 16 * u;
                *acc_u = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(off)), _mm512_loadu_ps(pb.add(off)), *acc_u);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc[0]);
            i += 16;
        }
        if i < n {
            let mask = lanes_in(n - i, 0);
            let va = _mm512_maskz_loadu_ps(mask, pa.add(i));
            let vb = _mm512_maskz_loadu_ps(mask, pb.add(i));
            acc[1] = _mm512_fmadd_ps(va, vb, acc[1]);
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bf16x16(p: *const u16) -> __m512 {
        let bits = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_f16x16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    macro_rules! dot_half_avx512 {
        ($name:ident, $load:ident, $tail:path) => {
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name(w: &[u16], x: &[f32]) -> f32 {
                let n = w.len();
                let (pw, px) = (w.as_ptr(), x.as_ptr());
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i + 64 <= n {
                    for (u, acc_u) in acc.iter_mut().enumerate() {
                        let off = i + 16 * u;
                        *acc_u = _mm512_fmadd_ps($load(pw.add(off)), _mm512_loadu_ps(px.add(off)), *acc_u);
                    }
                    i += 64;
                }
                while i + 16 <= n {
                    acc[0] = _mm512_fmadd_ps($load(pw.add(i)), _mm512_loadu_ps(px.add(i)), acc[0]);
                    i += 16;
                }
                let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                _mm512_reduce_add_ps(s) + $tail(&w[i..], &x[i..])
            }
        };
    }
    dot_half_avx512!(dot_bf16_avx512, load_bf16x16, super::scalar::dot_bf16);
    dot_half_avx512!(dot_f16_avx512, load_f16x16, super::scalar::dot_f16);

    /// Prefetches each 64-byte line of `len` bytes from `p`; sound for any address, since a
    /// prefetch never faults (SSE, so part of the x86-64 baseline).
    pub fn prefetch_lines(p: *const u8, len: usize) {
        for offset in (0..len).step_by(64) {
            // SAFETY: a prefetch is a hint that never faults nor reads into the program.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset) as *const i8) };
        }
    }

    use super::StreamPrefetch;

    /// Four rows against one input: one accumulator per row (four independent FMA chains).
    /// Asks for the line `prefetch.near` bytes past `line` into L1 and the one `prefetch.far`
    /// past it into L2 (0: not at all), for the four-row kernels' streams. A prefetch is a hint
    /// and never faults; past a row it reaches the stream's next rows (`wrapping_add`: no
    /// pointer UB). The plan's branches go the same way every time, so they are predicted.
    #[inline(always)]
    unsafe fn prefetch_ahead(line: *const i8, prefetch: StreamPrefetch) {
        if prefetch.near > 0 {
            _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(prefetch.near));
        }
        if prefetch.far > 0 {
            _mm_prefetch::<_MM_HINT_T1>(line.wrapping_add(prefetch.far));
        }
    }

    macro_rules! dot4_avx512 {
        ($name:ident, $t:ty, $load:ident, $tail:path) => {
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name(prefetch: StreamPrefetch, rows: [&[$t]; 4], x: &[f32]) -> [f32; 4] {
                let k = x.len();
                let (pw, px) = (rows.map(|row| row.as_ptr()), x.as_ptr());
                let mut acc = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                let per_line = 64 / size_of::<$t>();
                while i + 16 <= k {
                    let xv = _mm512_loadu_ps(px.add(i));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        // Once per cache line.
                        if i % per_line == 0 {
                            prefetch_ahead(pw[r].wrapping_add(i) as *const i8, prefetch);
                        }
                        *acc_r = _mm512_fmadd_ps($load(pw[r].add(i)), xv, *acc_r);
                    }
                    i += 16;
                }
                std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]) + $tail(&rows[r][i..], &x[i..]))
            }
        };
    }
    dot4_avx512!(dot4_f32_avx512, f32, load_f32x16, super::scalar::dot_f32);
    dot4_avx512!(dot4_f16_avx512, u16, load_f16x16, super::scalar::dot_f16);
    dot4_avx512!(dot4_bf16_avx512, u16, load_bf16x16, super::scalar::dot_bf16);

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_f32x16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let va = _mm512_set1_ps(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let r = _mm512_fmadd_ps(va, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), r);
            i += 16;
        }
        super::scalar::axpy(a, &x[i..], &mut y[i..]);
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, acc_u) in acc.iter_mut().enumerate() {
                let off = i + 8 * u;
                *acc_u = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(off)), _mm256_loadu_ps(pb.add(off)), *acc_u);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        hsum256(s) + super::scalar::dot_f32(&a[i..], &b[i..])
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16x8(p: *const u16) -> __m256 {
        let bits = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16x8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    macro_rules! dot_half_avx2 {
        ($name:ident, $load:ident, $tail:path) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(w: &[u16], x: &[f32]) -> f32 {
                let n = w.len();
                let (pw, px) = (w.as_ptr(), x.as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= n {
                    for (u, acc_u) in acc.iter_mut().enumerate() {
                        let off = i + 8 * u;
                        *acc_u = _mm256_fmadd_ps($load(pw.add(off)), _mm256_loadu_ps(px.add(off)), *acc_u);
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps($load(pw.add(i)), _mm256_loadu_ps(px.add(i)), acc[0]);
                    i += 8;
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                hsum256(s) + $tail(&w[i..], &x[i..])
            }
        };
    }
    dot_half_avx2!(dot_bf16_avx2, load_bf16x8, super::scalar::dot_bf16);
    dot_half_avx2!(dot_f16_avx2, load_f16x8, super::scalar::dot_f16);

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_f32x8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    /// The AVX2 form of `dot4_avx512`: 16 elements a step, two accumulators a row (eight in
    /// all, besides the two input vectors: ten of the 16 registers), the same per-line
    /// prefetches. Without it AVX2 decode dotted one row at a time, one load stream a core
    /// and no prefetch.
    macro_rules! dot4_avx2 {
        ($name:ident, $t:ty, $load:ident, $tail:path) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $name(prefetch: StreamPrefetch, rows: [&[$t]; 4], x: &[f32]) -> [f32; 4] {
                let k = x.len();
                let (pw, px) = (rows.map(|row| row.as_ptr()), x.as_ptr());
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                let per_line = 64 / size_of::<$t>();
                let mut i = 0;
                while i + 16 <= k {
                    let xv = [_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(px.add(i + 8))];
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        if i % per_line == 0 {
                            prefetch_ahead(pw[r].wrapping_add(i) as *const i8, prefetch);
                        }
                        acc_r[0] = _mm256_fmadd_ps($load(pw[r].add(i)), xv[0], acc_r[0]);
                        acc_r[1] = _mm256_fmadd_ps($load(pw[r].add(i + 8)), xv[1], acc_r[1]);
                    }
                    i += 16;
                }
                if i + 8 <= k {
                    let xv = _mm256_loadu_ps(px.add(i));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        acc_r[0] = _mm256_fmadd_ps($load(pw[r].add(i)), xv, acc_r[0]);
                    }
                    i += 8;
                }
                std::array::from_fn(|r| hsum256(_mm256_add_ps(acc[r][0], acc[r][1])) + $tail(&rows[r][i..], &x[i..]))
            }
        };
    }
    dot4_avx2!(dot4_f32_avx2, f32, load_f32x8, super::scalar::dot_f32);
    dot4_avx2!(dot4_f16_avx2, u16, load_f16x8, super::scalar::dot_f16);

    /// [`dot4_f32_avx2`] on bf16 rows, widened without a lane-crossing zero-extension: 16
    /// values loaded at once are two vectors of f32 by a shift (the even elements) and a mask
    /// (the odd ones), and the input is split into its even and odd elements once for the
    /// four rows. The zero-extending load ran the kernel at half the f16 one's rate in L1.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_bf16_avx2(prefetch: StreamPrefetch, rows: [&[u16]; 4], x: &[f32]) -> [f32; 4] {
        let k = x.len();
        let (pw, px) = (rows.map(|row| row.as_ptr()), x.as_ptr());
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i + 16 <= k {
            let (xa, xb) = (_mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(px.add(i + 8)));
            // Per 128-bit half the shuffles give elements 0,2,8,10 | 4,6,12,14 (and the odd
            // ones); the 64-bit permute puts them in order.
            let in_order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
            let x_even = in_order(_mm256_shuffle_ps::<0b10_00_10_00>(xa, xb));
            let x_odd = in_order(_mm256_shuffle_ps::<0b11_01_11_01>(xa, xb));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                if i % 32 == 0 {
                    prefetch_ahead(pw[r].wrapping_add(i) as *const i8, prefetch);
                }
                let bits = _mm256_loadu_si256(pw[r].add(i) as *const __m256i);
                let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(bits, high));
                acc_r[0] = _mm256_fmadd_ps(even, x_even, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(odd, x_odd, acc_r[1]);
            }
            i += 16;
        }
        std::array::from_fn(|r| hsum256(_mm256_add_ps(acc[r][0], acc[r][1])) + super::scalar::dot_bf16(&rows[r][i..], &x[i..]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let va = _mm256_set1_ps(a);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        super::scalar::axpy(a, &x[i..], &mut y[i..]);
    }

    /// exp on 16 lanes: `x = n·ln2 + r` with |r| ≤ ln2/2, a degree-6 Taylor polynomial for
    /// `e^r` (error below 2e-7 relative there), and `2^n` applied exactly by `vscalefps`.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        // ln 2 split in two so that n·ln2_hi is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_scaled_in_place_avx512(values: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (vs, vshift) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut total = _mm512_setzero_ps();
        // The argument is rounded as the scalar path rounds it (no fused multiply-subtract).
        let mut chunks = values.chunks_exact_mut(16);
        for chunk in &mut chunks {
            let e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(chunk.as_ptr()), vs), vshift));
            _mm512_storeu_ps(chunk.as_mut_ptr(), e);
            total = _mm512_add_ps(total, e);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask: __mmask16 = (1u16 << rest.len()) - 1;
            let e = exp16(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, rest.as_ptr()), vs), vshift));
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
        }
        _mm512_reduce_add_ps(total)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn silu_mul16(g: __m512, u: __m512) -> __m512 {
        // exp16 clamps its argument at -87, so e^-g stays finite down there; for g < -88.7 it
        // overflows to +inf and g / inf = -0, the limit.
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e)), u)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (pg, pu, po) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            _mm512_storeu_ps(po.add(i), silu_mul16(_mm512_loadu_ps(pg.add(i)), _mm512_loadu_ps(pu.add(i))));
            i += 16;
        }
        if i < n {
            let mask = lanes_in(n - i, 0);
            let v = silu_mul16(_mm512_maskz_loadu_ps(mask, pg.add(i)), _mm512_maskz_loadu_ps(mask, pu.add(i)));
            _mm512_mask_storeu_ps(po.add(i), mask, v);
        }
    }

    /// [`exp16`] on 8 lanes, with `2^n` built in the exponent bits instead of `vscalefps`: the
    /// argument is clamped to [-87, 88.7] so that those bits stay in range, which makes e^x
    /// +inf from 88.38 instead of near f32::MAX (softmax arguments are ≤ 0, and SiLU's
    /// g / (1 + e^-g) is -0 either way).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.7));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let two_to_n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))));
        _mm256_mul_ps(p, two_to_n)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_scaled_in_place_avx2(values: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (vs, vshift) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
        let mut total = _mm256_setzero_ps();
        // The argument is rounded as the scalar path rounds it (no fused multiply-subtract).
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), vs), vshift));
            _mm256_storeu_ps(chunk.as_mut_ptr(), e);
            total = _mm256_add_ps(total, e);
        }
        hsum256(total) + super::scalar::exp_scaled_in_place(chunks.into_remainder(), scale, shift)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (pg, pu, po) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let (g, u) = (_mm256_loadu_ps(pg.add(i)), _mm256_loadu_ps(pu.add(i)));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_storeu_ps(po.add(i), _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u));
            i += 8;
        }
        super::scalar::silu_mul(&gate[i..], &up[i..], &mut out[i..]);
    }

    /// The lanes of vector `v` (of a run of 16-float vectors) that fall inside `len` values.
    #[inline]
    fn lanes_in(len: usize, v: usize) -> __mmask16 {
        let inside = len.saturating_sub(16 * v).min(16);
        ((1u32 << inside) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_matches_a_scalar_fold_at_awkward_lengths() {
        let values: Vec<f32> = (0..203).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37).collect();
        for len in [0usize, 1, 5, 15, 16, 17, 33, 100, 203] {
            let x = &values[..len];
            let expected = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_f32(x), expected, "length {len}");
        }
        // The largest value last, in the remainder, and first.
        let mut x = vec![-1.0f32; 40];
        for at in [0, 15, 16, 39] {
            x.iter_mut().for_each(|v| *v = -1.0);
            x[at] = 3.5;
            assert_eq!(max_f32(&x), 3.5, "largest at {at}");
        }
    }

    #[test]
    fn prefetch_changes_nothing_for_any_slice() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        for range in [0..0, 0..1, 3..17, 1..1000] {
            prefetch(&values[range]);
        }
        let bytes = vec![7u8; 3 << 20];
        prefetch(&bytes[1..]);
        prefetch::<u16>(&[]);
        assert!(values.iter().enumerate().all(|(i, &v)| v == i as f32) && bytes.iter().all(|&b| b == 7));
    }
    use rand::{Rng, SeedableRng};

    const AWKWARD_LENGTHS: [usize; 12] = [1, 3, 7, 15, 16, 17, 31, 63, 64, 65, 200, 577];

    fn random_vec(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0) + 1e-3).collect()
    }

    fn tolerance(a: &[f32], b: &[f32]) -> f32 {
        let mag: f32 = a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum();
        1e-5 * mag + 1e-6
    }

    #[test]
    fn dot_products_match_scalar_reference_on_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for level in SimdLevel::all_supported() {
            for n in AWKWARD_LENGTHS {
                let a = random_vec(&mut rng, n);
                let b = random_vec(&mut rng, n);
                let want = scalar::dot_f32(&a, &b);
                let got = dot_f32(level, &a, &b);
                assert!((want - got).abs() <= tolerance(&a, &b), "{level} n={n}: {got} vs {want}");

                let wb: Vec<u16> = a.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                let wb_f32: Vec<f32> = wb.iter().map(|&v| scalar::bf16_bits_to_f32(v)).collect();
                let want = scalar::dot_bf16(&wb, &b);
                let got = dot_bf16(level, &wb, &b);
                assert!((want - got).abs() <= tolerance(&wb_f32, &b), "bf16 {level} n={n}: {got} vs {want}");

                let wh: Vec<u16> = a.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                let wh_f32: Vec<f32> = wh.iter().map(|&v| scalar::f16_bits_to_f32(v)).collect();
                let want = scalar::dot_f16(&wh, &b);
                let got = dot_f16(level, &wh, &b);
                assert!((want - got).abs() <= tolerance(&wh_f32, &b), "f16 {level} n={n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn four_row_dots_match_the_scalar_reference_on_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for level in SimdLevel::all_supported() {
            for k in AWKWARD_LENGTHS {
                let w = random_vec(&mut rng, 4 * k);
                let w16: Vec<u16> = w.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                let wb: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
                let x = random_vec(&mut rng, k);
                // Rows in any order: the kernels take four independent slices.
                let order = [2usize, 0, 3, 1];
                let (rows, rows16, rows_b): (Vec<&[f32]>, Vec<&[u16]>, Vec<&[u16]>) = (w.chunks(k).collect(), w16.chunks(k).collect(), wb.chunks(k).collect());
                let got = dot4_f32(level, StreamPrefetch::DEFAULT, order.map(|o| rows[o]), &x);
                let got16 = dot4_f16(level, StreamPrefetch::DEFAULT, order.map(|o| rows16[o]), &x);
                let got_b = dot4_bf16(level, StreamPrefetch::DEFAULT, order.map(|o| rows_b[o]), &x);
                // A plan is a hint: every plan gives the same bits.
                for plan in StreamPrefetch::CANDIDATES {
                    assert_eq!(dot4_f32(level, plan, order.map(|o| rows[o]), &x).map(f32::to_bits), got.map(f32::to_bits), "{level} k={k} f32 {plan}");
                    assert_eq!(dot4_f16(level, plan, order.map(|o| rows16[o]), &x).map(f32::to_bits), got16.map(f32::to_bits), "{level} k={k} f16 {plan}");
                    assert_eq!(dot4_bf16(level, plan, order.map(|o| rows_b[o]), &x).map(f32::to_bits), got_b.map(f32::to_bits), "{level} k={k} bf16 {plan}");
                }
                for (r, &o) in order.iter().enumerate() {
                    let row = rows[o];
                    let want = scalar::dot_f32(row, &x);
                    assert!((want - got[r]).abs() <= tolerance(row, &x), "{level} k={k} row {r}: {} vs {want}", got[r]);
                    let want16 = scalar::dot_f16(rows16[o], &x);
                    assert!((want16 - got16[r]).abs() <= tolerance(row, &x), "{level} f16 k={k} row {r}: {} vs {want16}", got16[r]);
                    let want_b = scalar::dot_bf16(rows_b[o], &x);
                    assert!((want_b - got_b[r]).abs() <= tolerance(row, &x), "{level} bf16 k={k} row {r}: {} vs {want_b}", got_b[r]);
                }
            }
        }
    }

    #[test]
    fn axpy_matches_scalar_reference_on_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for level in SimdLevel::all_supported() {
            for n in AWKWARD_LENGTHS {
                let x = random_vec(&mut rng, n);
                let y0 = random_vec(&mut rng, n);
                let mut want = y0.clone();
                scalar::axpy(0.37, &x, &mut want);
                let mut got = y0.clone();
                axpy(level, 0.37, &x, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{level} n={n}");
                }
            }
        }
    }

    #[test]
    fn half_widening_is_exact() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let v = random_vec(&mut rng, 333);
        let b: Vec<u16> = v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let h: Vec<u16> = v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
        let mut out = vec![f32::NAN; v.len()];
        bf16_to_f32(&b, &mut out);
        for (o, &bits) in out.iter().zip(&b) {
            assert_eq!(*o, half::bf16::from_bits(bits).to_f32());
        }
        f16_to_f32(&h, &mut out);
        for (o, &bits) in out.iter().zip(&h) {
            assert_eq!(*o, half::f16::from_bits(bits).to_f32());
        }
    }

    #[test]
    fn f16_narrowing_rounds_to_nearest_and_saturates() {
        let values = [0.0f32, -1.5, 1.0 + 1e-4, 65504.0, 70000.0, -1e9, f32::INFINITY, 3e-8, f32::NAN];
        let mut bits = vec![0u16; values.len()];
        f32_to_f16_saturating(&values, &mut bits);
        let back: Vec<f32> = bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
        for (&v, &b) in values[..4].iter().zip(&back) {
            assert_eq!(b, half::f16::from_f32(v).to_f32(), "{v}");
        }
        assert_eq!(&back[4..7], &[65504.0, -65504.0, 65504.0]);
        assert_eq!(back[7], half::f16::from_f32(3e-8).to_f32());
        assert!(back[8].is_nan());
        // Longer than one 64-value chunk, with a ragged end.
        let long: Vec<f32> = (0..150).map(|i| i as f32 * 0.37 - 20.0).collect();
        let mut bits = vec![0u16; long.len()];
        f32_to_f16_saturating(&long, &mut bits);
        for (&v, &b) in long.iter().zip(&bits) {
            assert_eq!(b, half::f16::from_f32(v).to_bits());
        }
    }

    #[test]
    fn silu_mul_matches_the_scalar_reference_on_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for level in SimdLevel::all_supported() {
            for n in AWKWARD_LENGTHS {
                // Wide enough to reach exp's clamp and overflow on both sides.
                let mut gate: Vec<f32> = (0..n).map(|_| rng.random_range(-120.0f32..120.0)).collect();
                if n > 3 {
                    gate[..3].copy_from_slice(&[0.0, -1e-30, 1e-3]);
                }
                let up = random_vec(&mut rng, n);
                let mut want = vec![0.0; n];
                scalar::silu_mul(&gate, &up, &mut want);
                let mut got = vec![f32::NAN; n];
                silu_mul(level, &gate, &up, &mut got);
                for ((g, w), x) in got.iter().zip(&want).zip(&gate) {
                    assert!((g - w).abs() <= 2e-6 * w.abs() + 1e-30, "{level} n={n}: silu({x})·u = {g}, want {w}");
                }
            }
        }
    }

    #[test]
    fn exp_matches_the_standard_library_on_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for level in SimdLevel::all_supported() {
            for n in AWKWARD_LENGTHS {
                let values: Vec<f32> = (0..n).map(|_| rng.random_range(-60.0f32..10.0)).collect();
                let (scale, shift) = (1.7f32, 10.0f32);
                let mut got = values.clone();
                let total = exp_scaled_in_place(level, &mut got, scale, shift);
                let mut want_total = 0.0f64;
                for (g, v) in got.iter().zip(&values) {
                    let want = ((v * scale - shift) as f64).exp();
                    want_total += want;
                    assert!((*g as f64 - want).abs() <= 1e-6 * want + 1e-37, "{level}: exp({}) = {g}, want {want}", v * scale - shift);
                }
                assert!((total as f64 - want_total).abs() <= 1e-5 * want_total + 1e-37, "{level} n={n}: {total} vs {want_total}");
            }
        }
    }
}
