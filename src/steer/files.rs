//! Steering-vector files: llama.cpp control vectors (GGUF), safetensors and `.npy`, read and
//! written with the same layer convention, plus the per-layer statistics `engram vectors show` prints.
//!
//! Layer `i` is the residual stream at the output of decoder block `i` everywhere (transformers'
//! `hidden_states[i + 1]`). In a llama.cpp control vector that is the tensor `direction.{i}`:
//! llama.cpp's `common_control_vector_load_one` stores `direction.N` at offset `n_embd * (N - 1)`
//! of its buffer and `llama_adapter_cvec::apply` gives block `il` the data at offset
//! `n_embd * (il - 1)`, looping from `il = 1`; the two shifts cancel, so `direction.N` is added
//! after block `N`'s FFN residual add (`build_cvec(cur, il)` just before `l_out`). Block 0 cannot
//! be steered by llama.cpp: a `direction.0` makes the loader log "invalid (zero) direction tensor
//! layer index" and skip the whole file. engram reads and writes layer 0 (it can steer it) and
//! warns when a GGUF it writes carries one.
//!
//! Formats:
//! - GGUF: `general.architecture = "controlvector"`, `controlvector.model_hint` (string),
//!   `controlvector.layer_count` (integer), one F32 1-D tensor `direction.{i}` per layer with a
//!   direction. llama.cpp reads no metadata at all; repeng writes `layer_count` as the number of
//!   directions and llama.cpp's cvector-generator as `n_layer - 1`, so on reading, the layer count
//!   is the larger of the metadata value and the highest direction index + 1. engram writes the
//!   vector's own layer count (as i32, like llama.cpp's generator).
//! - safetensors: one F32 tensor `direction.{i}` of shape `[hidden]` per layer; metadata
//!   `format = "engram-steering-vector"`, `layer_count`, and `model_hint` when known.
//! - `.npy`: a 2-D float32 array `[layer_count, hidden]`; an all-zero row means no direction.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};

use super::vector::SteeringVector;
use crate::error::{Error, Result};
use crate::model::gguf::{write_gguf, GgufFile, GgufTensorToWrite, GgufValue};
use crate::model::quant::GgmlType;
use crate::tensor::HostTensor;

/// The `format` value engram puts in a steering vector's safetensors metadata.
pub const SAFETENSORS_FORMAT: &str = "engram-steering-vector";
/// `general.architecture` of a llama.cpp control vector.
pub const CONTROL_VECTOR_ARCH: &str = "controlvector";

/// The on-disk formats a steering vector can have, chosen by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorFormat {
    /// llama.cpp control vector (`.gguf`).
    Gguf,
    /// One tensor per layer (`.safetensors`).
    Safetensors,
    /// A `[layer_count, hidden]` float32 array (`.npy`).
    Npy,
}

impl VectorFormat {
    /// The format named by `path`'s extension (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("gguf") => Ok(VectorFormat::Gguf),
            Some("safetensors") => Ok(VectorFormat::Safetensors),
            Some("npy") => Ok(VectorFormat::Npy),
            _ => Err(Error::InvalidInput(format!(
                "{}: cannot tell the steering vector format from the extension (expected .gguf, .safetensors or .npy)",
                path.display()
            ))),
        }
    }
}

/// Reads a steering vector, choosing the format by extension. Returns the vector and warnings
/// (things that are legal but worth telling the user), which the caller decides how to show.
pub fn read_vector(path: impl AsRef<Path>) -> Result<(SteeringVector, Vec<String>)> {
    let path = path.as_ref();
    match VectorFormat::from_path(path)? {
        VectorFormat::Gguf => read_control_vector_gguf(path),
        VectorFormat::Safetensors => read_safetensors_vector(path),
        VectorFormat::Npy => read_npy_vector(path),
    }
}

/// Writes a steering vector, choosing the format by extension; returns warnings (for instance a
/// layer-0 direction in a GGUF, which llama.cpp refuses).
pub fn write_vector(path: impl AsRef<Path>, vector: &SteeringVector) -> Result<Vec<String>> {
    let path = path.as_ref();
    match VectorFormat::from_path(path)? {
        VectorFormat::Gguf => write_control_vector_gguf(path, vector),
        VectorFormat::Safetensors => write_safetensors_vector(path, vector),
        VectorFormat::Npy => write_npy_vector(path, vector),
    }
}

/// Parses the layer index of a tensor named `direction.N` (decimal, no sign, no leading zeros),
/// or `None` for any other name.
fn direction_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("direction.")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok()
}

/// Checks every value is finite; the error names the file and the tensor.
fn check_finite(path: &Path, what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::format(path, format!("{what}: non-finite value {} at element {i}", values[i]))),
        None => Ok(()),
    }
}

/// Builds a vector of `layer_count` layers from (layer, values) pairs already checked for width
/// and finiteness.
fn assemble(
    path: &Path,
    hidden: usize,
    layer_count: usize,
    directions: Vec<(usize, Vec<f32>)>,
    model_hint: Option<String>,
) -> Result<SteeringVector> {
    let mut vector = SteeringVector::new(hidden, layer_count);
    vector.model_hint = model_hint;
    for (layer, values) in directions {
        vector.set(layer, values).map_err(|e| Error::format(path, e.to_string()))?;
    }
    Ok(vector)
}

fn check_writable(path: &Path, vector: &SteeringVector) -> Result<()> {
    if vector.hidden_size == 0 {
        return Err(Error::InvalidInput(format!("{}: cannot write a steering vector of width 0", path.display())));
    }
    for (layer, d) in vector.directions.iter().enumerate() {
        if let Some(d) = d {
            if d.len() != vector.hidden_size {
                return Err(Error::Shape(format!(
                    "{}: layer {layer} has width {} but the vector's hidden size is {}",
                    path.display(),
                    d.len(),
                    vector.hidden_size
                )));
            }
            if let Some(i) = d.iter().position(|v| !v.is_finite()) {
                return Err(Error::InvalidInput(format!("{}: layer {layer}: non-finite value at element {i}", path.display())));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GGUF (llama.cpp control vectors)

/// Reads a llama.cpp control vector. F16 directions are accepted (decoded to f32) with a warning,
/// since llama.cpp itself only loads F32 ones.
pub fn read_control_vector_gguf(path: impl AsRef<Path>) -> Result<(SteeringVector, Vec<String>)> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    let mut warnings = Vec::new();
    match file.get_str("general.architecture")? {
        Some(CONTROL_VECTOR_ARCH) => {}
        Some(other) => {
            return Err(Error::format(
                path,
                format!("not a control vector: general.architecture is '{other}', expected '{CONTROL_VECTOR_ARCH}' (is this a model file?)"),
            ))
        }
        None => {
            // llama.cpp reads no metadata, so a bare file of direction.N tensors still works there.
            if file.tensors().is_empty() {
                return Err(Error::format(path, "not a control vector: no general.architecture and no tensors"));
            }
            warnings.push(format!(
                "{}: no general.architecture; reading it as a control vector because every tensor must be direction.N",
                path.display()
            ));
        }
    }
    let model_hint = file.get_str("controlvector.model_hint")?.filter(|s| !s.is_empty()).map(str::to_string);
    let declared = file.get_u64("controlvector.layer_count")?;
    if file.tensors().is_empty() {
        return Err(Error::format(path, "control vector has no direction tensors"));
    }

    let mut hidden: Option<usize> = None;
    let mut directions = Vec::with_capacity(file.tensors().len());
    for t in file.tensors() {
        let layer = direction_index(&t.name).ok_or_else(|| {
            Error::format(path, format!("tensor '{}' is not named direction.N (N a layer index)", t.name))
        })?;
        // ggml_n_dims: trailing dimensions of size 1 do not count, as in llama.cpp's check.
        let rank = t.dims.iter().rposition(|&d| d != 1).map_or(1, |i| i + 1);
        if rank != 1 {
            return Err(Error::format(path, format!("tensor '{}' has shape {:?}; a direction must be one-dimensional", t.name, t.shape())));
        }
        let width = t.n_elements as usize;
        if width == 0 {
            return Err(Error::format(path, format!("tensor '{}' is empty", t.name)));
        }
        match t.ggml_type {
            GgmlType::F32 => {}
            GgmlType::F16 => warnings.push(format!(
                "{}: '{}' is F16; engram decodes it, llama.cpp refuses non-F32 directions",
                path.display(),
                t.name
            )),
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor '{}' has type {}; a direction must be F32 (or F16)", t.name, other.name()),
                ))
            }
        }
        match hidden {
            None => hidden = Some(width),
            Some(h) if h != width => {
                return Err(Error::format(path, format!("tensor '{}' has width {width} but earlier directions have width {h}", t.name)))
            }
            Some(_) => {}
        }
        let values = file.dequantize_to_f32(&t.name)?;
        check_finite(path, &t.name, &values)?;
        if layer == 0 {
            warnings.push(format!(
                "{}: has direction.0 (the output of block 0); engram applies it, but llama.cpp refuses the whole file",
                path.display()
            ));
        }
        directions.push((layer, values));
    }
    let hidden = hidden.unwrap_or(0);
    let max_index = directions.iter().map(|(l, _)| *l).max().unwrap_or(0);
    let declared = usize::try_from(declared.unwrap_or(0)).unwrap_or(usize::MAX);
    if declared > 1 << 20 {
        return Err(Error::format(path, format!("controlvector.layer_count = {declared} is implausible")));
    }
    let layer_count = declared.max(max_index + 1);
    Ok((assemble(path, hidden, layer_count, directions, model_hint)?, warnings))
}

/// Writes a llama.cpp control vector: the layout of llama.cpp's cvector-generator and repeng's
/// `export_gguf`, with `controlvector.layer_count` = the vector's layer count (i32). The model
/// hint is written as an empty string when unknown (repeng's importer requires the key). Returns
/// a warning if layer 0 carries a direction, since llama.cpp refuses such a file.
pub fn write_control_vector_gguf(path: impl AsRef<Path>, vector: &SteeringVector) -> Result<Vec<String>> {
    let path = path.as_ref();
    check_writable(path, vector)?;
    let layers = vector.layers();
    if layers.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: the steering vector has no directions; a control vector GGUF without tensors cannot record its width",
            path.display()
        )));
    }
    let layer_count = i32::try_from(vector.layer_count())
        .map_err(|_| Error::InvalidInput(format!("{}: {} layers do not fit in an i32", path.display(), vector.layer_count())))?;
    let mut warnings = Vec::new();
    if layers.first() == Some(&0) {
        warnings.push(format!(
            "{}: layer 0 is written as direction.0, which llama.cpp refuses (its loader skips the whole file); \
             drop layer 0 if llama.cpp is to load this file",
            path.display()
        ));
    }
    let metadata = vec![
        ("general.architecture".to_string(), GgufValue::String(CONTROL_VECTOR_ARCH.to_string())),
        ("controlvector.model_hint".to_string(), GgufValue::String(vector.model_hint.clone().unwrap_or_default())),
        ("controlvector.layer_count".to_string(), GgufValue::I32(layer_count)),
    ];
    let tensors = layers
        .iter()
        .filter_map(|&l| vector.get(l).map(|d| (l, d)))
        .map(|(l, d)| GgufTensorToWrite::from_f32(format!("direction.{l}"), vec![d.len()], GgmlType::F32, d))
        .collect::<Result<Vec<_>>>()?;
    write_gguf(path, &metadata, &tensors)?;
    Ok(warnings)
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// Reads a steering vector from safetensors: tensors `direction.{i}`, F32 (F16 and BF16 are
/// decoded), shape `[hidden]`; `layer_count` from the metadata when present.
pub fn read_safetensors_vector(path: impl AsRef<Path>) -> Result<(SteeringVector, Vec<String>)> {
    use safetensors::tensor::Dtype;
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut warnings = Vec::new();
    match meta.get("format").map(String::as_str) {
        Some(SAFETENSORS_FORMAT) => {}
        Some(other) => {
            return Err(Error::format(path, format!("metadata format is '{other}', not a steering vector ('{SAFETENSORS_FORMAT}')")))
        }
        None => warnings.push(format!(
            "{}: no metadata format '{SAFETENSORS_FORMAT}'; reading it as a steering vector because every tensor must be direction.N",
            path.display()
        )),
    }
    let mut names = st.names();
    names.sort();
    if names.is_empty() {
        return Err(Error::format(path, "steering vector has no direction tensors"));
    }
    let mut hidden: Option<usize> = None;
    let mut directions = Vec::with_capacity(names.len());
    for name in names {
        let layer = direction_index(name)
            .ok_or_else(|| Error::format(path, format!("tensor '{name}' is not named direction.N (N a layer index)")))?;
        let view = st.tensor(name).map_err(|e| Error::format(path, format!("tensor '{name}': {e}")))?;
        if view.shape().len() != 1 {
            return Err(Error::format(path, format!("tensor '{name}' has shape {:?}; a direction must be one-dimensional", view.shape())));
        }
        let width = view.shape()[0];
        if width == 0 {
            return Err(Error::format(path, format!("tensor '{name}' is empty")));
        }
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(Error::format(path, format!("tensor '{name}' has dtype {other:?}; a direction must be F32 (or F16/BF16)"))),
        };
        if values.len() != width {
            return Err(Error::format(path, format!("tensor '{name}' holds {} values for shape [{width}]", values.len())));
        }
        match hidden {
            None => hidden = Some(width),
            Some(h) if h != width => {
                return Err(Error::format(path, format!("tensor '{name}' has width {width} but other directions have width {h}")))
            }
            Some(_) => {}
        }
        check_finite(path, name, &values)?;
        directions.push((layer, values));
    }
    let max_index = directions.iter().map(|(l, _)| *l).max().unwrap_or(0);
    let layer_count = match meta.get("layer_count") {
        None => max_index + 1,
        Some(s) => {
            let n: usize =
                s.trim().parse().map_err(|_| Error::format(path, format!("metadata layer_count '{s}' is not a number")))?;
            if n <= max_index {
                return Err(Error::format(path, format!("metadata layer_count = {n} but there is a direction for layer {max_index}")));
            }
            n
        }
    };
    let model_hint = meta.get("model_hint").filter(|s| !s.is_empty()).cloned();
    Ok((assemble(path, hidden.unwrap_or(0), layer_count, directions, model_hint)?, warnings))
}

/// Writes a steering vector as safetensors (see the module docs for the layout).
pub fn write_safetensors_vector(path: impl AsRef<Path>, vector: &SteeringVector) -> Result<Vec<String>> {
    let path = path.as_ref();
    check_writable(path, vector)?;
    let tensors = vector
        .layers()
        .into_iter()
        .filter_map(|l| vector.get(l).map(|d| (l, d)))
        .map(|(l, d)| HostTensor::from_f32(vec![d.len()], d.to_vec()).map(|t| (format!("direction.{l}"), t)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), SAFETENSORS_FORMAT.to_string());
    meta.insert("layer_count".to_string(), vector.layer_count().to_string());
    meta.insert("hidden_size".to_string(), vector.hidden_size.to_string());
    if let Some(hint) = &vector.model_hint {
        meta.insert("model_hint".to_string(), hint.clone());
    }
    crate::model::safetensors::write_safetensors(path, &tensors, Some(meta))?;
    let mut warnings = Vec::new();
    if tensors.is_empty() {
        warnings.push(format!("{}: the steering vector has no directions; wrote an empty file", path.display()));
    }
    Ok(warnings)
}

// ---------------------------------------------------------------------------------------------
// .npy

/// Reads a `[layer_count, hidden]` float32 `.npy` (C or Fortran order); all-zero rows are layers
/// without a direction.
pub fn read_npy_vector(path: impl AsRef<Path>) -> Result<(SteeringVector, Vec<String>)> {
    use npyz::{DType, TypeChar};
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| Error::format(path, format!("not a valid .npy file: {e}")))?;
    match npy.dtype() {
        DType::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 4 => {}
        other => {
            return Err(Error::format(
                path,
                format!("dtype '{}' is not float32; save the array with dtype=np.float32", other.descr()),
            ))
        }
    }
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        return Err(Error::format(path, format!("array of shape {shape:?}; a steering vector is 2-D [layer_count, hidden]")));
    }
    let (layers, hidden) = (shape[0] as usize, shape[1] as usize);
    if layers == 0 || hidden == 0 {
        return Err(Error::format(path, format!("array of shape {shape:?} is empty")));
    }
    let fortran = matches!(npy.order(), npyz::Order::Fortran);
    let values: Vec<f32> = npy.into_vec().map_err(|e| Error::format(path, format!("cannot read the array data: {e}")))?;
    if values.len() != layers * hidden {
        return Err(Error::format(path, format!("array of shape {shape:?} holds {} values", values.len())));
    }
    check_finite(path, "array", &values)?;
    let mut directions = Vec::new();
    for layer in 0..layers {
        let row: Vec<f32> = if fortran {
            (0..hidden).map(|j| values[j * layers + layer]).collect()
        } else {
            values[layer * hidden..(layer + 1) * hidden].to_vec()
        };
        if row.iter().any(|&v| v != 0.0) {
            directions.push((layer, row));
        }
    }
    let mut warnings = Vec::new();
    if directions.is_empty() {
        warnings.push(format!("{}: every row is zero, so no layer has a direction", path.display()));
    }
    Ok((assemble(path, hidden, layers, directions, None)?, warnings))
}

/// Writes a `[layer_count, hidden]` float32 `.npy`, zero rows for layers without a direction.
/// The model hint cannot be stored (a warning says so), nor can an all-zero direction be told
/// from none.
pub fn write_npy_vector(path: impl AsRef<Path>, vector: &SteeringVector) -> Result<Vec<String>> {
    use npyz::WriterBuilder;
    use std::io::Write;
    let path = path.as_ref();
    check_writable(path, vector)?;
    if vector.layer_count() == 0 {
        return Err(Error::InvalidInput(format!("{}: cannot write a steering vector of 0 layers as .npy", path.display())));
    }
    let mut warnings = Vec::new();
    if let Some(hint) = &vector.model_hint {
        warnings.push(format!("{}: .npy cannot store the model hint '{hint}'; it is dropped", path.display()));
    }
    for l in vector.layers() {
        if vector.get(l).is_some_and(|d| d.iter().all(|&v| v == 0.0)) {
            warnings.push(format!("{}: layer {l}'s direction is all zeros and will read back as no direction", path.display()));
        }
    }
    let h = vector.hidden_size;
    let mut data = vec![0f32; vector.layer_count() * h];
    for l in vector.layers() {
        if let Some(d) = vector.get(l) {
            data[l * h..(l + 1) * h].copy_from_slice(d);
        }
    }
    let mut buf = Vec::new();
    {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[vector.layer_count() as u64, h as u64])
            .writer(&mut buf)
            .begin_nd()
            .map_err(|e| Error::io(path, e))?;
        writer.extend(data.iter().copied()).map_err(|e| Error::io(path, e))?;
        writer.finish().map_err(|e| Error::io(path, e))?;
    }
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&buf).map_err(|e| Error::io(path, e))?;
    Ok(warnings)
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// What `engram vectors show` prints about a vector.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VectorStats {
    /// Width of every direction.
    pub hidden_size: usize,
    /// Layers of the model the vector was made for.
    pub layer_count: usize,
    /// The model hint, if any.
    pub model_hint: Option<String>,
    /// Layers that carry a direction, ascending; the rows and columns of `cosine`.
    pub layers: Vec<usize>,
    /// L2 norm of each direction in `layers`.
    pub norms: Vec<f64>,
    /// `cosine[a][b]`: cosine similarity between the directions of `layers[a]` and `layers[b]`
    /// (0 where either is the zero vector).
    pub cosine: Vec<Vec<f64>>,
}

/// Per-layer norms and the layer-by-layer cosine similarity matrix (computed in f64).
pub fn describe(vector: &SteeringVector) -> VectorStats {
    let layers = vector.layers();
    let dirs: Vec<&[f32]> = layers.iter().filter_map(|&l| vector.get(l)).collect();
    let norms: Vec<f64> = dirs.iter().map(|d| d.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt()).collect();
    let cosine = (0..dirs.len())
        .map(|a| {
            (0..dirs.len())
                .map(|b| {
                    if norms[a] == 0.0 || norms[b] == 0.0 {
                        return 0.0;
                    }
                    let dot: f64 = dirs[a].iter().zip(dirs[b]).map(|(&x, &y)| x as f64 * y as f64).sum();
                    (dot / (norms[a] * norms[b])).clamp(-1.0, 1.0)
                })
                .collect()
        })
        .collect();
    VectorStats {
        hidden_size: vector.hidden_size,
        layer_count: vector.layer_count(),
        model_hint: vector.model_hint.clone(),
        layers,
        norms,
        cosine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::encode_gguf;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn sample(with_layer0: bool) -> SteeringVector {
        let mut v = SteeringVector::new(6, 5);
        v.model_hint = Some("llama".into());
        if with_layer0 {
            v.set(0, vec![0.5, -0.25, 0.0, 1.0, 2.0, -3.0]).unwrap();
        }
        v.set(1, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        v.set(3, vec![-1.5e-7, 0.1, f32::MAX, -f32::MIN_POSITIVE, 0.0, 7.0]).unwrap();
        v
    }

    #[test]
    fn gguf_py_fixture_matches_its_npy() {
        let (g, gw) = read_vector(fixture("controlvector_gguf_py.gguf")).unwrap();
        let (n, nw) = read_vector(fixture("controlvector_gguf_py.npy")).unwrap();
        assert!(gw.is_empty() && nw.is_empty(), "{gw:?} {nw:?}");
        assert_eq!(g.model_hint.as_deref(), Some("llama"));
        // layer_count metadata is 3 (repeng writes the number of directions); direction.4 makes it 5.
        assert_eq!(g.layer_count(), 5);
        assert_eq!(g.hidden_size, 8);
        assert_eq!(g.layers(), vec![1, 2, 4]);
        assert_eq!(g.get(4).unwrap()[0], 4.0);
        assert_eq!(g.directions, n.directions); // bit-exact
    }

    #[test]
    fn gguf_round_trip_and_layer0_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.gguf");
        let v = sample(false);
        assert!(write_vector(&p, &v).unwrap().is_empty());
        let (r, w) = read_vector(&p).unwrap();
        assert!(w.is_empty());
        assert_eq!(r, v);

        let v0 = sample(true);
        let w = write_vector(&p, &v0).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("direction.0") && w[0].contains("llama.cpp"), "{w:?}");
        let (r, rw) = read_vector(&p).unwrap();
        assert_eq!(r, v0);
        assert!(rw.iter().any(|m| m.contains("direction.0")));
        // What we wrote is the llama.cpp layout.
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), Some("controlvector"));
        assert_eq!(f.get("controlvector.layer_count"), Some(&GgufValue::I32(5)));
        let t = f.tensor_info("direction.3").unwrap();
        assert_eq!((t.dims.clone(), t.ggml_type), (vec![6], GgmlType::F32));
    }

    #[test]
    fn safetensors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.safetensors");
        for v in [sample(true), { let mut v = sample(false); v.model_hint = None; v }] {
            assert!(write_vector(&p, &v).unwrap().is_empty());
            let (r, w) = read_vector(&p).unwrap();
            assert!(w.is_empty());
            assert_eq!(r, v);
        }
    }

    #[test]
    fn npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.npy");
        let mut v = sample(true);
        let w = write_vector(&p, &v).unwrap();
        assert!(w.iter().any(|m| m.contains("model hint")));
        v.model_hint = None;
        let (r, w) = read_vector(&p).unwrap();
        assert!(w.is_empty());
        assert_eq!(r, v);
    }

    fn write_gguf_bytes(dir: &Path, name: &str, metadata: &[(String, GgufValue)], tensors: &[GgufTensorToWrite<'_>]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, encode_gguf(metadata, tensors).unwrap()).unwrap();
        p
    }

    fn arch(a: &str) -> (String, GgufValue) {
        ("general.architecture".to_string(), GgufValue::String(a.to_string()))
    }

    fn err_of(p: &Path) -> String {
        let e = read_vector(p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "error does not name the file: {e}");
        e
    }

    #[test]
    fn gguf_refusals_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let t = |name: &str, shape: Vec<usize>, ty: GgmlType, v: &[f32]| GgufTensorToWrite::from_f32(name, shape, ty, v).unwrap();
        let cv = [arch("controlvector")];

        let p = write_gguf_bytes(d, "model.gguf", &[arch("llama")], &[t("direction.1", vec![4], GgmlType::F32, &[1.0; 4])]);
        assert!(err_of(&p).contains("not a control vector"));
        let p = write_gguf_bytes(d, "nan.gguf", &cv, &[t("direction.1", vec![4], GgmlType::F32, &[1.0, f32::NAN, 0.0, 0.0])]);
        assert!(err_of(&p).contains("non-finite"));
        let p = write_gguf_bytes(d, "inf.gguf", &cv, &[t("direction.1", vec![2], GgmlType::F32, &[f32::INFINITY, 0.0])]);
        assert!(err_of(&p).contains("non-finite"));
        let p = write_gguf_bytes(
            d,
            "width.gguf",
            &cv,
            &[t("direction.1", vec![4], GgmlType::F32, &[1.0; 4]), t("direction.2", vec![3], GgmlType::F32, &[1.0; 3])],
        );
        assert!(err_of(&p).contains("width"));
        let p = write_gguf_bytes(d, "rank.gguf", &cv, &[t("direction.1", vec![2, 4], GgmlType::F32, &[1.0; 8])]);
        assert!(err_of(&p).contains("one-dimensional"));
        let p = write_gguf_bytes(d, "q8.gguf", &cv, &[t("direction.1", vec![32], GgmlType::Q8_0, &[1.0; 32])]);
        assert!(err_of(&p).contains("F32"));
        let p = write_gguf_bytes(d, "name.gguf", &cv, &[t("blk.0.attn_q.weight", vec![4], GgmlType::F32, &[1.0; 4])]);
        assert!(err_of(&p).contains("direction.N"));
        let p = write_gguf_bytes(d, "zeros.gguf", &cv, &[t("direction.01", vec![4], GgmlType::F32, &[1.0; 4])]);
        assert!(err_of(&p).contains("direction.N"));
        let p = write_gguf_bytes(d, "empty.gguf", &cv, &[]);
        assert!(err_of(&p).contains("no direction tensors"));
        let p = d.join("missing.gguf");
        assert!(matches!(read_vector(&p), Err(Error::Io { .. })));
        assert!(err_of(&p).contains("missing.gguf"));

        // F16 is decoded, with a warning that llama.cpp would not take it; [n, 1] counts as 1-D.
        let p = write_gguf_bytes(
            d,
            "f16.gguf",
            &cv,
            &[t("direction.2", vec![4], GgmlType::F16, &[0.5, -1.0, 2.0, 0.0]), t("direction.3", vec![1, 4], GgmlType::F32, &[1.0; 4])],
        );
        let (v, w) = read_vector(&p).unwrap();
        assert_eq!(v.get(2).unwrap(), &[0.5, -1.0, 2.0, 0.0]);
        assert_eq!(v.layer_count(), 4);
        assert!(w.iter().any(|m| m.contains("F16")));
    }

    #[test]
    fn npy_and_safetensors_refusals() {
        use npyz::WriterBuilder;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let npy_f64 = |name: &str, shape: &[u64], data: &[f64]| {
            let p = d.join(name);
            let mut buf = Vec::new();
            let mut w = npyz::WriteOptions::new().default_dtype().shape(shape).writer(&mut buf).begin_nd().unwrap();
            w.extend(data.iter().copied()).unwrap();
            w.finish().unwrap();
            std::fs::write(&p, buf).unwrap();
            p
        };
        let npy_f32 = |name: &str, shape: &[u64], data: &[f32]| {
            let p = d.join(name);
            let mut buf = Vec::new();
            let mut w = npyz::WriteOptions::new().default_dtype().shape(shape).writer(&mut buf).begin_nd().unwrap();
            w.extend(data.iter().copied()).unwrap();
            w.finish().unwrap();
            std::fs::write(&p, buf).unwrap();
            p
        };
        assert!(err_of(&npy_f64("f64.npy", &[2, 2], &[1.0; 4])).contains("float32"));
        assert!(err_of(&npy_f32("1d.npy", &[4], &[1.0; 4])).contains("2-D"));
        assert!(err_of(&npy_f32("nan.npy", &[2, 2], &[1.0, f32::NAN, 0.0, 0.0])).contains("non-finite"));
        let p = d.join("bad.npy");
        std::fs::write(&p, b"\x93NUMPY\x01\x00garbage").unwrap();
        assert!(err_of(&p).contains(".npy"));

        // safetensors: wrong rank, wrong names, inconsistent widths, NaN, layer_count too small.
        let st = |name: &str, tensors: Vec<(&str, Vec<usize>, Vec<f32>)>, meta: Option<Vec<(&str, &str)>>| {
            let p = d.join(name);
            let t: Vec<(String, HostTensor)> =
                tensors.into_iter().map(|(n, s, v)| (n.to_string(), HostTensor::from_f32(s, v).unwrap())).collect();
            let m = meta.map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
            crate::model::safetensors::write_safetensors(&p, &t, m).unwrap();
            p
        };
        let fmt = || Some(vec![("format", SAFETENSORS_FORMAT)]);
        assert!(err_of(&st("rank.safetensors", vec![("direction.0", vec![2, 2], vec![1.0; 4])], fmt())).contains("one-dimensional"));
        assert!(err_of(&st("name.safetensors", vec![("layer.0", vec![2], vec![1.0; 2])], fmt())).contains("direction.N"));
        assert!(err_of(&st(
            "width.safetensors",
            vec![("direction.0", vec![2], vec![1.0; 2]), ("direction.1", vec![3], vec![1.0; 3])],
            fmt()
        ))
        .contains("width"));
        assert!(err_of(&st("nan.safetensors", vec![("direction.0", vec![2], vec![f32::NAN, 1.0])], fmt())).contains("non-finite"));
        assert!(err_of(&st(
            "count.safetensors",
            vec![("direction.4", vec![2], vec![1.0; 2])],
            Some(vec![("format", SAFETENSORS_FORMAT), ("layer_count", "3")])
        ))
        .contains("layer_count"));
        assert!(err_of(&st("other.safetensors", vec![("direction.0", vec![2], vec![1.0; 2])], Some(vec![("format", "pt")])))
            .contains("not a steering vector"));
        let p = d.join("junk.safetensors");
        std::fs::write(&p, b"not a safetensors file at all").unwrap();
        assert!(err_of(&p).contains("safetensors"));
        assert!(matches!(read_vector(d.join("v.txt")), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn describe_norms_and_cosines() {
        let mut v = SteeringVector::new(2, 4);
        v.set(1, vec![3.0, 4.0]).unwrap();
        v.set(2, vec![-4.0, 3.0]).unwrap();
        v.set(3, vec![-6.0, -8.0]).unwrap();
        let s = describe(&v);
        assert_eq!(s.layers, vec![1, 2, 3]);
        assert_eq!(s.norms, vec![5.0, 5.0, 10.0]);
        assert_eq!(s.cosine[0], vec![1.0, 0.0, -1.0]);
        assert_eq!(s.cosine[1][1], 1.0);
        assert_eq!(s.cosine[2][0], -1.0);
    }
}
