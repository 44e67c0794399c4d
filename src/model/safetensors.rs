//! Hugging Face safetensors weights, memory-mapped, single file or sharded (with or without an index).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use super::TensorSource;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor, TensorData};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// All tensors of a model directory's safetensors files.
pub struct SafetensorsSource {
    description: String,
    shards: Vec<Shard>,
    /// Tensor name -> shard index.
    index: HashMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let mmap = super::map_file(path)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap[..])
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = mmap.len().saturating_sub(data_start);
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        if start > end || end > data_len {
            return Err(Error::format(path, format!("tensor '{name}' data [{start}, {end}) lies past the end of the file ({data_len} data bytes)")));
        }
        let elements: usize = info.shape.iter().product();
        let expected = elements.checked_mul(dtype_size(info.dtype).unwrap_or(0));
        if dtype_size(info.dtype).is_some() && expected != Some(end - start) {
            return Err(Error::format(path, format!("tensor '{name}' of shape {:?} has {} data bytes", info.shape, end - start)));
        }
    }
    Ok(Shard { path: path.to_path_buf(), mmap, data_start, metadata })
}

fn dtype_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, or every
    /// `*.safetensors` file in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::format(&index_path, "no weight_map object"))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if files.is_empty() {
            return Err(Error::format(dir, "no model.safetensors, model.safetensors.index.json or *.safetensors file"));
        }
        Self::open_files(&files, dir.display().to_string())
    }

    pub fn open_files(files: &[PathBuf], description: String) -> Result<Self> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let shard = open_shard(path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(SafetensorsSource { description, shards, index })
    }

    fn find(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo)> {
        let shard = self.index.get(name).map(|&i| &self.shards[i]).ok_or_else(|| Error::format(&self.description, format!("missing tensor '{name}'")))?;
        let info = shard.metadata.info(name).ok_or_else(|| Error::format(&shard.path, format!("missing tensor '{name}'")))?;
        Ok((shard, info))
    }
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.find(name)?.1.shape.clone())
    }

    fn stored_type(&self, name: &str) -> Result<String> {
        Ok(format!("{:?}", self.find(name)?.1.dtype))
    }

    fn load(&self, name: &str, dtype: DType) -> Result<HostTensor> {
        let (shard, info) = self.find(name)?;
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let halves = || bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        let data = match info.dtype {
            Dtype::F32 => TensorData::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Dtype::F16 => TensorData::F16(halves().map(half::f16::from_bits).collect()),
            Dtype::BF16 => TensorData::BF16(halves().map(half::bf16::from_bits).collect()),
            other => {
                return Err(Error::Unsupported(format!("{}: tensor '{name}' has dtype {other:?} (engram reads F32, F16, BF16)", shard.path.display())));
            }
        };
        HostTensor { shape: info.shape.clone(), data }
            .to_dtype(dtype)
            .map_err(|e| Error::format(&shard.path, format!("tensor '{name}' as {dtype}: {e}")))
    }
}

/// Writes tensors (name, tensor) as one safetensors file with optional string metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, HostTensor)], metadata: Option<HashMap<String, String>>) -> Result<()> {
    use safetensors::tensor::TensorView;
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = match t.dtype() {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::BF16 => Dtype::BF16,
                other => return Err(Error::Unsupported(format!("tensor '{name}': safetensors cannot hold {other} blocks"))),
            };
            TensorView::new(dtype, t.shape.clone(), t.as_bytes())
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Shape(format!("tensor '{name}': {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::format(path, format!("cannot write safetensors: {e}")))
}
