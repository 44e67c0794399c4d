//! A GGUF file seen as a model: [`ModelConfig`] from its metadata, and its tensors under their
//! Hugging Face names and in Hugging Face layout (llama.cpp's q/k row permutation undone).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::gguf::GgufFile;
use crate::model::quant::GgmlType;
use crate::model::TensorSource;
use crate::tensor::{DType, HostTensor};

/// Per-layer tensors: (GGUF suffix after `blk.N.`, Hugging Face suffix after `model.layers.N.`).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Model-level tensors: (GGUF name, Hugging Face name).
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("rope_freqs.weight", "rope_freqs.weight"),
];

/// The Hugging Face name of a GGUF tensor, if it is one engram knows.
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    if let Some(&(_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The GGUF name of a Hugging Face tensor name, if it has one.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    if let Some(&(g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let &(g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Maps a GGUF `general.architecture` to engram's architecture, naming the file otherwise.
fn architecture_of(file: &GgufFile) -> Result<(String, Architecture)> {
    let arch = file.require_str("general.architecture")?.to_string();
    let architecture = match arch.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF architecture '{other}' (supported: llama, qwen2, qwen3)",
                file.path().display()
            )))
        }
    };
    Ok((arch, architecture))
}

/// Reads the hyper-parameters of a model from GGUF metadata (`{arch}.*` and `tokenizer.ggml.*`).
pub fn model_config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let (arch, architecture) = architecture_of(file)?;
    let key = |k: &str| format!("{arch}.{k}");
    let usize_of = |k: &str| -> Result<usize> { Ok(file.require_u32(&key(k))? as usize) };
    let opt_usize = |k: &str| -> Result<Option<usize>> { Ok(file.get_u32(&key(k))?.map(|v| v as usize)) };

    let hidden_size = usize_of("embedding_length")?;
    let num_hidden_layers = usize_of("block_count")?;
    let intermediate_size = usize_of("feed_forward_length")?;
    let num_attention_heads = usize_of("attention.head_count")?;
    if hidden_size == 0 || num_hidden_layers == 0 || num_attention_heads == 0 {
        return Err(Error::format(
            file.path(),
            "embedding_length, block_count and attention.head_count must be positive",
        ));
    }
    let num_key_value_heads = opt_usize("attention.head_count_kv")?.unwrap_or(num_attention_heads);
    let head_dim = opt_usize("attention.key_length")?.unwrap_or(hidden_size / num_attention_heads);
    let vocab_size = match opt_usize("vocab_size")? {
        Some(v) => v,
        None => match file.get_array("tokenizer.ggml.tokens")? {
            Some(tokens) => tokens.len(),
            None => {
                file.tensor_info("token_embd.weight").and_then(|t| t.shape().first().copied()).ok_or_else(|| {
                    Error::format(
                        file.path(),
                        "cannot tell the vocabulary size: no vocab_size, token list or token_embd.weight",
                    )
                })?
            }
        },
    };
    let mut eos_token_ids = Vec::new();
    for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = file.get_u32(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: file.get_f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: file.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
        // Llama 3.1-style scaling is stored by llama.cpp as the `rope_freqs.weight` tensor of
        // per-frequency divisors, which engram exposes under its own name.
        rope_scaling: None,
        max_position_embeddings: opt_usize("context_length")?.unwrap_or(4096),
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: file.tensor_info("blk.0.attn_q.bias").is_some(),
        qk_norm: architecture == Architecture::Qwen3 || file.tensor_info("blk.0.attn_q_norm.weight").is_some(),
        sliding_window: None,
        bos_token_id: file.get_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
    };
    config.validate().map_err(|e| Error::format(file.path(), e.to_string()))?;
    Ok(config)
}

/// Undoes llama.cpp's interleaving of q/k rows: llama.cpp stores, within each head, the rows
/// of the two rotary halves interleaved (row 2i+j of the head holds Hugging Face row
/// j*head_dim/2 + i). `row_len` is the number of items per row (elements or bytes).
pub fn unpermute_qk_rows<T: Copy>(data: &[T], n_rows: usize, row_len: usize, n_heads: usize) -> Result<Vec<T>> {
    if n_heads == 0 || !n_rows.is_multiple_of(2 * n_heads) || data.len() != n_rows * row_len {
        return Err(Error::Shape(format!(
            "cannot un-permute {n_rows} rows of {row_len} (data length {}) over {n_heads} heads",
            data.len()
        )));
    }
    let head_dim = n_rows / n_heads;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_heads {
        for j in 0..2 {
            for i in 0..half {
                let src = h * head_dim + 2 * i + j;
                out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    Ok(out)
}

/// The stored bytes of a tensor in Hugging Face layout (q/k rows un-permuted), for code that
/// computes on quantized blocks directly.
#[derive(Debug, Clone)]
pub struct RawTensor<'a> {
    /// How `data` is encoded.
    pub ggml_type: GgmlType,
    /// Outermost first.
    pub shape: Vec<usize>,
    /// The encoded rows (whole blocks per row), in Hugging Face row order.
    pub data: Cow<'a, [u8]>,
}

/// A GGUF model file as a [`TensorSource`] with Hugging Face names and layouts.
#[derive(Debug, Clone)]
pub struct GgufModelSource {
    file: Arc<GgufFile>,
    config: ModelConfig,
    /// Hugging Face name -> GGUF name, for every tensor with a known mapping.
    names: HashMap<String, String>,
    /// Whether q/k rows were permuted by llama.cpp's converter (architecture `llama`).
    permuted_qk: bool,
}

impl GgufModelSource {
    /// Opens a GGUF model file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(Arc::new(GgufFile::open(path)?))
    }

    /// Wraps an already opened file.
    pub fn from_file(file: Arc<GgufFile>) -> Result<Self> {
        let config = model_config_from_gguf(&file)?;
        let names =
            file.tensors().iter().filter_map(|t| gguf_to_hf_name(&t.name).map(|hf| (hf, t.name.clone()))).collect();
        let permuted_qk = config.architecture == Architecture::Llama;
        Ok(GgufModelSource { file, config, names, permuted_qk })
    }

    /// The underlying file.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// The model configuration read from the metadata.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The GGUF name behind a Hugging Face name.
    pub fn gguf_name(&self, hf_name: &str) -> Option<&str> {
        self.names.get(hf_name).map(|s| s.as_str())
    }

    /// GGUF tensors that have no Hugging Face name (ignored by [`TensorSource`]).
    pub fn unmapped_tensors(&self) -> Vec<&str> {
        self.file.tensors().iter().filter(|t| gguf_to_hf_name(&t.name).is_none()).map(|t| t.name.as_str()).collect()
    }

    fn lookup(&self, name: &str) -> Result<&str> {
        self.gguf_name(name)
            .ok_or_else(|| Error::InvalidInput(format!("{}: no tensor '{name}'", self.file.path().display())))
    }

    /// Heads over which the rows of `hf_name` were permuted, if they were.
    fn permutation_heads(&self, hf_name: &str) -> Option<usize> {
        if !self.permuted_qk {
            return None;
        }
        if hf_name.contains(".self_attn.q_proj.") {
            Some(self.config.num_attention_heads)
        } else if hf_name.contains(".self_attn.k_proj.") {
            Some(self.config.num_key_value_heads)
        } else {
            None
        }
    }

    /// The tensor's stored bytes in Hugging Face row order (borrowed unless rows were permuted).
    pub fn load_raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let gguf = self.lookup(name)?;
        let info = self.file.tensor_info(gguf).ok_or_else(|| Error::InvalidInput(format!("no tensor '{gguf}'")))?;
        let bytes = self.file.tensor_data(gguf)?;
        let shape = info.shape();
        let data = match self.permutation_heads(name) {
            None => Cow::Borrowed(bytes),
            Some(heads) => {
                let rows = shape.first().copied().unwrap_or(1);
                let row_bytes = bytes.len() / rows.max(1);
                Cow::Owned(
                    unpermute_qk_rows(bytes, rows, row_bytes, heads)
                        .map_err(|e| Error::format(self.file.path(), format!("tensor '{gguf}': {e}")))?,
                )
            }
        };
        Ok(RawTensor { ggml_type: info.ggml_type, shape, data })
    }

    /// Dequantized f32 values in Hugging Face layout, row-major.
    pub fn load_f32(&self, name: &str) -> Result<Vec<f32>> {
        let gguf = self.lookup(name)?;
        let values = self.file.dequantize_to_f32(gguf)?;
        match self.permutation_heads(name) {
            None => Ok(values),
            Some(heads) => {
                let rows = self.shape(name)?.first().copied().unwrap_or(1);
                let row_len = values.len() / rows.max(1);
                unpermute_qk_rows(&values, rows, row_len, heads)
                    .map_err(|e| Error::format(self.file.path(), format!("tensor '{gguf}': {e}")))
            }
        }
    }
}

impl TensorSource for GgufModelSource {
    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }

    fn tensor_names(&self) -> Vec<String> {
        // File order, which is the natural model order.
        self.file.tensors().iter().filter_map(|t| gguf_to_hf_name(&t.name)).collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let gguf = self.lookup(name)?;
        Ok(self.file.tensor_info(gguf).map(|t| t.shape()).unwrap_or_default())
    }

    fn stored_type(&self, name: &str) -> Result<String> {
        let gguf = self.lookup(name)?;
        Ok(self.file.tensor_info(gguf).map(|t| t.ggml_type.name().to_string()).unwrap_or_default())
    }

    /// Quantized requests (`q8_0`, `q4_0`, `q4_1`, or `native` for a tensor stored in one of
    /// those) of a tensor stored in exactly that type take its blocks as they are: no
    /// dequantization. Anything else is decoded to f32 and converted.
    fn load(&self, name: &str, dtype: DType) -> Result<HostTensor> {
        let shape = self.shape(name)?;
        let stored = self.file.tensor_info(self.lookup(name)?).map(|t| t.ggml_type);
        let stored_dtype = stored.and_then(DType::of_ggml);
        let keep_blocks = stored_dtype.is_some_and(|s| s.quant_type().is_some() && (dtype == s || dtype == DType::Native));
        let in_file = |e: Error| Error::format(self.file.path(), format!("tensor '{name}': {e}"));
        if keep_blocks {
            let raw = self.load_raw(name)?;
            return HostTensor::quantized(shape, raw.ggml_type, raw.data.into_owned()).map_err(in_file);
        }
        // `native` of a type engram does not compute on (e.g. Q4_K) falls back to f32.
        let target = if dtype == DType::Native { stored_dtype.unwrap_or(DType::F32) } else { dtype };
        HostTensor::from_f32(shape, self.load_f32(name)?)?.to_dtype(target).map_err(in_file)
    }
}

/// Builders of small GGUF models for tests in this and the sibling modules.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;

    use crate::model::gguf::{GgufArray, GgufTensorToWrite, GgufValue};
    use crate::model::quant::{self, GgmlType};

    /// GPT-2's byte -> printable character table.
    pub fn bytes_to_unicode() -> Vec<char> {
        let mut table = vec!['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            table[b as usize] = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        table
    }

    pub fn kv(key: &str, value: GgufValue) -> (String, GgufValue) {
        (key.to_string(), value)
    }

    pub fn s(x: &str) -> GgufValue {
        GgufValue::String(x.to_string())
    }

    /// Ids in the tiny vocabulary: 3 control tokens, the 256 bytes (id 3 + byte), then merges.
    pub const TINY_MERGED: &[&str] = &["he", "ll", "hell", "Ġw", "or", "Ġwor", "12"];
    pub const TINY_MERGES: &[&str] = &["h e", "l l", "he ll", "Ġ w", "o r", "Ġw or", "1 2"];
    pub fn tiny_vocab_size() -> usize {
        3 + 256 + TINY_MERGED.len() + 1
    }

    /// A tiny gpt2-style tokenizer: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (control), the
    /// 256 byte tokens, a few merges and a user-defined `<tool>`.
    pub fn tiny_tokenizer_metadata(pre: Option<&str>) -> Vec<(String, GgufValue)> {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
        tokens.extend(bytes_to_unicode().iter().map(|c| c.to_string()));
        tokens.extend(TINY_MERGED.iter().map(|t| t.to_string()));
        tokens.push("<tool>".into());
        let mut types = vec![3i32; 3];
        types.extend(std::iter::repeat_n(1, 256 + TINY_MERGED.len()));
        types.push(4);
        let mut md = vec![
            kv("tokenizer.ggml.model", s("gpt2")),
            kv("tokenizer.ggml.tokens", GgufValue::Array(GgufArray::String(tokens))),
            kv("tokenizer.ggml.token_type", GgufValue::Array(GgufArray::I32(types))),
            kv(
                "tokenizer.ggml.merges",
                GgufValue::Array(GgufArray::String(TINY_MERGES.iter().map(|m| m.to_string()).collect())),
            ),
            kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
            kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
            kv("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
            kv("tokenizer.ggml.padding_token_id", GgufValue::U32(2)),
            kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
            kv(
                "tokenizer.chat_template",
                s("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"),
            ),
        ];
        if let Some(pre) = pre {
            md.push(kv("tokenizer.ggml.pre", s(pre)));
        }
        md
    }

    /// Deterministic values away from zero.
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + 0.003
            })
            .collect()
    }

    /// llama.cpp's converter permutation of q/k rows (the forward direction).
    pub fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let hd = rows / heads;
        let mut out = vec![0.0; w.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let hf = h * hd + j * (hd / 2) + i;
                    let gg = h * hd + 2 * i + j;
                    out[gg * cols..(gg + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
                }
            }
        }
        out
    }

    /// A tiny model: 2 layers, hidden 64, 4 heads of 16, 2 KV heads, FFN 96, the tiny tokenizer.
    /// Returns the metadata, the tensors (q/k permuted as llama.cpp does for `llama`) and, per
    /// Hugging Face name, the expected shape and values (what dequantizing gives, HF layout).
    #[allow(clippy::type_complexity)]
    pub fn tiny_model(
        arch: &str,
        tied: bool,
        bias: bool,
    ) -> (Vec<(String, GgufValue)>, Vec<GgufTensorToWrite<'static>>, HashMap<String, (Vec<usize>, Vec<f32>)>) {
        tiny_model_sized(arch, tied, bias, 64, 96)
    }

    /// [`tiny_model`] with a chosen width and feed-forward size (4 heads, 2 of keys and values,
    /// 2 layers).
    pub fn tiny_model_sized(
        arch: &str,
        tied: bool,
        bias: bool,
        hidden: usize,
        ffn: usize,
    ) -> (Vec<(String, GgufValue)>, Vec<GgufTensorToWrite<'static>>, HashMap<String, (Vec<usize>, Vec<f32>)>) {
        let (heads, kv_heads, layers) = (4usize, 2usize, 2usize);
        let vocab = tiny_vocab_size();
        let mut md = vec![
            kv("general.architecture", s(arch)),
            kv("general.name", s("tiny")),
            kv(&format!("{arch}.block_count"), GgufValue::U32(layers as u32)),
            kv(&format!("{arch}.context_length"), GgufValue::U32(256)),
            kv(&format!("{arch}.embedding_length"), GgufValue::U32(hidden as u32)),
            kv(&format!("{arch}.feed_forward_length"), GgufValue::U32(ffn as u32)),
            kv(&format!("{arch}.attention.head_count"), GgufValue::U32(heads as u32)),
            kv(&format!("{arch}.attention.head_count_kv"), GgufValue::U32(kv_heads as u32)),
            kv(&format!("{arch}.rope.freq_base"), GgufValue::F32(50000.0)),
            kv(&format!("{arch}.attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-6)),
        ];
        if hidden != heads * 16 {
            md.push(kv(&format!("{arch}.attention.key_length"), GgufValue::U32(16)));
        }
        md.extend(tiny_tokenizer_metadata(Some("smollm")));
        let permuted = arch == "llama";
        let mut tensors = Vec::new();
        let mut expected = HashMap::new();
        let mut seed = 1;
        let mut add = |gguf: &str, hf: &str, shape: Vec<usize>, ty: GgmlType, permute_heads: Option<usize>| {
            seed += 1;
            let n: usize = shape.iter().product();
            let hf_values = values(n, seed);
            let rows = shape[0];
            let cols = n / rows;
            let stored = match permute_heads {
                Some(h) if permuted => permute_rows(&hf_values, rows, cols, h),
                _ => hf_values.clone(),
            };
            let t = GgufTensorToWrite::from_f32(gguf, shape.clone(), ty, &stored).unwrap();
            // Quantization works within rows, so quantizing HF rows gives the same rows.
            let exact = quant::dequantize(ty, &quant::quantize(ty, &hf_values).unwrap(), n).unwrap();
            tensors.push(t);
            expected.insert(hf.to_string(), (shape, exact));
        };
        add("token_embd.weight", "model.embed_tokens.weight", vec![vocab, hidden], GgmlType::Q8_0, None);
        for l in 0..layers {
            let g = |x: &str| format!("blk.{l}.{x}");
            let h = |x: &str| format!("model.layers.{l}.{x}");
            add(&g("attn_norm.weight"), &h("input_layernorm.weight"), vec![hidden], GgmlType::F32, None);
            add(
                &g("attn_q.weight"),
                &h("self_attn.q_proj.weight"),
                vec![heads * 16, hidden],
                GgmlType::Q4_1,
                Some(heads),
            );
            add(
                &g("attn_k.weight"),
                &h("self_attn.k_proj.weight"),
                vec![kv_heads * 16, hidden],
                GgmlType::Q4_0,
                Some(kv_heads),
            );
            add(&g("attn_v.weight"), &h("self_attn.v_proj.weight"), vec![kv_heads * 16, hidden], GgmlType::F16, None);
            if bias {
                add(&g("attn_q.bias"), &h("self_attn.q_proj.bias"), vec![heads * 16], GgmlType::F32, Some(heads));
                add(&g("attn_k.bias"), &h("self_attn.k_proj.bias"), vec![kv_heads * 16], GgmlType::F32, Some(kv_heads));
                add(&g("attn_v.bias"), &h("self_attn.v_proj.bias"), vec![kv_heads * 16], GgmlType::F32, None);
            }
            if arch == "qwen3" {
                add(&g("attn_q_norm.weight"), &h("self_attn.q_norm.weight"), vec![16], GgmlType::F32, None);
                add(&g("attn_k_norm.weight"), &h("self_attn.k_norm.weight"), vec![16], GgmlType::F32, None);
            }
            add(
                &g("attn_output.weight"),
                &h("self_attn.o_proj.weight"),
                vec![hidden, heads * 16],
                GgmlType::BF16,
                None,
            );
            add(&g("ffn_norm.weight"), &h("post_attention_layernorm.weight"), vec![hidden], GgmlType::F32, None);
            add(&g("ffn_gate.weight"), &h("mlp.gate_proj.weight"), vec![ffn, hidden], GgmlType::Q4_1, None);
            add(&g("ffn_up.weight"), &h("mlp.up_proj.weight"), vec![ffn, hidden], GgmlType::Q8_0, None);
            add(&g("ffn_down.weight"), &h("mlp.down_proj.weight"), vec![hidden, ffn], GgmlType::Q4_1, None);
        }
        add("output_norm.weight", "model.norm.weight", vec![hidden], GgmlType::F32, None);
        if !tied {
            add("output.weight", "lm_head.weight", vec![vocab, hidden], GgmlType::Q8_0, None);
        }
        (md, tensors, expected)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::model::gguf::{write_gguf, GgufValue};
    use crate::model::quant;

    type Expected = HashMap<String, (Vec<usize>, Vec<f32>)>;

    fn write_tiny(dir: &Path, arch: &str, tied: bool, bias: bool) -> (std::path::PathBuf, Expected) {
        let (md, tensors, expected) = tiny_model(arch, tied, bias);
        let path = dir.join(format!("tiny-{arch}.gguf"));
        write_gguf(&path, &md, &tensors).unwrap();
        (path, expected)
    }

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.12.attn_q.bias", "model.layers.12.self_attn.q_proj.bias"),
            ("blk.0.attn_k_norm.weight", "model.layers.0.self_attn.k_norm.weight"),
            ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
            ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
            ("output.weight", "lm_head.weight"),
            ("rope_freqs.weight", "rope_freqs.weight"),
        ] {
            assert_eq!(gguf_to_hf_name(g).as_deref(), Some(h));
            assert_eq!(hf_to_gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(gguf_to_hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf_name("blk.0.unknown.weight"), None);
        assert_eq!(hf_to_gguf_name("model.layers.0.mlp.foo"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (rows, cols, heads) = (48, 5, 3);
        let w = values(rows * cols, 42);
        let p = permute_rows(&w, rows, cols, heads);
        assert_ne!(p, w);
        assert_eq!(unpermute_qk_rows(&p, rows, cols, heads).unwrap(), w);
        assert!(matches!(unpermute_qk_rows(&p, rows, cols, 5), Err(Error::Shape(_))));
        assert!(matches!(unpermute_qk_rows(&p[1..], rows, cols, heads), Err(Error::Shape(_))));
    }

    #[test]
    fn tiny_models_load_in_hugging_face_layout() {
        let dir = tempfile::tempdir().unwrap();
        for (arch, tied, bias) in
            [("llama", true, false), ("llama", false, true), ("qwen2", false, true), ("qwen3", true, false)]
        {
            let (path, expected) = write_tiny(dir.path(), arch, tied, bias);
            let src = GgufModelSource::open(&path).unwrap();
            let c = src.config();
            assert_eq!(c.architecture.model_type(), arch);
            assert_eq!(
                (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads),
                (64, 2, 4, 2)
            );
            assert_eq!(
                (c.head_dim, c.intermediate_size, c.vocab_size, c.max_position_embeddings),
                (16, 96, tiny_vocab_size(), 256)
            );
            assert_eq!((c.rope_theta, c.rms_norm_eps), (50000.0, 1e-6));
            assert_eq!(c.tie_word_embeddings, tied);
            assert_eq!(c.attention_bias, bias);
            assert_eq!(c.qk_norm, arch == "qwen3");
            assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2u32][..]));
            let mut names = src.tensor_names();
            names.sort();
            let mut want: Vec<String> = expected.keys().cloned().collect();
            want.sort();
            assert_eq!(names, want, "{arch}");
            assert!(src.unmapped_tensors().is_empty());
            for (name, (shape, values)) in &expected {
                assert!(src.contains(name));
                assert_eq!(&src.shape(name).unwrap(), shape, "{arch} {name}");
                let t = src.load(name, DType::F32).unwrap();
                assert_eq!(&t.shape, shape);
                assert_eq!(&t.to_f32_vec(), values, "{arch} {name} differs from the Hugging Face layout");
                let bf = src.load(name, DType::BF16).unwrap();
                assert_eq!(bf.dtype(), DType::BF16);
                // Raw rows are permuted back too: dequantizing them gives the same values.
                let raw = src.load_raw(name).unwrap();
                assert_eq!(&quant::dequantize(raw.ggml_type, &raw.data, values.len()).unwrap(), values);
            }
            assert_eq!(src.stored_type("model.layers.0.self_attn.q_proj.weight").unwrap(), "Q4_1");
            assert!(matches!(src.load("model.layers.9.mlp.up_proj.weight", DType::F32), Err(Error::InvalidInput(_))));
        }
    }

    fn write_with(dir: &Path, edit: impl FnOnce(&mut Vec<(String, GgufValue)>)) -> std::path::PathBuf {
        let (mut md, tensors, _) = tiny_model("llama", true, false);
        edit(&mut md);
        let path = dir.join("edited.gguf");
        write_gguf(&path, &md, &tensors).unwrap();
        path
    }

    #[test]
    fn unsupported_architecture_and_missing_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_with(dir.path(), |md| md[0].1 = s("gpt-neox"));
        match GgufModelSource::open(&path) {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains("gpt-neox") && msg.contains(&path.display().to_string()), "{msg}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let path = write_with(dir.path(), |md| md.retain(|(k, _)| k != "llama.embedding_length"));
        match GgufModelSource::open(&path) {
            Err(e @ Error::Format { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("llama.embedding_length") && msg.contains(&path.display().to_string()), "{msg}")
            }
            other => panic!("expected Format, got {other:?}"),
        }
        let path = write_with(dir.path(), |md| md.retain(|(k, _)| k != "general.architecture"));
        assert!(matches!(GgufModelSource::open(&path), Err(Error::Format { .. })));
        let path = write_with(dir.path(), |md| {
            md.retain(|(k, _)| k != "llama.attention.head_count");
            md.push(kv("llama.attention.head_count", s("four")));
        });
        match GgufModelSource::open(&path) {
            Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("head_count"), "{e}"),
            other => panic!("expected Format, got {other:?}"),
        }
        // Heads that do not divide: the config is rejected with the file named.
        let path = write_with(dir.path(), |md| {
            md.retain(|(k, _)| k != "llama.attention.head_count_kv");
            md.push(kv("llama.attention.head_count_kv", GgufValue::U32(3)));
        });
        match GgufModelSource::open(&path) {
            Err(e @ Error::Format { .. }) => assert!(e.to_string().contains("edited.gguf"), "{e}"),
            other => panic!("expected Format, got {other:?}"),
        }
    }

    /// The real model: its config, and q/k/other tensors equal to what transformers loads from
    /// the same GGUF (fixture made by tools/make_gguf_fixture.py).
    #[test]
    fn real_model_matches_transformers() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return;
        }
        let src = GgufModelSource::open(&path).unwrap();
        let c = src.config();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads), (30, 576, 9, 3));
        assert_eq!((c.intermediate_size, c.vocab_size, c.head_dim, c.max_position_embeddings), (1536, 49152, 64, 8192));
        assert!(c.tie_word_embeddings && !c.attention_bias && !c.qk_norm);
        assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5));
        assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2u32][..]));
        assert_eq!(src.tensor_names().len(), 272);
        assert!(!src.contains("lm_head.weight"));

        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_reference.json"))
                .unwrap(),
        )
        .unwrap();
        let mut checked = 0;
        for (name, expected) in reference.as_object().unwrap() {
            if !name.starts_with("model.") {
                continue;
            }
            let t = src.load(name, DType::F32).unwrap();
            let shape: Vec<usize> =
                expected["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(t.shape, shape, "{name}");
            let values = t.to_f32_vec();
            let mut h: u64 = 0xCBF2_9CE4_8422_2325;
            for b in values.iter().flat_map(|v| v.to_le_bytes()) {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01B3);
            }
            assert_eq!(format!("{h:016x}"), expected["fnv1a64"].as_str().unwrap(), "{name} differs from the reference");
            let first: Vec<f32> =
                expected["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(&values[..8], first.as_slice(), "{name}");
            checked += 1;
        }
        assert_eq!(checked, 10);
    }
}
