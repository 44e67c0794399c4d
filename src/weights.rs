//! Model weights resident on a backend, arranged for the forward pass: q|k|v and gate|up fused
//! into single matrices so that each sub-block input is read by one matrix product.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::TensorSource;
use crate::tensor::{DType, HostTensor, TensorData};

pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Buffer,
    /// `[q_dim + 2·kv_dim, hidden]`.
    pub qkv: B::Matrix,
    pub qkv_bias: Option<B::Buffer>,
    pub q_norm: Option<B::Buffer>,
    pub k_norm: Option<B::Buffer>,
    pub o_proj: B::Matrix,
    pub post_attention_norm: B::Buffer,
    /// `[2·intermediate, hidden]`: gate rows then up rows.
    pub gate_up: B::Matrix,
    pub down: B::Matrix,
}

pub struct ModelWeights<B: Backend> {
    pub embed: B::Matrix,
    pub layers: Vec<LayerWeights<B>>,
    pub final_norm: B::Buffer,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<B::Matrix>,
    /// Bytes of all matrices in their stored dtype (what a decode step streams).
    pub matrix_bytes: usize,
    pub dtype: DType,
}

impl<B: Backend> ModelWeights<B> {
    /// The output projection (the embedding itself when tied).
    pub fn output_matrix(&self) -> &B::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Bytes of matrices a backend is given to place together (see `Backend::matrices`): large
/// enough that the partial huge page at a group's end is a small share of it, small enough
/// that the host copies waiting for their group stay a small share of a large model.
const MATRIX_GROUP_BYTES: usize = 32 << 20;

/// A layer's vectors, kept while its matrices wait for their group.
struct LayerVectors<B: Backend> {
    input_norm: B::Buffer,
    qkv_bias: Option<B::Buffer>,
    q_norm: Option<B::Buffer>,
    k_norm: Option<B::Buffer>,
    post_attention_norm: B::Buffer,
}

/// Loads `name` and checks its shape against what the config implies.
fn load_checked(source: &dyn TensorSource, name: &str, expected: &[usize], dtype: DType) -> Result<HostTensor> {
    if !source.contains(name) {
        return Err(Error::format(source.describe(), format!("missing tensor '{name}'")));
    }
    let tensor = source.load(name, dtype)?;
    if tensor.shape != expected {
        return Err(Error::format(
            source.describe(),
            format!("tensor '{name}' has shape {:?}, the config implies {:?}", tensor.shape, expected),
        ));
    }
    tensor.check_finite(&format!("{}: tensor '{name}'", source.describe()))?;
    Ok(tensor)
}

/// Stacks 2-D tensors along their first axis. Parts loaded in different dtypes (possible with
/// `native`, when a file stores q, k and v differently) are first brought to the most precise
/// of them: f32 if any part is a float type, else Q8_0 (re-quantizing a Q4 block to Q8_0 moves
/// each value by at most half a Q8 step).
fn concat_rows(parts: Vec<HostTensor>) -> Result<HostTensor> {
    let cols = parts[0].shape[1];
    let rows = parts.iter().map(|t| t.shape[0]).sum();
    let first = parts[0].dtype();
    let parts = if parts.iter().all(|t| t.dtype() == first) {
        parts
    } else {
        let common = if parts.iter().any(|t| t.dtype().quant_type().is_none()) {
            DType::F32
        } else {
            DType::Q8_0
        };
        parts.into_iter().map(|t| t.to_dtype(common)).collect::<Result<Vec<_>>>()?
    };
    let shape = vec![rows, cols];
    let data = match parts[0].dtype() {
        DType::F32 => TensorData::F32(parts.iter().flat_map(|t| t.to_f32_vec()).collect()),
        DType::F16 => TensorData::F16(parts.into_iter().flat_map(|t| match t.data { TensorData::F16(v) => v, _ => unreachable!("one dtype") }).collect()),
        DType::BF16 => TensorData::BF16(parts.into_iter().flat_map(|t| match t.data { TensorData::BF16(v) => v, _ => unreachable!("one dtype") }).collect()),
        _ => {
            let ty = parts[0].dtype().quant_type().expect("a quantized dtype");
            let bytes = parts.into_iter().flat_map(|t| match t.data { TensorData::Quantized { bytes, .. } => bytes, _ => unreachable!("one dtype") }).collect();
            return HostTensor::quantized(shape, ty, bytes);
        }
    };
    Ok(HostTensor { shape, data })
}

fn concat_vectors(parts: Vec<HostTensor>) -> Vec<f32> {
    parts.iter().flat_map(|t| t.to_f32_vec()).collect()
}

impl<B: Backend> ModelWeights<B> {
    /// Reads every tensor by its Hugging Face name, matrices in `dtype`, norms and biases in f32.
    pub fn load(backend: &B, config: &ModelConfig, source: &dyn TensorSource, dtype: DType, mut progress: impl FnMut(usize, usize)) -> Result<Self> {
        let (hidden, ffn) = (config.hidden_size, config.intermediate_size);
        let (q_dim, kv_dim, hd) = (config.q_dim(), config.kv_dim(), config.head_dim);
        let vector = |name: &str, len: usize| -> Result<B::Buffer> {
            let values = load_checked(source, name, &[len], DType::F32)?.to_f32_vec();
            let mut buffer = backend.buffer(len)?;
            backend.upload(&values, &mut buffer)?;
            Ok(buffer)
        };
        let mut matrix_bytes = 0;
        let mut matrices = |tensors: Vec<HostTensor>| -> Result<Vec<B::Matrix>> {
            matrix_bytes += tensors.iter().map(|t| t.as_bytes().len()).sum::<usize>();
            backend.matrices(tensors)
        };
        let embed = matrices(vec![load_checked(source, "model.embed_tokens.weight", &[config.vocab_size, hidden], dtype)?])?.remove(0);
        // Layers wait here until their matrices reach MATRIX_GROUP_BYTES, and the backend
        // places each group's matrices together (see `Backend::matrices`).
        let mut pending: Vec<(LayerVectors<B>, [HostTensor; 4])> = Vec::new();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let mut flush = |pending: &mut Vec<(LayerVectors<B>, [HostTensor; 4])>, layers: &mut Vec<LayerWeights<B>>| -> Result<()> {
            let (vectors, tensors): (Vec<_>, Vec<_>) = pending.drain(..).unzip();
            let mut made = matrices(tensors.into_iter().flatten().collect())?.into_iter();
            for v in vectors {
                let mut next = || made.next().expect("four matrices per layer");
                let (qkv, o_proj, gate_up, down) = (next(), next(), next(), next());
                layers.push(LayerWeights {
                    input_norm: v.input_norm,
                    qkv,
                    qkv_bias: v.qkv_bias,
                    q_norm: v.q_norm,
                    k_norm: v.k_norm,
                    o_proj,
                    post_attention_norm: v.post_attention_norm,
                    gate_up,
                    down,
                });
            }
            Ok(())
        };
        for i in 0..config.num_hidden_layers {
            progress(i, config.num_hidden_layers);
            let p = format!("model.layers.{i}");
            let qkv = concat_rows(vec![
                load_checked(source, &format!("{p}.self_attn.q_proj.weight"), &[q_dim, hidden], dtype)?,
                load_checked(source, &format!("{p}.self_attn.k_proj.weight"), &[kv_dim, hidden], dtype)?,
                load_checked(source, &format!("{p}.self_attn.v_proj.weight"), &[kv_dim, hidden], dtype)?,
            ])?;
            let qkv_bias = if config.attention_bias {
                let values = concat_vectors(vec![
                    load_checked(source, &format!("{p}.self_attn.q_proj.bias"), &[q_dim], DType::F32)?,
                    load_checked(source, &format!("{p}.self_attn.k_proj.bias"), &[kv_dim], DType::F32)?,
                    load_checked(source, &format!("{p}.self_attn.v_proj.bias"), &[kv_dim], DType::F32)?,
                ]);
                let mut buffer = backend.buffer(values.len())?;
                backend.upload(&values, &mut buffer)?;
                Some(buffer)
            } else {
                None
            };
            let (q_norm, k_norm) = if config.qk_norm {
                (Some(vector(&format!("{p}.self_attn.q_norm.weight"), hd)?), Some(vector(&format!("{p}.self_attn.k_norm.weight"), hd)?))
            } else {
                (None, None)
            };
            let gate_up = concat_rows(vec![
                load_checked(source, &format!("{p}.mlp.gate_proj.weight"), &[ffn, hidden], dtype)?,
                load_checked(source, &format!("{p}.mlp.up_proj.weight"), &[ffn, hidden], dtype)?,
            ])?;
            let o_proj = load_checked(source, &format!("{p}.self_attn.o_proj.weight"), &[hidden, q_dim], dtype)?;
            let down = load_checked(source, &format!("{p}.mlp.down_proj.weight"), &[hidden, ffn], dtype)?;
            let vectors = LayerVectors {
                input_norm: vector(&format!("{p}.input_layernorm.weight"), hidden)?,
                qkv_bias,
                q_norm,
                k_norm,
                post_attention_norm: vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
            };
            pending.push((vectors, [qkv, o_proj, gate_up, down]));
            let pending_bytes: usize = pending.iter().flat_map(|(_, t)| t).map(|t| t.as_bytes().len()).sum();
            if pending_bytes >= MATRIX_GROUP_BYTES {
                flush(&mut pending, &mut layers)?;
            }
        }
        flush(&mut pending, &mut layers)?;
        progress(config.num_hidden_layers, config.num_hidden_layers);
        let final_norm = vector("model.norm.weight", hidden)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(matrices(vec![load_checked(source, "lm_head.weight", &[config.vocab_size, hidden], dtype)?])?.remove(0))
        };
        let weights = ModelWeights { embed, layers, final_norm, lm_head, matrix_bytes, dtype };
        backend.tune(&weights.decode_order());
        Ok(weights)
    }

    /// The matrices in the order a decode step reads them.
    pub fn decode_order(&self) -> Vec<&B::Matrix> {
        let layers = self.layers.iter().flat_map(|l| [&l.qkv, &l.o_proj, &l.gate_up, &l.down]);
        layers.chain([self.output_matrix()]).collect()
    }
}
