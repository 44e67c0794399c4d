//! Run-time dispatched kernels of decode attention over the CPU KV cache (AVX-512, AVX2, scalar
//! reference): the scores of a GQA group's query heads against one KV head's keys, and the
//! weighted sums of its values, each cached entry read once for every head of the group.
//!
//! Keys are stored in blocks of [`KEY_BLOCK`] positions, dimension-major inside a block
//! (`block[d][position]`): sixteen positions' scores then accumulate in the lanes of one vector,
//! each key vector is loaded (and widened from f16) once for all the group's heads, and no
//! horizontal sums are needed. Values stay position-major (`[position][d]`), which is what their
//! weighted sum reads best. Entries are f32 or f16 bits (widened as they are loaded).

use super::simd::SimdLevel;

/// Positions per key block (the lanes of one AVX-512 vector).
pub const KEY_BLOCK: usize = 16;

/// `positions` rounded up to whole key blocks: the room keys take (a partial block is stored
/// whole, its unused positions never scored).
pub fn whole_blocks(positions: usize) -> usize {
    positions.div_ceil(KEY_BLOCK) * KEY_BLOCK
}

/// Where key `(position, d)` lies in a run of key blocks that starts at a block boundary.
pub fn key_index(position: usize, d: usize, head_dim: usize) -> usize {
    (position / KEY_BLOCK) * KEY_BLOCK * head_dim + d * KEY_BLOCK + position % KEY_BLOCK
}

/// An element of the cache: f32, or f16 bits.
pub trait CacheValue: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}

impl CacheValue for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl CacheValue for u16 {
    fn widen(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

pub mod scalar {
    //! Plain loops: the references the SIMD paths are tested against.
    use super::{key_index, CacheValue};

    pub fn group_scores<T: CacheValue>(queries: &[f32], head_dim: usize, keys: &[T], out: &mut [f32]) {
        let heads = queries.len() / head_dim;
        let count = out.len() / heads.max(1);
        for h in 0..heads {
            for t in 0..count {
                out[h * count + t] = (0..head_dim).map(|d| queries[h * head_dim + d] * keys[key_index(t, d, head_dim)].widen()).sum();
            }
        }
    }

    pub fn group_values<T: CacheValue>(weights: &[f32], values: &[T], head_dim: usize, y: &mut [f32]) {
        let heads = y.len() / head_dim;
        let count = weights.len() / heads.max(1);
        for h in 0..heads {
            for t in 0..count {
                let w = weights[h * count + t];
                for d in 0..head_dim {
                    y[h * head_dim + d] += w * values[t * head_dim + d].widen();
                }
            }
        }
    }
}

/// The shapes every dispatcher checks before a SIMD body runs unchecked.
fn check_scores(queries: usize, head_dim: usize, keys: usize, out: usize) {
    assert!(head_dim > 0 && queries % head_dim == 0 && queries > 0, "queries must be whole heads");
    let heads = queries / head_dim;
    assert!(out % heads == 0, "scores must be [heads][positions]");
    let count = out / heads;
    assert!(whole_blocks(count) * head_dim <= keys, "key blocks exceed their slice");
}

fn check_values(weights: usize, values: usize, head_dim: usize, y: usize) {
    assert!(head_dim > 0 && y % head_dim == 0 && y > 0, "sums must be whole heads");
    let heads = y / head_dim;
    assert!(weights % heads == 0, "weights must be [heads][positions]");
    assert!(weights / heads * head_dim <= values, "value rows exceed their slice");
}

/// `out[h][t] = queries[h] · key(t)` for the group's heads (`queries` is `[heads][head_dim]`,
/// `out` is `[heads][positions]`), over key blocks starting at a block boundary. `keys` may run
/// on past the positions scored: the kernels prefetch into the rest (decode passes a span's keys
/// up to the head's last position).
pub fn group_scores(level: SimdLevel, queries: &[f32], head_dim: usize, keys: &[f32], out: &mut [f32]) {
    check_scores(queries.len(), head_dim, keys.len(), out.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected on this CPU; check_scores bounds every block.
        SimdLevel::Avx512 => unsafe { x86::group_scores_f32_avx512(queries, head_dim, keys, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::group_scores_f32_avx2(queries, head_dim, keys, out) },
        _ => scalar::group_scores(queries, head_dim, keys, out),
    }
}

/// [`group_scores`] over keys held as f16 bits.
pub fn group_scores_f16(level: SimdLevel, queries: &[f32], head_dim: usize, keys: &[u16], out: &mut [f32]) {
    check_scores(queries.len(), head_dim, keys.len(), out.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in group_scores.
        SimdLevel::Avx512 => unsafe { x86::group_scores_f16_avx512(queries, head_dim, keys, out) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::group_scores_f16_avx2(queries, head_dim, keys, out) },
        _ => scalar::group_scores(queries, head_dim, keys, out),
    }
}

/// `y[h] += Σ_t weights[h][t] · value(t)` for the group's heads (`weights` is
/// `[heads][positions]`, `y` is `[heads][head_dim]`, `values` is `[positions][head_dim]`, or
/// longer: rows past the positions weighted are only prefetched).
pub fn group_values(level: SimdLevel, weights: &[f32], values: &[f32], head_dim: usize, y: &mut [f32]) {
    check_values(weights.len(), values.len(), head_dim, y.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was detected on this CPU; check_values bounds every row.
        SimdLevel::Avx512 => unsafe { x86::group_values_f32_avx512(weights, values, head_dim, y) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::group_values_f32_avx2(weights, values, head_dim, y) },
        _ => scalar::group_values(weights, values, head_dim, y),
    }
}

/// [`group_values`] over values held as f16 bits.
pub fn group_values_f16(level: SimdLevel, weights: &[f32], values: &[u16], head_dim: usize, y: &mut [f32]) {
    check_values(weights.len(), values.len(), head_dim, y.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in group_values.
        SimdLevel::Avx512 => unsafe { x86::group_values_f16_avx512(weights, values, head_dim, y) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::group_values_f16_avx2(weights, values, head_dim, y) },
        _ => scalar::group_values(weights, values, head_dim, y),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The `#[target_feature]` bodies; callers have checked the shapes.
    use super::KEY_BLOCK;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_f32(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_f16(p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16_f32_masked(mask: __mmask16, p: *const f32) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_f16_masked(mask: __mmask16, p: *const u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8_f16(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    // How far ahead of the entries being read the kernels ask for cache lines: the distances of
    // the weight kernels, into L1 a little ahead and into L2 further ahead. Decode streams each
    // span of the cache once; without prefetches attention after 4000 tokens read at about half
    // the bandwidth the weights reach (the hardware prefetchers stop at every 4 KiB page and
    // restart on each short span). One distance into L1 (2 KiB) still left the kernels at ~0.73
    // of a plain read of the same spans: each such prefetch holds an L1 fill buffer for a whole
    // memory latency, so few lines were in flight. Asking L2 for the lines 8 KiB ahead as well
    // made the kernels 1.10-1.18x faster over a cold cache (two kernels alternated layer by layer
    // in one process, 4000 positions, 2 threads) and decode after 4000 tokens 1.03x.
    use super::super::simd::{FAR_PREFETCH_BYTES, NEAR_PREFETCH_BYTES};

    /// Asks for the lines `NEAR_PREFETCH_BYTES` (into L1) and `FAR_PREFETCH_BYTES` (into L2)
    /// past `p`; the far one only before `end`, the end of the rows the caller gave. Those rows
    /// run on past the span to the head's last position, so the far prefetch reaches the next
    /// span (often the same thread's next task) but not the cache's unwritten room, which at
    /// short contexts it would read for nothing. (Hints: they never fault; wrapping_add keeps
    /// the pointers defined.)
    ///
    /// Safety: none beyond the caller's (SSE, part of the x86-64 baseline; shared by the AVX-512
    /// and AVX2 kernels).
    #[inline(always)]
    unsafe fn prefetch_ahead<T>(p: *const T, end: *const T) {
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(NEAR_PREFETCH_BYTES));
        if (p as usize).wrapping_add(FAR_PREFETCH_BYTES) < end as usize {
            _mm_prefetch::<_MM_HINT_T1>((p as *const i8).wrapping_add(FAR_PREFETCH_BYTES));
        }
    }

    /// [`prefetch_ahead`] for each cache line of the (up to) 64 values of a row from `p`.
    #[inline(always)]
    unsafe fn prefetch_row_ahead<T>(p: *const T, len: usize, end: *const T) {
        for line in (0..len.min(64) * size_of::<T>()).step_by(64) {
            prefetch_ahead((p as *const u8).wrapping_add(line), end as *const u8);
        }
    }

    /// The first `len` lanes (at most 16).
    #[inline]
    fn first_lanes(len: usize) -> __mmask16 {
        ((1u32 << len.min(16)) - 1) as __mmask16
    }

    macro_rules! group_kernels {
        ($t:ty, $scores:ident, $scores_heads:ident, $values:ident, $values_heads:ident, $load:ident, $load_masked:ident,
         $scores2:ident, $scores2_heads:ident, $values2:ident, $values2_heads:ident, $load8:ident, $axpy8_tail:path) => {
            /// `H` heads over every block; `C` accumulators per head (independent FMA chains
            /// over alternate dimensions) so that `H·C ≥ 8` hides the FMA latency. Each key
            /// vector is loaded once and multiplied by every head's broadcast query element.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            unsafe fn $scores_heads<const H: usize, const C: usize>(queries: *const f32, hd: usize, keys: *const $t, end: *const $t, count: usize, out: *mut f32) {
                for block in 0..count.div_ceil(KEY_BLOCK) {
                    let keys = keys.add(block * KEY_BLOCK * hd);
                    let mut acc = [[_mm512_setzero_ps(); C]; H];
                    let mut d = 0;
                    while d + C <= hd {
                        for (c, lane) in (d..d + C).enumerate() {
                            // Once per cache line of the block.
                            if (lane * KEY_BLOCK * size_of::<$t>()) % 64 == 0 {
                                prefetch_ahead(keys.add(lane * KEY_BLOCK), end);
                            }
                            let k = $load(keys.add(lane * KEY_BLOCK));
                            for (h, acc_h) in acc.iter_mut().enumerate() {
                                acc_h[c] = _mm512_fmadd_ps(_mm512_set1_ps(*queries.add(h * hd + lane)), k, acc_h[c]);
                            }
                        }
                        d += C;
                    }
                    for lane in d..hd {
                        if (lane * KEY_BLOCK * size_of::<$t>()) % 64 == 0 {
                            prefetch_ahead(keys.add(lane * KEY_BLOCK), end);
                        }
                        let k = $load(keys.add(lane * KEY_BLOCK));
                        for (h, acc_h) in acc.iter_mut().enumerate() {
                            acc_h[0] = _mm512_fmadd_ps(_mm512_set1_ps(*queries.add(h * hd + lane)), k, acc_h[0]);
                        }
                    }
                    let first = block * KEY_BLOCK;
                    for (h, acc_h) in acc.iter().enumerate() {
                        let sum = acc_h[1..].iter().fold(acc_h[0], |s, &a| _mm512_add_ps(s, a));
                        _mm512_mask_storeu_ps(out.add(h * count + first), first_lanes(count - first), sum);
                    }
                }
            }

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            pub unsafe fn $scores(queries: &[f32], hd: usize, keys: &[$t], out: &mut [f32]) {
                let heads = queries.len() / hd;
                let count = out.len() / heads;
                let (q, k, o) = (queries.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
                let end = keys.as_ptr_range().end;
                // Up to four heads per pass over the keys (8 accumulators plus operands fit the
                // 32 registers); the common GQA groups of 2-4 heads take one pass.
                let mut h = 0;
                while h < heads {
                    let (q, o) = (q.add(h * hd), o.add(h * count));
                    match (heads - h).min(4) {
                        1 => $scores_heads::<1, 8>(q, hd, k, end, count, o),
                        2 => $scores_heads::<2, 4>(q, hd, k, end, count, o),
                        3 => $scores_heads::<3, 3>(q, hd, k, end, count, o),
                        _ => $scores_heads::<4, 2>(q, hd, k, end, count, o),
                    }
                    h += 4;
                }
            }

            /// `H` heads' sums for 64 values of the head dimension at a time, kept in
            /// registers across all positions; `E` alternating position chains per sum.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            unsafe fn $values_heads<const H: usize, const E: usize>(weights: *const f32, count: usize, values: *const $t, end: *const $t, hd: usize, y: *mut f32) {
                let mut c = 0;
                while c < hd {
                    let masks: [__mmask16; 4] = std::array::from_fn(|v| first_lanes((hd - c).saturating_sub(16 * v)));
                    let mut acc = [[[_mm512_setzero_ps(); 4]; H]; E];
                    let mut t = 0;
                    while t + E <= count {
                        for (e, acc_e) in acc.iter_mut().enumerate() {
                            let row = values.add((t + e) * hd + c);
                            prefetch_row_ahead(row, hd - c, end);
                            // Masked-out lanes read nothing, so the row's end is never passed.
                            let r: [__m512; 4] = std::array::from_fn(|v| $load_masked(masks[v], row.wrapping_add(16 * v)));
                            for (h, acc_h) in acc_e.iter_mut().enumerate() {
                                let w = _mm512_set1_ps(*weights.add(h * count + t + e));
                                for v in 0..4 {
                                    acc_h[v] = _mm512_fmadd_ps(w, r[v], acc_h[v]);
                                }
                            }
                        }
                        t += E;
                    }
                    for t in t..count {
                        let row = values.add(t * hd + c);
                        prefetch_row_ahead(row, hd - c, end);
                        let r: [__m512; 4] = std::array::from_fn(|v| $load_masked(masks[v], row.wrapping_add(16 * v)));
                        for (h, acc_h) in acc[0].iter_mut().enumerate() {
                            let w = _mm512_set1_ps(*weights.add(h * count + t));
                            for v in 0..4 {
                                acc_h[v] = _mm512_fmadd_ps(w, r[v], acc_h[v]);
                            }
                        }
                    }
                    for h in 0..H {
                        for v in 0..4 {
                            let at = y.add(h * hd + c).wrapping_add(16 * v);
                            let sum = acc[1..].iter().fold(acc[0][h][v], |s, a| _mm512_add_ps(s, a[h][v]));
                            _mm512_mask_storeu_ps(at, masks[v], _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], at), sum));
                        }
                    }
                    c += 64;
                }
            }

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
            pub unsafe fn $values(weights: &[f32], values: &[$t], hd: usize, y: &mut [f32]) {
                let heads = y.len() / hd;
                let count = weights.len() / heads;
                let (w, v, o) = (weights.as_ptr(), values.as_ptr(), y.as_mut_ptr());
                let end = values.as_ptr_range().end;
                // Four rows loaded, up to 4·H sums: two heads or fewer alternate two position
                // chains per sum (otherwise too few chains to hide the FMA latency).
                let mut h = 0;
                while h < heads {
                    let (w, o) = (w.add(h * count), o.add(h * hd));
                    match (heads - h).min(4) {
                        1 => $values_heads::<1, 2>(w, count, v, end, hd, o),
                        2 => $values_heads::<2, 2>(w, count, v, end, hd, o),
                        3 => $values_heads::<3, 1>(w, count, v, end, hd, o),
                        _ => $values_heads::<4, 1>(w, count, v, end, hd, o),
                    }
                    h += 4;
                }
            }

            /// AVX2: a block of sixteen positions is two vectors; up to three heads per pass
            /// (12 accumulators and the operands fill the 16 registers), prefetching as the
            /// AVX-512 kernel does (without, a cold span was read at a fraction of the bandwidth).
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $scores2_heads<const H: usize, const C: usize>(queries: *const f32, hd: usize, keys: *const $t, end: *const $t, count: usize, out: *mut f32) {
                for block in 0..count.div_ceil(KEY_BLOCK) {
                    let keys = keys.add(block * KEY_BLOCK * hd);
                    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; H];
                    let mut d = 0;
                    while d < hd {
                        // C dimensions at a time where they remain, then one.
                        let take = if d + C <= hd { C } else { 1 };
                        for (c, lane) in (d..d + take).enumerate() {
                            if (lane * KEY_BLOCK * size_of::<$t>()) % 64 == 0 {
                                prefetch_ahead(keys.add(lane * KEY_BLOCK), end);
                            }
                            let k = [$load8(keys.add(lane * KEY_BLOCK)), $load8(keys.add(lane * KEY_BLOCK + 8))];
                            for (h, acc_h) in acc.iter_mut().enumerate() {
                                let q = _mm256_set1_ps(*queries.add(h * hd + lane));
                                acc_h[c][0] = _mm256_fmadd_ps(q, k[0], acc_h[c][0]);
                                acc_h[c][1] = _mm256_fmadd_ps(q, k[1], acc_h[c][1]);
                            }
                        }
                        d += take;
                    }
                    let first = block * KEY_BLOCK;
                    let take = (count - first).min(KEY_BLOCK);
                    for (h, acc_h) in acc.iter().enumerate() {
                        let mut sums = [0.0f32; KEY_BLOCK];
                        for half in 0..2 {
                            let sum = acc_h[1..].iter().fold(acc_h[0][half], |s, a| _mm256_add_ps(s, a[half]));
                            _mm256_storeu_ps(sums.as_mut_ptr().add(8 * half), sum);
                        }
                        std::ptr::copy_nonoverlapping(sums.as_ptr(), out.add(h * count + first), take);
                    }
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $scores2(queries: &[f32], hd: usize, keys: &[$t], out: &mut [f32]) {
                let heads = queries.len() / hd;
                let count = out.len() / heads;
                let (q, k, o) = (queries.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
                let end = keys.as_ptr_range().end;
                let mut h = 0;
                while h < heads {
                    let (q, o) = (q.add(h * hd), o.add(h * count));
                    match (heads - h).min(3) {
                        1 => $scores2_heads::<1, 4>(q, hd, k, end, count, o),
                        2 => $scores2_heads::<2, 2>(q, hd, k, end, count, o),
                        _ => $scores2_heads::<3, 2>(q, hd, k, end, count, o),
                    }
                    h += 3;
                }
            }

            /// AVX2: `H` heads' sums for `8·V` values of the head dimension at a time, kept in
            /// registers across all positions (sums in memory, loaded and stored per position,
            /// made the value pass the slower half of AVX2 decode attention).
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $values2_heads<const H: usize, const V: usize>(weights: *const f32, count: usize, values: *const $t, end: *const $t, hd: usize, c: usize, y: *mut f32) {
                let mut acc = [[_mm256_setzero_ps(); V]; H];
                for t in 0..count {
                    let row = values.add(t * hd + c);
                    prefetch_row_ahead(row, 8 * V, end);
                    for v in 0..V {
                        let r = $load8(row.add(8 * v));
                        for (h, acc_h) in acc.iter_mut().enumerate() {
                            acc_h[v] = _mm256_fmadd_ps(_mm256_set1_ps(*weights.add(h * count + t)), r, acc_h[v]);
                        }
                    }
                }
                for (h, acc_h) in acc.iter().enumerate() {
                    for (v, &sum) in acc_h.iter().enumerate() {
                        let at = y.add(h * hd + c + 8 * v);
                        _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), sum));
                    }
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $values2(weights: &[f32], values: &[$t], hd: usize, y: &mut [f32]) {
                let heads = y.len() / hd;
                let count = weights.len() / heads;
                let (w, v, o) = (weights.as_ptr(), values.as_ptr(), y.as_mut_ptr());
                let end = values.as_ptr_range().end;
                let mut h = 0;
                while h < heads {
                    let (w, o) = (w.add(h * count), o.add(h * hd));
                    let group = (heads - h).min(3);
                    // 32 dimensions per pass (12 sums for three heads), then 8, then the rest
                    // one at a time.
                    let mut c = 0;
                    while c + 32 <= hd {
                        match group {
                            1 => $values2_heads::<1, 4>(w, count, v, end, hd, c, o),
                            2 => $values2_heads::<2, 4>(w, count, v, end, hd, c, o),
                            _ => $values2_heads::<3, 4>(w, count, v, end, hd, c, o),
                        }
                        c += 32;
                    }
                    while c + 8 <= hd {
                        match group {
                            1 => $values2_heads::<1, 1>(w, count, v, end, hd, c, o),
                            2 => $values2_heads::<2, 1>(w, count, v, end, hd, c, o),
                            _ => $values2_heads::<3, 1>(w, count, v, end, hd, c, o),
                        }
                        c += 8;
                    }
                    if c < hd {
                        for i in 0..group {
                            let y = std::slice::from_raw_parts_mut(o.add(i * hd + c), hd - c);
                            for t in 0..count {
                                $axpy8_tail(*w.add(i * count + t), values.get_unchecked(t * hd + c..(t + 1) * hd), y);
                            }
                        }
                    }
                    h += 3;
                }
            }
        };
    }

    fn axpy_tail<T: super::CacheValue>(w: f32, row: &[T], y: &mut [f32]) {
        for (y, &v) in y.iter_mut().zip(row) {
            *y += w * v.widen();
        }
    }

    group_kernels!(f32, group_scores_f32_avx512, scores_heads_f32, group_values_f32_avx512, values_heads_f32, load16_f32, load16_f32_masked,
        group_scores_f32_avx2, scores2_heads_f32, group_values_f32_avx2, values2_heads_f32, load8_f32, axpy_tail);
    group_kernels!(u16, group_scores_f16_avx512, scores_heads_f16, group_values_f16_avx512, values_heads_f16, load16_f16, load16_f16_masked,
        group_scores_f16_avx2, scores2_heads_f16, group_values_f16_avx2, values2_heads_f16, load8_f16, axpy_tail);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Keys of `count` positions in the blocked layout (the padding of the last block random
    /// too, so a kernel that let it into a score would be caught).
    fn blocked_keys(rng: &mut impl Rng, count: usize, hd: usize) -> Vec<f32> {
        (0..whole_blocks(count) * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn close(got: &[f32], want: &[f32], scale: f32, what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * scale, "{what} [{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn group_kernels_match_the_scalar_reference_on_every_level() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for level in SimdLevel::all_supported() {
            // Group sizes across the 1-4 head passes and past them; head sizes with tails.
            for (heads, hd, count) in [(3usize, 64usize, 100usize), (1, 64, 16), (2, 64, 33), (4, 128, 70), (5, 64, 47), (7, 80, 5), (3, 17, 31), (6, 3, 1), (3, 64, 0)] {
                let queries: Vec<f32> = (0..heads * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let keys = blocked_keys(&mut rng, count, hd);
                let keys16: Vec<u16> = keys.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                let scale = 2.0 * hd as f32;
                let mut want = vec![0.0; heads * count];
                scalar::group_scores(&queries, hd, &keys, &mut want);
                let mut got = vec![f32::NAN; heads * count];
                group_scores(level, &queries, hd, &keys, &mut got);
                close(&got, &want, scale, &format!("{level} scores {heads}x{hd}x{count}"));
                scalar::group_scores(&queries, hd, &keys16, &mut want);
                group_scores_f16(level, &queries, hd, &keys16, &mut got);
                close(&got, &want, scale, &format!("{level} f16 scores {heads}x{hd}x{count}"));

                let weights: Vec<f32> = (0..heads * count).map(|_| rng.random_range(0.0f32..1.0)).collect();
                let values: Vec<f32> = (0..count * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let values16: Vec<u16> = values.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
                let y0: Vec<f32> = (0..heads * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let scale = 2.0 * count.max(1) as f32;
                let (mut want, mut got) = (y0.clone(), y0.clone());
                scalar::group_values(&weights, &values, hd, &mut want);
                group_values(level, &weights, &values, hd, &mut got);
                close(&got, &want, scale, &format!("{level} values {heads}x{hd}x{count}"));
                let (mut want, mut got) = (y0.clone(), y0.clone());
                scalar::group_values(&weights, &values16, hd, &mut want);
                group_values_f16(level, &weights, &values16, hd, &mut got);
                close(&got, &want, scale, &format!("{level} f16 values {heads}x{hd}x{count}"));
            }
        }
    }

    #[test]
    fn rows_past_the_positions_are_never_read_into_a_result() {
        // Decode passes a span's rows up to the head's last position, for the kernels'
        // prefetches: NaN there (more than the far prefetch distance of it) must change nothing.
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let (heads, hd, count, extra) = (3usize, 64usize, 100usize, 400usize);
        let queries: Vec<f32> = (0..heads * hd).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let weights: Vec<f32> = (0..heads * count).map(|_| rng.random_range(0.0f32..1.0)).collect();
        let keys = blocked_keys(&mut rng, count, hd);
        let values: Vec<f32> = (0..count * hd).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let longer = |v: &[f32]| v.iter().copied().chain(std::iter::repeat_n(f32::NAN, extra * hd)).collect::<Vec<f32>>();
        let (long_keys, long_values) = (longer(&keys), longer(&values));
        let bits = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect::<Vec<u16>>();
        for level in SimdLevel::all_supported() {
            let (mut want, mut got) = (vec![0.0; heads * count], vec![0.0; heads * count]);
            group_scores(level, &queries, hd, &keys, &mut want);
            group_scores(level, &queries, hd, &long_keys, &mut got);
            assert_eq!(got, want, "{level} scores");
            group_scores_f16(level, &queries, hd, &bits(&keys), &mut want);
            group_scores_f16(level, &queries, hd, &bits(&long_keys), &mut got);
            assert_eq!(got, want, "{level} f16 scores");
            let (mut want, mut got) = (vec![0.0; heads * hd], vec![0.0; heads * hd]);
            group_values(level, &weights, &values, hd, &mut want);
            group_values(level, &weights, &long_values, hd, &mut got);
            assert_eq!(got, want, "{level} values");
            let (mut want, mut got) = (vec![0.0; heads * hd], vec![0.0; heads * hd]);
            group_values_f16(level, &weights, &bits(&values), hd, &mut want);
            group_values_f16(level, &weights, &bits(&long_values), hd, &mut got);
            assert_eq!(got, want, "{level} f16 values");
        }
    }

    #[test]
    fn the_scalar_references_compute_plain_dot_products() {
        // The blocked layout against dot products written out by hand.
        let (hd, count) = (3usize, 18usize);
        let plain: Vec<Vec<f32>> = (0..count).map(|t| (0..hd).map(|d| (t * 10 + d) as f32).collect()).collect();
        let mut keys = vec![0.0f32; 2 * KEY_BLOCK * hd];
        for (t, row) in plain.iter().enumerate() {
            for (d, &v) in row.iter().enumerate() {
                keys[key_index(t, d, hd)] = v;
            }
        }
        let q = [1.0f32, -2.0, 0.5];
        let mut out = vec![0.0; count];
        scalar::group_scores(&q, hd, &keys, &mut out);
        for (t, row) in plain.iter().enumerate() {
            assert_eq!(out[t], row[0] - 2.0 * row[1] + 0.5 * row[2], "position {t}");
        }
    }

    #[test]
    #[should_panic(expected = "key blocks exceed")]
    fn short_key_blocks_are_refused() {
        // 17 positions need two whole blocks.
        let mut out = vec![0.0; 17];
        group_scores(SimdLevel::detect(), &[0.0; 4], 4, &[0.0; KEY_BLOCK * 4 + 4], &mut out);
    }
}
