//! The prefill product `x · Wᵀ` on AVX2: weight rows packed, widened from f16/bf16 or decoded
//! from Q8_0 blocks on the way, into 16-column panels that 6×16 FMA tiles of the input run
//! against.
//!
//! The `gemm` crate multiplies f32 only, so 16-bit weights were first widened into scratch in one
//! pass and then packed by the crate in another. Here the packing is the widening: each task
//! transposes its own weight rows, eight at a time through F16C or a shift, into panels of
//! `[k][16]` values, one block of depth at a time so that a panel stays in L1 while every 6-row
//! tile of the input (packed once, `[k][6]` per tile, shared by the tasks) passes it. The tile
//! keeps twelve 8-lane accumulators in registers: 12 FMAs to 2 loads and 6 broadcasts a step.
//! Tasks own disjoint runs of panels, so each writes its own output columns.
//!
//! Q8_0 row groups (16 rows, the panel's width) decode straight into panels: `d·q` is exact in
//! f32, so the product is that of the file's weights with the unquantized input, where the
//! integer kernels of `quant` at four input rows a step ran at ~31 GMAC/s a core against the
//! tile's ~40.

use rayon::prelude::*;

use super::quant::{BlockFormat, BlockMatrix, ROW_GROUP};
use super::simd::SimdLevel;

/// Weight columns in a packed panel (two 8-lane vectors).
const PANEL_COLUMNS: usize = 16;
/// Input rows in a tile (six broadcasts against the two panel vectors: 12 accumulators).
const TILE_ROWS: usize = 6;
/// The deepest block of `k` packed at once; the depth is split evenly into blocks of at most
/// this (576 stays one block, 1536 becomes three of 512): a panel block of 36 KiB at most.
const MAX_DEPTH_BLOCK: usize = 576;
/// Input rows passed against each panel before the next panel (16 tiles, ~216 KiB of packed
/// input at the deepest block: it stays in L2 while the task's panels go by).
const ROWS_PER_PASS: usize = 96;
/// Tasks per thread: a little slack against a core slowed by something else on the machine.
const TASKS_PER_THREAD: usize = 2;

/// Weights as stored: float ones `[n, k]` row-major, or a Q8_0 block matrix of `n` rows. bf16
/// weights meet the input rounded to bf16 (as on every bf16 path, see `bf16_products`), done
/// here as the input is packed.
#[derive(Debug, Clone, Copy)]
pub enum PanelWeights<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
    Q8_0(&'a BlockMatrix),
}

impl PanelWeights<'_> {
    /// Whether the weights hold an `[n, k]` matrix.
    fn holds(&self, n: usize, k: usize) -> bool {
        match self {
            PanelWeights::F32(w) => w.len() >= n * k,
            PanelWeights::F16(w) | PanelWeights::BF16(w) => w.len() >= n * k,
            PanelWeights::Q8_0(m) => m.format == BlockFormat::Q8_0 && m.rows == n && m.cols == k,
        }
    }

    /// The step depth blocks are rounded to: a whole Q8_0 block of 32, else a float.
    fn depth_step(&self) -> usize {
        match self {
            PanelWeights::Q8_0(_) => 32,
            _ => 1,
        }
    }
}

/// Whether [`product`] runs at `level` (AVX2, FMA and F16C on x86-64; at AVX-512 the tiles
/// run two panels at once in 16-lane registers).
pub fn available(level: SimdLevel) -> bool {
    cfg!(target_arch = "x86_64") && level >= SimdLevel::Avx2
}

/// `out[m, n] = x[m, k] · wᵀ` with `threads` tasks' worth of the calling pool; `scratch` holds
/// the packed input and panels (grown as needed, kept by the caller between products).
///
/// # Panics
/// If [`available`] is false for `level`, or a buffer is smaller than the shapes say.
#[allow(clippy::too_many_arguments)]
pub fn product(level: SimdLevel, threads: usize, x: &[f32], m: usize, k: usize, w: PanelWeights<'_>, n: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
    assert!(available(level), "the panel gemm needs AVX2, FMA and F16C");
    assert!(x.len() >= m * k && w.holds(n, k) && out.len() >= m * n, "panel gemm buffers too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    run(level == SimdLevel::Avx512, threads, x, m, k, w, n, &mut out[..m * n], scratch);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (threads, scratch);
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn run(wide: bool, threads: usize, x: &[f32], m: usize, k: usize, w: PanelWeights<'_>, n: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
    let panels = n.div_ceil(PANEL_COLUMNS);
    let panels_per_task = panels.div_ceil(threads.max(1) * TASKS_PER_THREAD);
    let depth = k.div_ceil(k.div_ceil(MAX_DEPTH_BLOCK)).next_multiple_of(w.depth_step());
    let tiles = m.div_ceil(TILE_ROWS);
    let (panel_len, input_len) = (panels * PANEL_COLUMNS * depth, tiles * TILE_ROWS * k);
    // 64-byte aligned panels (each is 64·depth bytes): no load of a step splits a cache line.
    const ALIGN_SLACK: usize = 16;
    if scratch.len() < panel_len + input_len + ALIGN_SLACK {
        scratch.resize(panel_len + input_len + ALIGN_SLACK, 0.0);
    }
    let offset = scratch.as_ptr().align_offset(64).min(ALIGN_SLACK);
    let (panel_space, packed_input) = scratch[offset..offset + panel_len + input_len].split_at_mut(panel_len);
    let round_to_bf16 = matches!(w, PanelWeights::BF16(_));
    packed_input.par_chunks_mut(TILE_ROWS * k).enumerate().for_each(|(t, tile)| pack_input_tile(x, m, k, t * TILE_ROWS, round_to_bf16, tile));
    let packed_input = &*packed_input;
    let out_columns = OutColumns { ptr: out.as_mut_ptr(), len: out.len() };
    panel_space.par_chunks_mut(panels_per_task * PANEL_COLUMNS * depth).enumerate().for_each(|(task, space)| {
        let first = task * panels_per_task;
        let own = first..(first + panels_per_task).min(panels);
        for k0 in (0..k).step_by(depth) {
            let block_depth = depth.min(k - k0);
            let panel_of = |p: usize| (p - own.start) * PANEL_COLUMNS * block_depth..(p - own.start + 1) * PANEL_COLUMNS * block_depth;
            for p in own.clone() {
                pack_panel(w, n, k, p * PANEL_COLUMNS, k0, block_depth, &mut space[panel_of(p)]);
            }
            for t0 in (0..tiles).step_by(ROWS_PER_PASS / TILE_ROWS) {
                // At AVX-512 a tile takes two adjacent panels (32 columns, 12 16-lane sums).
                let mut p = own.start;
                while p < own.end {
                    let count = if wide && p + 1 < own.end { 2 } else { 1 };
                    let panels = &space[panel_of(p).start..panel_of(p + count - 1).end];
                    for t in t0..(t0 + ROWS_PER_PASS / TILE_ROWS).min(tiles) {
                        let input = &packed_input[t * TILE_ROWS * k + k0 * TILE_ROWS..][..block_depth * TILE_ROWS];
                        let rows = (m - t * TILE_ROWS).min(TILE_ROWS);
                        let columns = p * PANEL_COLUMNS..(p * PANEL_COLUMNS + count * PANEL_COLUMNS).min(n);
                        // SAFETY: the task owns the columns of its panels in every row, so no
                        // other task writes the elements this tile touches; `wide` is only set
                        // at the AVX-512 level.
                        unsafe { out_columns.tile(wide, t * TILE_ROWS, rows, n, columns, input, panels, block_depth, k0 > 0) };
                    }
                    p += count;
                }
            }
        }
    });
}

/// The output shared by the tasks, each writing only the columns of its own panels.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct OutColumns {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint columns (see `tile`).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for OutColumns {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for OutColumns {}

#[cfg(target_arch = "x86_64")]
impl OutColumns {
    /// Rows `first_row..first_row + rows`, `columns` of the `[_, n]` output: set to (or, with
    /// `accumulate`, increased by) the tile product of `input` (`[depth][6]`) and `panels`
    /// (one or, with `wide`, up to two consecutive `[depth][16]` panels).
    ///
    /// # Safety
    /// No other thread may access those elements during the call, and `wide` needs AVX-512F.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(&self, wide: bool, first_row: usize, rows: usize, n: usize, columns: std::ops::Range<usize>, input: &[f32], panels: &[f32], depth: usize, accumulate: bool) {
        let count = panels.len() / (depth * PANEL_COLUMNS);
        assert!(panels.len() == count * depth * PANEL_COLUMNS && (1..=if wide { 2 } else { 1 }).contains(&count), "one panel, or two at AVX-512");
        assert!((1..=TILE_ROWS).contains(&rows) && input.len() >= depth * TILE_ROWS && columns.len() <= count * PANEL_COLUMNS);
        assert!((first_row + rows - 1) * n + columns.end <= self.len, "tile outside the output");
        assert_eq!(panels.as_ptr().align_offset(64), 0, "panels are 64-byte aligned");
        let c = self.ptr.add(first_row * n + columns.start);
        let (i, p, cols) = (input.as_ptr(), panels.as_ptr(), columns.len());
        if wide {
            let stride = depth * PANEL_COLUMNS;
            return match (rows, count) {
                (6, 2) => x86::tile_wide::<6, 2>(depth, i, p, stride, c, n, cols, accumulate),
                (5, 2) => x86::tile_wide::<5, 2>(depth, i, p, stride, c, n, cols, accumulate),
                (4, 2) => x86::tile_wide::<4, 2>(depth, i, p, stride, c, n, cols, accumulate),
                (3, 2) => x86::tile_wide::<3, 2>(depth, i, p, stride, c, n, cols, accumulate),
                (2, 2) => x86::tile_wide::<2, 2>(depth, i, p, stride, c, n, cols, accumulate),
                (_, 2) => x86::tile_wide::<1, 2>(depth, i, p, stride, c, n, cols, accumulate),
                (6, _) => x86::tile_wide::<6, 1>(depth, i, p, stride, c, n, cols, accumulate),
                (5, _) => x86::tile_wide::<5, 1>(depth, i, p, stride, c, n, cols, accumulate),
                (4, _) => x86::tile_wide::<4, 1>(depth, i, p, stride, c, n, cols, accumulate),
                (3, _) => x86::tile_wide::<3, 1>(depth, i, p, stride, c, n, cols, accumulate),
                (2, _) => x86::tile_wide::<2, 1>(depth, i, p, stride, c, n, cols, accumulate),
                _ => x86::tile_wide::<1, 1>(depth, i, p, stride, c, n, cols, accumulate),
            };
        }
        match rows {
            6 => x86::tile::<6>(depth, i, p, c, n, cols, accumulate),
            5 => x86::tile::<5>(depth, i, p, c, n, cols, accumulate),
            4 => x86::tile::<4>(depth, i, p, c, n, cols, accumulate),
            3 => x86::tile::<3>(depth, i, p, c, n, cols, accumulate),
            2 => x86::tile::<2>(depth, i, p, c, n, cols, accumulate),
            _ => x86::tile::<1>(depth, i, p, c, n, cols, accumulate),
        }
    }
}

/// Rows `first..first + 6` of `x` (zeros past `m`) interleaved: `tile[kk * 6 + r] = x[first + r][kk]`,
/// rounded to bf16 values if `round_to_bf16`.
fn pack_input_tile(x: &[f32], m: usize, k: usize, first: usize, round_to_bf16: bool, tile: &mut [f32]) {
    for r in 0..TILE_ROWS {
        let row = first + r;
        if row < m {
            for (kk, &v) in x[row * k..(row + 1) * k].iter().enumerate() {
                tile[kk * TILE_ROWS + r] = if round_to_bf16 { super::bf16_products::round_to_bf16_value(v) } else { v };
            }
        } else {
            for kk in 0..k {
                tile[kk * TILE_ROWS + r] = 0.0;
            }
        }
    }
}

/// Weight rows `j0..j0 + 16` (zeros past `n`), depth `k0..k0 + depth`, as f32 into
/// `panel[kk * 16 + i]`.
#[cfg(target_arch = "x86_64")]
fn pack_panel(w: PanelWeights<'_>, n: usize, k: usize, j0: usize, k0: usize, depth: usize, panel: &mut [f32]) {
    assert!(panel.len() == depth * PANEL_COLUMNS && k0 + depth <= k && j0 < n);
    if let PanelWeights::Q8_0(matrix) = w {
        // A panel is one row group (padding rows have zero scales and decode to zeros); the
        // depth blocks are whole blocks of 32.
        const { assert!(PANEL_COLUMNS == ROW_GROUP) };
        assert!(k0.is_multiple_of(32) && depth.is_multiple_of(32), "Q8_0 panels take whole blocks");
        let (quants, scales) = matrix.q8_0_group(j0 / ROW_GROUP);
        let blocks = k0 / 32..(k0 + depth) / 32;
        // SAFETY: `available` checked AVX2/F16C; the slices hold the group's blocks in
        // `blocks` (512 quant bytes and 16 scales each) and the panel 16 values per depth step.
        return unsafe { x86::pack_q8_0(&quants[blocks.start * 512..blocks.end * 512], &scales[blocks.start * 16..blocks.end * 16], panel) };
    }
    let rows = (n - j0).min(PANEL_COLUMNS);
    let vector_depth = if rows == PANEL_COLUMNS { depth / 8 * 8 } else { 0 };
    if vector_depth > 0 {
        // SAFETY: `available` checked AVX2/F16C; the loads read 8 values at `(j0 + i) * k + k0 + kk`
        // for i < 16, kk + 8 <= depth: inside `w` since j0 + 16 <= n and k0 + depth <= k.
        unsafe {
            match w {
                PanelWeights::F32(v) => x86::pack_f32(v, k, j0, k0, vector_depth, panel),
                PanelWeights::F16(v) => x86::pack_f16(v, k, j0, k0, vector_depth, panel),
                PanelWeights::BF16(v) => x86::pack_bf16(v, k, j0, k0, vector_depth, panel),
                PanelWeights::Q8_0(_) => unreachable!("Q8_0 panels returned above"),
            }
        }
    }
    for kk in vector_depth..depth {
        for i in 0..PANEL_COLUMNS {
            let at = (j0 + i) * k + k0 + kk;
            panel[kk * PANEL_COLUMNS + i] = if i >= rows {
                0.0
            } else {
                match w {
                    PanelWeights::F32(v) => v[at],
                    PanelWeights::F16(v) => super::simd::scalar::f16_bits_to_f32(v[at]),
                    PanelWeights::BF16(v) => super::simd::scalar::bf16_bits_to_f32(v[at]),
                    PanelWeights::Q8_0(_) => unreachable!("Q8_0 panels returned above"),
                }
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The `#[target_feature]` bodies: the 6×16 tile and the transposing panel packers.
    use super::PANEL_COLUMNS;
    use std::arch::x86_64::*;

    /// `c[r][j] (+)= Σ_kk input[kk * 6 + r] · panel[kk * 16 + j]` for r < R, j < cols, rows of
    /// `c` `c_stride` apart. Unrolled by four so the loop's own instructions stay few.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const R: usize>(depth: usize, input: *const f32, panel: *const f32, c: *mut f32, c_stride: usize, cols: usize, accumulate: bool) {
        let mut low = [_mm256_setzero_ps(); R];
        let mut high = [_mm256_setzero_ps(); R];
        let step = |p: *const f32, x: *const f32, low: &mut [__m256; R], high: &mut [__m256; R]| {
            let (w0, w1) = (_mm256_load_ps(p), _mm256_load_ps(p.add(8)));
            for r in 0..R {
                let b = _mm256_broadcast_ss(&*x.add(r));
                low[r] = _mm256_fmadd_ps(b, w0, low[r]);
                high[r] = _mm256_fmadd_ps(b, w1, high[r]);
            }
        };
        let (mut p, mut x) = (panel, input);
        for _ in 0..depth / 4 {
            for u in 0..4 {
                step(p.add(u * PANEL_COLUMNS), x.add(u * super::TILE_ROWS), &mut low, &mut high);
            }
            p = p.add(4 * PANEL_COLUMNS);
            x = x.add(4 * super::TILE_ROWS);
        }
        for _ in 0..depth % 4 {
            step(p, x, &mut low, &mut high);
            p = p.add(PANEL_COLUMNS);
            x = x.add(super::TILE_ROWS);
        }
        for r in 0..R {
            let row = c.add(r * c_stride);
            if cols == PANEL_COLUMNS {
                let (mut v0, mut v1) = (low[r], high[r]);
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
                }
                _mm256_storeu_ps(row, v0);
                _mm256_storeu_ps(row.add(8), v1);
            } else {
                let mut sums = [0.0f32; PANEL_COLUMNS];
                _mm256_storeu_ps(sums.as_mut_ptr(), low[r]);
                _mm256_storeu_ps(sums.as_mut_ptr().add(8), high[r]);
                for (j, &s) in sums.iter().enumerate().take(cols) {
                    let o = row.add(j);
                    *o = if accumulate { *o + s } else { s };
                }
            }
        }
    }

    /// [`tile`] in 16-lane registers over `P` panels `panel_stride` values apart (columns
    /// `16j..16j + 16` from panel `j`): `R·P` sums, `P` loads and `R` broadcasts a step.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile_wide<const R: usize, const P: usize>(depth: usize, input: *const f32, panel: *const f32, panel_stride: usize, c: *mut f32, c_stride: usize, cols: usize, accumulate: bool) {
        let mut sums = [[_mm512_setzero_ps(); P]; R];
        let step = |p: *const f32, x: *const f32, sums: &mut [[__m512; P]; R]| {
            let mut w = [_mm512_setzero_ps(); P];
            for (j, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_ps(p.add(j * panel_stride));
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(r));
                for (sum, &w) in row.iter_mut().zip(&w) {
                    *sum = _mm512_fmadd_ps(b, w, *sum);
                }
            }
        };
        let (mut p, mut x) = (panel, input);
        for _ in 0..depth / 4 {
            for u in 0..4 {
                step(p.add(u * PANEL_COLUMNS), x.add(u * super::TILE_ROWS), &mut sums);
            }
            p = p.add(4 * PANEL_COLUMNS);
            x = x.add(4 * super::TILE_ROWS);
        }
        for _ in 0..depth % 4 {
            step(p, x, &mut sums);
            p = p.add(PANEL_COLUMNS);
            x = x.add(super::TILE_ROWS);
        }
        for (r, row) in sums.iter().enumerate() {
            for (j, &sum) in row.iter().enumerate() {
                let lanes = cols.saturating_sub(j * PANEL_COLUMNS).min(PANEL_COLUMNS);
                if lanes == 0 {
                    continue;
                }
                let mask: __mmask16 = if lanes == PANEL_COLUMNS { 0xFFFF } else { (1u16 << lanes) - 1 };
                let at = c.add(r * c_stride + j * PANEL_COLUMNS);
                let value = if accumulate { _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, at)) } else { sum };
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }

    /// Eight rows of eight values to eight columns: `out[c]` holds element `c` of each row.
    #[target_feature(enable = "avx2")]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let s = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        [
            _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
            _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
            _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
            _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
            _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
            _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
            _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
            _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
        ]
    }

    /// Sixteen rows from `(j0 + i) * k + k0`, `depth` (a multiple of 8) values each, read eight
    /// at a time by `load` and transposed into `panel[kk * 16 + i]` (32-byte aligned).
    #[inline(always)]
    unsafe fn pack_with(k: usize, j0: usize, k0: usize, depth: usize, panel: &mut [f32], load: impl Fn(usize) -> __m256) {
        debug_assert!(depth.is_multiple_of(8) && panel.len() >= depth * PANEL_COLUMNS);
        for kk in (0..depth).step_by(8) {
            for half in 0..2 {
                let rows: [__m256; 8] = std::array::from_fn(|i| load((j0 + half * 8 + i) * k + k0 + kk));
                for (c, column) in transpose8(rows).into_iter().enumerate() {
                    _mm256_store_ps(panel.as_mut_ptr().add((kk + c) * PANEL_COLUMNS + half * 8), column);
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_f32(w: &[f32], k: usize, j0: usize, k0: usize, depth: usize, panel: &mut [f32]) {
        debug_assert!((j0 + 15) * k + k0 + depth <= w.len());
        pack_with(k, j0, k0, depth, panel, |at| _mm256_loadu_ps(w.as_ptr().add(at)))
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn pack_f16(w: &[u16], k: usize, j0: usize, k0: usize, depth: usize, panel: &mut [f32]) {
        debug_assert!((j0 + 15) * k + k0 + depth <= w.len());
        pack_with(k, j0, k0, depth, panel, |at| _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(at) as *const __m128i)))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_bf16(w: &[u16], k: usize, j0: usize, k0: usize, depth: usize, panel: &mut [f32]) {
        debug_assert!((j0 + 15) * k + k0 + depth <= w.len());
        // bf16 is the top half of an f32: zero-extend each value and shift it into place.
        pack_with(k, j0, k0, depth, panel, |at| {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(w.as_ptr().add(at) as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        })
    }

    /// Q8_0 blocks of one row group (`quants`: per block 8 vectors of 16 rows × 4 bytes, each
    /// `q + 128`; `scales`: per block 16 f16 bits) decoded to `d·q` into `panel[kk * 16 + i]`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn pack_q8_0(quants: &[u8], scales: &[u16], panel: &mut [f32]) {
        let blocks = scales.len() / 16;
        assert!(quants.len() == blocks * 512 && panel.len() == blocks * 32 * PANEL_COLUMNS && panel.as_ptr().align_offset(32) == 0);
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        // Within each 128-bit lane (4 rows × elements 4v..4v+4): element-major, then the two
        // lanes' dwords interleaved, so bytes 8e..8e+8 are element 4v + e of the 8 rows.
        let by_element = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let lanes_interleaved = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..blocks {
            let (q, out) = (quants.as_ptr().add(b * 512), panel.as_mut_ptr().add(b * 32 * PANEL_COLUMNS));
            let d = [_mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(b * 16) as *const __m128i)), _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(b * 16 + 8) as *const __m128i))];
            for v in 0..8 {
                for (half, &d) in d.iter().enumerate() {
                    let stored = _mm256_loadu_si256(q.add(v * 64 + half * 32) as *const __m256i);
                    let bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(_mm256_xor_si256(stored, flip), by_element), lanes_interleaved);
                    let (low, high) = (_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes));
                    let elements = [low, _mm_srli_si128::<8>(low), high, _mm_srli_si128::<8>(high)];
                    for (e, &eight) in elements.iter().enumerate() {
                        let values = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), d);
                        _mm256_store_ps(out.add((4 * v + e) * PANEL_COLUMNS + half * 8), values);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::simd::scalar;
    use rand::{Rng, SeedableRng};

    /// The levels the panel gemm runs at on this CPU (AVX2, and AVX-512 where present); a test
    /// with none to run says so.
    fn panel_levels() -> Vec<SimdLevel> {
        let levels: Vec<SimdLevel> = SimdLevel::all_supported().into_iter().filter(|&l| available(l)).collect();
        if levels.is_empty() {
            eprintln!("skipped: this CPU has no AVX2 (the panel gemm does not run here)");
        }
        levels
    }

    /// The scalar reference: f64 sums of the widened weights.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        crate::backend::cpu::matmul::tests::naive(x, m, w, n, k)
    }

    #[test]
    fn matches_the_scalar_reference_for_every_weight_type_at_awkward_shapes() {
        if panel_levels().is_empty() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut scratch = Vec::new();
        // Row counts around the tile (6) and the pass (96); columns around the panel (16); depths
        // below 8, not multiples of 8, and past one depth block (577 makes two, 1200 three).
        for &(m, n, k) in &[(1usize, 1usize, 1usize), (5, 17, 7), (6, 16, 8), (13, 37, 53), (97, 33, 577), (9, 48, 1200), (200, 130, 64)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w32: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let f16: Vec<u16> = w32.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let bf16: Vec<u16> = w32.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            // bf16 weights meet the input rounded to bf16.
            let x_bf16: Vec<f32> = x.iter().map(|&v| crate::backend::cpu::bf16_products::round_to_bf16_value(v)).collect();
            let cases = [
                (PanelWeights::F32(&w32), w32.clone(), &x),
                (PanelWeights::F16(&f16), f16.iter().map(|&b| scalar::f16_bits_to_f32(b)).collect(), &x),
                (PanelWeights::BF16(&bf16), bf16.iter().map(|&b| scalar::bf16_bits_to_f32(b)).collect::<Vec<f32>>(), &x_bf16),
            ];
            for (weights, widened, input) in cases {
                let want = reference(input, m, k, &widened, n);
                for (level, threads) in panel_levels().into_iter().flat_map(|l| [(l, 1usize), (l, 2)]) {
                    let mut out = vec![f32::NAN; m * n];
                    pool.install(|| product(level, threads, &x, m, k, weights, n, &mut out, &mut scratch));
                    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()), "m={m} n={n} k={k} {weights:?} {level} threads={threads} at {i}: {g} vs {w}", weights = std::mem::discriminant(&weights));
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_panels_decode_the_files_values_and_match_the_scalar_reference() {
        if panel_levels().is_empty() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut scratch = Vec::new();
        // Partial row groups (rows 1, 17, 37), one block, depths over one depth block (608 is
        // two blocks of 320 and 288; 1216 three) and row counts around the tile and the pass.
        for &(m, n, k) in &[(1usize, 1usize, 32usize), (7, 17, 64), (97, 37, 608), (13, 48, 1216), (200, 16, 96)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w32: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let bytes = crate::model::quant::quantize(crate::model::quant::GgmlType::Q8_0, &w32).unwrap();
            let matrix = BlockMatrix::pack(BlockFormat::Q8_0, n, k, &bytes);
            let mut decoded = vec![0.0f32; n * k];
            for (r, row) in decoded.chunks_exact_mut(k).enumerate() {
                matrix.row_to_f32(r, row);
            }
            // The panels hold the file's values exactly: a single-row input picks out columns.
            for r in [0, n - 1] {
                let mut unit = vec![0.0f32; k];
                let picked: Vec<f32> = (0..k)
                    .map(|c| {
                        unit.fill(0.0);
                        unit[c] = 1.0;
                        let mut out = vec![f32::NAN; n];
                        product(SimdLevel::Avx2, 1, &unit, 1, k, PanelWeights::Q8_0(&matrix), n, &mut out, &mut scratch);
                        out[r]
                    })
                    .collect();
                assert_eq!(picked, decoded[r * k..(r + 1) * k], "row {r} of {n}x{k} decoded differently");
            }
            let want = reference(&x, m, k, &decoded, n);
            for (level, threads) in panel_levels().into_iter().flat_map(|l| [(l, 1usize), (l, 2)]) {
                let mut out = vec![f32::NAN; m * n];
                pool.install(|| product(level, threads, &x, m, k, PanelWeights::Q8_0(&matrix), n, &mut out, &mut scratch));
                for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-5 * (k as f32).sqrt() * (1.0 + w.abs()), "Q8_0 m={m} n={n} k={k} {level} threads={threads} at {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn empty_depth_gives_zeros_and_empty_shapes_do_nothing() {
        if panel_levels().is_empty() {
            return;
        }
        let mut out = vec![f32::NAN; 6];
        product(SimdLevel::Avx2, 1, &[], 2, 0, PanelWeights::F32(&[]), 3, &mut out, &mut Vec::new());
        assert!(out.iter().all(|&v| v == 0.0));
        let mut untouched = vec![7.0f32; 4];
        product(SimdLevel::Avx2, 1, &[], 0, 5, PanelWeights::F32(&[1.0; 20]), 4, &mut untouched, &mut Vec::new());
        assert!(untouched.iter().all(|&v| v == 7.0));
    }
}
