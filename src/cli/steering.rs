//! The steering, capture and readout options shared by `generate` and `logits`, and their
//! translation into plans on a session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use engram::backend::Backend;
use engram::steer::capture::{write_npy, write_safetensors};
use engram::steer::files::read_vector;
use engram::steer::plan::parse_range;
use engram::steer::{CapturePlan, CaptureRecord, ReadoutPlan, Schedule, SteeringMode, SteeringPlan, SteeringTerm, SteeringVector};
use engram::{Model, Session};
use serde::Deserialize;

#[derive(Args, Clone, Default)]
pub struct SteerArgs {
    /// Steering vector (.gguf control vector, .safetensors or .npy), optionally FILE:SCALE (default 1); repeatable, summed.
    #[arg(long = "steer", value_name = "FILE[:SCALE]")]
    pub steer: Vec<String>,
    /// Only steer these layers (inclusive range A-B).
    #[arg(long, value_name = "A-B")]
    pub steer_layers: Option<String>,
    /// Which tokens to steer: all, prompt, generated, first:K, range:A-B, decay:R.
    #[arg(long, default_value = "all")]
    pub steer_on: String,
    /// add (c·v), relative (c·|h|/|v|·v) or clamp:TARGET (add what is missing up to the target projection).
    #[arg(long, default_value = "add")]
    pub steer_mode: String,
    /// Steer after the attention residual add instead of at the block output.
    #[arg(long)]
    pub steer_attention: bool,
    /// Capture residual activations: LAYERS[@POSITIONS], e.g. 0-29@last, attn:5@all, all@mean.
    #[arg(long, value_name = "LAYERS[@POSITIONS]")]
    pub capture: Option<String>,
    /// Where captures go (.safetensors or .npy).
    #[arg(long, value_name = "FILE")]
    pub capture_out: Option<PathBuf>,
    /// Per-layer readouts: |h| and the projection on each steering vector, in --json output or --readout-out.
    #[arg(long)]
    pub readout: bool,
    /// Write readouts here as JSON lines.
    #[arg(long, value_name = "FILE")]
    pub readout_out: Option<PathBuf>,
}

/// One steering term as a `--prompts` line gives it: {"file", "scale", "layers", "on", "mode"}.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    pub file: PathBuf,
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default)]
    pub layers: Option<String>,
    #[serde(default)]
    pub on: Option<String>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub attention: bool,
}

fn one() -> f32 {
    1.0
}

/// Vector files read so far, each once: a file named by several sequences or terms is one
/// `Arc`, so the session's direction pool holds its directions once.
#[derive(Default)]
pub struct VectorCache {
    loaded: HashMap<PathBuf, Arc<SteeringVector>>,
    /// Load order, for naming readout probes deterministically.
    order: Vec<PathBuf>,
}

impl VectorCache {
    /// Reads a vector file (printing its warnings) and checks it fits the model.
    pub fn load<B: Backend>(&mut self, model: &Model<B>, path: &Path) -> Result<Arc<SteeringVector>> {
        if let Some(v) = self.loaded.get(path) {
            return Ok(v.clone());
        }
        let (vector, warnings) = read_vector(path)?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        vector.check_fits(model.config.hidden_size, model.config.num_hidden_layers, &path.display().to_string())?;
        let vector = Arc::new(vector);
        self.loaded.insert(path.to_path_buf(), vector.clone());
        self.order.push(path.to_path_buf());
        Ok(vector)
    }

    /// Every vector loaded, named by its file, in load order (the default readout probes).
    pub fn probes(&self) -> Vec<(String, Arc<SteeringVector>)> {
        self.order.iter().map(|p| (p.display().to_string(), self.loaded[p].clone())).collect()
    }
}

/// Splits `FILE:SCALE` (the suffix must parse as a number; otherwise the whole text is the file).
fn file_and_scale(text: &str) -> Result<(PathBuf, f32)> {
    if let Some((file, scale)) = text.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f32>() {
            if !scale.is_finite() {
                bail!("steering scale in '{text}' must be finite");
            }
            return Ok((PathBuf::from(file), scale));
        }
    }
    Ok((PathBuf::from(text), 1.0))
}

fn term<B: Backend>(model: &Model<B>, cache: &mut VectorCache, spec: &SteerSpec) -> Result<SteeringTerm> {
    if !spec.scale.is_finite() {
        bail!("steering scale {} for {} must be finite", spec.scale, spec.file.display());
    }
    let mut term = SteeringTerm::new(cache.load(model, &spec.file)?, spec.scale);
    if let Some(layers) = &spec.layers {
        term.layers = Some(parse_range(layers).with_context(|| format!("steering layers '{layers}' (expected A-B)"))?);
    }
    if let Some(on) = &spec.on {
        term.schedule = Schedule::parse(on)?;
    }
    if let Some(mode) = &spec.mode {
        term.mode = SteeringMode::parse(mode)?;
    }
    term.at_attention = spec.attention;
    Ok(term)
}

impl SteerArgs {
    /// The plan the command-line options describe (None without --steer).
    pub fn plan<B: Backend>(&self, model: &Model<B>, cache: &mut VectorCache) -> Result<Option<SteeringPlan>> {
        plan_from_specs(model, cache, &self.specs()?)
    }

    fn specs(&self) -> Result<Vec<SteerSpec>> {
        self.steer
            .iter()
            .map(|text| {
                let (file, scale) = file_and_scale(text)?;
                Ok(SteerSpec { file, scale, layers: self.steer_layers.clone(), on: Some(self.steer_on.clone()), mode: Some(self.steer_mode.clone()), attention: self.steer_attention })
            })
            .collect()
    }

    /// Installs capture and readout plans on `session` (readout probes: every steering vector
    /// loaded into `cache`, the --steer ones and any per-sequence ones).
    pub fn configure<B: Backend>(&self, session: &mut Session<'_, B>, model: &Model<B>, cache: &VectorCache) -> Result<()> {
        let layers = model.config.num_hidden_layers;
        if let Some(spec) = &self.capture {
            if self.capture_out.is_none() {
                bail!("--capture needs --capture-out FILE (.safetensors or .npy)");
            }
            session.set_capture(Some(CapturePlan::parse(spec, layers)?))?;
        } else if self.capture_out.is_some() {
            bail!("--capture-out needs --capture LAYERS[@POSITIONS]");
        }
        if self.readout || self.readout_out.is_some() {
            session.set_readout(Some(ReadoutPlan::all_blocks(layers, cache.probes())))?;
        }
        Ok(())
    }

    /// Writes what the session captured, if a capture was asked for.
    pub fn write_captures(&self, records: &[CaptureRecord], model_path: &Path) -> Result<()> {
        let Some(path) = &self.capture_out else { return Ok(()) };
        let is_npy = path.extension().is_some_and(|e| e == "npy");
        if is_npy {
            write_npy(path, records)?;
        } else {
            let mut meta = std::collections::HashMap::new();
            meta.insert("model".to_string(), model_path.display().to_string());
            meta.insert("capture".to_string(), self.capture.clone().unwrap_or_default());
            write_safetensors(path, records, meta)?;
        }
        eprintln!("wrote {} captured rows to {}", records.len(), path.display());
        Ok(())
    }

    /// The probe names, in the order of each readout's `projections`.
    pub fn probe_names(cache: &VectorCache) -> Vec<String> {
        cache.probes().into_iter().map(|(name, _)| name).collect()
    }
}

/// Builds a plan from specs (the command line's, or a `--prompts` line's "steer" list).
pub fn plan_from_specs<B: Backend>(model: &Model<B>, cache: &mut VectorCache, specs: &[SteerSpec]) -> Result<Option<SteeringPlan>> {
    if specs.is_empty() {
        return Ok(None);
    }
    Ok(Some(SteeringPlan { terms: specs.iter().map(|s| term(model, cache, s)).collect::<Result<_>>()? }))
}

/// One readout record as a JSON object (NaN projections, for a probe without a direction at
/// that layer, become null).
pub fn readout_json(sequence: Option<usize>, r: &engram::steer::ReadoutRecord) -> serde_json::Value {
    let projections: serde_json::Value = r.projections.iter().map(|v| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null }).collect();
    let mut value = serde_json::json!({"position": r.position, "layer": r.layer, "norm": r.norm, "projections": projections});
    if r.attention {
        value["point"] = "attention".into();
    }
    if let Some(i) = sequence {
        value["sequence"] = i.into();
    }
    value
}

/// Writes readouts as JSON lines, the first line naming the probes.
pub fn write_readouts(path: &Path, probe_names: &[String], records: impl Iterator<Item = serde_json::Value>) -> Result<()> {
    let mut text = serde_json::json!({"probes": probe_names}).to_string();
    text.push('\n');
    for r in records {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
