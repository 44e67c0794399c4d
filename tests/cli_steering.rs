//! The steering options of the `engram` binary end to end on a tiny random model: `vectors
//! compute|show`, `--steer` on logits and generate (global and per sequence), capture and
//! readout files, and the refusals of bad vectors and options.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::steer::files::{read_vector, write_vector};
use engram::steer::SteeringVector;
use engram::DType;

fn engram() -> Command {
    common::engram_command()
}

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::F32, 41).unwrap();
    dir
}


fn run_err(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // 1: engram's own error; 2: clap's usage error. A panic would be 101.
    assert!(matches!(out.status.code(), Some(1 | 2)), "expected a clean error exit, got {:?}\nstderr: {stderr}", out.status.code());
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A vector with a pseudo-random direction at every layer of the tiny model.
fn write_test_vector(dir: &Path, name: &str, seed: u32, hidden: usize) -> PathBuf {
    let config = tiny_config(Architecture::Llama);
    let mut v = SteeringVector::new(hidden, config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        v.set(l, (0..hidden).map(|i| ((((i + 97 * l) as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 500.0 - 2.0).collect()).unwrap();
    }
    let path = dir.join(name);
    write_vector(&path, &v).unwrap();
    path
}


fn logits(model: &Path, out: &Path, extra: &[&str]) -> Vec<f32> {
    common::run_ok(engram().args(["logits", "-m"]).arg(model).args(["-p", "Steer this prompt", "-o"]).arg(out).args(extra));
    common::read_npy(out)
}

#[test]
fn steer_scale_zero_is_bit_identical_and_a_real_scale_moves_the_logits() {
    let dir = tiny_model();
    let v = write_test_vector(dir.path(), "v.safetensors", 1, 72);
    let out = dir.path().join("l.npy");
    let plain = logits(dir.path(), &out, &[]);
    let zero = logits(dir.path(), &out, &["--steer", &format!("{}:0", v.display())]);
    assert_eq!(plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), zero.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let steered = logits(dir.path(), &out, &["--steer", &format!("{}:2", v.display()), "--steer-layers", "1-2"]);
    let change = plain.iter().zip(&steered).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(change > 1e-3, "steering at scale 2 changed the logits by only {change}");
    // Two terms of scale 1 on the same file sum to one of scale 2.
    let twice = logits(dir.path(), &out, &["--steer", &format!("{}:1", v.display()), "--steer", &format!("{}:1", v.display()), "--steer-layers", "1-2"]);
    let diff = steered.iter().zip(&twice).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "two unit terms differ from one term of scale 2 by {diff}");
}

#[test]
fn per_sequence_steering_in_a_prompts_file_equals_each_run_alone() {
    let dir = tiny_model();
    let a = write_test_vector(dir.path(), "a.gguf", 3, 72);
    let b = write_test_vector(dir.path(), "b.npy", 4, 72);
    let prompts = dir.path().join("p.jsonl");
    let lines = [
        serde_json::json!({"prompt": "first prompt", "steer": [{"file": a, "scale": 1.5}]}),
        serde_json::json!("second, unsteered"),
        serde_json::json!({"prompt": "third one here", "steer": [{"file": b, "scale": -1.0, "layers": "0-1", "on": "generated"}]}),
    ];
    std::fs::write(&prompts, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let (batch, _) = common::run_ok(engram().args(["generate", "-m"]).arg(dir.path()).arg("--prompts").arg(&prompts).args(["-n", "6", "--ignore-eos", "--json"]));
    let batch: Vec<serde_json::Value> = batch.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let alone = |prompt: &str, extra: &[String]| -> serde_json::Value {
        let (out, _) = common::run_ok(engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", prompt, "-n", "6", "--ignore-eos", "--json"]).args(extra));
        serde_json::from_str(out.trim()).unwrap()
    };
    let first = alone("first prompt", &["--steer".into(), format!("{}:1.5", a.display())]);
    let second = alone("second, unsteered", &[]);
    let third = alone("third one here", &["--steer".into(), format!("{}:-1", b.display()), "--steer-layers".into(), "0-1".into(), "--steer-on".into(), "generated".into()]);
    assert_eq!(batch[0]["generated_ids"], first["generated_ids"]);
    assert_eq!(batch[1]["generated_ids"], second["generated_ids"]);
    assert_eq!(batch[2]["generated_ids"], third["generated_ids"]);
    let unsteered_first = alone("first prompt", &[]);
    assert_ne!(unsteered_first["generated_ids"], first["generated_ids"], "the steered sequence must differ from the unsteered one for this test to mean anything");
}

#[test]
fn readouts_match_the_captured_rows() {
    let dir = tiny_model();
    let v = write_test_vector(dir.path(), "v.gguf", 5, 72);
    let capture = dir.path().join("cap.safetensors");
    let readout = dir.path().join("read.jsonl");
    common::run_ok(
        engram()
            .args(["logits", "-m"])
            .arg(dir.path())
            .args(["-p", "Capture me", "-o"])
            .arg(dir.path().join("l.npy"))
            .arg("--steer")
            .arg(format!("{}:0.5", v.display()))
            .args(["--capture", "all@prompt", "--capture-out"])
            .arg(&capture)
            .arg("--readout-out")
            .arg(&readout),
    );
    let bytes = std::fs::read(&capture).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata.metadata().clone().unwrap();
    let (vector, _) = read_vector(&v).unwrap();
    let text = std::fs::read_to_string(&readout).unwrap();
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["probes"].as_array().unwrap().len(), 1);
    let mut checked = 0;
    for line in lines {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let (layer, position) = (r["layer"].as_u64().unwrap() as usize, r["position"].as_u64().unwrap() as usize);
        let tensor = st.tensor(&format!("layer.{layer}")).unwrap();
        let rows: Vec<serde_json::Value> = serde_json::from_str(&metadata[&format!("rows.layer.{layer}")]).unwrap();
        let k = rows.iter().position(|row| row["positions"][0] == position).expect("the readout's row was captured");
        let data: Vec<f32> = tensor.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let row = &data[k * 72..(k + 1) * 72];
        let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let d = vector.get(layer).unwrap();
        let dn = d.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let proj = row.iter().zip(d).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / dn;
        assert!((r["norm"].as_f64().unwrap() - norm).abs() < 1e-4 * norm.max(1.0), "layer {layer} pos {position}: norm");
        assert!((r["projections"][0].as_f64().unwrap() - proj).abs() < 1e-4 * norm.max(1.0), "layer {layer} pos {position}: projection");
        checked += 1;
    }
    let tokens = st.tensor("layer.0").unwrap().shape()[0];
    assert_eq!(checked, 3 * tokens, "a readout for every layer and prompt token");
}

#[test]
fn vectors_compute_writes_a_vector_and_show_describes_it() {
    let dir = tiny_model();
    let pos = dir.path().join("pos.txt");
    let neg = dir.path().join("neg.jsonl");
    std::fs::write(&pos, "I love this, wonderful!\nWhat a great day\nSo happy and glad\nExcellent work, thanks\n").unwrap();
    std::fs::write(&neg, "\"I hate this, awful.\"\n\"What a terrible day\"\n{\"prompt\": \"So sad and angry\"}\n\"Horrible work, sorry\"\n").unwrap();
    for method in ["mean", "pca", "probe"] {
        let out = dir.path().join(format!("v_{method}.gguf"));
        let report = dir.path().join(format!("r_{method}.json"));
        let (stdout, _) = common::run_ok(
            engram().args(["vectors", "compute", "-m"]).arg(dir.path()).arg("--pos").arg(&pos).arg("--neg").arg(&neg).arg("-o").arg(&out).args(["--method", method, "--paired", "--folds", "2", "--report"]).arg(&report),
        );
        assert!(stdout.contains("best separating layers"), "{stdout}");
        let (vector, _) = read_vector(&out).unwrap();
        assert_eq!(vector.layers(), vec![0, 1, 2]);
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(report["layers"].as_array().unwrap().len(), 3);
        // The sign convention: positives project higher than negatives in sample.
        for layer in report["layers"].as_array().unwrap() {
            assert!(layer["in_sample"]["pos_mean"].as_f64().unwrap() >= layer["in_sample"]["neg_mean"].as_f64().unwrap());
        }
    }
    let (shown, _) = common::run_ok(engram().args(["vectors", "show"]).arg(dir.path().join("v_mean.gguf")));
    assert!(shown.contains("hidden size 72") && shown.contains("cosine similarity between layers"), "{shown}");
    // The mean difference with --positions mean on a layer subset.
    let out = dir.path().join("v_sub.npy");
    common::run_ok(engram().args(["vectors", "compute", "-m"]).arg(dir.path()).arg("--pos").arg(&pos).arg("--neg").arg(&neg).arg("-o").arg(&out).args(["--layers", "1-2", "--positions", "mean"]));
    assert_eq!(read_vector(&out).unwrap().0.layers(), vec![1, 2]);
}

#[test]
fn bad_vectors_and_options_are_refused_with_the_file_named() {
    let dir = tiny_model();
    let wide = write_test_vector(dir.path(), "wide.npy", 6, 80);
    let out = dir.path().join("l.npy");
    let err = run_err(engram().args(["logits", "-m"]).arg(dir.path()).args(["-p", "x", "-o"]).arg(&out).arg("--steer").arg(&wide));
    assert!(err.contains("wide.npy") && err.contains("80"), "{err}");
    let missing = dir.path().join("nope.gguf");
    let err = run_err(engram().args(["logits", "-m"]).arg(dir.path()).args(["-p", "x", "-o"]).arg(&out).arg("--steer").arg(&missing));
    assert!(err.contains("nope.gguf"), "{err}");
    let v = write_test_vector(dir.path(), "ok.gguf", 7, 72);
    let err = run_err(engram().args(["logits", "-m"]).arg(dir.path()).args(["-p", "x", "-o"]).arg(&out).arg("--steer").arg(&v).args(["--steer-on", "sometimes"]));
    assert!(err.contains("sometimes"), "{err}");
    let err = run_err(engram().args(["logits", "-m"]).arg(dir.path()).args(["-p", "x", "-o"]).arg(&out).args(["--capture", "0-1"]));
    assert!(err.contains("--capture-out"), "{err}");
    let err = run_err(engram().args(["logits", "-m"]).arg(dir.path()).args(["-p", "x", "-o"]).arg(&out).args(["--capture", "0-7", "--capture-out"]).arg(dir.path().join("c.npy")));
    assert!(err.contains("3 layers"), "{err}");
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(&prompts, format!("{}\n", serde_json::json!({"prompt": "a", "steer": [{"file": v, "scale": 1.0, "colour": "red"}]}))).unwrap();
    let err = run_err(engram().args(["generate", "-m"]).arg(dir.path()).arg("--prompts").arg(&prompts));
    assert!(err.contains("p.jsonl:1") && err.contains("colour"), "{err}");
}

#[test]
fn bench_reports_overheads_for_each_condition() {
    let dir = tiny_model();
    let json = dir.path().join("bench.json");
    let (stdout, _) = common::run_ok(
        engram()
            .args(["bench", "-m"])
            .arg(dir.path())
            .args(["--dtypes", "f32", "-p", "16", "-n", "8", "--batch", "2", "--repeats", "2", "--conditions", "none,steer,per-seq+capture+readout", "--json"])
            .arg(&json),
    );
    assert!(stdout.contains("per-seq+capture+readout"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(results[0]["decode_overhead"].is_null(), "the baseline has no overhead against itself");
    for r in &results[1..] {
        assert_eq!(r["decode_overhead"]["samples"].as_array().unwrap().len(), 2);
        assert!(r["decode_tokens_per_second"]["median"].as_f64().unwrap() > 0.0);
    }
    let err = run_err(engram().args(["bench", "-m"]).arg(dir.path()).args(["--conditions", "steer+warp"]));
    assert!(err.contains("warp"), "{err}");
}
