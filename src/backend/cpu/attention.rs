//! Causal attention over the preallocated KV cache on the CPU (GQA-aware, one task per row×head).
//!
//! The cache is head-major: each KV head's positions lie one after another, so the scores and
//! the weighted sum of values read one sequential stream per head, which the hardware
//! prefetchers follow (position-major rows read 64 of every 192 values per head, and at 4000
//! positions attention ran at about a quarter of the memory bandwidth). Keys are kept in blocks
//! of sixteen positions, dimension-major inside a block (see [`attention_simd`]), so that decode
//! scores a GQA group's query heads in one pass over the keys without horizontal sums.

use rayon::prelude::*;

use super::attention_simd::{self, KEY_BLOCK};
use super::buffer::ZeroedBuffer;
use super::matmul::{gemm_strided, MatRef};
use super::simd::{self, SimdLevel};
use crate::backend::{AttentionLayout, KvPrecision, RowTable};

/// Cached entries at the store's precision.
#[derive(Debug)]
pub enum KvValues {
    F32(ZeroedBuffer<f32>),
    /// f16 bits, narrowed with [`simd::f32_to_f16_saturating`].
    F16(ZeroedBuffer<u16>),
}

impl KvValues {
    fn zeros(precision: KvPrecision, len: usize) -> std::io::Result<Self> {
        Ok(match precision {
            KvPrecision::F32 => KvValues::F32(ZeroedBuffer::new(len)?),
            KvPrecision::F16 => KvValues::F16(ZeroedBuffer::new(len)?),
        })
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvValues::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvValues::F16(v) => simd::f32_to_f16_saturating(src, &mut v[at..at + src.len()]),
        }
    }

    /// Writes `src[d]` at `at + d·stride` (a key into its block, dimension-major).
    fn write_strided(&mut self, at: usize, src: &[f32], stride: usize) {
        match self {
            KvValues::F32(v) => {
                for (d, &x) in src.iter().enumerate() {
                    v[at + d * stride] = x;
                }
            }
            KvValues::F16(v) => {
                let mut bits = [0u16; 64];
                for (c, chunk) in src.chunks(bits.len()).enumerate() {
                    simd::f32_to_f16_saturating(chunk, &mut bits[..chunk.len()]);
                    for (d, &b) in bits[..chunk.len()].iter().enumerate() {
                        v[at + (c * 64 + d) * stride] = b;
                    }
                }
            }
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            KvValues::F32(v) => v.copy_within(src, dst),
            KvValues::F16(v) => v.copy_within(src, dst),
        }
    }

    fn rows(&self, range: std::ops::Range<usize>) -> KvRows<'_> {
        match self {
            KvValues::F32(v) => KvRows::F32(&v[range]),
            KvValues::F16(v) => KvRows::F16(&v[range]),
        }
    }
}

/// A run of one KV head's cached rows (`head_dim` values each, one after another).
#[derive(Clone, Copy)]
enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl<'a> KvRows<'a> {
    /// Scores of a group's query heads (`[heads][head_dim]`) against these key blocks.
    fn group_scores(self, level: SimdLevel, queries: &[f32], hd: usize, out: &mut [f32]) {
        match self {
            KvRows::F32(keys) => attention_simd::group_scores(level, queries, hd, keys, out),
            KvRows::F16(keys) => attention_simd::group_scores_f16(level, queries, hd, keys, out),
        }
    }

    /// Weighted sums of these value rows for a group's heads (`weights` is `[heads][rows]`).
    fn group_values(self, level: SimdLevel, weights: &[f32], hd: usize, y: &mut [f32]) {
        match self {
            KvRows::F32(values) => attention_simd::group_values(level, weights, values, hd, y),
            KvRows::F16(values) => attention_simd::group_values_f16(level, weights, values, hd, y),
        }
    }

    /// The rows as f32: borrowed from an f32 cache, widened (exactly) from an f16 one.
    fn to_f32(self) -> std::borrow::Cow<'a, [f32]> {
        match self {
            KvRows::F32(rows) => std::borrow::Cow::Borrowed(rows),
            KvRows::F16(rows) => {
                let mut wide = vec![0.0; rows.len()];
                simd::f16_to_f32(rows, &mut wide);
                std::borrow::Cow::Owned(wide)
            }
        }
    }
}

/// K and V of every layer, slot, KV head and position, allocated once:
/// `[layer][slot][kv_head][position][head_dim]` for values, and for keys the same with each
/// head's positions in blocks of [`KEY_BLOCK`], dimension-major inside a block. Each head has
/// room for `max_positions` rounded up to whole blocks.
#[derive(Debug)]
pub struct CpuKvStore {
    pub layers: usize,
    pub slots: usize,
    pub max_positions: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub keys: KvValues,
    pub values: KvValues,
}

impl CpuKvStore {
    /// A failed mapping (a context the machine cannot hold) is an error naming the size.
    pub fn new(layers: usize, slots: usize, max_positions: usize, layout: AttentionLayout, precision: KvPrecision) -> crate::error::Result<Self> {
        let padded = attention_simd::whole_blocks(max_positions);
        let len = [layers, slots, padded, layout.kv_dim()].iter().try_fold(1usize, |n, &f| n.checked_mul(f));
        let (kv_heads, head_dim) = (layout.kv_heads, layout.head_dim);
        let too_big = |reason: String| {
            crate::error::Error::InvalidInput(format!(
                "cannot allocate a {precision} KV cache of {layers} layers x {slots} slots x {max_positions} positions x {} values, twice: {reason}",
                layout.kv_dim()
            ))
        };
        let len = len.ok_or_else(|| too_big("the size overflows".into()))?;
        let zeros = || KvValues::zeros(precision, len).map_err(|e| too_big(e.to_string()));
        let (keys, values) = (zeros()?, zeros()?);
        Ok(CpuKvStore { layers, slots, max_positions, kv_heads, head_dim, keys, values })
    }

    /// Positions each head has room for: `max_positions` in whole key blocks.
    fn padded_positions(&self) -> usize {
        attention_simd::whole_blocks(self.max_positions)
    }

    /// Where KV head `head`'s value row for `position` starts (and, for a position at a block
    /// boundary, its key block); its positions follow one another.
    fn offset(&self, layer: usize, slot: usize, head: usize, position: usize) -> usize {
        (((layer * self.slots + slot) * self.kv_heads + head) * self.padded_positions() + position) * self.head_dim
    }

    /// Key blocks and value rows of KV head `head` at `positions`, which start at a block
    /// boundary (the keys run to the end of the last block they touch).
    fn head_rows(&self, layer: usize, slot: usize, head: usize, positions: std::ops::Range<usize>) -> (KvRows<'_>, KvRows<'_>) {
        debug_assert!(positions.start % KEY_BLOCK == 0, "key spans start at a block boundary");
        let first = self.offset(layer, slot, head, 0);
        let hd = self.head_dim;
        let keys = first + positions.start * hd..first + attention_simd::whole_blocks(positions.end) * hd;
        (self.keys.rows(keys), self.values.rows(first + positions.start * hd..first + positions.end * hd))
    }

    /// Stores the k and v of KV head `head` at `position`.
    fn store(&mut self, layer: usize, slot: usize, head: usize, position: usize, k: &[f32], v: &[f32]) {
        let block = self.offset(layer, slot, head, position / KEY_BLOCK * KEY_BLOCK);
        self.keys.write_strided(block + position % KEY_BLOCK, k, KEY_BLOCK);
        self.values.write(self.offset(layer, slot, head, position), v);
    }

    /// Keys of KV head `head` at positions `0..context` as an f32 `[head_dim][context]` matrix
    /// (Kᵀ, what the prefill gemm multiplies by).
    fn keys_transposed(&self, layer: usize, slot: usize, head: usize, context: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let (blocks, _) = self.head_rows(layer, slot, head, 0..context);
        let mut transposed = vec![0.0f32; hd * context];
        let mut widened = [0.0f32; KEY_BLOCK];
        for block in 0..context.div_ceil(KEY_BLOCK) {
            let (first, take) = (block * KEY_BLOCK, (context - block * KEY_BLOCK).min(KEY_BLOCK));
            for d in 0..hd {
                let at = attention_simd::key_index(first, d, hd);
                match blocks {
                    KvRows::F32(keys) => widened.copy_from_slice(&keys[at..at + KEY_BLOCK]),
                    KvRows::F16(keys) => simd::f16_to_f32(&keys[at..at + KEY_BLOCK], &mut widened),
                }
                transposed[d * context + first..d * context + first + take].copy_from_slice(&widened[..take]);
            }
        }
        transposed
    }

    /// Copies positions `0..positions` of every layer's K and V from `from` to `to`.
    pub fn copy_prefix(&mut self, from: usize, to: usize, positions: usize) {
        assert!(from < self.slots && to < self.slots && positions <= self.max_positions, "KV prefix copy outside the cache");
        if from == to || positions == 0 {
            return;
        }
        // Keys go in whole blocks: the positions past `positions` in the last one come along and
        // are overwritten before the target slot ever reads them.
        let (key_len, value_len) = (attention_simd::whole_blocks(positions) * self.head_dim, positions * self.head_dim);
        for layer in 0..self.layers {
            for head in 0..self.kv_heads {
                let (src, dst) = (self.offset(layer, from, head, 0), self.offset(layer, to, head, 0));
                self.keys.copy_within(src..src + key_len, dst);
                self.values.copy_within(src..src + value_len, dst);
            }
        }
    }
}

/// Query rows per prefill attention task (32, 64 and 128 measured alike: F16 pp512 1.04-1.07x
/// whole heads, in alternated runs).
const PREFILL_QUERY_BLOCK: usize = 64;

/// Rows in a run at least this long (same slot, consecutive positions) use the gemm path.
const GEMM_RUN_MIN_ROWS: usize = 8;

/// Writes each row's k and v into the cache, then attends. `out` is `[rows, q_dim]`.
///
/// Decode rows (one per sequence) take one dot product per cached position. Prefill runs
/// (many consecutive positions of one sequence) compute, per head and block of query rows,
/// `S = Q·Kᵀ` and `O = P·V` over the positions the block sees, as matrix products over strided
/// views of the cache: one gemm instead of a dot call per
/// (row, head, position).
pub fn attention(
    level: SimdLevel,
    qkv: &[f32],
    rows: usize,
    layout: AttentionLayout,
    kv: &mut CpuKvStore,
    layer: usize,
    table: RowTable<'_>,
    out: &mut [f32],
) {
    let (q_dim, kv_dim, hd) = (layout.q_dim(), layout.kv_dim(), layout.head_dim);
    let width = layout.qkv_dim();
    assert!(kv.kv_heads == layout.kv_heads && kv.head_dim == hd, "KV cache heads differ from the attention layout");
    for r in 0..rows {
        let (slot, pos) = (table.slots[r] as usize, table.positions[r] as usize);
        assert!(slot < kv.slots && pos < kv.max_positions && layer < kv.layers, "row outside the KV cache");
        let row = &qkv[r * width..(r + 1) * width];
        for g in 0..layout.kv_heads {
            kv.store(layer, slot, g, pos, &row[q_dim + g * hd..q_dim + (g + 1) * hd], &row[q_dim + kv_dim + g * hd..q_dim + kv_dim + (g + 1) * hd]);
        }
    }
    let kv = &*kv;
    let mut begin = 0;
    while begin < rows {
        let mut end = begin + 1;
        while end < rows && table.slots[end] == table.slots[begin] && table.positions[end] == table.positions[end - 1] + 1 {
            end += 1;
        }
        let run_out = &mut out[begin * q_dim..end * q_dim];
        if end - begin >= GEMM_RUN_MIN_ROWS {
            attend_run(level, qkv, begin, end, layout, kv, layer, table, run_out);
        } else {
            attend_rows(level, qkv, begin, layout, kv, layer, table, run_out);
        }
        begin = end;
    }
}

/// Positions below which a row's attention is not split across tasks.
const SPLIT_MIN_POSITIONS: usize = 256;

/// Decode rows: one task per (row, KV head, span of positions). The query heads sharing a KV
/// head are scored in one pass over its keys and summed in one pass over its values, so each
/// cached entry is read (and widened) once for the whole group (GQA), and long contexts are split
/// into spans (flash-decoding) so that every thread has work. Each span returns per query head
/// its running max, the sum of its exponentials and the unnormalized weighted sum of values; the
/// spans of a head are then merged exactly.
#[allow(clippy::too_many_arguments)]
fn attend_rows(
    level: SimdLevel,
    qkv: &[f32],
    begin: usize,
    layout: AttentionLayout,
    kv: &CpuKvStore,
    layer: usize,
    table: RowTable<'_>,
    out: &mut [f32],
) {
    let (q_dim, hd, width) = (layout.q_dim(), layout.head_dim, layout.qkv_dim());
    let group = layout.heads / layout.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let rows = out.len() / q_dim;
    // Many spans per thread: with 4 per thread a 4000-position row made 9 tasks for 2 threads,
    // one thread idle for the ninth (16 measured 1.05x faster decode at that context).
    let target_tasks = 16 * rayon::current_num_threads();
    // (row, kv head, first position, end position); spans start at key-block boundaries.
    let mut tasks = Vec::new();
    for r in 0..rows {
        let positions = table.positions[begin + r] as usize + 1;
        let splits = target_tasks.div_ceil(rows * layout.kv_heads).min(positions.div_ceil(SPLIT_MIN_POSITIONS)).max(1);
        let span = attention_simd::whole_blocks(positions.div_ceil(splits));
        for g in 0..layout.kv_heads {
            for start in (0..positions).step_by(span) {
                tasks.push((r, g, start, (start + span).min(positions)));
            }
        }
    }
    // Per task: the group's weighted value sums `[head][hd]`, then each head's max, then each
    // head's sum of exponentials.
    let partials: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(r, g, start, end)| {
            let slot = table.slots[begin + r] as usize;
            // The rows run on to the head's last position: the kernels prefetch past the span
            // into them (the next span, often this thread's next task), never beyond.
            let (keys, values) = kv.head_rows(layer, slot, g, start..table.positions[begin + r] as usize + 1);
            let n = end - start;
            let queries = &qkv[(begin + r) * width + g * group * hd..][..group * hd];
            let mut scores = vec![0.0f32; group * n];
            keys.group_scores(level, queries, hd, &mut scores);
            let mut partial = vec![0.0f32; group * (hd + 2)];
            for (i, head_scores) in scores.chunks_exact_mut(n).enumerate() {
                let max = head_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                partial[group * hd + i] = max;
                partial[group * (hd + 1) + i] = simd::exp_scaled_in_place(level, head_scores, scale, max);
            }
            values.group_values(level, &scores, hd, &mut partial[..group * hd]);
            partial
        })
        .collect();
    // Merge the spans of each (row, query head): rescale each to the overall max.
    out.fill(0.0);
    // (value sums, max, sum of exponentials) of each span, per (row, query head).
    let mut by_head: Vec<Vec<(&[f32], f32, f32)>> = vec![Vec::new(); rows * layout.heads];
    for (&(r, g, _, _), partial) in tasks.iter().zip(&partials) {
        for i in 0..group {
            let part = (&partial[i * hd..(i + 1) * hd], partial[group * hd + i], partial[group * (hd + 1) + i]);
            by_head[r * layout.heads + g * group + i].push(part);
        }
    }
    for (index, parts) in by_head.iter().enumerate() {
        let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.1));
        let weights: Vec<f32> = parts.iter().map(|p| (p.1 - max).exp()).collect();
        let total: f32 = parts.iter().zip(&weights).map(|(p, w)| p.2 * w).sum();
        let head_out = &mut out[index * hd..(index + 1) * hd];
        for (p, w) in parts.iter().zip(&weights) {
            simd::axpy(level, w / total, p.0, head_out);
        }
    }
}

/// A run of consecutive positions of one slot: per head, two gemms over the cache.
#[allow(clippy::too_many_arguments)]
fn attend_run(
    level: SimdLevel,
    qkv: &[f32],
    begin: usize,
    end: usize,
    layout: AttentionLayout,
    kv: &CpuKvStore,
    layer: usize,
    table: RowTable<'_>,
    out: &mut [f32],
) {
    let (q_dim, hd, width) = (layout.q_dim(), layout.head_dim, layout.qkv_dim());
    let group = layout.heads / layout.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = end - begin;
    let slot = table.slots[begin] as usize;
    let first_pos = table.positions[begin] as usize;
    let context = first_pos + n;
    // The gemms read f32 matrices: each KV head's key blocks are unpacked into Kᵀ and an f16
    // cache's values widened, once for all the query heads that share it (a small cost beside
    // the products: context·head_dim values against n·context·head_dim multiply-adds).
    let kv_heads: Vec<(Vec<f32>, std::borrow::Cow<'_, [f32]>)> = (0..layout.kv_heads)
        .into_par_iter()
        .map(|g| (kv.keys_transposed(layer, slot, g, context), kv.head_rows(layer, slot, g, 0..context).1.to_f32()))
        .collect();
    // One task per (query head, block of query rows): a block's rows see at most the context up
    // to its last row, so causal attention computes about half the scores of full rows, and nine
    // heads × several blocks balance over the threads where nine head tasks left one idle.
    let blocks: Vec<(usize, usize)> = (0..layout.heads).flat_map(|h| (0..n).step_by(PREFILL_QUERY_BLOCK).map(move |i| (h, i))).collect();
    let outputs: Vec<Vec<f32>> = blocks
        .par_iter()
        .map(|&(h, i0)| {
            let i1 = (i0 + PREFILL_QUERY_BLOCK).min(n);
            let (rows, seen) = (i1 - i0, first_pos + i1);
            let (keys_t, values) = &kv_heads[h / group];
            let q = MatRef { data: &qkv[(begin + i0) * width + h * hd..], rows, cols: hd, row_stride: width, col_stride: 1 };
            let k_t = MatRef { data: keys_t, rows: hd, cols: seen, row_stride: context, col_stride: 1 };
            let mut scores = vec![0.0f32; rows * seen];
            gemm_strided(1, q, k_t, &mut scores, seen, false);
            // The scale goes into the exponent and the normalization onto the output row (64
            // values instead of `seen`): one pass over the scores instead of three. The
            // exponents are as before, since rounding keeps the order: max(s·c) = max(s)·c.
            let mut inverse_totals = vec![0.0f32; rows];
            for (i, row) in scores.chunks_mut(seen).enumerate() {
                let visible = first_pos + i0 + i + 1;
                let max = simd::max_f32(&row[..visible]);
                let total = simd::exp_scaled_in_place(level, &mut row[..visible], scale, max * scale);
                inverse_totals[i] = 1.0 / total;
                row[visible..].fill(0.0);
            }
            let p = MatRef::dense(&scores, rows, seen);
            let v = MatRef::dense(&values[..seen * hd], seen, hd);
            let mut block_out = vec![0.0f32; rows * hd];
            gemm_strided(1, p, v, &mut block_out, hd, false);
            for (row, inverse) in block_out.chunks_mut(hd).zip(inverse_totals) {
                row.iter_mut().for_each(|o| *o *= inverse);
            }
            block_out
        })
        .collect();
    for (&(h, i0), block_out) in blocks.iter().zip(&outputs) {
        for (i, row) in block_out.chunks(hd).enumerate() {
            out[(i0 + i) * q_dim + h * hd..(i0 + i) * q_dim + (h + 1) * hd].copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn split_decode_attention_matches_the_prefill_run() {
        // 700 positions: the decode row is split into spans and merged; the prefill run computes
        // the same last row with one softmax over all positions (gemm path).
        let layout = AttentionLayout { heads: 6, kv_heads: 2, head_dim: 16 };
        let (n, width, q_dim) = (700usize, layout.qkv_dim(), layout.q_dim());
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let qkv: Vec<f32> = (0..n * width).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (level, precision) in SimdLevel::all_supported().into_iter().flat_map(|l| [(l, KvPrecision::F32), (l, KvPrecision::F16)]) {
            let mut kv = CpuKvStore::new(1, 2, n, layout, precision).unwrap();
            let slots = vec![1u32; n];
            let positions: Vec<u32> = (0..n as u32).collect();
            let mut run_out = vec![0.0f32; n * q_dim];
            pool.install(|| attention(level, &qkv, n, layout, &mut kv, 0, RowTable { slots: &slots, positions: &positions }, &mut run_out));
            let mut row_out = vec![f32::NAN; q_dim];
            let last = RowTable { slots: &slots[n - 1..], positions: &positions[n - 1..] };
            pool.install(|| attention(level, &qkv[(n - 1) * width..], 1, layout, &mut kv, 0, last, &mut row_out));
            for (g, w) in row_out.iter().zip(&run_out[(n - 1) * q_dim..]) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{level} {precision}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn an_f16_cache_stays_within_its_rounding_of_the_f32_cache() {
        // Each cached entry is rounded to 11 significant bits (relative error ≤ 2^-11); the
        // scores then move by at most |q|·|k|·2^-11 and the output by about as much relative
        // to the values' size. The bound below is that with a margin, and far below what a
        // wrong kernel (a dropped position, a misread row) would give.
        let layout = AttentionLayout { heads: 6, kv_heads: 2, head_dim: 64 };
        let (n, width, q_dim) = (1200usize, layout.qkv_dim(), layout.q_dim());
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let qkv: Vec<f32> = (0..n * width).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let slots = vec![0u32; n];
        let positions: Vec<u32> = (0..n as u32).collect();
        let table = RowTable { slots: &slots, positions: &positions };
        let run = |precision: KvPrecision, level: SimdLevel| {
            let mut kv = CpuKvStore::new(1, 1, n, layout, precision).unwrap();
            // Prefill all but the last row (gemm path), then decode the last one.
            let mut out = vec![0.0f32; n * q_dim];
            pool.install(|| attention(level, &qkv, n - 1, layout, &mut kv, 0, table, &mut out));
            let last = RowTable { slots: &slots[n - 1..], positions: &positions[n - 1..] };
            pool.install(|| attention(level, &qkv[(n - 1) * width..], 1, layout, &mut kv, 0, last, &mut out[(n - 1) * q_dim..]));
            out
        };
        for level in SimdLevel::all_supported() {
            let (exact, rounded) = (run(KvPrecision::F32, level), run(KvPrecision::F16, level));
            let worst = exact.iter().zip(&rounded).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let differs = exact.iter().zip(&rounded).filter(|(a, b)| a != b).count();
            // Values are in [-1, 1]: rounding moves an output by ~2^-11 at most, scores by
            // 64·2^-11 / 8 ≈ 0.004 nats, which reweights the mean by well under 1%.
            assert!(worst < 1e-3, "{level}: f16 cache moved an output by {worst}");
            assert!(differs > n * q_dim / 2, "{level}: the f16 cache changed only {differs} outputs; is it rounding at all?");
        }
    }
}
