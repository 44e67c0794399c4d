//! Criterion bench of the fused residual step alone (SmolLM2-135M's width), plain and with each
//! feature switched on: steering (add, relative, clamp, a different vector per row), readouts
//! and capture. The feature cost is the difference to `plain` at the same row count.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engram::backend::cpu::CpuBackend;
use engram::backend::{Backend, FusedArgs};
use engram::steer::tables::{FusedPoint, RowTerm, TermMode};

const DIM: usize = 576;

fn random(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 1000.0 - 1.0).collect()
}

/// The tables of one point for `rows` rows: which features are on.
fn table(rows: usize, steer: Option<TermMode>, per_row: bool, readout: bool, capture: bool) -> FusedPoint {
    let mut point = FusedPoint::default();
    if let Some(mode) = steer {
        point.row_offsets.push(0);
        for r in 0..rows {
            let direction = if per_row { r as u32 } else { 0 };
            point.terms.push(RowTerm { direction, coefficient: 0.5, mode });
            point.row_offsets.push(point.terms.len() as u32);
        }
    }
    if readout {
        point.readout_offset = Some(0);
        point.probes = vec![0];
    }
    if capture {
        point.capture = (0..rows as u32).map(|r| (r, r)).collect();
    }
    point
}

fn residual_step(c: &mut Criterion) {
    let backend = CpuBackend::new(2, None).unwrap();
    let directions = random(8 * DIM, 9);
    let weight = random(DIM, 5);
    let cases: [(&str, Option<TermMode>, bool, bool, bool); 8] = [
        ("plain", None, false, false, false),
        ("steer_add", Some(TermMode::Add), false, false, false),
        ("steer_per_row", Some(TermMode::Add), true, false, false),
        ("steer_relative", Some(TermMode::NormScaled), false, false, false),
        ("steer_clamp", Some(TermMode::Clamp { target: 3.0 }), false, false, false),
        ("readout", None, false, true, false),
        ("capture", None, false, false, true),
        ("steer_readout_capture", Some(TermMode::Add), false, true, true),
    ];
    let mut group = c.benchmark_group("residual_step_576");
    for rows in [1usize, 8] {
        let delta = random(rows * DIM, 2);
        let mut h = random(rows * DIM, 1);
        let mut x = vec![0.0f32; rows * DIM];
        let mut readout = vec![0.0f32; rows * 2];
        let mut capture = vec![0.0f32; rows * DIM];
        group.throughput(Throughput::Elements((rows * DIM) as u64));
        for (name, mode, per_row, with_readout, with_capture) in cases {
            let point = table(rows, mode, per_row, with_readout, with_capture);
            group.bench_function(BenchmarkId::new(name, format!("{rows}rows")), |bench| {
                // Called directly, not through backend.run: the forward pass enters the thread
                // pool once per pass, and entering it per call would dominate a 1-row step.
                // Several rows run on rayon's global pool (one thread per core).
                bench.iter(|| {
                    let fused = FusedArgs { point: &point, directions: &directions, readout: &mut readout, capture: &mut capture };
                    backend.residual_step(&mut h, &delta, rows, DIM, &weight, 1e-5, &mut x, fused);
                    // Keep h bounded: the step adds delta every iteration.
                    h.copy_from_slice(&delta);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, residual_step);
criterion_main!(benches);
