//! The CUDA backend against the CPU backend: every kernel through the `Backend` trait on random
//! inputs, then whole random-weight models (GQA, odd sizes, long prompts, uneven batches,
//! steering, capture, readouts). Without a usable GPU each test prints `skipped: <reason>` and
//! returns; with `ENGRAM_REQUIRE_GPU=1` a missing GPU fails instead.
//!
//! Tolerances (weights are bf16 on both sides, so only activations and summation order differ):
//! element kernels 1e-5 relative; GEMV 1e-4 (bf16 weights meet activations rounded to bf16 on
//! both backends, f16 weights f32 ones); cuBLAS prefill products, which narrow activations to
//! bf16 or f16, 1e-2 (for bf16 the CPU narrows alike since bf16 products round their inputs, but
//! that bound has not been re-measured on a GPU); whole-model logits 3e-2 relative L2 per row, and greedy
//! tokens equal wherever the CPU's top-2 margin exceeds twice the row's largest logit difference
//! (the only case where the difference cannot change the argmax).

mod common;

use std::sync::Arc;

use engram::backend::cpu::CpuBackend;
use engram::backend::cuda::CudaBackend;
use engram::backend::{AttentionLayout, Backend, FusedArgs, KvPrecision, RowTable};
use engram::model::config::{Architecture, ModelConfig};
use engram::model::random::{tiny_config, write_random_model};
use engram::model::ModelFiles;
use engram::session::{LogitRequest, SequenceInput};
use engram::steer::tables::{FusedPoint, RowTerm, TermMode, NO_DIRECTION};
use engram::steer::{CapturePlan, ReadoutPlan, SteeringMode, SteeringPlan, SteeringTerm, SteeringVector};
use engram::{DType, HostTensor, Model, Session, SessionOptions, TensorData};
use rand::{Rng, SeedableRng};

/// The CUDA backend on device 0, or `None` after printing why the test is skipped.
fn cuda_or_skip() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(backend) => Some(backend),
        Err(reason) => {
            if std::env::var("ENGRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("ENGRAM_REQUIRE_GPU=1 but the CUDA backend is unusable: {reason}");
            }
            eprintln!("skipped: {reason}");
            None
        }
    }
}

/// The CPU reference keeps an f32 cache like CUDA's, so the two compute the same thing.
fn cpu() -> CpuBackend {
    CpuBackend::new(2, None).unwrap().with_kv_precision(KvPrecision::F32)
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: f64 = got.iter().zip(want).map(|(a, b)| ((*a - *b) as f64).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f64) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values from CUDA");
    let err = relative_error(got, want);
    assert!(err < tolerance, "{what}: relative error {err:.3e} above {tolerance:.0e}");
}

/// A buffer on `b` holding `data`.
fn put<B: Backend>(b: &B, data: &[f32]) -> B::Buffer {
    let mut buffer = b.buffer(data.len()).unwrap();
    b.upload(data, &mut buffer).unwrap();
    buffer
}

/// A buffer on `b` of `len` values poisoned with NaN, so unwritten outputs show.
fn poisoned<B: Backend>(b: &B, len: usize) -> B::Buffer {
    put(b, &vec![f32::NAN; len])
}

fn get<B: Backend>(b: &B, buffer: &B::Buffer, len: usize) -> Vec<f32> {
    let mut out = vec![0.0; len];
    b.download(buffer, &mut out).unwrap();
    out
}

fn bf16_tensor(rows: usize, cols: usize, seed: u64) -> HostTensor {
    let values = random(rows * cols, seed);
    HostTensor { shape: vec![rows, cols], data: TensorData::BF16(values.iter().map(|&v| half::bf16::from_f32(v)).collect()) }
}

fn f16_tensor(rows: usize, cols: usize, seed: u64) -> HostTensor {
    let values = random(rows * cols, seed);
    HostTensor { shape: vec![rows, cols], data: TensorData::F16(values.iter().map(|&v| half::f16::from_f32(v)).collect()) }
}

#[test]
fn rms_norm_silu_bias_and_gather_match_the_cpu() {
    let Some(gpu) = cuda_or_skip() else { return };
    let host = cpu();
    for (rows, dim) in [(1, 72), (3, 70), (5, 4096), (2, 8191)] {
        let x = random(rows * dim, 1);
        let w = random(dim, 2);
        let mut out = poisoned(&host, rows * dim);
        host.rms_norm(&put(&host, &x), &put(&host, &w), 1e-5, rows, dim, &mut out);
        let want = get(&host, &out, rows * dim);
        let mut out = poisoned(&gpu, rows * dim);
        gpu.rms_norm(&put(&gpu, &x), &put(&gpu, &w), 1e-5, rows, dim, &mut out);
        assert_close(&format!("rms_norm {rows}x{dim}"), &get(&gpu, &out, rows * dim), &want, 1e-5);

        let ffn = dim;
        let gate_up = random(rows * 2 * ffn, 3);
        let mut want = poisoned(&host, rows * ffn);
        host.silu_mul(&put(&host, &gate_up), rows, ffn, &mut want);
        let mut got = poisoned(&gpu, rows * ffn);
        gpu.silu_mul(&put(&gpu, &gate_up), rows, ffn, &mut got);
        assert_close("silu_mul", &get(&gpu, &got, rows * ffn), &get(&host, &want, rows * ffn), 1e-5);

        let bias = random(dim, 4);
        let mut want = put(&host, &x);
        host.add_bias(&mut want, &put(&host, &bias), rows, dim);
        let mut got = put(&gpu, &x);
        gpu.add_bias(&mut got, &put(&gpu, &bias), rows, dim);
        assert_close("add_bias", &get(&gpu, &got, rows * dim), &get(&host, &want, rows * dim), 1e-6);

        let picks: Vec<u32> = (0..rows as u32).rev().collect();
        let mut want = poisoned(&host, rows * dim);
        host.gather_rows(&put(&host, &x), &picks, dim, &mut want);
        let mut got = poisoned(&gpu, rows * dim);
        gpu.gather_rows(&put(&gpu, &x), &picks, dim, &mut got);
        assert_eq!(get(&gpu, &got, rows * dim), get(&host, &want, rows * dim), "gather_rows is a copy");
    }
}

#[test]
fn embedding_and_matmul_match_the_cpu_for_bf16_and_f16() {
    let Some(gpu) = cuda_or_skip() else { return };
    let host = cpu();
    // (out, in): aligned (16-byte path) and odd (scalar path) widths, and a large product.
    for (out_features, in_features) in [(136, 72), (45, 70), (4104, 1024), (259, 8)] {
        for (format, tensor) in [("bf16", bf16_tensor(out_features, in_features, 5)), ("f16", f16_tensor(out_features, in_features, 6))] {
            let (cw, gw) = (host.matrix(&tensor).unwrap(), gpu.matrix(&tensor).unwrap());
            let tokens: Vec<u32> = vec![0, (out_features - 1) as u32, 7 % out_features as u32];
            let mut want = poisoned(&host, tokens.len() * in_features);
            host.embed(&cw, &tokens, &mut want);
            let mut got = poisoned(&gpu, tokens.len() * in_features);
            gpu.embed(&gw, &tokens, &mut got);
            // Widening bf16/f16 is exact.
            assert_eq!(get(&gpu, &got, tokens.len() * in_features), get(&host, &want, tokens.len() * in_features), "embed {format}");

            // 1..=8 rows take the GEMV kernels; more rows take cuBLAS (activations narrowed).
            for rows in [1, 3, 8, 9, 40] {
                let x = random(rows * in_features, 7 + rows as u64);
                let mut want = poisoned(&host, rows * out_features);
                host.matmul(&put(&host, &x), rows, &cw, &mut want);
                let mut got = poisoned(&gpu, rows * out_features);
                gpu.matmul(&put(&gpu, &x), rows, &gw, &mut got);
                let tolerance = if rows <= 8 || gpu.cublas_missing().is_some() { 1e-4 } else { 1e-2 };
                assert_close(&format!("matmul {format} {rows}x{in_features} -> {out_features}"), &get(&gpu, &got, rows * out_features), &get(&host, &want, rows * out_features), tolerance);
            }
        }
    }
}

fn rope_tables(positions: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = vec![0.0; positions * half];
    let mut sin = vec![0.0; positions * half];
    for p in 0..positions {
        for i in 0..half {
            let angle = p as f32 * 10000f32.powf(-((2 * i) as f32) / head_dim as f32);
            cos[p * half + i] = angle.cos();
            sin[p * half + i] = angle.sin();
        }
    }
    (cos, sin)
}

#[test]
fn rope_and_head_norm_match_the_cpu() {
    let Some(gpu) = cuda_or_skip() else { return };
    let host = cpu();
    for layout in [AttentionLayout { heads: 6, kv_heads: 2, head_dim: 12 }, AttentionLayout { heads: 32, kv_heads: 8, head_dim: 128 }] {
        let rows = 5;
        let positions: Vec<u32> = vec![0, 1, 2, 17, 63];
        let (cos, sin) = rope_tables(64, layout.head_dim);
        let qkv = random(rows * layout.qkv_dim(), 11);
        let mut want = put(&host, &qkv);
        host.rope(&mut want, rows, layout, &positions, &put(&host, &cos), &put(&host, &sin));
        let mut got = put(&gpu, &qkv);
        gpu.rope(&mut got, rows, layout, &positions, &put(&gpu, &cos), &put(&gpu, &sin));
        assert_close("rope", &get(&gpu, &got, qkv.len()), &get(&host, &want, qkv.len()), 1e-5);

        let (qw, kw) = (random(layout.head_dim, 12), random(layout.head_dim, 13));
        let mut want = put(&host, &qkv);
        host.head_rms_norm(&mut want, rows, layout, &put(&host, &qw), &put(&host, &kw), 1e-6);
        let mut got = put(&gpu, &qkv);
        gpu.head_rms_norm(&mut got, rows, layout, &put(&gpu, &qw), &put(&gpu, &kw), 1e-6);
        assert_close("head_rms_norm", &get(&gpu, &got, qkv.len()), &get(&host, &want, qkv.len()), 1e-5);
    }
}

/// Runs the same attention batches through both backends, comparing every output.
fn compare_attention(gpu: &CudaBackend, layout: AttentionLayout, batches: &[(Vec<u32>, Vec<u32>)], copies: &[(usize, usize, usize, usize)], slots: usize, max_positions: usize) {
    let host = cpu();
    let mut cpu_kv = host.kv_store(2, slots, max_positions, layout, KvPrecision::F32).unwrap();
    let mut gpu_kv = gpu.kv_store(2, slots, max_positions, layout, KvPrecision::F32).unwrap();
    for (step, (row_slots, row_positions)) in batches.iter().enumerate() {
        for &(before_step, from, to, count) in copies {
            if before_step == step {
                host.copy_kv_prefix(&mut cpu_kv, from, to, count);
                gpu.copy_kv_prefix(&mut gpu_kv, from, to, count);
            }
        }
        let rows = row_slots.len();
        let table = RowTable { slots: row_slots, positions: row_positions };
        for layer in 0..2 {
            let qkv = random(rows * layout.qkv_dim(), 100 + 10 * step as u64 + layer as u64);
            let mut want = poisoned(&host, rows * layout.q_dim());
            host.attention(&put(&host, &qkv), rows, layout, &mut cpu_kv, layer, table, &mut want);
            let mut got = poisoned(gpu, rows * layout.q_dim());
            gpu.attention(&put(gpu, &qkv), rows, layout, &mut gpu_kv, layer, table, &mut got);
            assert_close(
                &format!("attention {layout:?} step {step} layer {layer} ({rows} rows)"),
                &get(gpu, &got, rows * layout.q_dim()),
                &get(&host, &want, rows * layout.q_dim()),
                1e-4,
            );
        }
    }
}

fn run(slot: u32, positions: std::ops::Range<u32>) -> (Vec<u32>, Vec<u32>) {
    (positions.clone().map(|_| slot).collect(), positions.collect())
}

fn concat(parts: &[(Vec<u32>, Vec<u32>)]) -> (Vec<u32>, Vec<u32>) {
    (parts.iter().flat_map(|p| p.0.clone()).collect(), parts.iter().flat_map(|p| p.1.clone()).collect())
}

#[test]
fn attention_prefill_decode_and_prefix_copies_match_the_cpu() {
    let Some(gpu) = cuda_or_skip() else { return };
    let layouts = [
        AttentionLayout { heads: 6, kv_heads: 2, head_dim: 12 },
        AttentionLayout { heads: 8, kv_heads: 8, head_dim: 64 },
        AttentionLayout { heads: 32, kv_heads: 8, head_dim: 128 },
        AttentionLayout { heads: 14, kv_heads: 2, head_dim: 64 },
        AttentionLayout { heads: 4, kv_heads: 1, head_dim: 256 },
    ];
    for layout in layouts {
        // Uneven prompts in one batch, a continuation chunk, decode steps, a shared prefix copied
        // to a fresh slot and decoded there, and a mixed batch (prefill rows next to decode rows).
        let batches = vec![
            concat(&[run(0, 0..37), run(1, 0..5), run(2, 0..1)]),
            concat(&[run(0, 37..40), run(1, 5..21)]),
            concat(&[run(0, 40..41), run(1, 21..22), run(2, 1..2)]),
            concat(&[run(3, 40..41)]),
            concat(&[run(0, 41..42), run(3, 41..45)]),
        ];
        compare_attention(&gpu, layout, &batches, &[(3, 0, 3, 40)], 4, 64);
    }
    // A long context: decode splits the sequence over many blocks.
    let layout = AttentionLayout { heads: 32, kv_heads: 8, head_dim: 128 };
    let batches = vec![run(0, 0..1500), run(0, 1500..1501), concat(&[run(0, 1501..1502), run(1, 0..1)])];
    compare_attention(&gpu, layout, &batches, &[], 2, 1600);
}

struct ResidualInputs<'a> {
    h: &'a [f32],
    delta: &'a [f32],
    weight: &'a [f32],
    directions: &'a [f32],
    rows: usize,
    dim: usize,
    readout_len: usize,
    capture_rows: usize,
}

/// h, x, readout and capture after one residual step on `b`.
fn residual_outputs<B: Backend>(b: &B, point: &FusedPoint, i: &ResidualInputs<'_>) -> [Vec<f32>; 4] {
    let (n, dim) = (i.rows * i.dim, i.dim);
    let (mut h, mut x, mut readout, mut capture) = (put(b, i.h), poisoned(b, n), poisoned(b, i.readout_len), poisoned(b, i.capture_rows * dim));
    let directions = put(b, i.directions);
    let args = FusedArgs { point, directions: &directions, readout: &mut readout, capture: &mut capture };
    b.residual_step(&mut h, &put(b, i.delta), i.rows, dim, &put(b, i.weight), 1e-5, &mut x, args);
    [get(b, &h, n), get(b, &x, n), get(b, &readout, i.readout_len), get(b, &capture, i.capture_rows * dim)]
}

#[test]
fn the_fused_residual_step_matches_the_cpu_with_steering_readouts_and_capture() {
    let Some(gpu) = cuda_or_skip() else { return };
    let host = cpu();
    for dim in [72, 70, 2048, 8192] {
        let rows = 4;
        let directions = random(3 * dim, 21);
        let h = random(rows * dim, 22);
        let delta = random(rows * dim, 23);
        let w = random(dim, 24);
        let point = FusedPoint {
            row_offsets: vec![0, 2, 2, 3, 5],
            terms: vec![
                RowTerm { direction: 0, coefficient: 1.5, mode: TermMode::Add },
                RowTerm { direction: 1, coefficient: 0.3, mode: TermMode::NormScaled },
                RowTerm { direction: 2, coefficient: 1.0, mode: TermMode::Clamp { target: 4.0 } },
                RowTerm { direction: 0, coefficient: -0.7, mode: TermMode::Add },
                RowTerm { direction: 1, coefficient: 0.0, mode: TermMode::Add },
            ],
            readout_offset: Some(3),
            probes: vec![2, NO_DIRECTION, 0],
            capture: vec![(0, 1), (3, 0)],
        };
        let readout_len = 3 + rows * (1 + point.probes.len());
        let inputs = ResidualInputs { h: &h, delta: &delta, weight: &w, directions: &directions, rows, dim, readout_len, capture_rows: 2 };
        let want = residual_outputs(&host, &point, &inputs);
        let got = residual_outputs(&gpu, &point, &inputs);
        assert_close(&format!("residual h ({dim})"), &got[0], &want[0], 1e-5);
        assert_close(&format!("residual x ({dim})"), &got[1], &want[1], 1e-5);
        for (i, (g, c)) in got[2].iter().zip(&want[2]).enumerate().skip(3) {
            let probe = (i - 3) % (1 + point.probes.len());
            if probe > 0 && point.probes[probe - 1] == NO_DIRECTION {
                assert!(g.is_nan(), "readout {i}: a probe without a direction reads NaN");
            } else {
                assert!((g - c).abs() <= 1e-4 * c.abs().max(1.0), "readout {i}: {g} vs {c}");
            }
        }
        assert_close(&format!("capture ({dim})"), &got[3], &want[3], 1e-6);
    }
}

#[test]
fn a_zero_coefficient_is_bit_identical_to_a_plain_step_on_the_gpu() {
    let Some(gpu) = cuda_or_skip() else { return };
    let (rows, dim) = (3, 576);
    let (h, delta, w, directions) = (random(rows * dim, 31), random(rows * dim, 32), random(dim, 33), random(dim, 34));
    let step = |point: &FusedPoint| {
        let (mut hb, mut x, mut readout, mut capture) = (put(&gpu, &h), poisoned(&gpu, rows * dim), gpu.buffer(0).unwrap(), gpu.buffer(0).unwrap());
        let dirs = put(&gpu, &directions);
        gpu.residual_step(&mut hb, &put(&gpu, &delta), rows, dim, &put(&gpu, &w), 1e-5, &mut x, FusedArgs { point, directions: &dirs, readout: &mut readout, capture: &mut capture });
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        (bits(get(&gpu, &hb, rows * dim)), bits(get(&gpu, &x, rows * dim)))
    };
    let plain = FusedPoint::default();
    let zero = FusedPoint {
        row_offsets: vec![0, 1, 2, 2],
        terms: vec![RowTerm { direction: 0, coefficient: 0.0, mode: TermMode::Add }, RowTerm { direction: 0, coefficient: 0.0, mode: TermMode::NormScaled }],
        ..Default::default()
    };
    assert_eq!(step(&plain), step(&zero));
}

// ---- whole models ----

fn load<B: Backend>(backend: B, dir: &std::path::Path) -> Model<B> {
    Model::load(backend, ModelFiles::open(dir).unwrap(), DType::BF16, |_, _| {}).unwrap()
}

/// Shapes that exercise GQA, odd (unaligned) widths, bias, q/k norm and untied heads.
fn shapes() -> Vec<(&'static str, ModelConfig)> {
    let mut odd = tiny_config(Architecture::Llama);
    (odd.hidden_size, odd.intermediate_size, odd.num_attention_heads, odd.num_key_value_heads, odd.head_dim) = (70, 90, 7, 7, 10);
    let mut wide = tiny_config(Architecture::Llama);
    (wide.hidden_size, wide.intermediate_size, wide.num_attention_heads, wide.num_key_value_heads, wide.head_dim, wide.num_hidden_layers) = (512, 1376, 8, 2, 64, 2);
    vec![
        ("llama gqa", tiny_config(Architecture::Llama)),
        ("mistral untied", tiny_config(Architecture::Mistral)),
        ("qwen2 bias", tiny_config(Architecture::Qwen2)),
        ("qwen3 qk-norm", tiny_config(Architecture::Qwen3)),
        ("odd sizes", odd),
        ("wide", wide),
    ]
}

/// Logits of every row of uneven prompts run as one batch, then `decode` greedy steps (the
/// tokens chosen on the CPU are fed to both, so the sequences stay comparable).
fn batch_logits<B: Backend>(model: &Model<B>, prompts: &[Vec<u32>], decode: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let mut options = SessionOptions::new(prompts.len(), 512);
    options.max_logit_rows = prompts.iter().map(Vec::len).sum();
    let mut session = Session::new(model, options).unwrap();
    let inputs: Vec<SequenceInput> = prompts.iter().enumerate().map(|(slot, p)| SequenceInput { slot, tokens: p, logits: LogitRequest::All }).collect();
    let mut out = session.step(&inputs).unwrap().per_input;
    for step in decode {
        let inputs: Vec<SequenceInput> = step.iter().enumerate().map(|(slot, t)| SequenceInput { slot, tokens: std::slice::from_ref(t), logits: LogitRequest::Last }).collect();
        out.extend(session.step(&inputs).unwrap().per_input);
    }
    out
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best })
}

/// Per row: relative L2 error within tolerance, and equal argmax where the margin allows.
fn assert_logits_agree(what: &str, got: &[f32], want: &[f32], vocab: usize) {
    for (r, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        assert_close(&format!("{what} row {r}"), g, w, 3e-2);
        let max_diff = g.iter().zip(w).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let mut sorted = w.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * max_diff {
            assert_eq!(argmax(g), argmax(w), "{what} row {r}: greedy token differs with margin {} > 2 × {max_diff}", sorted[0] - sorted[1]);
        }
    }
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    [11usize, 3, 40, 1].iter().map(|&n| (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}

#[test]
fn random_models_of_several_shapes_match_the_cpu() {
    if cuda_or_skip().is_none() {
        return;
    }
    for (name, config) in shapes() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &config, DType::BF16, 51).unwrap();
        let cpu_model = load(cpu(), dir.path());
        let Some(gpu_backend) = cuda_or_skip() else { return };
        let gpu_model = load(gpu_backend, dir.path());
        let vocab = config.vocab_size;
        let prompts = prompts(vocab);
        // Greedy continuations chosen on the CPU, fed to both backends.
        let cpu_prefill = batch_logits(&cpu_model, &prompts, &[]);
        let mut decode: Vec<Vec<u32>> = Vec::new();
        let mut last: Vec<u32> = cpu_prefill.iter().map(|rows| argmax(&rows[rows.len() - vocab..]) as u32).collect();
        for _ in 0..6 {
            decode.push(last.clone());
            let rows = batch_logits(&cpu_model, &prompts, &decode);
            let tail = &rows[rows.len() - prompts.len()..];
            last = tail.iter().map(|r| argmax(r) as u32).collect();
        }
        let want = batch_logits(&cpu_model, &prompts, &decode);
        let got = batch_logits(&gpu_model, &prompts, &decode);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_logits_agree(&format!("{name} output {i}"), g, w, vocab);
        }
    }
}

#[test]
fn a_long_prompt_matches_the_cpu() {
    let Some(gpu) = cuda_or_skip() else { return };
    let config = tiny_config(Architecture::Qwen3);
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &config, DType::BF16, 61).unwrap();
    let (cpu_model, gpu_model) = (load(cpu(), dir.path()), load(gpu, dir.path()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(62);
    let prompt: Vec<u32> = (0..700).map(|_| rng.random_range(0..config.vocab_size as u32)).collect();
    let logits = |model: &dyn Fn(&mut SessionOptions) -> Vec<f32>| {
        let mut options = SessionOptions::new(1, 1024);
        options.max_batch_rows = 256;
        model(&mut options)
    };
    let want = logits(&|options| Session::new(&cpu_model, *options).unwrap().step(&[SequenceInput { slot: 0, tokens: &prompt, logits: LogitRequest::Last }]).unwrap().per_input.remove(0));
    let got = logits(&|options| Session::new(&gpu_model, *options).unwrap().step(&[SequenceInput { slot: 0, tokens: &prompt, logits: LogitRequest::Last }]).unwrap().per_input.remove(0));
    assert_logits_agree("700-token prompt", &got, &want, config.vocab_size);
}

fn random_vector(config: &ModelConfig, seed: u64) -> Arc<SteeringVector> {
    let mut v = SteeringVector::new(config.hidden_size, config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        v.set(layer, random(config.hidden_size, seed + layer as u64)).unwrap();
    }
    Arc::new(v)
}

#[test]
fn steering_capture_and_readouts_match_the_cpu() {
    let Some(gpu) = cuda_or_skip() else { return };
    let config = tiny_config(Architecture::Llama);
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &config, DType::BF16, 71).unwrap();
    let (cpu_model, gpu_model) = (load(cpu(), dir.path()), load(gpu, dir.path()));
    let (v, u) = (random_vector(&config, 72), random_vector(&config, 73));
    let prompts = prompts(config.vocab_size);

    fn observe<B: Backend>(model: &Model<B>, prompts: &[Vec<u32>], v: &Arc<SteeringVector>, u: &Arc<SteeringVector>) -> (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let mut options = SessionOptions::new(prompts.len(), 128);
        options.max_logit_rows = prompts.iter().map(Vec::len).sum();
        let mut session = Session::new(model, options).unwrap();
        // Different vectors and modes per sequence (per-sequence slots in one batch).
        let mut relative = SteeringTerm::new(u.clone(), 0.2);
        relative.mode = SteeringMode::Relative;
        let mut clamp = SteeringTerm::new(v.clone(), 1.0);
        clamp.mode = SteeringMode::Clamp { target: 3.0 };
        let mut attention = SteeringTerm::new(u.clone(), -1.1);
        attention.at_attention = true;
        session.set_steering(0, Some(SteeringPlan { terms: vec![SteeringTerm::new(v.clone(), 2.5)] })).unwrap();
        session.set_steering(1, Some(SteeringPlan { terms: vec![relative] })).unwrap();
        session.set_steering(2, Some(SteeringPlan { terms: vec![clamp, attention] })).unwrap();
        session.set_capture(Some(CapturePlan::parse("all@prompt", model.config.num_hidden_layers).unwrap())).unwrap();
        session.set_readout(Some(ReadoutPlan::all_blocks(model.config.num_hidden_layers, vec![("v".into(), v.clone()), ("u".into(), u.clone())]))).unwrap();
        let inputs: Vec<SequenceInput> = prompts.iter().enumerate().map(|(slot, p)| SequenceInput { slot, tokens: p, logits: LogitRequest::All }).collect();
        let step = session.step(&inputs).unwrap();
        let readouts: Vec<f32> = step.readouts.iter().flat_map(|r| std::iter::once(r.norm).chain(r.projections.iter().copied())).collect();
        let captures: Vec<f32> = session.take_captures().into_iter().flat_map(|c| c.values).collect();
        (step.per_input, readouts, captures)
    }

    let (want_logits, want_readouts, want_captures) = observe(&cpu_model, &prompts, &v, &u);
    let (got_logits, got_readouts, got_captures) = observe(&gpu_model, &prompts, &v, &u);
    for (i, (g, w)) in got_logits.iter().zip(&want_logits).enumerate() {
        assert_logits_agree(&format!("steered sequence {i}"), g, w, config.vocab_size);
    }
    assert_close("readouts", &got_readouts, &want_readouts, 3e-2);
    assert_close("captures", &got_captures, &want_captures, 3e-2);
}

#[test]
fn failures_surface_at_the_next_fallible_call() {
    let Some(gpu) = cuda_or_skip() else { return };
    let mut out = gpu.buffer(4).unwrap();
    // A token outside the table must not launch; the error comes back from the next download.
    let table = gpu.matrix(&bf16_tensor(2, 8, 81)).unwrap();
    gpu.embed(&table, &[5], &mut out);
    let mut host = [0.0f32; 4];
    let err = gpu.download(&out, &mut host).expect_err("the recorded failure must surface");
    assert!(err.to_string().contains("embed"), "{err}");
}

#[test]
fn device_argmax_and_sampling_choose_like_the_host() {
    let Some(gpu) = cuda_or_skip() else { return };
    for vocab in [259, 32_000, 128_256] {
        let rows = 3;
        let mut logits = random(rows * vocab, 91);
        // A tie: the lowest index wins, as on the host.
        logits[vocab + 10] = 5.0;
        logits[vocab + 20] = 5.0;
        let buffer = put(&gpu, &logits);
        let want: Vec<u32> = logits.chunks(vocab).map(engram::generate::argmax).collect();
        assert_eq!(gpu.argmax_rows(&buffer, rows, vocab).unwrap(), want, "argmax over {vocab}");
        // A tiny temperature makes sampling greedy (the tied row splits its mass between the two
        // tied tokens, so u < 0.5 must take the first); u = 0 and u → 1 pick the CDF's ends.
        assert_eq!(gpu.sample_rows(&buffer, rows, vocab, 1e-9, &[0.3, 0.3, 0.9]).unwrap(), want, "cold sampling over {vocab}");
        let first = gpu.sample_rows(&buffer, rows, vocab, 1e4, &[0.0, 0.0, 0.0]).unwrap();
        assert_eq!(first, vec![0, 0, 0], "u = 0 takes the first token");
        let last = gpu.sample_rows(&buffer, rows, vocab, 1e4, &[0.999_999, 0.999_999, 0.999_999]).unwrap();
        assert!(last.iter().all(|&t| t as usize >= vocab - vocab / 100), "u → 1 takes a token near the end: {last:?}");
    }
}

/// Runs on every machine: the CPU backend's prefix copy makes a fresh slot attend exactly like
/// the slot it was copied from (the reference the CUDA test above compares against).
#[test]
fn the_cpu_prefix_copy_makes_a_slot_attend_like_its_source() {
    let host = cpu();
    let layout = AttentionLayout { heads: 6, kv_heads: 2, head_dim: 12 };
    let mut kv = host.kv_store(2, 3, 32, layout, KvPrecision::F32).unwrap();
    let (slots, positions) = run(0, 0..9);
    for layer in 0..2 {
        let qkv = put(&host, &random(9 * layout.qkv_dim(), 200 + layer as u64));
        let mut out = poisoned(&host, 9 * layout.q_dim());
        host.attention(&qkv, 9, layout, &mut kv, layer, RowTable { slots: &slots, positions: &positions }, &mut out);
    }
    host.copy_kv_prefix(&mut kv, 0, 2, 9);
    let qkv = random(layout.qkv_dim(), 300);
    let decode = |slot: u32, kv: &mut <CpuBackend as Backend>::KvStore| {
        let mut out = poisoned(&host, layout.q_dim());
        host.attention(&put(&host, &qkv), 1, layout, kv, 1, RowTable { slots: &[slot], positions: &[9] }, &mut out);
        get(&host, &out, layout.q_dim())
    };
    let from_source = decode(0, &mut kv);
    assert_eq!(decode(2, &mut kv), from_source);
    assert_ne!(decode(1, &mut kv), from_source, "an empty slot attends differently");
}
