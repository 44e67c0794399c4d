//! Weight matrices on the CPU and the product `x · Wᵀ`: GEMV for few rows, gemm for many.
//!
//! Decode (1..=GEMV_MAX_ROWS rows) is memory-bound: each thread streams disjoint weight rows
//! once, four sequential streams at a time, and dots them with every input row. Prefill is
//! compute-bound: on AVX2 and AVX-512 the panel gemm (16-bit weights widened as they are packed,
//! see `panel_gemm`; bf16 on `vdpbf16ps` where that outruns FMA, see `bf16_products`), without
//! AVX2 the `gemm` crate's packed, register-blocked f32 kernels, with 16-bit weights widened
//! chunk by chunk into scratch.
//! Block-quantized weights take integer products in both (see `quant`): the input is quantized
//! to 8 bits once per product and meets row groups of 16 weight rows, four input rows at a time
//! in prefill (on AVX2, Q8_0 prefill of many rows decodes into the panel gemm instead; without
//! AVX2 the blocks are widened to f32 like the 16-bit types).

use rayon::prelude::*;

use super::bf16_products;
use super::panel_gemm::{self, PanelWeights};
use super::quant::{self, BlockFormat, BlockMatrix, Q8Activations, Q8Row, QuantKernel, ROW_GROUP};
use super::buffer::{Placeable, WeightBuffer};
use crate::error::{Error, Result};
use crate::tensor::{HostTensor, TensorData};
use super::simd::{self, SimdLevel, StreamPrefetch};
use super::tune::StreamClass;

/// Row counts up to this go through the weight-streaming GEMV path.
pub const GEMV_MAX_ROWS: usize = 8;

/// Weight storage; 16-bit types are kept as raw bits.
#[derive(Debug)]
pub enum WeightData {
    F32(WeightBuffer<f32>),
    BF16(WeightBuffer<u16>),
    F16(WeightBuffer<u16>),
    /// GGUF blocks repacked for the kernels (see `quant`).
    Quantized(BlockMatrix),
}

/// A `[rows, cols]` = `[out_features, in_features]` weight matrix.
#[derive(Debug)]
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl CpuMatrix {
    /// The matrix of `tensor`, its values still on the heap: float values are taken over, not
    /// copied, since the backend then copies the matrices loaded together into one mapping
    /// (see [`super::buffer::share_mapping`]).
    pub fn on_heap(tensor: HostTensor) -> Result<CpuMatrix> {
        let [rows, cols] = tensor.shape[..] else {
            return Err(Error::Shape(format!("a weight matrix must be 2-D, got shape {:?}", tensor.shape)));
        };
        let data = match tensor.data {
            TensorData::F32(v) => WeightData::F32(WeightBuffer::from_vec(v)),
            TensorData::BF16(v) => WeightData::BF16(WeightBuffer::from_vec(bytemuck::allocation::cast_vec(v))),
            TensorData::F16(v) => WeightData::F16(WeightBuffer::from_vec(bytemuck::allocation::cast_vec(v))),
            TensorData::Quantized { ty, bytes } => {
                let format = quant::BlockFormat::from_ggml(ty)
                    .ok_or_else(|| Error::Unsupported(format!("{ty} weight matrices on the CPU")))?;
                // HostTensor::quantized checked that rows are whole blocks and the byte count.
                WeightData::Quantized(BlockMatrix::pack(format, rows, cols, &bytes))
            }
        };
        Ok(CpuMatrix { rows, cols, data })
    }

    /// The buffers holding the values, for [`super::buffer::share_mapping`].
    pub fn buffers_mut(&mut self) -> Vec<&mut dyn Placeable> {
        match &mut self.data {
            WeightData::F32(w) => vec![w],
            WeightData::BF16(w) | WeightData::F16(w) => vec![w],
            WeightData::Quantized(blocks) => blocks.buffers_mut().into(),
        }
    }

    /// Row `r` widened to f32 into `out`.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(w) => out.copy_from_slice(&w[range]),
            WeightData::BF16(w) => simd::bf16_to_f32(&w[range], out),
            WeightData::F16(w) => simd::f16_to_f32(&w[range], out),
            WeightData::Quantized(blocks) => blocks.row_to_f32(r, out),
        }
    }

    /// `out[i] = row(first + i) · x`. Float rows go four at a time, one from each quarter
    /// of the run: four sequential streams in different pages, which the hardware prefetcher
    /// follows, where four adjacent f16 rows (1152 bytes apart at width 576) share a page and
    /// measured slower than one row at a time.
    fn dot_rows(&self, level: SimdLevel, prefetch: StreamPrefetch, first: usize, x: &[f32], out: &mut [f32]) {
        let (k, quarter) = (self.cols, out.len() / 4);
        let row = |r: usize| (first + r) * k..(first + r + 1) * k;
        // The first lines of the four streams, which the kernels' prefetches (a fixed distance
        // ahead of each load) never ask for: all in flight at once instead of missed in turn.
        if quarter > 0 {
            let streams = |values_per_lead: usize| (0..4).map(move |q| row(q * quarter).start..row(q * quarter).start + values_per_lead.min(quarter * k));
            match &self.data {
                WeightData::F32(w) => streams(simd::STREAM_START_BYTES / 4).for_each(|s| simd::prefetch(&w[s])),
                WeightData::F16(w) | WeightData::BF16(w) => streams(simd::STREAM_START_BYTES / 2).for_each(|s| simd::prefetch(&w[s])),
                WeightData::Quantized(_) => {}
            }
        }
        for j in 0..quarter {
            let rows = [j, quarter + j, 2 * quarter + j, 3 * quarter + j];
            let dots = match &self.data {
                WeightData::F32(w) => simd::dot4_f32(level, prefetch, rows.map(|r| &w[row(r)]), x),
                WeightData::F16(w) => simd::dot4_f16(level, prefetch, rows.map(|r| &w[row(r)]), x),
                WeightData::BF16(w) => simd::dot4_bf16(level, prefetch, rows.map(|r| &w[row(r)]), x),
                WeightData::Quantized(_) => unreachable!("quantized rows go through their own gemv arm"),
            };
            for (r, dot) in rows.into_iter().zip(dots) {
                out[r] = dot;
            }
        }
        for (j, o) in out.iter_mut().enumerate().skip(4 * quarter) {
            *o = self.dot_row(level, first + j, x);
        }
    }

    fn dot_row(&self, level: SimdLevel, r: usize, x: &[f32]) -> f32 {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::F32(w) => simd::dot_f32(level, &w[range], x),
            WeightData::BF16(w) => simd::dot_bf16(level, &w[range], x),
            WeightData::F16(w) => simd::dot_f16(level, &w[range], x),
            WeightData::Quantized(_) => {
                unreachable!("quantized rows go through their own gemv arm")
            }
        }
    }

    /// Where the matrix's first buffer starts in memory (tests check placement with it).
    #[cfg(test)]
    fn first_byte_address(&self) -> usize {
        match &self.data {
            WeightData::F32(w) => w.as_ptr() as usize,
            WeightData::BF16(w) | WeightData::F16(w) => w.as_ptr() as usize,
            WeightData::Quantized(blocks) => blocks.first_byte_address(),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(w) => w.len() * 4,
            WeightData::BF16(w) | WeightData::F16(w) => w.len() * 2,
            WeightData::Quantized(blocks) => blocks.size_in_bytes(),
        }
    }
}

/// `out[rows, w.rows] = x[rows, w.cols] · wᵀ`, using the calling rayon pool's threads (decode
/// streams the weights with their type's default prefetch plan).
pub fn matmul(level: SimdLevel, threads: usize, x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32]) {
    matmul_with_scratch(level, StreamClass::of(w).default_plan(), bf16_products::bf16_kernel_available(level), threads, x, rows, w, out, &mut Vec::new());
}

/// [`matmul`] streaming the weight rows in decode with `prefetch` (a plan among
/// [`StreamClass::candidates`] of the matrix's class), bf16 prefill on the `vdpbf16ps` kernel
/// if `bf16_dot_prefill` (where it is available; else on FMA panels, see
/// [`bf16_products::dot_rate_over_fma`]), and widening 16-bit weights for prefill into
/// `scratch` (grown as needed, kept by the caller between products).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with_scratch(level: SimdLevel, prefetch: StreamPrefetch, bf16_dot_prefill: bool, threads: usize, x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32], scratch: &mut Vec<f32>) {
    let (n, k) = (w.rows, w.cols);
    assert!(x.len() >= rows * k && out.len() >= rows * n, "matmul buffers too small");
    let (x, out) = (&x[..rows * k], &mut out[..rows * n]);
    if let WeightData::BF16(weights) = &w.data {
        return bf16_weight_product(level, prefetch, bf16_dot_prefill, threads, x, rows, w, weights, out, scratch);
    }
    if rows <= GEMV_MAX_ROWS {
        gemv(level, prefetch, threads, x, rows, w, out);
    } else {
        gemm_any(level, threads, x, rows, w, out, scratch);
    }
}

/// bf16 weights meet activations rounded to bf16 (see `bf16_products`): `vdpbf16ps` for prefill
/// where the CPU has it and it pays, the panel gemm (rounding as it packs) on AVX2 and AVX-512,
/// otherwise the f32 paths on the rounded activations, which compute the same products.
#[allow(clippy::too_many_arguments)]
fn bf16_weight_product(level: SimdLevel, prefetch: StreamPrefetch, dot_prefill: bool, threads: usize, x: &[f32], rows: usize, w: &CpuMatrix, weights: &[u16], out: &mut [f32], scratch: &mut Vec<f32>) {
    if rows > GEMV_MAX_ROWS && dot_prefill && bf16_products::bf16_kernel_available(level) {
        let mut bits = vec![0u16; x.len()];
        bf16_products::to_bf16_bits(level, x, &mut bits);
        bf16_products::gemm_bf16(level, threads, &bits, rows, w.cols, weights, w.rows, out);
        return;
    }
    let round = |rounded: &mut [f32]| {
        rounded.copy_from_slice(x);
        rounded.par_chunks_mut(1 << 14).for_each(bf16_products::round_in_place);
    };
    if rows <= GEMV_MAX_ROWS {
        // Decode: the widening scratch is idle on this path, so the rounded rows go there
        // instead of a fresh allocation per product.
        scratch.resize(scratch.len().max(x.len()), 0.0);
        round(&mut scratch[..x.len()]);
        gemv(level, prefetch, threads, &scratch[..x.len()], rows, w, out);
    } else if panel_gemm::available(level) {
        // `gemm_any` takes the panel gemm, which rounds the input as it packs it.
        gemm_any(level, threads, x, rows, w, out, scratch);
    } else {
        let mut rounded = vec![0.0f32; x.len()];
        round(&mut rounded);
        gemm_any(level, threads, &rounded, rows, w, out, scratch);
    }
}

/// Output rows per parallel task: enough tasks to balance, few enough to keep overhead low.
fn chunk_len(n: usize, threads: usize) -> usize {
    n.div_ceil(threads * 4).max(16)
}

fn gemv(level: SimdLevel, prefetch: StreamPrefetch, threads: usize, x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32]) {
    let k = w.cols;
    match &w.data {
        WeightData::Quantized(blocks) => quantized_products(QuantKernel::for_level(level), prefetch, threads, x, rows, blocks, out),
        _ => {
            // Tiles of weight rows run against every input, so that a tile stays in L1 across
            // the inputs. With one input there is nothing to keep: the task's whole run is one
            // tile, so that dot_rows' four streams run long.
            const TILE_ROWS: usize = 32;
            by_column_blocks(rows, w.rows, chunk_len(w.rows, threads), out, |start, block| {
                let width = block.len() / rows;
                let tile_rows = if rows == 1 { width } else { TILE_ROWS };
                for tile in (0..width).step_by(tile_rows) {
                    let end = (tile + tile_rows).min(width);
                    for r in 0..rows {
                        let input = &x[r * k..(r + 1) * k];
                        w.dot_rows(level, prefetch, start + tile, input, &mut block[r * width + tile..r * width + end]);
                    }
                }
            })
        }
    }
}

/// `out[rows, n]` split over threads by output column, `chunk` columns per task, so that each
/// task streams disjoint weight rows once: `fill(start, block)` writes the columns
/// `start..start + width` as a `[rows, width]` block. With one row the block is `out`'s own run;
/// with several, it is scratch copied into place afterwards.
fn by_column_blocks(rows: usize, n: usize, chunk: usize, out: &mut [f32], fill: impl Fn(usize, &mut [f32]) + Sync) {
    if rows == 1 {
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, run)| fill(c * chunk, run));
        return;
    }
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let start = c * chunk;
            let mut block = vec![0.0f32; rows * chunk.min(n - start)];
            fill(start, &mut block);
            (start, block)
        })
        .collect();
    for (start, block) in blocks {
        let width = block.len() / rows;
        for r in 0..rows {
            out[r * n + start..r * n + start + width].copy_from_slice(&block[r * width..(r + 1) * width]);
        }
    }
}

/// Elements of 16-bit weights widened per gemm call (bounds the scratch to 16 MiB).
const WIDEN_CHUNK_ELEMENTS: usize = 1 << 22;

/// Input rows from which Q8_0 prefill on AVX2 decodes its row groups into the panel gemm's f32
/// panels rather than running the four-row integer kernel: the decoding, once per product, pays
/// for itself over many rows (criterion `prefill_q8_0` on a Sapphire Rapids core at AVX2: the
/// integer kernel 1.4-1.8x faster at 16 rows, even at 64, the panels 7-10% faster at 512).
const PANEL_Q8_0_MIN_ROWS: usize = 128;

fn gemm_any(level: SimdLevel, threads: usize, x: &[f32], rows: usize, w: &CpuMatrix, out: &mut [f32], scratch: &mut Vec<f32>) {
    let (n, k) = (w.rows, w.cols);
    if panel_gemm::available(level) {
        let weights = match &w.data {
            WeightData::F32(data) => Some(PanelWeights::F32(data)),
            WeightData::F16(data) => Some(PanelWeights::F16(data)),
            WeightData::BF16(data) => Some(PanelWeights::BF16(data)),
            // Only on AVX2: the AVX-512 VNNI integer kernels outrun f32 FMA tiles.
            WeightData::Quantized(blocks) if level == SimdLevel::Avx2 && blocks.format == BlockFormat::Q8_0 && rows >= PANEL_Q8_0_MIN_ROWS => {
                Some(PanelWeights::Q8_0(blocks))
            }
            WeightData::Quantized(_) => None,
        };
        if let Some(weights) = weights {
            return panel_gemm::product(level, threads, x, rows, k, weights, n, out, scratch);
        }
    }
    match &w.data {
        WeightData::F32(data) => gemm_f32(threads, x, rows, k, data, n, out, n, 0),
        WeightData::Quantized(blocks) if QuantKernel::for_level(level) != QuantKernel::Scalar => {
            quantized_products(QuantKernel::for_level(level), quant::UNIT_PREFETCH_NEAR_AND_FAR, threads, x, rows, blocks, out)
        }
        WeightData::BF16(_) | WeightData::F16(_) | WeightData::Quantized(_) => {
            let chunk_rows = (WIDEN_CHUNK_ELEMENTS / k).clamp(1, n);
            if scratch.len() < chunk_rows * k {
                scratch.resize(chunk_rows * k, 0.0);
            }
            let mut start = 0;
            while start < n {
                let end = (start + chunk_rows).min(n);
                let widened = &mut scratch[..(end - start) * k];
                widened.par_chunks_mut(k).enumerate().for_each(|(i, row)| w.row_to_f32(start + i, row));
                gemm_f32(threads, x, rows, k, widened, end - start, out, n, start);
                start = end;
            }
        }
    }
}

/// `x · Wᵀ` on block-quantized weights with integer products (decode, and prefill where the CPU
/// has AVX2 or VNNI): the activation rows are quantized once; each row group of `w` (16 weight
/// rows, which stay in L1) meets the activation rows four at a time.
pub fn quantized_products(kernel: QuantKernel, prefetch: StreamPrefetch, threads: usize, x: &[f32], rows: usize, w: &BlockMatrix, out: &mut [f32]) {
    let activations = Q8Activations::quantize(x, rows, w.cols);
    if rows >= threads * 8 * quant::ROWS_AT_ONCE {
        quantized_products_by_rows(kernel, prefetch, threads, &activations, rows, w, out);
    } else {
        quantized_products_by_columns(kernel, prefetch, threads, &activations, rows, w, out);
    }
}

/// Many activation rows: tasks take runs of whole output rows and every row group, so that they
/// write `out` in place. Each task reads the whole matrix, from the shared cache after the
/// first: next to its arithmetic that costs nothing (gate|up, 1.9 MB, against 64 rows is 113M
/// multiply-adds), where splitting by columns wrote every output through scratch and a copy.
fn quantized_products_by_rows(kernel: QuantKernel, prefetch: StreamPrefetch, threads: usize, activations: &Q8Activations, rows: usize, w: &BlockMatrix, out: &mut [f32]) {
    let n = w.rows;
    let task_rows = rows.div_ceil(threads * 4).next_multiple_of(quant::ROWS_AT_ONCE);
    out.par_chunks_mut(task_rows * n).enumerate().for_each(|(task, run)| {
        let first_row = task * task_rows;
        let run_rows = run.len() / n;
        // The task's activation rows, sliced once instead of once per row group.
        let inputs: Vec<Q8Row<'_>> = (first_row..first_row + run_rows).map(|r| activations.row(r)).collect();
        for g in 0..w.groups() {
            let columns = g * ROW_GROUP..((g + 1) * ROW_GROUP).min(n);
            dot_rows_four_at_a_time(kernel, prefetch, w, g..g + 1, &inputs, run.chunks_mut(n).map(|row| &mut row[columns.clone()]));
        }
    });
}

/// Few activation rows (decode): tasks take whole row groups of `w`, so that each streams
/// disjoint weight rows once.
fn quantized_products_by_columns(kernel: QuantKernel, prefetch: StreamPrefetch, threads: usize, activations: &Q8Activations, rows: usize, w: &BlockMatrix, out: &mut [f32]) {
    let chunk = w.groups().div_ceil(threads * 4).max(1) * ROW_GROUP;
    // With several input rows each row group (16 weight rows) stays in L1 while they all pass;
    // with one there is nothing to reuse, and a task's groups go in one call.
    let tile_groups = if rows == 1 { usize::MAX } else { 1 };
    let inputs: Vec<Q8Row<'_>> = (0..rows).map(|r| activations.row(r)).collect();
    by_column_blocks(rows, w.rows, chunk, out, |start, block| {
        let width = block.len() / rows;
        let (first_group, end_group) = (start / ROW_GROUP, (start + width).div_ceil(ROW_GROUP));
        let mut g = first_group;
        while g < end_group {
            let tile_end = g.saturating_add(tile_groups).min(end_group);
            let (first, last) = ((g - first_group) * ROW_GROUP, (tile_end * ROW_GROUP - start).min(width));
            dot_rows_four_at_a_time(kernel, prefetch, w, g..tile_end, &inputs, block.chunks_mut(width).map(|row| &mut row[first..last]));
            g = tile_end;
        }
    });
}

/// The row groups `groups` of `w` against each of `inputs`, [`quant::ROWS_AT_ONCE`] rows per
/// kernel call and the remainder one by one; `outputs` yields the destination of each input
/// row in turn (as many as there are inputs).
fn dot_rows_four_at_a_time<'o>(kernel: QuantKernel, prefetch: StreamPrefetch, w: &BlockMatrix, groups: std::ops::Range<usize>, inputs: &[Q8Row<'_>], mut outputs: impl Iterator<Item = &'o mut [f32]>) {
    const GROUP: usize = quant::ROWS_AT_ONCE;
    let mut r = 0;
    while r < inputs.len() {
        if inputs.len() - r >= GROUP {
            let mut outs: [&mut [f32]; GROUP] = std::array::from_fn(|_| outputs.next().expect("an output per input row"));
            quant::dot_groups_prefetching(kernel, prefetch, w, groups.clone(), std::array::from_fn(|t| inputs[r + t]), &mut outs);
            r += GROUP;
        } else {
            quant::dot_groups_prefetching(kernel, prefetch, w, groups.clone(), [inputs[r]], &mut [outputs.next().expect("an output per input row")]);
            r += 1;
        }
    }
}

/// A read-only strided view of an f32 matrix: element (i, j) is `data[i*row_stride + j*col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A dense row-major `rows × cols` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The same data read as its transpose.
    pub fn transposed(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn last_index(&self) -> usize {
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
    }
}

/// `out = a · b` (or `out += a · b` with `accumulate`), where `out` is row-major with rows
/// `out_stride` apart starting at `out[0]`. Empty products are a no-op.
pub fn gemm_strided(threads: usize, a: MatRef<'_>, b: MatRef<'_>, out: &mut [f32], out_stride: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm inner dimensions differ");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len(), "gemm operand views exceed their data");
    assert!(n <= out_stride && (m - 1) * out_stride + n <= out.len(), "gemm output too small");
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above bound every index gemm reads (the views' last elements lie inside
    // their slices) and writes (m rows of n values, out_stride apart, inside `out`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out[r, col_offset + j] = Σ_k x[r, k] · w[j, k]` for `j < n`, with `out` rows `out_stride` wide.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(threads: usize, x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], out_stride: usize, col_offset: usize) {
    let a = MatRef::dense(x, m, k);
    let b = MatRef::dense(w, n, k).transposed();
    gemm_strided(threads, a, b, &mut out[col_offset..], out_stride, false);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The scalar reference of `x · wᵀ`: f64 sums (`w` is `[n, k]`).
    pub(crate) fn naive(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_for_every_dtype_path_and_row_count() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(n, k) in &[(37usize, 53usize), (130, 577), (5, 16)] {
            let w32: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let wb: Vec<u16> = w32.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let wh: Vec<u16> = w32.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let variants = [
                (CpuMatrix { rows: n, cols: k, data: WeightData::F32(WeightBuffer::copy_of(&w32).unwrap()) }, w32.clone()),
                (CpuMatrix { rows: n, cols: k, data: WeightData::BF16(WeightBuffer::copy_of(&wb).unwrap()) }, wb.iter().map(|&b| simd::scalar::bf16_bits_to_f32(b)).collect()),
                (CpuMatrix { rows: n, cols: k, data: WeightData::F16(WeightBuffer::copy_of(&wh).unwrap()) }, wh.iter().map(|&b| simd::scalar::f16_bits_to_f32(b)).collect()),
            ];
            for rows in [1usize, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 33] {
                let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                // bf16 weights meet activations rounded to bf16 (on every path and row count).
                let x_bf16: Vec<f32> = x.iter().map(|&v| bf16_products::round_to_bf16_value(v)).collect();
                for (matrix, widened) in &variants {
                    let input = if matches!(matrix.data, WeightData::BF16(_)) { &x_bf16 } else { &x };
                    let want = naive(input, rows, widened, n, k);
                    for level in SimdLevel::all_supported() {
                        let mut out = vec![f32::NAN; rows * n];
                        pool.install(|| matmul(level, 2, &x, rows, matrix, &mut out));
                        for (g, w) in out.iter().zip(&want) {
                            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "n={n} k={k} rows={rows} {level}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_products_match_the_decoded_weights_on_every_path() {
        use crate::model::quant::{quantize, GgmlType};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let (n, k) = (37usize, 96usize);
        let w32: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let blocks = BlockMatrix::pack(BlockFormat::Q8_0, n, k, &quantize(GgmlType::Q8_0, &w32).unwrap());
        let mut decoded = vec![0.0f32; n * k];
        for (r, row) in decoded.chunks_exact_mut(k).enumerate() {
            blocks.row_to_f32(r, row);
        }
        let matrix = CpuMatrix { rows: n, cols: k, data: WeightData::Quantized(blocks) };
        for rows in [1usize, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, PANEL_Q8_0_MIN_ROWS - 1, PANEL_Q8_0_MIN_ROWS, 33] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let want = naive(&x, rows, &decoded, n, k);
            for level in SimdLevel::all_supported() {
                let mut out = vec![f32::NAN; rows * n];
                pool.install(|| matmul(level, 2, &x, rows, &matrix, &mut out));
                // The integer kernels quantize the input to 8 bits (a relative error of about
                // 1/254 a block); the AVX2 panel path multiplies the unquantized input.
                let exact = level == SimdLevel::Avx2 && rows >= PANEL_Q8_0_MIN_ROWS;
                let tolerance = if exact { 1e-4 } else { 0.1 };
                for (g, w) in out.iter().zip(&want) {
                    assert!((g - w).abs() <= tolerance * (1.0 + w.abs()), "rows={rows} {level}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn matrices_placed_together_compute_what_each_alone_does() {
        use crate::backend::Backend;
        use crate::model::quant::{quantize, GgmlType};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let backend = super::super::CpuBackend::new(2, None).unwrap();
        let (n, k) = (70usize, 96usize);
        let values = |rng: &mut rand::rngs::StdRng| -> Vec<f32> { (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let tensors = vec![
            HostTensor::from_f32(vec![n, k], values(&mut rng)).unwrap(),
            HostTensor::from_f32(vec![n, k], values(&mut rng)).unwrap().to_dtype(crate::tensor::DType::F16).unwrap(),
            HostTensor::quantized(vec![n, k], GgmlType::Q4_1, quantize(GgmlType::Q4_1, &values(&mut rng)).unwrap()).unwrap(),
            HostTensor::quantized(vec![n, k], GgmlType::Q8_0, quantize(GgmlType::Q8_0, &values(&mut rng)).unwrap()).unwrap(),
        ];
        let together = backend.matrices(tensors.clone()).unwrap();
        let x: Vec<f32> = (0..3 * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for (tensor, placed) in tensors.iter().zip(&together) {
            let alone = CpuMatrix::on_heap(tensor.clone()).unwrap();
            for rows in [1usize, 3] {
                let (mut want, mut got) = (vec![0.0; rows * n], vec![0.0; rows * n]);
                backend.run(|| {
                    matmul(backend.simd_level(), 2, &x, rows, &alone, &mut want);
                    matmul(backend.simd_level(), 2, &x, rows, placed, &mut got);
                });
                assert_eq!(got, want, "{:?} rows={rows}", tensor.dtype());
            }
        }
        // All four share one mapping: each starts where the one before it ends, on a cache line.
        let starts: Vec<usize> = together.iter().map(|m| m.first_byte_address()).collect();
        for (pair, m) in starts.windows(2).zip(&together) {
            assert!(pair[1] > pair[0] && pair[1] - pair[0] <= m.size_in_bytes() + 4 * 64, "{starts:?}");
        }
    }

    #[test]
    fn quantized_matmul_matches_its_dequantized_weights_for_every_row_count() {
        use crate::model::quant::{dequantize, quantize};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(n, k) in &[(37usize, 96usize), (130, 576)] {
            let w32: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for format in [quant::BlockFormat::Q8_0, quant::BlockFormat::Q4_0, quant::BlockFormat::Q4_1] {
                let bytes = quantize(format.ggml(), &w32).unwrap();
                let widened = dequantize(format.ggml(), &bytes, n * k).unwrap();
                let matrix = CpuMatrix { rows: n, cols: k, data: WeightData::Quantized(BlockMatrix::pack(format, n, k, &bytes)) };
                // 64 and 70 rows take the split by output rows (70: a run of 10, its last two
                // rows one at a time).
                for rows in [1usize, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 33, 64, 70] {
                    let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    let want = naive(&x, rows, &widened, n, k);
                    for level in SimdLevel::all_supported() {
                        let mut out = vec![f32::NAN; rows * n];
                        pool.install(|| matmul(level, 2, &x, rows, &matrix, &mut out));
                        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                            let (r, j) = (i / n, i % n);
                            let magnitude: f32 = (0..k).map(|c| (x[r * k + c] * widened[j * k + c]).abs()).sum();
                            // Integer products meet 8-bit activations (≈1/254 of each block's
                            // largest value): decode always, prefill with AVX2 or VNNI; the
                            // scalar level's prefill uses the widened weights exactly.
                            let integer = rows <= GEMV_MAX_ROWS || QuantKernel::for_level(level) != QuantKernel::Scalar;
                            let tolerance = if integer { 0.01 * magnitude } else { 1e-5 * magnitude };
                            assert!((g - w).abs() <= tolerance + 1e-5, "{format:?} n={n} k={k} rows={rows} {level}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}
