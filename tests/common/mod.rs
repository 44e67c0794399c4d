//! Shared test helpers: tiny random models on disk and an independent naive reference forward.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use engram::backend::cpu::simd::SimdLevel;
use engram::backend::cpu::CpuBackend;
use engram::model::config::ModelConfig;
use engram::model::ModelFiles;
use engram::{DType, KvPrecision, Model};

/// An unlabelled-origin episode (no variation, split or workflow) scored 1 or 0 by `success`.
pub fn labelled_episode(task: String, kind: &str, instruction: &str, success: bool, steps: Vec<engram::memory::Step>) -> engram::memory::Episode {
    engram::memory::Episode {
        task,
        kind: kind.into(),
        instruction: instruction.into(),
        success,
        score: Some(if success { 1.0 } else { 0.0 }),
        steps,
        workflow: None,
        variation: None,
        split: None,
    }
}

/// A model on the CPU with an f32 KV cache: the tests against the f64 reference measure the
/// kernels' arithmetic, not the cache's rounding (the f16 cache has tests of its own).
pub fn load_cpu(dir: &Path, dtype: DType, threads: usize, level: Option<SimdLevel>) -> Model<CpuBackend> {
    load_cpu_with_cache(dir, dtype, threads, level, KvPrecision::F32)
}

pub fn load_cpu_with_cache(dir: &Path, dtype: DType, threads: usize, level: Option<SimdLevel>, cache: KvPrecision) -> Model<CpuBackend> {
    let files = ModelFiles::open(dir).expect("open model");
    let backend = CpuBackend::new(threads, level).unwrap().with_kv_precision(cache);
    Model::load(backend, files, dtype, |_, _| {}).expect("load model")
}

/// Straightforward f64 transformer forward over a whole sequence, written from the transformers
/// modelling code (not from engram's kernels). Returns logits for every position.
pub struct Reference {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Vec<f64>>,
    /// Round each product's input to bf16, as engram does for bf16 weights (set by `load` for
    /// bf16; clear it to model f32 activations meeting the same rounded weights).
    pub bf16_inputs: bool,
}

impl Reference {
    /// Reads every tensor as f32 rounded through `dtype` (so bf16 models compare like for like).
    pub fn load(dir: &Path, dtype: DType) -> Reference {
        let files = ModelFiles::open(dir).unwrap();
        let mut tensors = HashMap::new();
        for name in files.source.tensor_names() {
            let t = files.source.load(&name, DType::F32).unwrap();
            let t = if t.shape.len() == 2 { t.to_dtype(dtype).unwrap() } else { t };
            tensors.insert(name, t.to_f32_vec().into_iter().map(|v| v as f64).collect());
        }
        Reference { config: files.config, tensors, bf16_inputs: dtype == DType::BF16 }
    }

    fn t(&self, name: &str) -> &[f64] {
        self.tensors.get(name).unwrap_or_else(|| panic!("missing {name}"))
    }

    fn linear(&self, name: &str, x: &[f64], out_dim: usize) -> Vec<f64> {
        let w = self.t(name);
        let k = x.len();
        let rounded: Vec<f64>;
        let x = if self.bf16_inputs {
            rounded = x.iter().map(|&v| half::bf16::from_f32(v as f32).to_f64()).collect();
            &rounded[..]
        } else {
            x
        };
        (0..out_dim).map(|j| (0..k).map(|i| w[j * k + i] * x[i]).sum()).collect()
    }

    fn rms_norm(&self, x: &[f64], weight: &[f64]) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + self.config.rms_norm_eps as f64).sqrt();
        x.iter().zip(weight).map(|(v, w)| v * s * w).collect()
    }

    fn rope(&self, x: &mut [f64], pos: usize) {
        let d = x.len();
        let half = d / 2;
        let inv = self.config.rope_inv_freq();
        for i in 0..half {
            let angle = pos as f64 * inv[i] as f64;
            let (c, s) = (angle.cos(), angle.sin());
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * c - b * s;
            x[i + half] = b * c + a * s;
        }
    }

    /// Logits `[tokens.len()][vocab]` and hidden states `[layers + 1][tokens.len()][hidden]`
    /// (entry 0 = embeddings, entry i+1 = output of block i, before the final norm).
    pub fn run(&self, tokens: &[u32]) -> (Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>) {
        self.run_hooked(tokens, &|_, _, _, _| {})
    }

    /// Like `run`, calling `hook(layer, at_attention, position, h)` on the residual row after
    /// each attention residual add and each block output, as a PyTorch forward hook would.
    pub fn run_hooked(&self, tokens: &[u32], hook: &dyn Fn(usize, bool, usize, &mut [f64])) -> (Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>) {
        let c = &self.config;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let embed = self.t("model.embed_tokens.weight");
        let mut states: Vec<Vec<f64>> = tokens.iter().map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
        let mut hidden_states = vec![states.clone()];
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut keys = Vec::new();
            let mut values = Vec::new();
            let mut queries = Vec::new();
            for (pos, x) in states.iter().enumerate() {
                let xn = self.rms_norm(x, self.t(&format!("{p}.input_layernorm.weight")));
                let mut q = self.linear(&format!("{p}.self_attn.q_proj.weight"), &xn, nh * hd);
                let mut k = self.linear(&format!("{p}.self_attn.k_proj.weight"), &xn, nkv * hd);
                let mut v = self.linear(&format!("{p}.self_attn.v_proj.weight"), &xn, nkv * hd);
                if c.attention_bias {
                    for (name, vec) in [("q_proj", &mut q), ("k_proj", &mut k), ("v_proj", &mut v)] {
                        for (a, b) in vec.iter_mut().zip(self.t(&format!("{p}.self_attn.{name}.bias"))) {
                            *a += b;
                        }
                    }
                }
                for (heads, vec, norm) in [(nh, &mut q, "q_norm"), (nkv, &mut k, "k_norm")] {
                    for head in 0..heads {
                        let slice = &mut vec[head * hd..(head + 1) * hd];
                        if c.qk_norm {
                            let normed = self.rms_norm(slice, self.t(&format!("{p}.self_attn.{norm}.weight")));
                            slice.copy_from_slice(&normed);
                        }
                        self.rope(slice, pos);
                    }
                }
                queries.push(q);
                keys.push(k);
                values.push(v);
            }
            for pos in 0..states.len() {
                let mut attn = vec![0.0; nh * hd];
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let q = &queries[pos][head * hd..(head + 1) * hd];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|t| q.iter().zip(&keys[t][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = exps.iter().sum();
                    for (t, e) in exps.iter().enumerate() {
                        for d in 0..hd {
                            attn[head * hd + d] += e / total * values[t][kvh * hd + d];
                        }
                    }
                }
                let o = self.linear(&format!("{p}.self_attn.o_proj.weight"), &attn, h);
                for (a, b) in states[pos].iter_mut().zip(&o) {
                    *a += b;
                }
                hook(l, true, pos, &mut states[pos]);
                let xn = self.rms_norm(&states[pos], self.t(&format!("{p}.post_attention_layernorm.weight")));
                let f = c.intermediate_size;
                let g = self.linear(&format!("{p}.mlp.gate_proj.weight"), &xn, f);
                let u = self.linear(&format!("{p}.mlp.up_proj.weight"), &xn, f);
                let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let d = self.linear(&format!("{p}.mlp.down_proj.weight"), &act, h);
                for (a, b) in states[pos].iter_mut().zip(&d) {
                    *a += b;
                }
                hook(l, false, pos, &mut states[pos]);
            }
            hidden_states.push(states.clone());
        }
        let head_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let logits = states
            .iter()
            .map(|x| {
                let xn = self.rms_norm(x, self.t("model.norm.weight"));
                self.linear(head_name, &xn, c.vocab_size)
            })
            .collect();
        (logits, hidden_states)
    }
}

/// max |a - b| over max |b|.
pub fn relative_error(a: &[f32], b: &[f64]) -> f64 {
    let max_ref = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let max_diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    max_diff / max_ref.max(1e-12)
}

/// `tests/fixtures/smollm2`, where tools/make_reference.py and make_steering_reference.py write.
pub fn smollm2_fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2")
}

/// The default model's path under models/, or None (with a printed reason) when it is missing.
/// With ENGRAM_REQUIRE_MODEL=1 (set by .ci/run) a missing model is a failure, not a skip.
pub fn require_model(file_name: &str) -> Option<std::path::PathBuf> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(file_name);
    if !model.exists() {
        if std::env::var("ENGRAM_REQUIRE_MODEL").as_deref() == Ok("1") {
            panic!("{} is missing and ENGRAM_REQUIRE_MODEL=1: run tools/fetch_model.sh", model.display());
        }
        eprintln!("SKIPPED: {} is missing (run tools/fetch_model.sh)", model.display());
        return None;
    }
    Some(model)
}

/// A float32 .npy file's values.
pub fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

/// The `engram` binary built for this test run.
pub fn engram_command() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_engram"))
}

/// Runs `cmd`, asserting success; returns (stdout, stderr).
pub fn run_ok(cmd: &mut std::process::Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "command failed\nstdout: {stdout}\nstderr: {stderr}");
    (stdout, stderr)
}
