//! Steering on the default model against tools/make_steering_reference.py: transformers with a
//! forward hook adding `scale · v[i]` to the output of decoder layer i (hidden_states[i+1]) at
//! every position, where v is a llama.cpp control vector written by the `gguf` package. engram
//! reads the same file and steers "at layer i" by the same convention; last-position logits
//! must agree as tightly as unsteered ones, and so must the greedy continuation.
//!
//! Skipped with a printed reason when models/ lacks the model, unless ENGRAM_REQUIRE_MODEL=1.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engram::backend::cpu::CpuBackend;
use engram::generate::{self, GenerationRequest, SamplingParams, StopParams};
use engram::model::ModelFiles;
use engram::session::{LogitRequest, SequenceInput};
use engram::steer::files::read_vector;
use engram::steer::{SteeringPlan, SteeringTerm};
use engram::{DType, Model, Session, SessionOptions};
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
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2")
}

fn load_fixture() -> Option<(Fixture, PathBuf)> {
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("steering.json")).unwrap()).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(&fixture.model_file);
    if !model.exists() {
        if std::env::var("ENGRAM_REQUIRE_MODEL").as_deref() == Ok("1") {
            panic!("{} is missing and ENGRAM_REQUIRE_MODEL=1: run tools/fetch_model.sh", model.display());
        }
        eprintln!("SKIPPED: {} is missing (run tools/fetch_model.sh)", model.display());
        return None;
    }
    Some((fixture, model))
}

fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
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
    let model: Model<CpuBackend> = Model::load(CpuBackend::new(2, None).unwrap(), ModelFiles::open(&model_path).unwrap(), DType::F32, |_, _| {}).unwrap();
    let mut argmax_changes = 0;
    for case in &fixture.cases {
        let want = read_npy(&fixture_dir().join(&case.logits_file));
        let mut session = Session::new(&model, SessionOptions::new(1, case.token_ids.len())).unwrap();
        session.set_steering(0, plan(&fixture, case)).unwrap();
        let got = session.step(&[SequenceInput { slot: 0, tokens: &case.token_ids, logits: LogitRequest::Last }]).unwrap().per_input.remove(0);
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
