//! Criterion benches of the CPU kernels: each SIMD level of the dot products, the SiLU gate and
//! the decode attention kernels (hot, and a whole decode row's attention over a cold cache),
//! each kernel of the block-quantized products (one activation row, four at once), and the matmul paths (GEMV for
//! decode, gemm for prefill) at SmolLM2-135M's layer shapes, float and quantized, and the AVX2
//! panel gemm for prefill against the `gemm` crate it replaced there, and against the integer
//! kernel for Q8_0.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engram::backend::cpu::bf16_products;
use engram::backend::cpu::buffer::WeightBuffer;
use engram::backend::cpu::matmul::{gemm_strided, matmul, CpuMatrix, MatRef, WeightData};
use engram::backend::cpu::panel_gemm::{self, PanelWeights};
use engram::backend::cpu::quant::{self, BlockFormat, BlockMatrix, Q8Activations, QuantKernel, ROWS_AT_ONCE};
use engram::backend::cpu::simd::{self, SimdLevel};
use engram::backend::cpu::attention_simd;
use rayon::prelude::*;

fn random(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 1000.0 - 1.0).collect()
}

fn dot_products(c: &mut Criterion) {
    let n = 1536;
    let (a, b) = (random(n, 1), random(n, 2));
    let bits: Vec<u16> = a.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let mut group = c.benchmark_group("dot");
    group.throughput(Throughput::Elements(n as u64));
    for level in SimdLevel::all_supported() {
        group.bench_with_input(BenchmarkId::new("f32", level), &level, |bench, &l| bench.iter(|| simd::dot_f32(l, &a, &b)));
        group.bench_with_input(BenchmarkId::new("bf16", level), &level, |bench, &l| bench.iter(|| simd::dot_bf16(l, &bits, &b)));
    }
    group.finish();
    // Four rows against one input, as decode streams float weights (hot here: the rows stay in
    // L1, so this times the arithmetic; `matmul_3072x576` times the stream).
    let rows = random(4 * n, 5);
    let halves: Vec<u16> = rows.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    let brain: Vec<u16> = rows.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let (rows4, halves4, brain4) = (four_rows(&rows), four_rows(&halves), four_rows(&brain));
    let plan = simd::StreamPrefetch::DEFAULT;
    let mut group = c.benchmark_group("dot4");
    group.throughput(Throughput::Elements(4 * n as u64));
    for level in SimdLevel::all_supported() {
        group.bench_with_input(BenchmarkId::new("f32", level), &level, |bench, &l| bench.iter(|| simd::dot4_f32(l, plan, rows4, &b)));
        group.bench_with_input(BenchmarkId::new("f16", level), &level, |bench, &l| bench.iter(|| simd::dot4_f16(l, plan, halves4, &b)));
        group.bench_with_input(BenchmarkId::new("bf16", level), &level, |bench, &l| bench.iter(|| simd::dot4_bf16(l, plan, brain4, &b)));
    }
    group.finish();
}

fn four_rows<T>(values: &[T]) -> [&[T]; 4] {
    let n = values.len() / 4;
    std::array::from_fn(|r| &values[r * n..(r + 1) * n])
}

/// The MLP gate over one row of SmolLM2-135M's 1536 intermediate values.
fn silu_gate(c: &mut Criterion) {
    let n = 1536;
    let (gate, up) = (random(n, 3).iter().map(|v| 8.0 * v).collect::<Vec<f32>>(), random(n, 4));
    let mut out = vec![0.0f32; n];
    let mut group = c.benchmark_group("silu_mul");
    group.throughput(Throughput::Elements(n as u64));
    for level in SimdLevel::all_supported() {
        group.bench_with_input(BenchmarkId::new("f32", level), &level, |bench, &l| bench.iter(|| simd::silu_mul(l, &gate, &up, &mut out)));
    }
    group.finish();
}

/// Decode attention over one KV head's span of 1024 cached positions for the three query heads
/// of its GQA group (head_dim 64: SmolLM2-135M's shape): the scores against the keys, and the
/// weighted sums of the values, with f32 and f16 entries.
fn attention_kernels(c: &mut Criterion) {
    let (positions, head_dim, heads) = (1024, 64, 3);
    let (queries, keys, values) = (random(heads * head_dim, 6), random(positions * head_dim, 7), random(positions * head_dim, 9));
    let weights: Vec<f32> = random(heads * positions, 8).iter().map(|v| v.abs()).collect();
    let (mut scores, mut sums) = (vec![0.0f32; heads * positions], vec![0.0f32; heads * head_dim]);
    // The same entries as an f16 cache holds them.
    let half = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect() };
    let (keys16, values16) = (half(&keys), half(&values));
    let mut group = c.benchmark_group("attention_3x1024x64");
    group.throughput(Throughput::Elements((positions * head_dim) as u64));
    for level in SimdLevel::all_supported() {
        group.bench_with_input(BenchmarkId::new("scores", level), &level, |bench, &l| bench.iter(|| attention_simd::group_scores(l, &queries, head_dim, &keys, &mut scores)));
        group.bench_with_input(BenchmarkId::new("values", level), &level, |bench, &l| bench.iter(|| attention_simd::group_values(l, &weights, &values, head_dim, &mut sums)));
        group.bench_with_input(BenchmarkId::new("scores_f16", level), &level, |bench, &l| bench.iter(|| attention_simd::group_scores_f16(l, &queries, head_dim, &keys16, &mut scores)));
        group.bench_with_input(BenchmarkId::new("values_f16", level), &level, |bench, &l| bench.iter(|| attention_simd::group_values_f16(l, &weights, &values16, head_dim, &mut sums)));
    }
    group.finish();
}

/// One decode row's whole attention (the tasks over spans of positions, their merge) at
/// SmolLM2-135M's shape (9 query heads, 3 KV heads of 64) on two threads, with the cache cold
/// as in decode: each iteration takes the next of 30 layers' caches and first reads the 9 MB of
/// "weights" a layer streams between two attentions (untimed), so that the entries come from
/// memory, not from a cache level.
fn attention_decode_cold(c: &mut Criterion) {
    use engram::backend::cpu::attention::{attention, CpuKvStore, KvValues};
    use engram::backend::{AttentionLayout, KvPrecision, RowTable};
    let layout = AttentionLayout { heads: 9, kv_heads: 3, head_dim: 64 };
    let (layers, level) = (30, SimdLevel::detect());
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let others = random(270_000_000 / 4, 11);
    let qkv = random(layout.qkv_dim(), 12);
    let mut out = vec![0.0f32; layout.q_dim()];
    let mut group = c.benchmark_group("attention_decode_cold");
    group.sample_size(30);
    for (precision, positions) in [(KvPrecision::F16, 128usize), (KvPrecision::F16, 4000usize), (KvPrecision::F16, 1000), (KvPrecision::F32, 4000)] {
        let mut kv = CpuKvStore::new(layers, 1, positions + 1, layout, precision).unwrap();
        // Random entries everywhere (a cache never written reads the shared zero page).
        for (values, seed) in [(&mut kv.keys, 13), (&mut kv.values, 14)] {
            match values {
                KvValues::F32(v) => {
                    let entries = random(v.len(), seed);
                    v.copy_from_slice(&entries);
                }
                KvValues::F16(v) => {
                    let entries = random(v.len(), seed);
                    v.iter_mut().zip(entries).for_each(|(x, e)| *x = half::f16::from_f32(e).to_bits());
                }
            }
        }
        let position = [positions as u32];
        let table = RowTable { slots: &[0], positions: &position };
        group.throughput(Throughput::Bytes((2 * positions * layout.kv_dim() * precision.bytes_per_value()) as u64));
        let mut layer = 0;
        group.bench_function(BenchmarkId::new(format!("{precision}"), positions), |bench| {
            bench.iter_custom(|iterations| {
                // The threads kept awake, as in a forward pass: a wake-up per attention would
                // time the futex, not the attention.
                pool.install(|| {
                    engram::backend::cpu::warm::with_threads_awake(|| {
                        let mut spent = std::time::Duration::ZERO;
                        for _ in 0..iterations {
                            layer = (layer + 1) % layers;
                            let slice = &others[layer * others.len() / layers..(layer + 1) * others.len() / layers];
                            std::hint::black_box(slice.par_chunks(1 << 16).map(|c| c.iter().fold(0.0f32, |a, &b| a.max(b))).reduce(|| 0.0, f32::max));
                            let start = std::time::Instant::now();
                            attention(level, &qkv, 1, layout, &mut kv, layer, table, &mut out);
                            spent += start.elapsed();
                        }
                        spent
                    })
                })
            })
        });
    }
    group.finish();
}

/// A random `[n, k]` matrix in each of `formats`.
fn quantized_matrices(n: usize, k: usize, formats: &[BlockFormat]) -> Vec<(String, BlockMatrix)> {
    let w = random(n * k, 5);
    formats
        .iter()
        .map(|&format| {
            let bytes = engram::model::quant::quantize(format.ggml(), &w).unwrap();
            (format.ggml().name().to_ascii_lowercase(), BlockMatrix::pack(format, n, k, &bytes))
        })
        .collect()
}

/// gate|up of SmolLM2-135M, [3072, 576], in the 32-element formats; its down projection,
/// [576, 1536] (rows of whole 256-element super-blocks), in the K formats and two 32-element
/// ones to compare with.
fn quantized_products(c: &mut Criterion) {
    use BlockFormat::*;
    quantized_group(c, "quantized_3072x576", 3072, 576, &[Q4_1, Q8_0, Q5_0]);
    quantized_group(c, "quantized_576x1536", 576, 1536, &[Q4_K, Q6_K, Q4_1, Q5_0]);
}

fn quantized_group(c: &mut Criterion, group_name: &str, n: usize, k: usize, formats: &[BlockFormat]) {
    let x = random(ROWS_AT_ONCE * k, 6);
    let activations = Q8Activations::quantize(&x, ROWS_AT_ONCE, k);
    let mut group = c.benchmark_group(group_name);
    for (name, matrix) in quantized_matrices(n, k, formats) {
        for kernel in QuantKernel::all_supported() {
            let groups = 0..matrix.groups();
            let mut one = vec![0.0f32; n];
            group.throughput(Throughput::Elements((n * k) as u64));
            group.bench_function(BenchmarkId::new(format!("{name}/1row"), kernel), |bench| {
                bench.iter(|| quant::dot_groups(kernel, &matrix, groups.clone(), [activations.row(0)], &mut [&mut one[..]]))
            });
            let mut four = vec![vec![0.0f32; n]; ROWS_AT_ONCE];
            group.throughput(Throughput::Elements((ROWS_AT_ONCE * n * k) as u64));
            group.bench_function(BenchmarkId::new(format!("{name}/4rows"), kernel), |bench| {
                bench.iter(|| {
                    let mut rows = four.iter_mut();
                    let mut outs: [&mut [f32]; ROWS_AT_ONCE] = std::array::from_fn(|_| rows.next().unwrap().as_mut_slice());
                    quant::dot_groups(kernel, &matrix, groups.clone(), std::array::from_fn(|t| activations.row(t)), &mut outs)
                })
            });
        }
    }
    group.finish();
}

fn matmuls(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let level = SimdLevel::detect();
    // gate|up of SmolLM2-135M: [3072, 576].
    let (n, k) = (3072, 576);
    let w = random(n * k, 3);
    let matrices = [
        ("f32".to_string(), CpuMatrix { rows: n, cols: k, data: WeightData::F32(WeightBuffer::copy_of(&w).unwrap()) }),
        ("bf16".to_string(), CpuMatrix { rows: n, cols: k, data: WeightData::BF16(WeightBuffer::copy_of(&w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect::<Vec<u16>>()).unwrap()) }),
    ]
    .into_iter()
    .chain(
        quantized_matrices(n, k, &[BlockFormat::Q4_1, BlockFormat::Q8_0])
            .into_iter()
            .map(|(name, m)| (name, CpuMatrix { rows: n, cols: k, data: WeightData::Quantized(m) })),
    )
    .collect::<Vec<_>>();
    let mut group = c.benchmark_group("matmul_3072x576");
    for rows in [1usize, 64] {
        let x = random(rows * k, 4);
        let mut out = vec![0.0f32; rows * n];
        group.throughput(Throughput::Elements((rows * n * k) as u64));
        for (name, m) in &matrices {
            group.bench_function(BenchmarkId::new(name.as_str(), format!("{rows}rows")), |bench| {
                bench.iter(|| pool.install(|| matmul(level, 2, &x, rows, m, &mut out)))
            });
        }
    }
    group.finish();
}

/// The prefill product at 512 rows: the panel gemm (16-bit weights widened while packed) at each
/// level it runs at, against what it replaced, a widening pass and the `gemm` crate's f32
/// product.
fn prefill_products(c: &mut Criterion) {
    let levels: Vec<SimdLevel> = SimdLevel::all_supported().into_iter().filter(|&l| panel_gemm::available(l)).collect();
    if levels.is_empty() {
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let m = 512;
    for (n, k) in [(3072usize, 576usize), (576, 1536)] {
        let w = random(n * k, 5);
        let f16: Vec<u16> = w.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        let bf16: Vec<u16> = w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let x = random(m * k, 6);
        let mut out = vec![0.0f32; m * n];
        let (mut scratch, mut widened) = (Vec::new(), vec![0.0f32; n * k]);
        let mut group = c.benchmark_group(format!("prefill_{n}x{k}_512rows"));
        group.throughput(Throughput::Elements((m * n * k) as u64));
        group.sample_size(20);
        let crate_product = |weights: &[f32], out: &mut [f32]| gemm_strided(2, MatRef::dense(&x, m, k), MatRef::dense(weights, n, k).transposed(), out, n, false);
        group.bench_function("gemm_crate_f32", |b| b.iter(|| pool.install(|| crate_product(&w, &mut out))));
        group.bench_function("widen_then_gemm_crate_f16", |b| {
            b.iter(|| {
                pool.install(|| {
                    widened.par_chunks_mut(k).zip(f16.par_chunks(k)).for_each(|(d, s)| simd::f16_to_f32(s, d));
                    crate_product(&widened, &mut out)
                })
            })
        });
        if bf16_products::bf16_kernel_available(SimdLevel::detect()) {
            let level = SimdLevel::detect();
            let mut bits = vec![0u16; x.len()];
            bf16_products::to_bf16_bits(level, &x, &mut bits);
            group.bench_function("vdpbf16ps_bf16", |b| b.iter(|| pool.install(|| bf16_products::gemm_bf16(level, 2, &bits, m, k, &bf16, n, &mut out))));
        }
        for &level in &levels {
            for (name, weights) in [("panel_f32", PanelWeights::F32(&w)), ("panel_f16", PanelWeights::F16(&f16)), ("panel_bf16", PanelWeights::BF16(&bf16))] {
                group.bench_function(BenchmarkId::new(name, level), |b| b.iter(|| pool.install(|| panel_gemm::product(level, 2, &x, m, k, weights, n, &mut out, &mut scratch))));
            }
        }
        group.finish();
    }
}

/// Q8_0 prefill on AVX2 at several row counts: the four-row integer kernel (input quantized to
/// 8 bits) against row groups decoded into the panel gemm's f32 panels.
fn prefill_q8_0(c: &mut Criterion) {
    // AVX2 kernels on any CPU that has AVX2 (an AVX-512 one too, for comparing there).
    let level = SimdLevel::Avx2;
    if !SimdLevel::all_supported().contains(&level) {
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (n, k) in [(3072usize, 576usize), (576, 1536)] {
        let (_, matrix) = quantized_matrices(n, k, &[BlockFormat::Q8_0]).remove(0);
        let mut group = c.benchmark_group(format!("prefill_q8_0_{n}x{k}"));
        group.sample_size(20);
        let mut scratch = Vec::new();
        for m in [8usize, 16, 32, 64, 512] {
            let x = random(m * k, 7);
            let mut out = vec![0.0f32; m * n];
            group.throughput(Throughput::Elements((m * n * k) as u64));
            group.bench_function(BenchmarkId::new("integer", m), |b| {
                b.iter(|| pool.install(|| engram::backend::cpu::matmul::quantized_products(QuantKernel::for_level(level), quant::UNIT_PREFETCH_NEAR_AND_FAR, 2, &x, m, &matrix, &mut out)))
            });
            group.bench_function(BenchmarkId::new("panel", m), |b| b.iter(|| pool.install(|| panel_gemm::product(level, 2, &x, m, k, PanelWeights::Q8_0(&matrix), n, &mut out, &mut scratch))));
        }
        group.finish();
    }
}

criterion_group!(benches, dot_products, silu_gate, attention_kernels, attention_decode_cold, quantized_products, matmuls, prefill_products, prefill_q8_0);
criterion_main!(benches);
