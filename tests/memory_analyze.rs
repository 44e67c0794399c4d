//! `memory analyze` on a tiny random model: memories distilled from disjoint halves of the same
//! kind are more alike than memories of different kinds, the basis directions' top steps are the
//! marked successes, and the CLI writes report.json, report.md and the plots, refusing bad input.

mod common;

use std::path::Path;

use engram::memory::analyze::{analyze, AnalyzeOptions};
use engram::memory::distill::{distill, DistillOptions, GroupBy, LayerChoice};
use engram::memory::{Episode, MemoryBank, Step};
use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::DType;

use common::{engram_command, labelled_episode, load_cpu, run_ok};

/// Each kind's successful steps carry that kind's own marker phrase and a marker all kinds share;
/// failed steps carry neither.
const KINDS: [(&str, &str, &str); 3] = [
    ("cook", "cook pasta in the kitchen pot", "ZZZ GOLD ZZZ GOLD"),
    ("garden", "water the garden roses outside", "QQ## silver !! QQ##"),
    ("laundry", "WASH SHIRTS WITH SOAP NOW", "xyxy 7777 xyxy 7777"),
];
const FILLER: [&str; 8] = ["a lamp", "the door", "a red chair", "some boxes", "a window", "the rug", "a clock", "two cups"];

/// 16 episodes per kind; the task names put them in two disjoint halves, `{kind}-a` and `{kind}-b`.
fn halves_episodes() -> Vec<Episode> {
    let mut out = Vec::new();
    for (kind, instruction, marker) in KINDS {
        for e in 0..16 {
            let success = e % 2 == 0;
            let steps = (0..3)
                .map(|s| {
                    // The halves see different fillers, so they are not copies of each other.
                    let filler = FILLER[(e * 3 + s + e / 8) % FILLER.len()];
                    let observation = if success { format!("You see {filler}. {marker} well done") } else { format!("You see {filler}. nothing at all here") };
                    Step { observation, action: format!("{} {}", if success { "take" } else { "look" }, FILLER[(e + s) % FILLER.len()]), valid_actions: None }
                })
                .collect();
            out.push(labelled_episode(format!("{kind}-{}", if e < 8 { "a" } else { "b" }), kind, instruction, success, steps));
        }
    }
    out
}

fn tiny_model(dir: &Path) {
    write_random_model(dir, &tiny_config(Architecture::Llama), DType::F32, 41).unwrap();
}

#[test]
fn halves_of_a_kind_are_closer_than_other_kinds_and_top_steps_are_successes_only() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let model = load_cpu(dir.path(), DType::F32, 2, None);
    let episodes = halves_episodes();
    let options = DistillOptions { by: GroupBy::Task, layers: LayerChoice::Range(0, 2), history: 1, ..Default::default() };
    let bank = distill(&model, &episodes, &options, |_, _| {}).unwrap().bank;
    assert_eq!(bank.memories.len(), 6);
    assert!(bank.memories.iter().all(|m| m.meta.history == Some(1)));
    let analysis = analyze(&bank, Some((&model, &episodes)), &AnalyzeOptions { top: 6, ..Default::default() }, |_, _| {}).unwrap();
    assert_eq!(analysis.layers.len(), 3);
    for layer in &analysis.layers {
        let (within, across) = (layer.within_summary.as_ref().unwrap(), layer.across_summary.as_ref().unwrap());
        assert_eq!((within.count, across.count), (3, 12));
        eprintln!("layer {}: within {:.3} (min {:.3}), across {:.3} (max {:.3})", layer.layer, within.mean, within.min, across.mean, across.max);
        assert!(within.mean > across.mean + 0.1, "layer {}: within {} vs across {}", layer.layer, within.mean, across.mean);
    }
    // Three kinds, three marker features: the bank spans about three directions.
    let explained: f64 = analysis.directions.iter().map(|d| d.explained).sum();
    assert!(explained > 0.8, "the first three directions explain {explained}");
    assert_eq!(analysis.steps, episodes.len() * 3);
    let first = analysis.directions[0].steps.as_ref().unwrap();
    eprintln!("direction 0: top success {}, bottom {}, AUC {}", first.top.success_rate, first.bottom.success_rate, first.success_auc);
    assert_eq!(first.top.success_rate, 1.0, "{:?}", first.top.steps.iter().map(|s| &s.observation).collect::<Vec<_>>());
    // The bottom end holds other kinds' successes as well as failures: the kinds' markers pull
    // the first direction different ways, so only the ordering is asserted there.
    assert!(first.bottom.success_rate < first.top.success_rate);
    assert!(first.success_auc > 0.6, "{}", first.success_auc);
    assert_eq!(first.top.action_types[0].0, "take");
    let coordinates = analysis.coordinates.as_ref().unwrap();
    assert_eq!(coordinates.first.len(), analysis.steps);
}

fn lines_of(episodes: &[Episode]) -> String {
    episodes.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect()
}

#[test]
fn cli_writes_reports_and_plots_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    let out = tempfile::tempdir().unwrap();
    let experiences = out.path().join("halves.jsonl");
    std::fs::write(&experiences, lines_of(&halves_episodes())).unwrap();
    let bank = out.path().join("bank.safetensors");
    run_ok(engram_command().args(["memory", "distill", "-m"]).arg(dir.path()).arg("--experiences").arg(&experiences).arg("-o").arg(&bank).args(["--by", "task", "--layers", "0-2"]));
    assert!(!out.path().join("bank.safetensors.checkpoint").exists(), "the distillation checkpoint is removed once the bank is written");
    let report = out.path().join("report");
    let (stdout, _) = run_ok(
        engram_command()
            .args(["memory", "analyze"])
            .arg(&bank)
            .arg("-m")
            .arg(dir.path())
            .arg("--experiences")
            .arg(&experiences)
            .arg("-o")
            .arg(&report)
            .args(["--label", "--label-retries", "1", "--top", "4"]),
    );
    assert!(stdout.contains("basis at layer"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap()).unwrap();
    let analysis = &json["analysis"];
    assert_eq!(analysis["memories"].as_array().unwrap().len(), 6);
    assert_eq!(analysis["layers"].as_array().unwrap().len(), 3);
    let direction = &analysis["directions"][0];
    assert_eq!(direction["steps"]["top"]["steps"].as_array().unwrap().len(), 4);
    assert!(direction["explained"].as_f64().unwrap() > 0.0);
    // A random model cannot write the JSON asked for: each label is reported as not valid,
    // after the greedy answer and one sampled retry, with the reasons.
    let labels = json["labels"].as_array().unwrap();
    assert_eq!(labels.len(), analysis["directions"].as_array().unwrap().len());
    for l in labels {
        assert!(l["label"].is_null(), "{l}");
        assert_eq!(l["attempts"], 2);
        assert_eq!(l["rejected"].as_array().unwrap().len(), 2);
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("## Similarity within and across kinds") && md.contains("## Direction 0") && md.contains("none valid after 2 attempts"), "{md}");
    for plot in ["similarity_heatmap.svg", "similarity_histogram.svg", "basis_memories.svg", "basis_steps.svg"] {
        let svg = std::fs::read_to_string(report.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{plot}");
    }

    // Without experiences: no model is needed, no step plot is drawn.
    let bare = out.path().join("bare");
    run_ok(engram_command().args(["memory", "analyze"]).arg(&bank).arg("-o").arg(&bare).args(["-m", "/nonexistent"]));
    assert!(bare.join("basis_memories.svg").exists() && !bare.join("basis_steps.svg").exists());

    let fails = |args: &[&str], expect: &str| {
        let output = engram_command().args(["memory", "analyze"]).arg(&bank).arg("-o").arg(out.path().join("x")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expect) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    };
    fails(&["--label"], "--label needs --experiences");
    fails(&["--basis-layer", "9"], "basis layer 9");
    fails(&["--layers", "0-x"], "--layers");
    fails(&["--layers", "5"], "layer 5");
    fails(&["--directions", "0"], "at least 1");
    // A model of another shape than the bank's.
    let other = tempfile::tempdir().unwrap();
    let mut config = tiny_config(Architecture::Llama);
    config.num_hidden_layers = 4;
    write_random_model(other.path(), &config, DType::F32, 7).unwrap();
    let other_path = other.path().to_str().unwrap();
    let experiences_path = experiences.to_str().unwrap();
    fails(&["-m", other_path, "--experiences", experiences_path], "4 layers");
    // A missing experiences file is named.
    fails(&["-m", dir.path().to_str().unwrap(), "--experiences", "/nonexistent/exp.jsonl"], "/nonexistent/exp.jsonl");
    assert!(MemoryBank::read(&bank).is_ok());
}
