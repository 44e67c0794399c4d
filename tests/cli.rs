//! The `engram` binary end to end on a tiny random model: generate (text, JSON, batches), logits, info.

mod common;

use std::process::Command;

use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::DType;

fn engram() -> Command {
    common::engram_command()
}

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::BF16, 21).unwrap();
    dir
}


#[test]
fn generate_json_reports_ids_text_and_speeds() {
    let dir = tiny_model();
    let (stdout, stderr) = common::run_ok(engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", "Hello", "--chat", "--system", "Be brief.", "-n", "6", "--ignore-eos", "--json", "--threads", "2"]));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let prompt_ids: Vec<u64> = v["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    // ChatML: <|im_start|> (257) opens the system turn, and the prompt ends with "assistant\n".
    assert_eq!(prompt_ids[0], 257);
    assert_eq!(*prompt_ids.last().unwrap(), b'\n' as u64);
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 6);
    assert_eq!(v["finish_reason"], "length");
    assert!(v["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(stderr.contains("decode:"), "{stderr}");
}

#[test]
fn a_prompts_file_runs_as_one_batch_and_matches_single_runs() {
    let dir = tiny_model();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "\"The cat\"\n{\"prompt\": \"A much longer prompt here\", \"max_tokens\": 3}\n").unwrap();
    let (stdout, _) = common::run_ok(engram().args(["generate", "-m"]).arg(dir.path()).arg("--prompts").arg(&prompts).args(["-n", "5", "--ignore-eos", "--json"]));
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["generated_ids"].as_array().unwrap().len(), 3);
    let (single, _) = common::run_ok(engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", "The cat", "-n", "5", "--ignore-eos", "--json"]));
    let single: serde_json::Value = serde_json::from_str(single.trim()).unwrap();
    assert_eq!(single["generated_ids"], lines[0]["generated_ids"]);
}

#[test]
fn a_malformed_prompts_line_is_named() {
    let dir = tiny_model();
    let prompts = dir.path().join("bad.jsonl");
    std::fs::write(&prompts, "\"ok\"\n{not json\n").unwrap();
    let out = engram().args(["generate", "-m"]).arg(dir.path()).arg("--prompts").arg(&prompts).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad.jsonl:2"), "{stderr}");
}

#[test]
fn an_over_long_prompt_is_an_error_not_a_panic() {
    let dir = tiny_model();
    let long = "x".repeat(2000);
    let out = engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", &long, "-n", "4"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("maximum") || stderr.contains("context"), "{stderr}");
}

#[test]
fn logits_are_written_as_npy_with_the_right_shape() {
    let dir = tiny_model();
    let out = dir.path().join("logits.npy");
    common::run_ok(engram().args(["logits", "-m"]).arg(dir.path()).args(["-p", "abc", "--all-positions", "-o"]).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(npy.shape(), &[3, 259]);
    let values: Vec<f32> = npy.into_vec().unwrap();
    assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|&v| v != values[0]));
}

#[test]
fn info_describes_the_model() {
    let dir = tiny_model();
    let (stdout, _) = common::run_ok(engram().arg("info").arg(dir.path()));
    assert!(stdout.contains("llama") && stdout.contains("layers         3") && stdout.contains("BF16"), "{stdout}");
}

#[test]
fn convert_then_generate_from_the_directory_matches_the_gguf() {
    // The CLI path on the real model; the converter itself is tested on small GGUFs built by
    // the library's writer (src/model/convert.rs).
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.exists() {
        assert_ne!(std::env::var("ENGRAM_REQUIRE_MODEL").as_deref(), Ok("1"), "{} missing", gguf.display());
        eprintln!("SKIPPED: {} is missing (run tools/fetch_model.sh)", gguf.display());
        return;
    }
    let out = tempfile::tempdir().unwrap();
    common::run_ok(engram().arg("convert").arg(&gguf).arg(out.path()).args(["--dtype", "bf16"]));
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out.path().join(file).exists(), "{file} missing");
    }
    let args = ["-p", "The capital of France is", "-n", "8", "--ignore-eos", "--json", "--dtype", "bf16"];
    let (from_dir, _) = common::run_ok(engram().args(["generate", "-m"]).arg(out.path()).args(args));
    let (from_gguf, _) = common::run_ok(engram().args(["generate", "-m"]).arg(&gguf).args(args));
    let a: serde_json::Value = serde_json::from_str(from_dir.trim()).unwrap();
    let b: serde_json::Value = serde_json::from_str(from_gguf.trim()).unwrap();
    assert_eq!(a["prompt_ids"], b["prompt_ids"]);
    assert_eq!(a["generated_ids"], b["generated_ids"]);
}

#[test]
fn a_closed_stdout_pipe_ends_the_command_quietly() {
    use std::process::Stdio;
    let dir = tiny_model();
    // Close our end of the pipe before the command has loaded the model and printed anything.
    let mut child = engram().arg("info").arg(dir.path()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

#[test]
fn the_kv_cache_precision_is_chosen_on_the_command_line_and_checked() {
    let dir = tiny_model();
    for precision in ["f16", "f32"] {
        let (stdout, stderr) = common::run_ok(engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", "Hello", "-n", "4", "--ignore-eos", "--json", "--device", "cpu", "--kv-cache", precision]));
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["generated_ids"].as_array().unwrap().len(), 4, "--kv-cache {precision}");
        assert!(stderr.contains(&format!("{precision} KV cache")), "the status line names the cache: {stderr}");
    }
    let out = engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", "Hello", "--kv-cache", "f8"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("f16 or f32"), "{stderr}");
    // CUDA keeps an f32 cache: an f16 request there is refused, not silently ignored.
    let out = engram().args(["generate", "-m"]).arg(dir.path()).args(["-p", "Hello", "--device", "cuda", "--kv-cache", "f16"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--kv-cache f16 runs on the CPU only"), "{stderr}");
}

#[test]
fn the_simd_level_is_capped_on_the_command_line_and_checked() {
    let dir = tiny_model();
    let (stdout, stderr) = common::run_ok(engram().args(["bench", "-m"]).arg(dir.path()).args(["--dtypes", "f32", "-p", "8", "-n", "2", "--repeats", "1", "--threads", "2", "--device", "cpu", "--simd", "scalar"]));
    let header = format!("{stdout}{stderr}");
    assert!(header.contains("2 threads, scalar)"), "the header names the capped level: {header}");
    let out = engram().args(["bench", "-m"]).arg(dir.path()).args(["--simd", "avx3"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("use scalar, avx2 or avx512"), "{stderr}");
}
