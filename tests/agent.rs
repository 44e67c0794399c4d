//! The agent end to end on the built-in environment served by the `engram` binary: the KV
//! prefix fork the scoring policy relies on, environment failures (exit, hang, garbage)
//! reported while the run goes on, collection and its resume, evaluation under all four
//! conditions with a tiny random model and a bank distilled from collected episodes, the
//! refusal of episodes the bank saw, the statistics against hand-computed values, and a smoke
//! run on the default model when it is present.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{engram_command, require_model, run_ok};
use engram::agent::builtin::BuiltinEnv;
use engram::agent::eval::{check_overlap, parse_conditions, summarize, EpisodeResult, OverlapCheck};
use engram::agent::policy::{ActionPolicy, Agent, AgentOptions, PromptInput};
use engram::agent::runner::{run_episode, schedule, EpisodeEnd, EpisodeSpec, GoldActor, ModelActor, RunLimits};
use engram::agent::stats::{mcnemar_exact, mean_t_interval, paired_bootstrap_interval, wilson_interval, Z95};
use engram::agent::{EnvCommand, Environment, ProcessEnv};
use engram::backend::cpu::CpuBackend;
use engram::memory::MemoryBank;
use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::model::ModelFiles;
use engram::session::{LogitRequest, SequenceInput};
use engram::{DType, Model, Session, SessionOptions};

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::F32, 7).unwrap();
    dir
}

fn load(dir: &Path) -> Model<CpuBackend> {
    Model::load(CpuBackend::new(2, None).unwrap(), ModelFiles::open(dir).unwrap(), DType::F32, |_, _| {}).unwrap()
}

fn engram_path() -> &'static str {
    env!("CARGO_BIN_EXE_engram")
}

/// `--env cmd:` running this test's engram binary as the built-in environment, with extra arguments.
fn builtin_cmd(extra: &str) -> String {
    format!("cmd:{} agent env builtin {extra}", engram_path())
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn forked_prefix_continues_bit_identically() {
    let dir = tiny_model();
    let model = load(dir.path());
    let mut session = Session::new(&model, SessionOptions::new(4, 96)).unwrap();
    let prefix: Vec<u32> = (0..37u32).map(|i| (i * 31 + 5) % 250 + 3).collect();
    let continuation: Vec<u32> = (0..6u32).map(|i| (i * 17 + 9) % 250 + 3).collect();
    // Reference: the whole text in slot 3, prefix then continuation.
    session.step(&[SequenceInput { slot: 3, tokens: &prefix, logits: LogitRequest::None }]).unwrap();
    let reference = session.step(&[SequenceInput { slot: 3, tokens: &continuation, logits: LogitRequest::All }]).unwrap();
    // Slot 1 holds something else first: the fork must replace it.
    session.step(&[SequenceInput { slot: 1, tokens: &continuation, logits: LogitRequest::None }]).unwrap();
    session.step(&[SequenceInput { slot: 0, tokens: &prefix, logits: LogitRequest::None }]).unwrap();
    session.fork_prefix(0, &[1, 2], prefix.len()).unwrap();
    assert_eq!(session.kv.len(1), prefix.len());
    for slot in [1, 2] {
        let forked = session.step(&[SequenceInput { slot, tokens: &continuation, logits: LogitRequest::All }]).unwrap();
        let (a, b): (Vec<u32>, Vec<u32>) = (forked.per_input[0].iter().map(|v| v.to_bits()).collect(), reference.per_input[0].iter().map(|v| v.to_bits()).collect());
        assert!(a == b, "slot {slot}: logits after a forked prefix differ from the whole text");
    }
    // Bad forks are errors, not panics.
    assert!(session.fork_prefix(0, &[9], 3).is_err());
    assert!(session.fork_prefix(0, &[1], prefix.len() + 1).is_err());
}

#[test]
fn scoring_with_the_fork_matches_scoring_each_candidate_alone() {
    let dir = tiny_model();
    let model = load(dir.path());
    let actions: Vec<String> = ["open fridge", "take egg", "go north", "wait", "put egg in pot"].map(String::from).to_vec();
    let input = PromptInput { instruction: "Cook the egg.", workflow: None, history: &[], observation: "You are in the kitchen.", actions: &actions };
    let mut batched = Agent::new(&model, AgentOptions { batch: 3, ..AgentOptions::default() }).unwrap();
    let all = batched.choose(&input).unwrap();
    assert_eq!(all.scores.len(), actions.len());
    assert!(all.scores.iter().all(|s| s.is_finite() && *s < 0.0), "{:?}", all.scores);
    let best = all.scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(all.scores[all.index], best);
    // One candidate a batch gives the same scores (up to batch-composition rounding).
    let mut single = Agent::new(&model, AgentOptions { batch: 1, ..AgentOptions::default() }).unwrap();
    let one = single.choose(&input).unwrap();
    for (a, b) in all.scores.iter().zip(&one.scores) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert!(batched.tokens > 0 && batched.seconds > 0.0);
    // The generate policy maps whatever it writes to one of the candidates.
    let mut generating = Agent::new(&model, AgentOptions { policy: ActionPolicy::Generate, max_action_tokens: 6, ..AgentOptions::default() }).unwrap();
    let generated = generating.choose(&input).unwrap();
    assert!(generated.index < actions.len() && generated.generated.is_some() && generated.scores.is_empty());
    // A prompt that cannot fit the context is an error naming the context, not a panic.
    let long = "x".repeat(3000);
    let too_long = PromptInput { observation: &long, ..input };
    let err = batched.choose(&too_long).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
}

#[test]
fn builtin_over_the_process_matches_in_process() {
    let mut process = ProcessEnv::new(EnvCommand { program: engram_path().into(), args: vec!["agent".into(), "env".into(), "builtin".into()] }, "builtin", std::time::Duration::from_secs(20));
    let mut local = BuiltinEnv::new();
    let specs = schedule(&mut process, &[], "dev", 8).unwrap().episodes;
    assert_eq!(specs, schedule(&mut local, &[], "dev", 8).unwrap().episodes);
    assert_eq!(specs.iter().map(|s| s.task.as_str()).collect::<Vec<_>>()[..4], ["clean", "cook", "laundry", "water"]);
    for spec in &specs {
        let a = run_episode(&mut process, spec, &mut GoldActor::new(0.0, 1), RunLimits::default()).unwrap();
        let b = run_episode(&mut local, spec, &mut GoldActor::new(0.0, 1), RunLimits::default()).unwrap();
        assert_eq!(a.end, EpisodeEnd::Success);
        assert_eq!((a.success, a.score, &a.steps), (b.success, b.score, &b.steps));
    }
    // A refusal names the request and leaves the process usable.
    let err = process.reset("fly", 0, "dev").unwrap_err().to_string();
    assert!(err.contains("refused") && err.contains("fly"), "{err}");
    assert!(process.info().is_ok());
}

#[test]
fn environment_failures_end_the_episode_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    for (fault, expect) in [("crash", "exited"), ("hang", "did not answer"), ("garbage", "not a valid answer")] {
        let out = dir.path().join(format!("{fault}.jsonl"));
        let (ok, stdout, stderr) = output(engram_command().args(["agent", "collect", "--env", &builtin_cmd(&format!("--fault {fault} --fault-variation 1")), "--split", "train", "--episodes", "6", "--policy", "gold", "--env-timeout", "2", "-o"]).arg(&out));
        assert!(ok, "{fault}: {stderr}");
        // Variation 1 is the fifth and sixth episodes (clean 1, cook 1): both fail, the rest is written.
        assert!(stdout.contains("wrote 4 episodes") && stdout.contains("2 environment errors"), "{fault}: {stdout}");
        assert!(stderr.contains(expect) && stderr.contains("\"op\":\"step\"") && stderr.contains("--fault"), "{fault}: {stderr}");
        assert_eq!(lines(&out).len(), 4);
    }
    // A variation the environment refuses to start is replaced by the task's next one, so the
    // count holds (clean 1 and cook 1 become clean 2 and cook 2).
    let out = dir.path().join("refused.jsonl");
    let (ok, stdout, stderr) = output(engram_command().args(["agent", "collect", "--env", &builtin_cmd("--fault refuse-reset --fault-variation 1"), "--split", "train", "--episodes", "6", "--policy", "gold", "-o"]).arg(&out));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrote 6 episodes") && stdout.contains("2 variations refused"), "{stdout}");
    assert!(stderr.contains("running variation 2 instead") && stderr.contains("fault injected"), "{stderr}");
    let written: Vec<(String, u64)> = lines(&out).iter().map(|l| (l["task"].as_str().unwrap().to_string(), l["variation"].as_u64().unwrap())).collect();
    assert!(written.contains(&("clean".into(), 2)) && written.contains(&("cook".into(), 2)) && !written.iter().any(|(_, v)| *v == 1), "{written:?}");
    // A hung environment started through a shell is stopped with everything the shell started.
    if let Ok(left) = Command::new("pgrep").args(["-f", "--", "--fault hang --fault-variation 1"]).output() {
        assert!(left.stdout.is_empty(), "hung environments left running: {}", String::from_utf8_lossy(&left.stdout));
    }
    // An environment that exits at once: the command fails naming it and the request.
    let (ok, _, stderr) = output(engram_command().args(["agent", "collect", "--env", "cmd:exit 3", "--split", "train", "--policy", "gold", "-o"]).arg(dir.path().join("x.jsonl")));
    assert!(!ok && stderr.contains("exit 3") && stderr.contains("info") && !stderr.contains("panicked"), "{stderr}");
    // A missing program.
    let (ok, _, stderr) = output(engram_command().args(["agent", "collect", "--env", "cmd:/nonexistent/env-bridge", "--split", "train", "--policy", "gold", "-o"]).arg(dir.path().join("x.jsonl")));
    assert!(!ok && stderr.contains("/nonexistent/env-bridge"), "{stderr}");
    // Unknown --env values and conditions are named.
    let (ok, _, stderr) = output(engram_command().args(["agent", "collect", "--env", "gym", "--split", "train", "--policy", "gold", "-o"]).arg(dir.path().join("x.jsonl")));
    assert!(!ok && stderr.contains("unknown environment 'gym'"), "{stderr}");
    assert!(parse_conditions("none,steer,fancy").unwrap_err().to_string().contains("fancy"));
    // The environment's stderr is passed through, prefixed.
    let (ok, _, stderr) = output(engram_command().args(["agent", "collect", "--env", &format!("cmd:echo hello from env >&2; exec {} agent env builtin", engram_path()), "--split", "dev", "--episodes", "1", "--policy", "gold", "-o"]).arg(dir.path().join("y.jsonl")));
    assert!(ok && stderr.contains("[env cmd] hello from env"), "{stderr}");
}

#[test]
fn collect_appends_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exp.jsonl");
    let collect = |n: &str| run_ok(engram_command().args(["agent", "collect", "--env", "builtin", "--split", "train", "--episodes", n, "--policy", "mixed", "--seed", "3", "-o"]).arg(&out));
    let (first, _) = collect("6");
    assert!(first.contains("wrote 6 episodes"), "{first}");
    let before = std::fs::read_to_string(&out).unwrap();
    // An interrupted run leaves a partial line; the rerun drops it and resumes.
    std::fs::write(&out, format!("{before}{{\"task\": \"clean\", \"vari")).unwrap();
    let (second, stderr) = collect("10");
    assert!(second.contains("wrote 4 episodes") && second.contains("6 already there"), "{second}");
    assert!(stderr.contains("unfinished last line"), "{stderr}");
    let all = lines(&out);
    assert_eq!(all.len(), 10);
    assert!(std::fs::read_to_string(&out).unwrap().starts_with(&before), "earlier episodes are kept as they were");
    let mut ids: Vec<(String, u64)> = all.iter().map(|e| (e["task"].as_str().unwrap().to_string(), e["variation"].as_u64().unwrap())).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10);
    for e in &all {
        assert_eq!(e["split"], "train");
        assert!(e["steps"].as_array().unwrap().iter().all(|s| s["valid_actions"].is_array()));
        engram::memory::Episode::parse(&e.to_string()).unwrap();
    }
    let (third, _) = collect("10");
    assert!(third.contains("wrote 0 episodes"), "{third}");
    // The model policy collects too (a tiny model, short episodes).
    let model_dir = tiny_model();
    let by_model = dir.path().join("model.jsonl");
    let (stdout, _) = run_ok(
        engram_command().args(["agent", "collect", "--env", "builtin", "--split", "dev", "--episodes", "2", "--policy", "model", "--max-steps", "2", "-m"]).arg(model_dir.path()).arg("-o").arg(&by_model),
    );
    assert!(stdout.contains("wrote 2 episodes"), "{stdout}");
    assert!(lines(&by_model).iter().all(|e| e["steps"].as_array().unwrap().len() <= 2));
}

/// Collects mixed train episodes and distils a bank from them with the CLI.
fn tiny_bank(dir: &Path, model: &Path) -> PathBuf {
    let exp = dir.join("train.jsonl");
    run_ok(engram_command().args(["agent", "collect", "--env", "builtin", "--split", "train", "--episodes", "24", "--policy", "mixed", "--deviation", "0.4", "-o"]).arg(&exp));
    let bank = dir.join("bank.safetensors");
    run_ok(engram_command().args(["memory", "distill", "-m"]).arg(model).args(["--experiences"]).arg(&exp).args(["-o"]).arg(&bank).args(["--layers", "1-2"]));
    bank
}

#[test]
fn eval_runs_all_conditions_and_refuses_what_the_bank_saw() {
    let model_dir = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let bank_path = tiny_bank(dir.path(), model_dir.path());
    let bank = MemoryBank::read(&bank_path).unwrap();
    assert!(bank.memories.iter().all(|m| m.meta.sources.as_ref().is_some_and(|s| !s.is_empty() && s.iter().all(|x| x.split == "train"))));
    let (json, markdown) = (dir.path().join("eval.json"), dir.path().join("eval.md"));
    let (stdout, stderr) = run_ok(
        engram_command()
            .args(["agent", "eval", "-m"])
            .arg(model_dir.path())
            // Every task's first test variation (8) is refused: the run takes variation 9 instead.
            .args(["--env", &builtin_cmd("--fault refuse-reset --fault-variation 8"), "--split", "test", "--episodes", "4", "--conditions", "none,text,steer,both", "--memory"])
            .arg(&bank_path)
            .args(["--memory-scale", "4", "--max-steps", "4", "--json"])
            .arg(&json)
            .arg("--markdown")
            .arg(&markdown),
    );
    for name in ["none", "text", "steer", "both", "Wilson", "McNemar"] {
        assert!(stdout.contains(name), "{name} missing from\n{stdout}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let conditions = report["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 4);
    for c in conditions {
        for field in ["condition", "episodes", "successes", "success_rate", "success_ci95", "mean_score", "score_ci95", "mean_steps", "tokens_per_second", "env_errors"] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        assert_eq!(c["episodes"], 4);
        assert!(c["tokens_per_second"].as_f64().unwrap() > 0.0);
        let (lo, hi) = (c["success_ci95"][0].as_f64().unwrap(), c["success_ci95"][1].as_f64().unwrap());
        let rate = c["success_rate"].as_f64().unwrap();
        assert!(lo <= rate && rate <= hi);
    }
    assert_eq!(report["comparisons"].as_array().unwrap().len(), 6);
    assert_eq!(report["results"].as_array().unwrap().len(), 16);
    assert_eq!(report["overlap_checked"], true);
    assert_eq!(report["complete"], true);
    assert_eq!(report["refused"].as_array().unwrap().len(), 4, "{}", report["refused"]);
    let results = report["results"].as_array().unwrap();
    assert!(results.iter().all(|r| r["variation"] == 9), "replacements run");
    // stderr is not a terminal here: progress comes as one line per episode and condition.
    assert!(stderr.contains("16/16") && (0..=4).any(|k| stderr.contains(&format!("both {k}/4"))), "{stderr}");
    assert!(results.iter().filter(|r| r["condition"] != "none").all(|r| !r["retrieved"].as_array().unwrap().is_empty()), "memory conditions retrieve");
    assert!(results.iter().all(|r| r["steps"].as_u64().unwrap() <= 4));
    assert!(std::fs::read_to_string(&markdown).unwrap().contains("| condition |"));
    // The train split is what the bank was distilled from: refused, naming the episodes.
    let (ok, _, stderr) = output(engram_command().args(["agent", "eval", "-m"]).arg(model_dir.path()).args(["--env", "builtin", "--split", "train", "--episodes", "2", "--memory"]).arg(&bank_path));
    assert!(!ok && stderr.contains("distilled from") && stderr.contains("variation 0 (train)"), "{stderr}");
    // A bank from another model is refused, naming the bank.
    let other = tempfile::tempdir().unwrap();
    let mut config = tiny_config(Architecture::Llama);
    config.hidden_size = 48;
    config.head_dim = 8;
    write_random_model(other.path(), &config, DType::F32, 2).unwrap();
    let (ok, _, stderr) = output(engram_command().args(["agent", "eval", "-m"]).arg(other.path()).args(["--env", "builtin", "--split", "test", "--episodes", "1", "--memory"]).arg(&bank_path));
    assert!(!ok && stderr.contains("bank.safetensors") && stderr.contains("hidden size"), "{stderr}");
    // Memory conditions without a bank are refused before anything runs.
    let (ok, _, stderr) = output(engram_command().args(["agent", "eval", "-m"]).arg(model_dir.path()).args(["--env", "builtin", "--split", "test", "--conditions", "none,steer"]));
    assert!(!ok && stderr.contains("'steer' needs a memory bank"), "{stderr}");
}

#[test]
fn banks_without_sources_cannot_be_checked() {
    let model_dir = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let bank = dir.path().join("old.safetensors");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/experiences_small.jsonl");
    run_ok(engram_command().args(["memory", "distill", "-m"]).arg(model_dir.path()).arg("--experiences").arg(&fixture).arg("-o").arg(&bank).args(["--layers", "1-2"]));
    let read = MemoryBank::read(&bank).unwrap();
    let spec = EpisodeSpec { task: "cook".into(), variation: 8, split: "test".into() };
    assert!(matches!(check_overlap(&read, &[spec]).unwrap(), OverlapCheck::Unchecked(names) if names.len() == read.memories.len()));
    let (stdout, stderr) = run_ok(
        engram_command().args(["agent", "eval", "-m"]).arg(model_dir.path()).args(["--env", "builtin", "--split", "test", "--episodes", "1", "--conditions", "none,text", "--max-steps", "2", "--memory"]).arg(&bank),
    );
    assert_eq!(stderr.matches("cannot be checked").count(), 1, "warned once: {stderr}");
    assert!(stdout.contains("text"), "{stdout}");
}

#[test]
fn statistics_match_hand_computed_values() {
    // Wilson 95%, 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width as in Wilson (1927).
    let (lo, hi) = wilson_interval(8, 10, Z95);
    assert!((lo - 0.490_162).abs() < 1e-5 && (hi - 0.943_318).abs() < 1e-5, "{lo} {hi}");
    let (lo, hi) = wilson_interval(0, 5, Z95);
    assert!(lo == 0.0 && (hi - 0.434_482).abs() < 1e-5, "{lo} {hi}");
    assert_eq!(wilson_interval(0, 0, Z95), (0.0, 1.0));
    // Exact McNemar: 1 vs 6 discordant pairs, p = 2 · (C(7,0) + C(7,1)) / 2⁷ = 0.125.
    assert!((mcnemar_exact(1, 6) - 0.125).abs() < 1e-12);
    assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
    assert!((mcnemar_exact(3, 3) - 1.0).abs() < 1e-12);
    assert_eq!(mcnemar_exact(0, 0), 1.0);
    // t interval of [0, 1, 1, 1]: mean 0.75, s = 0.5, t(0.975, 3) = 3.182446.
    let (mean, ci) = mean_t_interval(&[0.0, 1.0, 1.0, 1.0]);
    let (lo, hi) = ci.unwrap();
    assert!((mean - 0.75).abs() < 1e-12 && (lo - (0.75 - 3.182_446 * 0.25)).abs() < 1e-5 && (hi - (0.75 + 3.182_446 * 0.25)).abs() < 1e-5);
    assert_eq!(mean_t_interval(&[0.5]).1, None);
    // A constant difference bootstraps to a point.
    assert_eq!(paired_bootstrap_interval(&[0.0, 0.5, 1.0], &[0.25, 0.75, 1.25], 1000, 1), Some((0.25, 0.25)));
    // Summaries pair by episode.
    let result = |condition: &str, variation: u64, success: bool| EpisodeResult {
        task: "t".into(),
        variation,
        split: "test".into(),
        condition: condition.into(),
        success,
        score: if success { 1.0 } else { 0.0 },
        steps: 3,
        end: "x".into(),
        error: None,
        retrieved: Vec::new(),
        actions: Vec::new(),
        tokens: 10,
        seconds: 1.0,
    };
    let mut results = Vec::new();
    for v in 0..7 {
        results.push(result("none", v, v == 0));
        results.push(result("steer", v, v != 0));
    }
    let (summaries, comparisons) = summarize(&["none".into(), "steer".into()], &results, 0);
    assert_eq!((summaries[0].successes, summaries[1].successes), (1, 6));
    assert_eq!((comparisons[0].only_a_succeeded, comparisons[0].only_b_succeeded), (1, 6));
    assert!((comparisons[0].mcnemar_p - 0.125).abs() < 1e-12);
    assert!((comparisons[0].mean_score_difference - 5.0 / 7.0).abs() < 1e-12);
    assert_eq!(summaries[0].tokens_per_second, 10.0);
    // 1 of 7: the t interval's lower end (1/7 - 2.447 · 0.378 / √7 < 0) is clipped to the score range.
    let (lo, hi) = summaries[0].score_ci95.unwrap();
    assert!(lo == 0.0 && hi > 1.0 / 7.0 && hi < 1.0, "{lo} {hi}");
}

#[test]
fn default_model_plays_the_builtin_environment() {
    let Some(model_path) = require_model("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let model = Model::load(CpuBackend::new(0, None).unwrap(), ModelFiles::open(&model_path).unwrap(), DType::F32, |_, _| {}).unwrap();
    let mut env = BuiltinEnv::new();
    let specs = schedule(&mut env, &[], "test", 2).unwrap().episodes;
    let mut agent = Agent::new(&model, AgentOptions::default()).unwrap();
    for spec in &specs {
        let outcome = run_episode(&mut env, spec, &mut ModelActor { agent: &mut agent, workflow: None }, RunLimits { max_steps: 4, max_candidates: 64 }).unwrap();
        assert!(!outcome.steps.is_empty() && outcome.steps.len() <= 4);
        assert!(!matches!(outcome.end, EpisodeEnd::EnvError(_)));
        eprintln!("{} {}: {:?} score {} actions {:?}", spec.task, spec.variation, outcome.end, outcome.score, outcome.steps.iter().map(|s| &s.action).collect::<Vec<_>>());
    }
    assert!(agent.tokens > 0);
}
