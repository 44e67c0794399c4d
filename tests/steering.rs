//! Fused steering, capture and readouts against an unfused reference that adds vectors with a
//! hook on the residual stream (what PyTorch forward hooks do), on tiny random models.

mod common;

use std::sync::Arc;

use common::{load_cpu, relative_error, Reference};
use engram::backend::cpu::CpuBackend;
use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::session::{LogitRequest, SequenceInput};
use engram::steer::{CapturePlan, CapturePositions, Point, ReadoutPlan, Schedule, SteeringMode, SteeringPlan, SteeringTerm, SteeringVector};
use engram::{DType, Model, Session, SessionOptions};
use rand::{Rng, SeedableRng};

const PROMPT: [u32; 10] = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114];

fn tiny() -> (tempfile::TempDir, Model<CpuBackend>, Reference) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::F32, 31).unwrap();
    let model = load_cpu(dir.path(), DType::F32, 2, None);
    let reference = Reference::load(dir.path(), DType::F32);
    (dir, model, reference)
}

fn random_vector(model: &Model<CpuBackend>, layers: std::ops::RangeInclusive<usize>, seed: u64) -> Arc<SteeringVector> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let c = &model.config;
    let mut v = SteeringVector::new(c.hidden_size, c.num_hidden_layers);
    for l in layers {
        v.set(l, (0..c.hidden_size).map(|_| rng.random_range(-1.0f32..1.0)).collect()).unwrap();
    }
    Arc::new(v)
}

fn session_logits(model: &Model<CpuBackend>, plan: Option<SteeringPlan>, tokens: &[u32]) -> Vec<f32> {
    let mut options = SessionOptions::new(1, 64);
    options.max_logit_rows = 64;
    let mut session = Session::new(model, options).unwrap();
    session.set_steering(0, plan).unwrap();
    session.step(&[SequenceInput { slot: 0, tokens, logits: LogitRequest::All }]).unwrap().per_input.remove(0)
}

fn plan(term: SteeringTerm) -> Option<SteeringPlan> {
    Some(SteeringPlan { terms: vec![term] })
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * *y as f64).sum()
}

fn norm32(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
}

#[test]
fn scale_zero_and_empty_plans_are_bit_identical_to_no_steering() {
    let (_dir, model, _) = tiny();
    let v = random_vector(&model, 0..=2, 1);
    let none = session_logits(&model, None, &PROMPT);
    let empty = session_logits(&model, Some(SteeringPlan::default()), &PROMPT);
    let zero = session_logits(&model, plan(SteeringTerm::new(v.clone(), 0.0)), &PROMPT);
    let mut relative_zero = SteeringTerm::new(v, 0.0);
    relative_zero.mode = SteeringMode::Relative;
    let relative_zero = session_logits(&model, plan(relative_zero), &PROMPT);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&none), bits(&empty));
    assert_eq!(bits(&none), bits(&zero));
    assert_eq!(bits(&none), bits(&relative_zero));
}

#[test]
fn added_vectors_match_the_hooked_reference_at_block_and_attention_points() {
    let (_dir, model, reference) = tiny();
    let v = random_vector(&model, 0..=2, 2);
    let unsteered: Vec<f64> = reference.run(&PROMPT).0.concat();
    for at_attention in [false, true] {
        let mut term = SteeringTerm::new(v.clone(), 1.7);
        term.at_attention = at_attention;
        term.layers = Some((1, 2));
        let got = session_logits(&model, plan(term), &PROMPT);
        let hook = |l: usize, attn: bool, _p: usize, h: &mut [f64]| {
            if attn == at_attention && (1..=2).contains(&l) {
                for (x, d) in h.iter_mut().zip(v.get(l).unwrap()) {
                    *x += 1.7 * *d as f64;
                }
            }
        };
        let want: Vec<f64> = reference.run_hooked(&PROMPT, &hook).0.concat();
        let err = relative_error(&got, &want);
        assert!(err < 1e-4, "attention={at_attention}: relative error {err}");
        assert!(relative_error(&got, &unsteered) > 1e-2, "steering must change the logits");
    }
}

#[test]
fn relative_and_clamp_modes_match_the_reference() {
    let (_dir, model, reference) = tiny();
    let v = random_vector(&model, 0..=2, 3);
    // relative: h += c·|h|/|v|·v, |h| before the add.
    let mut term = SteeringTerm::new(v.clone(), 0.3);
    term.mode = SteeringMode::Relative;
    let got = session_logits(&model, plan(term), &PROMPT);
    let hook = |l: usize, attn: bool, _p: usize, h: &mut [f64]| {
        if !attn {
            let d = v.get(l).unwrap();
            let scale = 0.3 * h.iter().map(|x| x * x).sum::<f64>().sqrt() / norm32(d);
            for (x, dv) in h.iter_mut().zip(d) {
                *x += scale * *dv as f64;
            }
        }
    };
    let err = relative_error(&got, &reference.run_hooked(&PROMPT, &hook).0.concat());
    assert!(err < 1e-4, "relative: {err}");

    // clamp: add max(0, target − ⟨h,v̂⟩)·v̂; a target near the typical projection is active on
    // some rows and not others.
    let target = 0.5f32;
    let active = std::cell::Cell::new((0, 0));
    let clamp_hook = |l: usize, attn: bool, _p: usize, h: &mut [f64]| {
        if !attn {
            let d = v.get(l).unwrap();
            let n = norm32(d);
            let projection = dot(h, d) / n;
            let missing = (target as f64 - projection).max(0.0);
            let (on, off) = active.get();
            active.set(if missing > 0.0 { (on + 1, off) } else { (on, off + 1) });
            for (x, dv) in h.iter_mut().zip(d) {
                *x += missing * *dv as f64 / n;
            }
        }
    };
    let want = reference.run_hooked(&PROMPT, &clamp_hook).0.concat();
    let (on, off) = active.get();
    assert!(on > 0 && off > 0, "the clamp should be active on some rows only ({on} on, {off} off)");
    let mut term = SteeringTerm::new(v, 1.0);
    term.mode = SteeringMode::Clamp { target };
    let err = relative_error(&session_logits(&model, plan(term), &PROMPT), &want);
    assert!(err < 1e-4, "clamp: {err}");
}

#[test]
fn schedules_steer_prompt_or_generated_rows_only() {
    let (_dir, model, reference) = tiny();
    let v = random_vector(&model, 0..=2, 4);
    let vocab = model.config.vocab_size;
    let prompt = &PROMPT[..7];
    let next = PROMPT[7];
    for schedule in [Schedule::Prompt, Schedule::Generated, Schedule::Positions { start: 2, end: 7 }, Schedule::Decay(0.5)] {
        let mut term = SteeringTerm::new(v.clone(), 2.0);
        term.schedule = schedule;
        let mut session = Session::new(&model, SessionOptions::new(1, 32)).unwrap();
        session.set_steering(0, plan(term)).unwrap();
        session.step(&[SequenceInput { slot: 0, tokens: prompt, logits: LogitRequest::None }]).unwrap();
        session.begin_generation(0).unwrap();
        let got = session.step(&[SequenceInput { slot: 0, tokens: &[next], logits: LogitRequest::Last }]).unwrap().per_input.remove(0);
        let hook = |l: usize, attn: bool, p: usize, h: &mut [f64]| {
            let factor = schedule.factor(p, Some(prompt.len())) as f64;
            if !attn && factor != 0.0 {
                for (x, d) in h.iter_mut().zip(v.get(l).unwrap()) {
                    *x += 2.0 * factor * *d as f64;
                }
            }
        };
        let mut tokens = prompt.to_vec();
        tokens.push(next);
        let want = &reference.run_hooked(&tokens, &hook).0[prompt.len()];
        let err = relative_error(&got, want);
        assert!(err < 1e-4, "{schedule:?}: {err}");
        assert_eq!(got.len(), vocab);
    }
}

#[test]
fn per_sequence_steering_in_one_batch_equals_each_sequence_alone() {
    let (_dir, model, _) = tiny();
    let vectors = [Some(random_vector(&model, 0..=2, 5)), None, Some(random_vector(&model, 1..=1, 6))];
    let prompts: [&[u32]; 3] = [&PROMPT, &PROMPT[2..6], &PROMPT[1..]];
    let plan_of = |i: usize| vectors[i].clone().map(|v| SteeringPlan { terms: vec![SteeringTerm::new(v, 1.0 + i as f32)] });
    let alone: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            let mut s = Session::new(&model, SessionOptions::new(1, 32)).unwrap();
            s.set_steering(0, plan_of(i)).unwrap();
            s.step(&[SequenceInput { slot: 0, tokens: prompts[i], logits: LogitRequest::Last }]).unwrap().per_input.remove(0)
        })
        .collect();
    let mut batch = Session::new(&model, SessionOptions::new(3, 32)).unwrap();
    for i in 0..3 {
        batch.set_steering(i, plan_of(i)).unwrap();
    }
    let inputs: Vec<SequenceInput> = (0..3).map(|i| SequenceInput { slot: i, tokens: prompts[i], logits: LogitRequest::Last }).collect();
    let out = batch.step(&inputs).unwrap();
    for i in 0..3 {
        let diff = out.last(i).iter().zip(&alone[i]).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-4, "sequence {i}: {diff}");
    }
}

#[test]
fn captures_equal_the_reference_stream_and_readouts_equal_their_norms_and_projections() {
    let (_dir, model, reference) = tiny();
    let v = random_vector(&model, 0..=2, 7);
    let layers = model.config.num_hidden_layers;
    let mut session = Session::new(&model, SessionOptions::new(1, 32)).unwrap();
    session.set_steering(0, plan(SteeringTerm::new(v.clone(), 0.8))).unwrap();
    session.set_capture(Some(CapturePlan { points: (0..layers).map(Point::Block).collect(), positions: CapturePositions::All })).unwrap();
    session.set_readout(Some(ReadoutPlan::all_blocks(layers, vec![("v".into(), v.clone())]))).unwrap();
    let out = session.step(&[SequenceInput { slot: 0, tokens: &PROMPT, logits: LogitRequest::Last }]).unwrap();
    let captures = session.take_captures();
    assert_eq!(captures.len(), layers * PROMPT.len());
    let hook = |l: usize, attn: bool, _p: usize, h: &mut [f64]| {
        if !attn {
            for (x, d) in h.iter_mut().zip(v.get(l).unwrap()) {
                *x += 0.8 * *d as f64;
            }
        }
    };
    let (_, hidden) = reference.run_hooked(&PROMPT, &hook);
    for c in &captures {
        let Point::Block(l) = c.point else { panic!("only block points were captured") };
        let want = &hidden[l + 1][c.positions[0]];
        assert!(relative_error(&c.values, want) < 1e-4, "layer {l} position {:?}", c.positions);
    }
    assert_eq!(out.readouts.len(), layers * PROMPT.len());
    for r in &out.readouts {
        let c = captures.iter().find(|c| c.point == Point::Block(r.layer) && c.positions[0] == r.position).unwrap();
        let norm = norm32(&c.values);
        let d = v.get(r.layer).unwrap();
        let projection = c.values.iter().zip(d).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / norm32(d);
        assert!((r.norm as f64 - norm).abs() < 1e-4 * norm, "norm at layer {}", r.layer);
        assert!((r.projections[0] as f64 - projection).abs() < 1e-4 * norm, "projection at layer {}", r.layer);
    }
}

#[test]
fn mean_and_last_capture_reduce_the_prompt_rows() {
    let (_dir, model, _) = tiny();
    let capture = |positions: CapturePositions| {
        let mut session = Session::new(&model, SessionOptions::new(1, 32)).unwrap();
        session.set_capture(Some(CapturePlan { points: vec![Point::Block(1), Point::Attention(2)], positions })).unwrap();
        session.step(&[SequenceInput { slot: 0, tokens: &PROMPT, logits: LogitRequest::None }]).unwrap();
        session.begin_generation(0).unwrap();
        session.step(&[SequenceInput { slot: 0, tokens: &[65], logits: LogitRequest::None }]).unwrap();
        session.take_captures()
    };
    let all = capture(CapturePositions::All);
    let mean = capture(CapturePositions::MeanPrompt);
    let last = capture(CapturePositions::LastPrompt);
    let generated = capture(CapturePositions::Generated);
    assert_eq!(all.len(), 2 * (PROMPT.len() + 1));
    assert_eq!(mean.len(), 2);
    assert_eq!(generated.len(), 2);
    assert!(generated.iter().all(|c| c.positions == vec![PROMPT.len()]));
    for m in &mean {
        let rows: Vec<_> = all.iter().filter(|c| c.point == m.point && c.positions[0] < PROMPT.len()).collect();
        assert_eq!(m.positions.len(), PROMPT.len());
        for (i, value) in m.values.iter().enumerate() {
            let want = rows.iter().map(|c| c.values[i] as f64).sum::<f64>() / rows.len() as f64;
            assert!((*value as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
        }
        let l = last.iter().find(|c| c.point == m.point).unwrap();
        assert_eq!(l.positions, vec![PROMPT.len() - 1]);
    }
}

#[test]
fn vectors_of_the_wrong_width_or_layers_are_refused() {
    let (_dir, model, _) = tiny();
    let mut session = Session::new(&model, SessionOptions::new(1, 8)).unwrap();
    let narrow = Arc::new(SteeringVector::new(model.config.hidden_size - 1, model.config.num_hidden_layers));
    let err = session.set_steering(0, plan(SteeringTerm::new(narrow, 1.0))).unwrap_err();
    assert!(err.to_string().contains("hidden size"), "{err}");
    let mut deep = SteeringVector::new(model.config.hidden_size, model.config.num_hidden_layers + 2);
    deep.set(model.config.num_hidden_layers + 1, vec![0.5; model.config.hidden_size]).unwrap();
    let err = session.set_steering(0, plan(SteeringTerm::new(Arc::new(deep), 1.0))).unwrap_err();
    assert!(err.to_string().contains("layers"), "{err}");
    let v = random_vector(&model, 0..=0, 9);
    let err = session.set_steering(0, plan(SteeringTerm::new(v, f32::NAN))).unwrap_err();
    assert!(err.to_string().contains("finite"), "{err}");
}
