//! SteeringVector: one direction per decoder layer (some layers may have none), with the
//! checks every file format shares (width, finiteness, layer range).

use crate::error::{Error, Result};

/// Per-layer directions in the residual stream. Layer `i` is the output of decoder block `i`
/// (transformers' `hidden_states[i + 1]`, llama.cpp's `direction.{i}`).
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringVector {
    /// Hidden size every direction has.
    pub hidden_size: usize,
    /// `directions[i]` is the direction for layer `i`, if any; the length is the layer count.
    pub directions: Vec<Option<Vec<f32>>>,
    /// Which model the vector was made for (llama.cpp's `controlvector.model_hint`).
    pub model_hint: Option<String>,
}

impl SteeringVector {
    /// An empty vector for a model with `layer_count` layers of width `hidden_size`.
    pub fn new(hidden_size: usize, layer_count: usize) -> Self {
        SteeringVector { hidden_size, directions: vec![None; layer_count], model_hint: None }
    }

    pub fn layer_count(&self) -> usize {
        self.directions.len()
    }

    /// Sets layer `layer`'s direction, checking its width and values.
    pub fn set(&mut self, layer: usize, direction: Vec<f32>) -> Result<()> {
        if layer >= self.directions.len() {
            return Err(Error::Shape(format!("layer {layer} outside a vector of {} layers", self.directions.len())));
        }
        if direction.len() != self.hidden_size {
            return Err(Error::Shape(format!("layer {layer}: direction of width {} for hidden size {}", direction.len(), self.hidden_size)));
        }
        if let Some(i) = direction.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!("layer {layer}: non-finite value at element {i}")));
        }
        self.directions[layer] = Some(direction);
        Ok(())
    }

    pub fn get(&self, layer: usize) -> Option<&[f32]> {
        self.directions.get(layer).and_then(|d| d.as_deref())
    }

    /// Layers that carry a direction, ascending.
    pub fn layers(&self) -> Vec<usize> {
        self.directions.iter().enumerate().filter_map(|(i, d)| d.as_ref().map(|_| i)).collect()
    }

    /// Checks the vector fits a model of `hidden_size` and `layer_count`; `origin` names the file.
    pub fn check_fits(&self, hidden_size: usize, layer_count: usize, origin: &str) -> Result<()> {
        if self.hidden_size != hidden_size {
            return Err(Error::Shape(format!("{origin}: vector width {} does not match the model's hidden size {hidden_size}", self.hidden_size)));
        }
        if let Some(&last) = self.layers().last() {
            if last >= layer_count {
                return Err(Error::Shape(format!("{origin}: direction for layer {last} but the model has {layer_count} layers")));
            }
        }
        Ok(())
    }
}
