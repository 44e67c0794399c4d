//! Steering on the default model against tools/make_steering_reference.py: transformers with a
//! forward hook adding `scale · v[i]` to the output of decoder layer i (hidden_states[i+1]) at
//! every position, where v is a llama.cpp control vector written by the `gguf` package. engram
//! reads the same file and steers "at layer i" by the same convention; last-position logits
//! must agree as tightly as unsteered ones, and so must the greedy continuation. The cache is
//! f32, as in the unsteered exactness test (the f16 cache's bound is tested there).
//!
//! Skipped with a printed reason when models/ lacks the model, unless ENGRAM_REQUIRE_MODEL=1.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use engram::backend::cpu::CpuBackend;
use engram::generate::{self, GenerationRequest, SamplingParams, StopParams};
use engram::model::ModelFiles;
use engram::session::{LogitRequest, SequenceInput};
use engram::steer::files::read_vector;
use engram::steer::{CapturePlan, CapturePositions, Point, SteeringPlan, SteeringTerm};
use engram::{DType, KvPrecision, Model, Session, SessionOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model_file: String,
    vector_file: String,
    vector_layers: Vec<usize>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    token_ids: Vec<u32>,
    scale: f32,
    layers: [usize; 2],
    logits_file: String,
    unsteered_argmax: u32,
    steered_argmax: u32,
    max_abs_logit_change: f32,
    greedy_tokens: Vec<u32>,
    greedy_margins: Vec<f32>,
    /// Norms of transformers' steered hidden_states[i] at the last prompt position (the last
    /// entry has the final norm applied; the raw last block output is `last_block_norm`).
    residual_norms: Vec<f64>,
    last_block_norm: f64,
}

fn fixture_dir() -> PathBuf {
    common::smollm2_fixture_dir()
}

fn load_fixture() -> Option<(Fixture, PathBuf)> {
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("steering.json")).unwrap()).unwrap();
    let model = common::require_model(&fixture.model_file)?;
    Some((fixture, model))
}

fn plan(fixture: &Fixture, case: &Case) -> Option<SteeringPlan> {
    let (vector, _) = read_vector(fixture_dir().join(&fixture.vector_file)).unwrap();
    assert_eq!(vector.layers(), fixture.vector_layers, "the control vector's layers");
    let mut term = SteeringTerm::new(Arc::new(vector), case.scale);
    term.layers = Some((case.layers[0], case.layers[1]));
    Some(SteeringPlan { terms: vec![term] })
}

fn argmax(v: &[f32]) -> u32 {
    engram::generate::argmax(v)
}

#[test]
fn steered_logits_and_greedy_tokens_match_the_hooked_transformers_model() {
    let Some((fixture, model_path)) = load_fixture() else { return };
    let model: Model<CpuBackend> = Model::load(CpuBackend::new(2, None).unwrap().with_kv_precision(KvPrecision::F32), ModelFiles::open(&model_path).unwrap(), DType::F32, |_, _| {}).unwrap();
    let mut argmax_changes = 0;
    for case in &fixture.cases {
        let want = common::read_npy(&fixture_dir().join(&case.logits_file));
        let layers = model.config.num_hidden_layers;
        let mut session = Session::new(&model, SessionOptions::new(1, case.token_ids.len())).unwrap();
        session.set_steering(0, plan(&fixture, case)).unwrap();
        session.set_capture(Some(CapturePlan { points: (0..layers).map(Point::Block).collect(), positions: CapturePositions::LastPrompt })).unwrap();
        let got = session.step(&[SequenceInput { slot: 0, tokens: &case.token_ids, logits: LogitRequest::Last }]).unwrap().per_input.remove(0);
        // The captured (steered) residual of every block against transformers' hidden states.
        let captures = session.take_captures();
        assert_eq!(captures.len(), layers);
        for record in &captures {
            let layer = record.point.layer();
            let want = if layer + 1 == layers { case.last_block_norm } else { case.residual_norms[layer + 1] };
            let norm = record.values.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            assert!((norm - want).abs() <= 1e-4 * want, "{}: captured layer {layer} norm {norm} vs transformers {want}", case.name);
        }
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        eprintln!("{}: relative logit error {err:.2e} (steering moved the logits by up to {:.2})", case.name, case.max_abs_logit_change);
        assert!(err <= 1e-3, "{}: steered logits differ by {err} of max |logit|", case.name);
        assert_eq!(argmax(&got), case.steered_argmax, "{}", case.name);
        argmax_changes += usize::from(case.steered_argmax != case.unsteered_argmax);

        // Greedy continuation with steering at every generated token too.
        let steps = case.greedy_tokens.len();
        let mut session = Session::new(&model, SessionOptions::new(1, case.token_ids.len() + steps)).unwrap();
        session.set_steering(0, plan(&fixture, case)).unwrap();
        let request = GenerationRequest { prompt_ids: case.token_ids.clone(), sampling: SamplingParams::default(), stop: StopParams { max_tokens: steps, stop_strings: vec![], ignore_eos: true } };
        let generated = generate::generate(&mut session, &[request], &mut |_: usize, _: &str| {}).unwrap().0.remove(0).generated_ids;
        let mut checked = 0;
        for (k, (&g, &w)) in generated.iter().zip(&case.greedy_tokens).enumerate() {
            if case.greedy_margins[k] <= 1e-2 {
                break;
            }
            assert_eq!(g, w, "{}: steered greedy token {k} differs (reference margin {})", case.name, case.greedy_margins[k]);
            checked += 1;
        }
        eprintln!("{}: {checked}/{steps} steered greedy tokens checked and equal", case.name);
    }
    // The fixture must exercise steering that matters, or agreement would prove little.
    assert!(argmax_changes > 0 || fixture.cases.iter().all(|c| c.max_abs_logit_change > 1.0), "the fixture's steering barely changes the output");
}
