//! Converting a GGUF model file into a Hugging Face model directory: config.json,
//! model.safetensors (Hugging Face names and layout, dequantized), tokenizer.json,
//! tokenizer_config.json (with the chat template) and generation_config.json.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use safetensors::tensor::{Dtype as StDtype, View};

use crate::error::{Error, Result};
use crate::model::gguf::GgufFile;
use crate::model::gguf_model::GgufModelSource;
use crate::model::gguf_tokenizer::{tokenizer_config_from_gguf, tokenizer_from_gguf, tokenizer_json_from_gguf};
use crate::model::TensorSource;
use crate::tensor::DType;

/// One tensor converted only when the safetensors writer asks for its bytes, so that at most
/// one dequantized tensor is in memory at a time. A failure is kept in `error` (the writer's
/// `View::data` cannot fail) and zero bytes of the right length are written in its place; the
/// caller then discards the file.
struct LazyTensor<'a> {
    source: &'a GgufModelSource,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    error: &'a RefCell<Option<Error>>,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> StDtype {
        match self.dtype {
            DType::F32 => StDtype::F32,
            DType::F16 => StDtype::F16,
            DType::BF16 => StDtype::BF16,
            other => unreachable!("convert_gguf_to_hf refuses {other} before writing"),
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.source.load(&self.name, self.dtype) {
            Ok(t) if t.shape == self.shape => Cow::Owned(t.as_bytes().to_vec()),
            Ok(t) => {
                self.error.borrow_mut().get_or_insert(Error::Shape(format!(
                    "tensor '{}' loaded with shape {:?}, expected {:?}",
                    self.name, t.shape, self.shape
                )));
                Cow::Owned(vec![0; self.data_len()])
            }
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes().expect("a float dtype, checked on entry")
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidInput(format!("{}: cannot serialise JSON: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Converts a GGUF model into a Hugging Face directory with weights stored as `dtype`.
///
/// Everything is validated (architecture, tokenizer, tensor types) before anything is written;
/// tied embeddings produce no `lm_head.weight`. Fails with [`Error::Unsupported`] for GGUF files
/// whose RoPE scaling is stored as a `rope_freqs` tensor (no config.json equivalent yet).
pub fn convert_gguf_to_hf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    if dtype.size_in_bytes().is_none() {
        return Err(Error::InvalidInput(format!(
            "a Hugging Face directory holds f32, f16 or bf16 weights, not {dtype} (use `engram quantize` for GGUF files)"
        )));
    }
    let file = Arc::new(GgufFile::open(gguf_path)?);
    let source = GgufModelSource::from_file(Arc::clone(&file))?;
    let config = source.config().clone();

    // Validate everything before writing anything.
    tokenizer_from_gguf(&file)?;
    let tokenizer_json = tokenizer_json_from_gguf(&file)?;
    let tokenizer_config = tokenizer_config_from_gguf(&file)?;
    if source.contains("rope_freqs.weight") {
        return Err(Error::Unsupported(format!(
            "{}: RoPE frequency factors (rope_freqs.weight) cannot be expressed in config.json yet",
            gguf_path.display()
        )));
    }
    let names = source.tensor_names();
    for name in &names {
        let gguf_name = source.gguf_name(name).unwrap_or(name);
        if let Some(info) = file.tensor_info(gguf_name) {
            if !info.ggml_type.can_dequantize() {
                return Err(Error::Unsupported(format!(
                    "{}: tensor '{gguf_name}' has ggml type {}, which engram cannot decode yet",
                    gguf_path.display(),
                    info.ggml_type
                )));
            }
        }
    }
    if !source.contains("model.embed_tokens.weight") {
        return Err(Error::format(gguf_path, "the model has no token_embd.weight"));
    }

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut config_json = config.to_config_json();
    config_json["torch_dtype"] = serde_json::json!(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        _ => "bfloat16",
    });
    write_json(&out_dir.join("config.json"), &config_json)?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer_json)?;
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    let mut generation = serde_json::json!({"_from_model_config": true});
    if let Some(bos) = config.bos_token_id {
        generation["bos_token_id"] = serde_json::json!(bos);
    }
    match config.eos_token_ids.as_slice() {
        [] => {}
        [one] => generation["eos_token_id"] = serde_json::json!(one),
        many => generation["eos_token_id"] = serde_json::json!(many),
    }
    write_json(&out_dir.join("generation_config.json"), &generation)?;

    let error = RefCell::new(None);
    let mut views = Vec::with_capacity(names.len());
    for name in names {
        let shape = source.shape(&name)?;
        views.push((name.clone(), LazyTensor { source: &source, name, dtype, shape, error: &error }));
    }
    let final_path = out_dir.join("model.safetensors");
    let tmp_path = out_dir.join("model.safetensors.partial");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp_path)
        .map_err(|e| Error::InvalidInput(format!("{}: writing safetensors failed: {e}", tmp_path.display())));
    if let Some(e) = error.into_inner() {
        let _ = std::fs::remove_file(&tmp_path);
        return Err(e);
    }
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp_path);
        return Err(e);
    }
    std::fs::rename(&tmp_path, &final_path).map_err(|e| Error::io(&final_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use crate::model::gguf::{write_gguf, GgufValue};
    use crate::model::gguf_model::testing::{s, tiny_model};
    use half::{bf16, f16};
    use safetensors::SafeTensors;
    use std::str::FromStr;

    fn read_f32(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, StDtype, Vec<f32>) {
        let t = st.tensor(name).unwrap();
        let values = match t.dtype() {
            StDtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StDtype::F16 => t.data().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StDtype::BF16 => t.data().chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => panic!("unexpected dtype {other:?}"),
        };
        (t.shape().to_vec(), t.dtype(), values)
    }

    #[test]
    fn round_trip_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        for (arch, tied, bias) in [("llama", true, false), ("qwen2", false, true)] {
            let (md, tensors, expected) = tiny_model(arch, tied, bias);
            let gguf = dir.path().join(format!("{arch}.gguf"));
            write_gguf(&gguf, &md, &tensors).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let out = dir.path().join(format!("{arch}-{dtype}"));
                convert_gguf_to_hf(&gguf, &out, dtype).unwrap();

                let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
                let st = SafeTensors::deserialize(&bytes).unwrap();
                assert_eq!(st.names().len(), expected.len());
                assert_eq!(st.tensor("lm_head.weight").is_ok(), !tied);
                for (name, (shape, values)) in &expected {
                    let (got_shape, got_dtype, got) = read_f32(&st, name);
                    assert_eq!(&got_shape, shape, "{name}");
                    let want: Vec<f32> = match dtype {
                        DType::F32 => values.clone(),
                        DType::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                        DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                        other => unreachable!("not converted to {other}"),
                    };
                    assert_eq!(got_dtype.to_string().to_lowercase(), dtype.name(), "{name}");
                    assert_eq!(got, want, "{arch} {dtype} {name}");
                }

                let config = ModelConfig::from_config_json(&out.join("config.json")).unwrap();
                let original = GgufModelSource::open(&gguf).unwrap().config().clone();
                assert_eq!(config, original);
                let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
                let reference = tokenizer_from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
                for text in ["hello world<|im_end|>", "a12 ✓ <tool>"] {
                    assert_eq!(
                        tok.encode(text, true).unwrap().get_ids(),
                        reference.encode(text, true).unwrap().get_ids()
                    );
                }
                let tc: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
                assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
                assert_eq!(tc["eos_token"], "<|im_end|>");
                let gc: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
                        .unwrap();
                assert_eq!((gc["bos_token_id"].as_u64(), gc["eos_token_id"].as_u64()), (Some(1), Some(2)));
                assert!(!out.join("model.safetensors.partial").exists());
            }
        }
        assert_eq!(DType::from_str("bf16").unwrap(), DType::BF16);
    }

    #[test]
    fn bad_inputs_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        type Edit = Box<dyn Fn(&mut Vec<(String, GgufValue)>)>;
        let cases: Vec<(&str, Edit, bool)> = vec![
            ("no-tokenizer", Box::new(|md| md.retain(|(k, _)| !k.starts_with("tokenizer."))), false),
            ("arch", Box::new(|md| md[0].1 = s("falcon")), true),
            (
                "sentencepiece",
                Box::new(|md| {
                    md.retain(|(k, _)| k != "tokenizer.ggml.model");
                    md.push(("tokenizer.ggml.model".into(), s("llama")));
                }),
                true,
            ),
        ];
        for (what, edit, unsupported) in cases {
            let (mut md, tensors, _) = tiny_model("llama", true, false);
            edit(&mut md);
            let gguf = dir.path().join(format!("{what}.gguf"));
            write_gguf(&gguf, &md, &tensors).unwrap();
            let err = convert_gguf_to_hf(&gguf, &out, DType::F32).unwrap_err();
            assert_eq!(matches!(err, Error::Unsupported(_)), unsupported, "{what}: {err}");
            assert_eq!(matches!(err, Error::Format { .. }), !unsupported, "{what}: {err}");
            assert!(err.to_string().contains(&gguf.display().to_string()), "{what}: {err}");
            assert!(!out.exists(), "{what}: output written despite the error");
        }
        // Truncated file.
        let (md, tensors, _) = tiny_model("llama", true, false);
        let gguf = dir.path().join("cut.gguf");
        write_gguf(&gguf, &md, &tensors).unwrap();
        let bytes = std::fs::read(&gguf).unwrap();
        std::fs::write(&gguf, &bytes[..bytes.len() / 2]).unwrap();
        let err = convert_gguf_to_hf(&gguf, &out, DType::F32).unwrap_err();
        assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("cut.gguf"), "{err}");
        assert!(!out.exists());
    }

    /// Converts the real model into `$ENGRAM_CONVERT_OUT` (for checking the directory with
    /// transformers); run with `cargo test --lib convert_real_model -- --ignored`.
    #[test]
    #[ignore]
    fn convert_real_model() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let out = std::env::var("ENGRAM_CONVERT_OUT").unwrap_or_else(|_| "/tmp/engram-smollm2-hf".into());
        convert_gguf_to_hf(&path, Path::new(&out), DType::F32).unwrap();
    }
}
