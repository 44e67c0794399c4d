//! Neural procedural memory on a tiny random model: distillation of synthetic experiences whose
//! successes differ by a known feature (held-out AUC), retrieval by kind for held-out
//! instructions, the bank file round trip, export as a control vector, refusals (malformed
//! lines, another model's bank, an empty side), and the `engram memory` CLI end to end.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use engram::backend::cpu::CpuBackend;
use engram::memory::bank::merge;
use engram::memory::distill::{distill, instruction_key, DistillOptions, LayerChoice};
use engram::memory::experience::read_experiences;
use engram::memory::retrieve::{blend, retrieve};
use engram::memory::{Episode, MemoryBank, Position, Step};
use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::model::ModelFiles;
use engram::steer::compute::Method;
use engram::steer::files::read_vector;
use engram::{DType, Model};

use common::labelled_episode;

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::F32, 41).unwrap();
    dir
}

fn load(dir: &Path) -> Model<CpuBackend> {
    Model::load(CpuBackend::new(2, None).unwrap(), ModelFiles::open(dir).unwrap(), DType::F32, |_, _| {}).unwrap()
}

/// Kinds with clearly different instruction texts; the last of each list is held out.
const KINDS: [(&str, [&str; 4]); 3] = [
    ("cook", ["cook pasta in the kitchen pot", "cook rice in the kitchen pot", "cook soup in the kitchen pot", "cook beans in the kitchen pot"]),
    ("garden", ["water the garden roses outside", "water the garden tulips outside", "water the garden lilies outside", "water the garden daisies outside"]),
    ("laundry", ["WASH SHIRTS WITH SOAP NOW", "WASH SOCKS WITH SOAP NOW", "WASH TOWELS WITH SOAP NOW", "WASH SHEETS WITH SOAP NOW"]),
];

const FILLER: [&str; 8] = ["a lamp", "the door", "a red chair", "some boxes", "a window", "the rug", "a clock", "two cups"];

/// Episodes whose successful steps' observations contain a marker phrase and whose failed steps'
/// observations do not; everything else is shared filler.
fn synthetic_episodes() -> Vec<Episode> {
    let mut out = Vec::new();
    for (kind, instructions) in KINDS {
        for e in 0..12 {
            let success = e % 2 == 0;
            let steps = (0..3)
                .map(|s| {
                    let filler = FILLER[(e * 3 + s) % FILLER.len()];
                    let observation =
                        if success { format!("You see {filler}. ZZZ GOLD ZZZ GOLD ZZZ") } else { format!("You see {filler}. nothing at all here") };
                    Step { observation, action: format!("use {}", FILLER[(e + s) % FILLER.len()]), valid_actions: None }
                })
                .collect();
            out.push(labelled_episode(format!("{kind}-{}", e % 3), kind, instructions[e % 3], success, steps));
        }
    }
    out
}

fn options(position: Position) -> DistillOptions {
    DistillOptions { layers: LayerChoice::Range(0, 2), position, history: 1, ..Default::default() }
}

#[test]
fn distilled_direction_separates_successes_held_out() {
    let dir = tiny_model();
    let model = load(dir.path());
    for position in [Position::ContextLast, Position::ActionMean] {
        for method in [Method::Mean, Method::Pca, Method::Probe] {
            let report = distill(&model, &synthetic_episodes(), &DistillOptions { method, ..options(position) }, |_, _| {}).unwrap();
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(report.bank.memories.len(), 3);
            for m in &report.bank.memories {
                assert_eq!(m.meta.counts.episodes, 12);
                assert_eq!((m.meta.counts.success_steps, m.meta.counts.failure_steps), (18, 18));
                let best = m.meta.layers.iter().filter_map(|s| s.held_out_auc).fold(0.0, f64::max);
                let aucs: Vec<(usize, f64, Option<f64>)> = m.meta.layers.iter().map(|s| (s.layer, s.auc, s.held_out_auc)).collect();
                println!("{position} {method} {}: {aucs:?}", m.meta.name);
                assert!(best > 0.9, "{position} {method} {}: best held-out AUC {best} ({aucs:?})", m.meta.name);
                assert_eq!(m.direction.layers(), vec![0, 1, 2]);
            }
        }
    }
}

/// A subtler contrast: one word of the current observation differs (`gold` vs `lead`) and no
/// history is shown. The difference of means does not find it on the tiny random model (held-out
/// AUC 0.5–0.75: noise dimensions dominate); the probe, on standardized features, does (measured
/// best-layer held-out AUC 0.77–0.87 per kind with the agent's prompt, where the word sits
/// further from the read position behind the question line; 0.84–0.90 with the older bare
/// context; chance is 0.5).
#[test]
fn a_one_word_contrast_is_found_held_out_by_the_probe() {
    let dir = tiny_model();
    let model = load(dir.path());
    let episodes: Vec<Episode> = synthetic_episodes()
        .into_iter()
        .map(|mut e| {
            for s in &mut e.steps {
                let filler = s.observation.split('.').next().unwrap().to_string();
                s.observation = format!("{filler}. It is made of {}.", if e.success { "gold" } else { "lead" });
            }
            e
        })
        .collect();
    let options = DistillOptions { history: 0, method: Method::Probe, ..options(Position::ContextLast) };
    let report = distill(&model, &episodes, &options, |_, _| {}).unwrap();
    assert_eq!(report.bank.memories.len(), 3);
    for m in &report.bank.memories {
        let aucs: Vec<(usize, f64, Option<f64>)> = m.meta.layers.iter().map(|s| (s.layer, s.auc, s.held_out_auc)).collect();
        let best = m.meta.layers.iter().filter_map(|s| s.held_out_auc).fold(0.0, f64::max);
        eprintln!("{}: best held-out AUC {best} ({aucs:?})", m.meta.name);
        assert!(best > 0.7, "{}: best held-out AUC {best} ({aucs:?})", m.meta.name);
    }
}

#[test]
fn auto_layers_keep_the_best_and_workflow_is_the_shortest_success() {
    let dir = tiny_model();
    let model = load(dir.path());
    let mut episodes = synthetic_episodes();
    episodes[2].steps.truncate(1);
    let report = distill(&model, &episodes, &DistillOptions { layers: LayerChoice::Auto(2), ..options(Position::ContextLast) }, |_, _| {}).unwrap();
    let cook = report.bank.get("cook").unwrap();
    assert_eq!(cook.direction.layers().len(), 2);
    let score = |s: &engram::memory::bank::LayerStats| s.held_out_auc.unwrap_or(s.auc);
    let kept_worst = cook.meta.layers.iter().filter(|s| s.selected).map(score).fold(f64::INFINITY, f64::min);
    let dropped_best = cook.meta.layers.iter().filter(|s| !s.selected).map(score).fold(0.0, f64::max);
    assert!(kept_worst >= dropped_best);
    assert_eq!(cook.meta.workflow, format!("1. {}", episodes[2].steps[0].action));
}

#[test]
fn retrieval_returns_the_kind_of_held_out_instructions() {
    let dir = tiny_model();
    let model = load(dir.path());
    let bank = distill(&model, &synthetic_episodes(), &options(Position::ContextLast), |_, _| {}).unwrap().bank;
    let key_layer = bank.memories[0].meta.key_layer;
    assert_eq!(key_layer, 1);
    for (kind, instructions) in KINDS {
        let query = instruction_key(&model, instructions[3], key_layer).unwrap();
        let hits = retrieve(&bank, &query, key_layer, 3, -1.0).unwrap();
        println!("{kind}: {:?}", hits.iter().map(|h| (&h.name, h.score)).collect::<Vec<_>>());
        assert_eq!(hits[0].name, kind, "{hits:?}");
        assert!(retrieve(&bank, &query, key_layer, 3, hits[0].score + 1e-9).unwrap().is_empty());
        let top = retrieve(&bank, &query, key_layer, 1, -1.0).unwrap();
        let blended = blend(&bank, &top).unwrap();
        assert_eq!(blended.get(1).unwrap(), bank.get(kind).unwrap().direction.get(1).unwrap());
    }
}

#[test]
fn bank_round_trip_export_merge_and_refusals() {
    let dir = tiny_model();
    let model = load(dir.path());
    let out = tempfile::tempdir().unwrap();
    let bank = distill(&model, &synthetic_episodes(), &options(Position::ContextLast), |_, _| {}).unwrap().bank;
    let path = out.path().join("bank.safetensors");
    bank.write(&path).unwrap();
    let read = MemoryBank::read(&path).unwrap();
    assert_eq!(read, bank);
    read.check_fits(72, 3).unwrap();
    let refusal = read.check_fits(64, 3).unwrap_err().to_string();
    assert!(refusal.contains("hidden size 72 and 3 layers"), "{refusal}");

    let gguf = out.path().join("garden.gguf");
    bank.export("garden", &gguf).unwrap();
    let (vector, _) = read_vector(&gguf).unwrap();
    let garden = bank.get("garden").unwrap();
    for layer in garden.direction.layers() {
        assert_eq!(vector.get(layer).unwrap(), garden.direction.get(layer).unwrap());
    }
    assert!(bank.export("nothing", &gguf).unwrap_err().to_string().contains("cook"));

    let merged = merge(&bank, &bank, Some("-b")).unwrap();
    assert_eq!(merged.memories.len(), 6);
    assert!(merge(&bank, &bank, None).is_err());

    // Corruptions name the file.
    std::fs::write(out.path().join("junk.safetensors"), b"not safetensors").unwrap();
    let err = MemoryBank::read(out.path().join("junk.safetensors")).unwrap_err().to_string();
    assert!(err.contains("junk.safetensors"), "{err}");
    let err = MemoryBank::read(&gguf).unwrap_err().to_string();
    assert!(err.contains("garden.gguf"), "{err}");
}

#[test]
fn an_empty_side_is_reported_and_the_other_keys_still_distil() {
    let dir = tiny_model();
    let model = load(dir.path());
    let mut episodes = synthetic_episodes();
    for e in episodes.iter_mut().filter(|e| e.kind == "garden") {
        e.success = true;
    }
    let report = distill(&model, &episodes, &options(Position::ContextLast), |_, _| {}).unwrap();
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].0, "garden");
    assert!(report.errors[0].1.contains("no failed episodes"), "{:?}", report.errors);
    let names: Vec<&str> = report.bank.memories.iter().map(|m| m.name()).collect();
    assert_eq!(names, ["cook", "laundry"]);
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

#[test]
fn malformed_line_is_named_or_skipped() {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("exp.jsonl");
    let mut lines: Vec<String> = synthetic_episodes().iter().take(4).map(|e| serde_json::to_string(e).unwrap()).collect();
    lines.insert(2, r#"{"kind": "cook", "instruction": "x", "success": true, "steps": []}"#.into());
    write_lines(&path, &lines);
    let err = read_experiences(&path, false).unwrap_err().to_string();
    assert!(err.contains("exp.jsonl:3:") && err.contains("at least one step"), "{err}");
    let (episodes, warnings) = read_experiences(&path, true).unwrap();
    assert_eq!(episodes.len(), 4);
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("exp.jsonl:3:"));
}

// ---------------------------------------------------------------------------------------------
// CLI

fn engram() -> Command {
    Command::new(env!("CARGO_BIN_EXE_engram"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "command failed\nstdout: {stdout}\nstderr: {stderr}");
    stdout + &stderr
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected engram's error exit\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/experiences_small.jsonl")
}

#[test]
fn cli_distill_list_show_retrieve_export_merge() {
    let model = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let bank = out.path().join("bank.safetensors");
    let text = run_ok(engram().args(["memory", "distill", "-m"]).arg(model.path()).arg("--experiences").arg(fixture()).arg("-o").arg(&bank).args(["--layers", "auto:2"]));
    assert!(text.contains("24 episodes"), "{text}");
    let read = MemoryBank::read(&bank).unwrap();
    let names: Vec<&str> = read.memories.iter().map(|m| m.name()).collect();
    assert_eq!(names, ["clean", "cook", "laundry", "water"]);
    assert!(read.memories.iter().all(|m| m.direction.layers().len() == 2));

    let list = run_ok(engram().args(["memory", "list"]).arg(&bank));
    assert!(list.contains("4 memories") && list.contains("laundry"), "{list}");
    let show = run_ok(engram().args(["memory", "show"]).arg(&bank).arg("cook"));
    assert!(show.contains("6 episodes (3 succeeded, 3 failed)") && show.contains("1. open fridge"), "{show}");
    let err = run_err(engram().args(["memory", "show"]).arg(&bank).arg("nap"));
    assert!(err.contains("no memory named 'nap'"), "{err}");

    let blend_path = out.path().join("blend.gguf");
    let hits = run_ok(
        engram().args(["memory", "retrieve", "-m"]).arg(model.path()).arg(&bank).args(["--task", "Boil an egg in the kitchen.", "--top-k", "2", "--threshold", "-1"]).arg("--blend").arg(&blend_path),
    );
    assert!(hits.contains("   1 cook"), "{hits}");
    assert!(hits.contains("   2 "), "{hits}");
    assert!(read_vector(&blend_path).is_ok());

    let gguf = out.path().join("cook.gguf");
    run_ok(engram().args(["memory", "export"]).arg(&bank).arg("cook").arg("-o").arg(&gguf));
    let (vector, _) = read_vector(&gguf).unwrap();
    assert_eq!(vector.layers(), read.get("cook").unwrap().direction.layers());

    let merged = out.path().join("merged.safetensors");
    let err = run_err(engram().args(["memory", "merge"]).arg(&bank).arg(&bank).arg("-o").arg(&merged));
    assert!(err.contains("both banks have a memory named"), "{err}");
    run_ok(engram().args(["memory", "merge"]).arg(&bank).arg(&bank).arg("-o").arg(&merged).args(["--suffix", "_2"]));
    assert_eq!(MemoryBank::read(&merged).unwrap().memories.len(), 8);

    // action-mean position and task grouping run too.
    let by_task = out.path().join("tasks.safetensors");
    run_ok(engram().args(["memory", "distill", "-m"]).arg(model.path()).arg("--experiences").arg(fixture()).arg("-o").arg(&by_task).args(["--by", "task", "--position", "action-mean", "--layers", "0-2"]));
}

#[test]
fn cli_refuses_bad_lines_other_models_and_empty_sides() {
    let model = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let bank = out.path().join("bank.safetensors");
    let bad = out.path().join("bad.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(fixture()).unwrap().lines().map(String::from).collect();
    lines.insert(4, "{not json".into());
    write_lines(&bad, &lines);
    let err = run_err(engram().args(["memory", "distill", "-m"]).arg(model.path()).arg("--experiences").arg(&bad).arg("-o").arg(&bank));
    assert!(err.contains("bad.jsonl:5:"), "{err}");
    let text = run_ok(engram().args(["memory", "distill", "-m"]).arg(model.path()).arg("--experiences").arg(&bad).arg("-o").arg(&bank).args(["--skip-bad", "--layers", "1"]));
    assert!(text.contains("bad.jsonl:5:") && text.contains("1 lines skipped"), "{text}");

    // A bank from another model (4 layers) is refused.
    let other = tempfile::tempdir().unwrap();
    let mut config = tiny_config(Architecture::Llama);
    config.num_hidden_layers = 4;
    write_random_model(other.path(), &config, DType::F32, 7).unwrap();
    let err = run_err(engram().args(["memory", "retrieve", "-m"]).arg(other.path()).arg(&bank).args(["--task", "Boil an egg."]));
    assert!(err.contains("hidden size 72 and 3 layers") && err.contains("4 layers"), "{err}");

    // Only successes: the memory is reported, the others are written.
    let wins = out.path().join("wins.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(fixture())
        .unwrap()
        .lines()
        .map(|l| if l.contains("\"kind\": \"clean\"") { l.replace("\"success\": false", "\"success\": true") } else { l.to_string() })
        .collect();
    write_lines(&wins, &lines);
    let text = run_ok(engram().args(["memory", "distill", "-m"]).arg(model.path()).arg("--experiences").arg(&wins).arg("-o").arg(&bank).args(["--layers", "1"]));
    assert!(text.contains("memory 'clean'") && text.contains("no failed episodes"), "{text}");
    assert_eq!(MemoryBank::read(&bank).unwrap().memories.len(), 3);
}

#[test]
fn generate_applies_the_retrieved_memory_as_steering_text_or_both() {
    let model = tiny_model();
    let out = tempfile::tempdir().unwrap();
    let bank = out.path().join("bank.safetensors");
    run_ok(engram().args(["memory", "distill", "-m"]).arg(model.path()).arg("--experiences").arg(fixture()).arg("-o").arg(&bank).args(["--layers", "0-2"]));
    let generate = |extra: &[&str]| -> serde_json::Value {
        let text = run_ok(engram().args(["generate", "-m"]).arg(model.path()).args(["-p", "Boil an egg in the kitchen.", "-n", "6", "--ignore-eos", "--json"]).args(extra));
        // run_ok returns stdout then stderr: the JSON line comes first.
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    let bank_arg = bank.to_str().unwrap();
    let plain = generate(&[]);
    let zero = generate(&["--memory", bank_arg, "--memory-scale", "0"]);
    assert_eq!(zero["memory"][0]["name"], "cook", "an instruction of the bank retrieves its own kind");
    assert_eq!(zero["generated_ids"], plain["generated_ids"], "memory scale 0 must not change the output");
    let steered = generate(&["--memory", bank_arg, "--memory-scale", "40"]);
    assert_ne!(steered["generated_ids"], plain["generated_ids"], "a strong memory term must change the output");
    assert_eq!(steered["prompt_ids"], plain["prompt_ids"], "steer mode leaves the prompt alone");
    let text = generate(&["--memory", bank_arg, "--memory-mode", "text"]);
    assert!(text["prompt_ids"].as_array().unwrap().len() > plain["prompt_ids"].as_array().unwrap().len(), "text mode puts the workflow in the prompt");
    let both = generate(&["--memory", bank_arg, "--memory-mode", "both", "--memory-scale", "40"]);
    assert_eq!(both["prompt_ids"], text["prompt_ids"]);
    assert_ne!(both["generated_ids"], text["generated_ids"]);
    let err = run_err(engram().args(["generate", "-m"]).arg(model.path()).args(["-p", "x", "--memory", bank_arg, "--memory-mode", "sometimes"]));
    assert!(err.contains("sometimes"), "{err}");
}

#[test]
fn an_interrupted_distillation_resumes_from_its_checkpoint() {
    let dir = tiny_model();
    let model = load(dir.path());
    let hidden = model.config.hidden_size;
    let episodes = synthetic_episodes();
    let steps: usize = episodes.iter().map(|e| e.steps.len()).sum();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("bank.checkpoint");
    let with_checkpoint = DistillOptions { checkpoint: Some(path.clone()), checkpoint_block: 10, batch: 4, ..options(Position::ContextLast) };
    let full = distill(&model, &episodes, &with_checkpoint, |_, _| {}).unwrap();
    assert_eq!((full.resumed_steps, full.checkpoint_note.as_deref()), (0, None));

    // A run killed while writing its fourth block: three whole blocks and part of the fourth.
    let header = std::fs::read(&path).unwrap().iter().position(|&b| b == b'\n').unwrap() as u64 + 1;
    let block_bytes = (3 * 10 * hidden * 4) as u64;
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(header + 3 * block_bytes + 100).unwrap();
    let mut first_progress = None;
    let resumed = distill(&model, &episodes, &with_checkpoint, |done, _| {
        first_progress.get_or_insert(done);
    })
    .unwrap();
    assert_eq!(resumed.resumed_steps, 30);
    assert_eq!(first_progress, Some(30));
    assert!(resumed.checkpoint_note.as_deref().unwrap().contains(&format!("30 of {steps} steps")), "{:?}", resumed.checkpoint_note);
    assert_eq!(resumed.bank, full.bank, "the resumed bank differs from the uninterrupted one");

    // A finished checkpoint captures nothing more; other inputs start it over.
    assert_eq!(distill(&model, &episodes, &with_checkpoint, |_, _| {}).unwrap().resumed_steps, steps);
    let other = DistillOptions { history: 2, ..with_checkpoint.clone() };
    let restarted = distill(&model, &episodes, &other, |_, _| {}).unwrap();
    assert_eq!(restarted.resumed_steps, 0);
    assert!(restarted.checkpoint_note.as_deref().unwrap().contains("other inputs"), "{:?}", restarted.checkpoint_note);
}
