//! Random-weight models written as Hugging Face directories, for tests and benchmarks that need
//! no real model: config.json, model.safetensors, a byte-level BPE tokenizer.json and a ChatML
//! tokenizer_config.json.

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};

use super::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor};

/// The ChatML template SmolLM2 uses, so random models exercise the same chat path.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Special tokens of the byte-level tokenizer, after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A small configuration with awkward sizes (GQA, odd vocabulary) for tests.
pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        vocab_size: 256 + SPECIAL_TOKENS.len(),
        hidden_size: 72,
        intermediate_size: 136,
        num_hidden_layers: 3,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 12,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 1024,
        tie_word_embeddings: architecture != Architecture::Mistral,
        attention_bias: architecture == Architecture::Qwen2,
        qk_norm: architecture == Architecture::Qwen3,
        sliding_window: None,
        bos_token_id: Some(256 + 1),
        eos_token_ids: vec![256 + 2],
    }
}

/// GPT-2's reversible byte -> printable character map used by byte-level BPE.
pub fn byte_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut map = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if printable.contains(&b) {
            map[b as usize] = char::from_u32(b).expect("latin-1 is valid");
        } else {
            map[b as usize] = char::from_u32(256 + extra).expect("valid code point");
            extra += 1;
            printable.push(b);
        }
    }
    map
}

/// A byte-level BPE tokenizer.json with one token per byte (ids 0..256) and the special tokens.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let map = byte_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (id, c) in map.iter().enumerate() {
        vocab.insert(c.to_string(), serde_json::json!(id));
    }
    let mut added = Vec::new();
    for (k, tok) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(tok.to_string(), serde_json::json!(256 + k));
        added.push(serde_json::json!({"id": 256 + k, "content": tok, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Random tensors by Hugging Face name for `config`. Scales keep activations of order one so
/// that logits differ meaningfully between tokens.
pub fn random_tensors(config: &ModelConfig, seed: u64) -> Vec<(String, HostTensor)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (h, f, q, kv, hd) = (config.hidden_size, config.intermediate_size, config.q_dim(), config.kv_dim(), config.head_dim);
    let matrix = |rows: usize, cols: usize, rng: &mut rand::rngs::StdRng| {
        let bound = (3.0 / cols as f32).sqrt();
        HostTensor::from_f32(vec![rows, cols], (0..rows * cols).map(|_| rng.random_range(-bound..bound)).collect()).expect("sizes agree")
    };
    let norm = |len: usize, rng: &mut rand::rngs::StdRng| HostTensor::from_f32(vec![len], (0..len).map(|_| rng.random_range(0.8f32..1.2)).collect()).expect("sizes agree");
    let bias = |len: usize, rng: &mut rand::rngs::StdRng| HostTensor::from_f32(vec![len], (0..len).map(|_| rng.random_range(-0.2f32..0.2)).collect()).expect("sizes agree");
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), {
        let n = config.vocab_size * h;
        HostTensor::from_f32(vec![config.vocab_size, h], (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()).expect("sizes agree")
    })];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), norm(h, &mut rng)));
        tensors.push((format!("{p}.self_attn.q_proj.weight"), matrix(q, h, &mut rng)));
        tensors.push((format!("{p}.self_attn.k_proj.weight"), matrix(kv, h, &mut rng)));
        tensors.push((format!("{p}.self_attn.v_proj.weight"), matrix(kv, h, &mut rng)));
        if config.attention_bias {
            tensors.push((format!("{p}.self_attn.q_proj.bias"), bias(q, &mut rng)));
            tensors.push((format!("{p}.self_attn.k_proj.bias"), bias(kv, &mut rng)));
            tensors.push((format!("{p}.self_attn.v_proj.bias"), bias(kv, &mut rng)));
        }
        if config.qk_norm {
            tensors.push((format!("{p}.self_attn.q_norm.weight"), norm(hd, &mut rng)));
            tensors.push((format!("{p}.self_attn.k_norm.weight"), norm(hd, &mut rng)));
        }
        tensors.push((format!("{p}.self_attn.o_proj.weight"), matrix(h, q, &mut rng)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), norm(h, &mut rng)));
        tensors.push((format!("{p}.mlp.gate_proj.weight"), matrix(f, h, &mut rng)));
        tensors.push((format!("{p}.mlp.up_proj.weight"), matrix(f, h, &mut rng)));
        tensors.push((format!("{p}.mlp.down_proj.weight"), matrix(h, f, &mut rng)));
    }
    tensors.push(("model.norm.weight".to_string(), norm(h, &mut rng)));
    if !config.tie_word_embeddings {
        tensors.push(("lm_head.weight".to_string(), matrix(config.vocab_size, h, &mut rng)));
    }
    tensors
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::format(path, e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes a complete Hugging Face model directory with random weights stored as `dtype`.
/// The tokenizer is the byte-level one, so `config.vocab_size` must be at least 259.
pub fn write_random_model(dir: &Path, config: &ModelConfig, dtype: DType, seed: u64) -> Result<()> {
    config.validate()?;
    let vocab_needed = 256 + SPECIAL_TOKENS.len();
    if config.vocab_size < vocab_needed {
        return Err(Error::InvalidInput(format!("a random model needs a vocabulary of at least {vocab_needed}")));
    }
    if dtype.size_in_bytes().is_none() {
        return Err(Error::InvalidInput(format!(
            "random models are written as safetensors, which hold f32, f16 or bf16 weights, not {dtype}"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = random_tensors(config, seed)
        .into_iter()
        .map(|(n, t)| if t.shape.len() == 2 { t.to_dtype(dtype).map(|t| (n, t)) } else { Ok((n, t)) })
        .collect::<Result<Vec<(String, HostTensor)>>>()?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    super::safetensors::write_safetensors(&dir.join("model.safetensors"), &tensors, Some(metadata))?;
    write_json(&dir.join("config.json"), &config.to_config_json())?;
    write_json(&dir.join("tokenizer.json"), &byte_tokenizer_json())?;
    write_json(&dir.join("tokenizer_config.json"), &serde_json::json!({
        "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2], "add_bos_token": false,
        "chat_template": CHATML_TEMPLATE, "model_max_length": config.max_position_embeddings,
    }))?;
    write_json(&dir.join("generation_config.json"), &serde_json::json!({
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids,
    }))?;
    Ok(())
}
