//! Criterion benches of the CPU kernels: each SIMD level of the dot products, and the matmul
//! paths (GEMV for decode, gemm for prefill) at SmolLM2-135M's layer shapes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engram::backend::cpu::matmul::{matmul, CpuMatrix, WeightData};
use engram::backend::cpu::simd::{self, SimdLevel};

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
}

fn matmuls(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let level = SimdLevel::detect();
    // gate|up of SmolLM2-135M: [3072, 576].
    let (n, k) = (3072, 576);
    let w = random(n * k, 3);
    let matrices = [
        ("f32", CpuMatrix { rows: n, cols: k, data: WeightData::F32(w.clone()) }),
        ("bf16", CpuMatrix { rows: n, cols: k, data: WeightData::BF16(w.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()) }),
    ];
    let mut group = c.benchmark_group("matmul_3072x576");
    for rows in [1usize, 64] {
        let x = random(rows * k, 4);
        let mut out = vec![0.0f32; rows * n];
        group.throughput(Throughput::Elements((rows * n * k) as u64));
        for (name, m) in &matrices {
            group.bench_function(BenchmarkId::new(*name, format!("{rows}rows")), |bench| {
                bench.iter(|| pool.install(|| matmul(level, 2, &x, rows, m, &mut out)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, dot_products, matmuls);
criterion_main!(benches);
