//! The memory bank: memories (per-layer directions, a retrieval key, counts, separability,
//! workflow text) for one model, kept in one safetensors file; merge, and export of one memory
//! as a llama.cpp control vector.
//!
//! File layout: tensors `memory.{name}.direction.{layer}` and `memory.{name}.key` (F32
//! `[hidden]`); `__metadata__` holds `format = "engram-memory-bank"`, `bank` (JSON: format
//! version, model hint, hidden size, layer count) and one `memory.{name}` entry per memory (JSON
//! of [`MemoryMeta`]: everything but the tensors).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::context::Position;
use super::experience::EpisodeSource;
use crate::error::{Error, Result};
use crate::steer::compute::Method;
use crate::steer::SteeringVector;
use crate::tensor::HostTensor;

/// The `format` value of a memory bank's safetensors metadata.
pub const BANK_FORMAT: &str = "engram-memory-bank";
/// The bank layout version this code writes and reads.
pub const BANK_VERSION: u32 = 1;

/// How many episodes and steps a memory was distilled from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub episodes: usize,
    pub steps: usize,
    pub successes: usize,
    pub failures: usize,
    pub success_steps: usize,
    pub failure_steps: usize,
}

/// One layer's direction statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    /// L2 norm of the direction.
    pub norm: f64,
    /// AUC of success vs failure projections on the direction, on the rows it was fitted to.
    pub auc: f64,
    /// Cross-validated AUC, when both sides had at least two rows.
    pub held_out_auc: Option<f64>,
    /// Whether the layer's direction was kept in the memory.
    pub selected: bool,
}

/// Everything about a memory except its tensors (the JSON in the bank's metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryMeta {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub workflow: String,
    pub counts: Counts,
    pub layers: Vec<LayerStats>,
    pub key_layer: usize,
    pub method: Method,
    pub position: Position,
    /// Earlier steps shown in each step's context when distilled (absent in banks written
    /// before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<usize>,
    /// The (task, variation, split) of every episode the memory was distilled from, so that an
    /// evaluation can refuse them; `None` when some episode did not say (or the bank predates
    /// this field), and then overlap cannot be checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<EpisodeSource>>,
}

/// One memory: a skill as per-layer directions plus what retrieval and people need to use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub meta: MemoryMeta,
    /// Success-minus-failure direction at the selected layers.
    pub direction: SteeringVector,
    /// Retrieval key: the mean activation of the instructions, at `meta.key_layer`.
    pub key: Vec<f32>,
}

impl Memory {
    pub fn name(&self) -> &str {
        &self.meta.name
    }
}

/// Memories made for one model (hidden size and layer count).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBank {
    pub model_hint: Option<String>,
    pub hidden_size: usize,
    pub layer_count: usize,
    /// Memories in name order.
    pub memories: Vec<Memory>,
}

#[derive(Serialize, Deserialize)]
struct BankMeta {
    format_version: u32,
    model_hint: Option<String>,
    hidden_size: usize,
    layer_count: usize,
}

/// Whether `name` can be a memory name (ASCII letters, digits, `_` and `-`; not empty).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A memory name made from any text: other characters become `_`.
pub fn name_from(text: &str) -> String {
    let name: String = text.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    if name.is_empty() { "memory".into() } else { name }
}

impl MemoryBank {
    /// An empty bank for a model of `hidden_size` and `layer_count`.
    pub fn new(model_hint: Option<String>, hidden_size: usize, layer_count: usize) -> Self {
        MemoryBank { model_hint, hidden_size, layer_count, memories: Vec::new() }
    }

    /// The memory called `name`.
    pub fn get(&self, name: &str) -> Option<&Memory> {
        self.memories.iter().find(|m| m.meta.name == name)
    }

    /// Adds a memory after checking its name, shapes and values; a clashing name is an error.
    pub fn add(&mut self, memory: Memory) -> Result<()> {
        let name = memory.meta.name.clone();
        if !valid_name(&name) {
            return Err(Error::InvalidInput(format!("memory name '{name}' (use letters, digits, _ and -)")));
        }
        if self.get(&name).is_some() {
            return Err(Error::InvalidInput(format!("the bank already has a memory named '{name}'")));
        }
        memory.direction.check_fits(self.hidden_size, self.layer_count, &format!("memory '{name}'"))?;
        if memory.direction.layer_count() != self.layer_count {
            return Err(Error::Shape(format!("memory '{name}': {} layers in a bank of {}", memory.direction.layer_count(), self.layer_count)));
        }
        if memory.key.len() != self.hidden_size {
            return Err(Error::Shape(format!("memory '{name}': key of width {} for hidden size {}", memory.key.len(), self.hidden_size)));
        }
        if memory.key.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!("memory '{name}': non-finite key")));
        }
        if memory.meta.key_layer >= self.layer_count {
            return Err(Error::Shape(format!("memory '{name}': key layer {} of {} layers", memory.meta.key_layer, self.layer_count)));
        }
        self.memories.push(memory);
        self.memories.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        Ok(())
    }

    /// Refuses a bank made for another model (hidden size or layer count differ).
    pub fn check_fits(&self, hidden_size: usize, layer_count: usize) -> Result<()> {
        if self.hidden_size != hidden_size || self.layer_count != layer_count {
            return Err(Error::Shape(format!(
                "the memory bank was made for a model with hidden size {} and {} layers (model hint {}), but this model has hidden size {hidden_size} and {layer_count} layers",
                self.hidden_size,
                self.layer_count,
                self.model_hint.as_deref().unwrap_or("-")
            )));
        }
        Ok(())
    }

    /// Writes the bank as one safetensors file (see the module docs).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tensors = Vec::new();
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), BANK_FORMAT.to_string());
        let bank = BankMeta { format_version: BANK_VERSION, model_hint: self.model_hint.clone(), hidden_size: self.hidden_size, layer_count: self.layer_count };
        metadata.insert("bank".to_string(), serde_json::to_string(&bank).expect("serializable"));
        for m in &self.memories {
            let name = &m.meta.name;
            for layer in m.direction.layers() {
                let d = m.direction.get(layer).expect("listed layer");
                tensors.push((format!("memory.{name}.direction.{layer}"), HostTensor::from_f32(vec![d.len()], d.to_vec())?));
            }
            tensors.push((format!("memory.{name}.key"), HostTensor::from_f32(vec![m.key.len()], m.key.clone())?));
            metadata.insert(format!("memory.{name}"), serde_json::to_string(&m.meta).expect("serializable"));
        }
        crate::model::safetensors::write_safetensors(path, &tensors, Some(metadata))
    }

    /// Reads a bank written by [`MemoryBank::write`]; every problem names the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::format(path, message);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        match meta.get("format").map(String::as_str) {
            Some(BANK_FORMAT) => {}
            Some(other) => return Err(bad(format!("metadata format is '{other}', not a memory bank ('{BANK_FORMAT}')"))),
            None => return Err(bad(format!("no metadata format '{BANK_FORMAT}': not a memory bank"))),
        }
        let bank_json = meta.get("bank").ok_or_else(|| bad("metadata has no 'bank' entry".into()))?;
        let bank: BankMeta = serde_json::from_str(bank_json).map_err(|e| bad(format!("metadata 'bank' is not valid JSON: {e}")))?;
        if bank.format_version != BANK_VERSION {
            return Err(bad(format!("bank format version {} (this engram reads version {BANK_VERSION})", bank.format_version)));
        }
        if bank.hidden_size == 0 || bank.layer_count == 0 {
            return Err(bad("bank has a zero hidden size or layer count".into()));
        }
        let mut out = MemoryBank::new(bank.model_hint, bank.hidden_size, bank.layer_count);
        let mut claimed = HashSet::new();
        let mut load = |name: String| -> Result<Vec<f32>> {
            let view = st.tensor(&name).map_err(|_| bad(format!("missing tensor '{name}'")))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != [bank.hidden_size] {
                return Err(bad(format!("tensor '{name}' is {:?} {:?}; expected F32 [{}]", view.dtype(), view.shape(), bank.hidden_size)));
            }
            let values: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("tensor '{name}' has a non-finite value at element {i}")));
            }
            claimed.insert(name);
            Ok(values)
        };
        for (entry, json) in meta.iter().filter(|(k, _)| k.starts_with("memory.")) {
            let m: MemoryMeta = serde_json::from_str(json).map_err(|e| bad(format!("metadata '{entry}' is not a valid memory: {e}")))?;
            if entry.as_str() != format!("memory.{}", m.name) {
                return Err(bad(format!("metadata '{entry}' describes a memory named '{}'", m.name)));
            }
            let mut direction = SteeringVector::new(bank.hidden_size, bank.layer_count);
            for stats in m.layers.iter().filter(|s| s.selected) {
                if stats.layer >= bank.layer_count {
                    return Err(bad(format!("memory '{}': layer {} of a {}-layer bank", m.name, stats.layer, bank.layer_count)));
                }
                let values = load(format!("memory.{}.direction.{}", m.name, stats.layer))?;
                direction.set(stats.layer, values).map_err(|e| bad(e.to_string()))?;
            }
            let key = load(format!("memory.{}.key", m.name))?;
            out.add(Memory { meta: m, direction, key }).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(extra) = st.names().into_iter().find(|n| !claimed.contains(*n)) {
            return Err(bad(format!("tensor '{extra}' belongs to no memory in the metadata")));
        }
        Ok(out)
    }

    /// Writes memory `name`'s direction as a llama.cpp control vector (or any format
    /// [`crate::steer::files::write_vector`] takes, by extension); returns its warnings.
    pub fn export(&self, name: &str, path: impl AsRef<Path>) -> Result<Vec<String>> {
        let memory = self.get(name).ok_or_else(|| self.missing(name))?;
        let mut vector = memory.direction.clone();
        vector.model_hint = self.model_hint.clone();
        crate::steer::files::write_vector(path, &vector)
    }

    /// The error for a memory that is not in the bank, listing those that are.
    pub fn missing(&self, name: &str) -> Error {
        let names: Vec<&str> = self.memories.iter().map(|m| m.name()).collect();
        Error::InvalidInput(format!("no memory named '{name}' (the bank has: {})", names.join(", ")))
    }
}

/// Merges two banks of the same model. A name in both is an error unless `suffix` is given: the
/// second bank's memory is then renamed `{name}{suffix}` (still an error if that clashes too).
pub fn merge(a: &MemoryBank, b: &MemoryBank, suffix: Option<&str>) -> Result<MemoryBank> {
    b.check_fits(a.hidden_size, a.layer_count)
        .map_err(|e| Error::InvalidInput(format!("cannot merge banks of different models: {e}")))?;
    let mut out = a.clone();
    if out.model_hint.is_none() {
        out.model_hint = b.model_hint.clone();
    }
    for m in &b.memories {
        let mut m = m.clone();
        if out.get(m.name()).is_some() {
            match suffix {
                Some(s) => m.meta.name = format!("{}{s}", m.meta.name),
                None => return Err(Error::InvalidInput(format!("both banks have a memory named '{}' (give a suffix to rename the second)", m.name()))),
            }
        }
        out.add(m)?;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn memory(name: &str, hidden: usize, layers: usize, seed: f32) -> Memory {
        let mut direction = SteeringVector::new(hidden, layers);
        direction.set(1, (0..hidden).map(|i| (i as f32 * 0.1 + seed).sin()).collect()).unwrap();
        Memory {
            meta: MemoryMeta {
                name: name.into(),
                kind: name.into(),
                description: "d".into(),
                workflow: "1. go".into(),
                counts: Counts { episodes: 2, ..Default::default() },
                layers: vec![
                    LayerStats { layer: 0, norm: 0.0, auc: 0.5, held_out_auc: None, selected: false },
                    LayerStats { layer: 1, norm: 1.0, auc: 0.9, held_out_auc: Some(0.8), selected: true },
                ],
                key_layer: 1,
                method: Method::Mean,
                position: Position::ContextLast,
                history: Some(2),
                sources: None,
            },
            direction,
            key: (0..hidden).map(|i| (i as f32 + seed).cos()).collect(),
        }
    }

    #[test]
    fn statistics_read_back_to_the_last_bit() {
        // 1.9696014137792506 read back one ulp off (as ...504) through serde_json's default float parser.
        let dir = tempfile::tempdir().unwrap();
        let mut bank = MemoryBank::new(None, 8, 3);
        let mut m = memory("cook", 8, 3, 0.0);
        let hard = [1.9696014137792506, 1.9696014137792504, 0.1 + 0.2, 2.2250738585072014e-308, 5e-324, 1.7976931348623157e308, 0.8651642096734512];
        m.meta.layers = hard.iter().enumerate().map(|(i, &v)| LayerStats { layer: i % 3, norm: v, auc: 1.0 - v.min(1.0), held_out_auc: Some(v / 3.0), selected: i % 3 == 1 }).collect();
        bank.add(m).unwrap();
        let path = dir.path().join("bank.safetensors");
        bank.write(&path).unwrap();
        let read = MemoryBank::read(&path).unwrap();
        for (got, want) in read.memories[0].meta.layers.iter().zip(&bank.memories[0].meta.layers) {
            assert_eq!(got.norm.to_bits(), want.norm.to_bits());
            assert_eq!(got.auc.to_bits(), want.auc.to_bits());
            assert_eq!(got.held_out_auc.map(f64::to_bits), want.held_out_auc.map(f64::to_bits));
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let mut bank = MemoryBank::new(Some("llama".into()), 8, 3);
        bank.add(memory("cook", 8, 3, 0.0)).unwrap();
        bank.add(memory("clean", 8, 3, 1.0)).unwrap();
        assert!(bank.add(memory("cook", 8, 3, 2.0)).is_err());
        assert!(bank.add(memory("bad.name", 8, 3, 2.0)).is_err());
        let path = dir.path().join("bank.safetensors");
        bank.write(&path).unwrap();
        let read = MemoryBank::read(&path).unwrap();
        assert_eq!(read, bank);
        assert!(bank.check_fits(8, 3).is_ok());
        assert!(bank.check_fits(8, 4).unwrap_err().to_string().contains("hidden size 8 and 3 layers"));

        let merged = merge(&bank, &bank, Some("_2")).unwrap();
        assert_eq!(merged.memories.len(), 4);
        assert!(merged.get("cook_2").is_some());
        assert!(merge(&bank, &bank, None).unwrap_err().to_string().contains("'clean'"));

        // Crafted corruptions: each names the file and the problem.
        type Edit<'a> = &'a dyn Fn(&mut Vec<(String, HostTensor)>, &mut HashMap<String, String>);
        let corrupt = |file: &str, edit: Edit| -> String {
            let mut tensors = Vec::new();
            let mut metadata = HashMap::new();
            metadata.insert("format".to_string(), BANK_FORMAT.to_string());
            metadata.insert("bank".to_string(), r#"{"format_version":1,"model_hint":null,"hidden_size":8,"layer_count":3}"#.to_string());
            let m = &bank.memories[0];
            metadata.insert("memory.clean".to_string(), serde_json::to_string(&m.meta).unwrap());
            tensors.push(("memory.clean.direction.1".to_string(), HostTensor::from_f32(vec![8], m.direction.get(1).unwrap().to_vec()).unwrap()));
            tensors.push(("memory.clean.key".to_string(), HostTensor::from_f32(vec![8], m.key.clone()).unwrap()));
            edit(&mut tensors, &mut metadata);
            let path = dir.path().join(file);
            crate::model::safetensors::write_safetensors(&path, &tensors, Some(metadata)).unwrap();
            let err = MemoryBank::read(&path).unwrap_err().to_string();
            assert!(err.contains(file), "{err}");
            err
        };
        assert!(corrupt("nobank.safetensors", &|_, m| { m.remove("bank"); }).contains("no 'bank'"));
        assert!(corrupt("json.safetensors", &|_, m| { m.insert("memory.clean".into(), "{oops".into()); }).contains("not a valid memory"));
        assert!(corrupt("missing.safetensors", &|t, _| { t.remove(0); }).contains("missing tensor 'memory.clean.direction.1'"));
        assert!(corrupt("shape.safetensors", &|t, _| { t[1].1 = HostTensor::from_f32(vec![2, 4], vec![0.5; 8]).unwrap(); }).contains("expected F32 [8]"));
        assert!(corrupt("extra.safetensors", &|t, _| { t.push(("memory.other.key".into(), HostTensor::from_f32(vec![8], vec![0.5; 8]).unwrap())); }).contains("belongs to no memory"));
        let nan = corrupt("nan.safetensors", &|t, _| {
            let mut v = vec![0.5f32; 8];
            v[3] = f32::NAN;
            t[1].1 = HostTensor { shape: vec![8], data: crate::tensor::TensorData::F32(v) };
        });
        assert!(nan.contains("non-finite value at element 3"), "{nan}");

        let vector_path = dir.path().join("bad.safetensors");
        crate::steer::files::write_vector(&vector_path, &bank.memories[0].direction).unwrap();
        assert!(MemoryBank::read(&vector_path).unwrap_err().to_string().contains("not a memory bank"));
    }
}
