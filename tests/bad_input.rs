//! Bad model files and inputs give clear errors that name the file and the problem.

use std::path::Path;

use engram::model::config::Architecture;
use engram::model::random::{tiny_config, write_random_model};
use engram::model::ModelFiles;
use engram::{DType, Error};

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_config(Architecture::Llama), DType::F32, 1).unwrap();
    dir
}

fn load_error(dir: &Path) -> Error {
    let files = match ModelFiles::open(dir) {
        Ok(files) => files,
        Err(e) => return e,
    };
    let backend = engram::backend::cpu::CpuBackend::new(1, None).unwrap();
    match engram::Model::load(backend, files, DType::F32, |_, _| {}) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = tiny_dir();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_error(dir.path());
        assert!(matches!(err, Error::Format { .. }), "cut {cut}: {err}");
        assert!(err.to_string().contains("model.safetensors"), "cut {cut}: {err}");
    }
}

#[test]
fn garbage_safetensors_header_is_refused() {
    let dir = tiny_dir();
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] = b'!';
    bytes[11] = b'{';
    std::fs::write(&path, &bytes).unwrap();
    let err = load_error(dir.path());
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn missing_tokenizer_is_reported() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_error(dir.path());
    assert!(err.to_string().contains("missing tokenizer.json"), "{err}");
}

#[test]
fn unsupported_architecture_is_reported() {
    let dir = tiny_dir();
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&path, text).unwrap();
    let err = load_error(dir.path());
    assert!(matches!(err, Error::Unsupported(_)) && err.to_string().contains("gpt_neox"), "{err}");
}

#[test]
fn malformed_config_names_the_file() {
    let dir = tiny_dir();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let err = load_error(dir.path());
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn a_config_that_disagrees_with_the_tensors_names_the_tensor() {
    let dir = tiny_dir();
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["intermediate_size"] = serde_json::json!(100);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.to_string().contains("mlp.gate_proj.weight") && err.to_string().contains("shape"), "{err}");
}

#[test]
fn non_finite_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(Architecture::Llama);
    let mut tensors = engram::model::random::random_tensors(&config, 3);
    if let engram::TensorData::F32(values) = &mut tensors[3].1.data {
        values[5] = f32::NAN;
    }
    let bad_name = tensors[3].0.clone();
    write_random_model(dir.path(), &config, DType::F32, 3).unwrap();
    engram::model::safetensors::write_safetensors(&dir.path().join("model.safetensors"), &tensors, None).unwrap();
    let err = load_error(dir.path());
    assert!(err.to_string().contains(&bad_name) && err.to_string().contains("non-finite"), "{err}");
}

#[test]
fn a_missing_model_path_is_reported() {
    let err = ModelFiles::open(Path::new("/nonexistent/model.gguf")).err().expect("must fail");
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}
