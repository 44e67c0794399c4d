//! The KV cache: one backend store allocated once for all layers, slots and positions, plus the
//! length of each slot's sequence. Nothing is reallocated while tokens are appended.

use crate::backend::{Backend, KvPrecision};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

pub struct KvCache<B: Backend> {
    pub store: B::KvStore,
    lengths: Vec<usize>,
    capacity: usize,
    precision: KvPrecision,
}

impl<B: Backend> KvCache<B> {
    pub fn new(backend: &B, config: &ModelConfig, slots: usize, capacity: usize, precision: KvPrecision) -> Result<Self> {
        if slots == 0 || capacity == 0 {
            return Err(Error::InvalidInput("a KV cache needs at least one slot and one position".into()));
        }
        let store = backend.kv_store(config.num_hidden_layers, slots, capacity, crate::forward::attention_layout(config), precision)?;
        Ok(KvCache { store, lengths: vec![0; slots], capacity, precision })
    }

    /// How the entries are stored.
    pub fn precision(&self) -> KvPrecision {
        self.precision
    }

    pub fn slots(&self) -> usize {
        self.lengths.len()
    }

    /// Positions available to each slot.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens already cached in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lengths[slot]
    }

    pub fn is_empty(&self, slot: usize) -> bool {
        self.lengths[slot] == 0
    }

    /// Forgets a slot's sequence (its storage is reused as is).
    pub fn reset(&mut self, slot: usize) {
        self.lengths[slot] = 0;
    }

    /// Truncates a slot back to `len` tokens (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, slot: usize, len: usize) {
        self.lengths[slot] = self.lengths[slot].min(len);
    }

    /// Checks that `count` more tokens fit in `slot`.
    pub fn check_room(&self, slot: usize, count: usize) -> Result<()> {
        if slot >= self.lengths.len() {
            return Err(Error::InvalidInput(format!("slot {slot} outside the session's {} slots", self.lengths.len())));
        }
        let needed = self.lengths[slot] + count;
        if needed > self.capacity {
            return Err(Error::InvalidInput(format!(
                "sequence would reach {needed} tokens ({} cached + {count} new), beyond the context of {} (raise --context up to the model's maximum)",
                self.lengths[slot], self.capacity
            )));
        }
        Ok(())
    }

    /// Makes each slot of `to` hold the first `positions` tokens of `from`'s sequence (the K/V
    /// entries are copied; the slots' own earlier contents are forgotten).
    pub fn fork_prefix(&mut self, backend: &B, from: usize, to: &[usize], positions: usize) -> Result<()> {
        let slots = self.lengths.len();
        if from >= slots {
            return Err(Error::InvalidInput(format!("slot {from} outside the session's {slots} slots")));
        }
        if positions > self.lengths[from] {
            return Err(Error::InvalidInput(format!("cannot fork {positions} positions of slot {from}, which holds {}", self.lengths[from])));
        }
        if let Some(&bad) = to.iter().find(|&&t| t >= slots) {
            return Err(Error::InvalidInput(format!("slot {bad} outside the session's {slots} slots")));
        }
        for &target in to {
            if target != from {
                backend.copy_kv_prefix(&mut self.store, from, target, positions);
                self.lengths[target] = positions;
            }
        }
        Ok(())
    }

    pub(crate) fn advance(&mut self, slot: usize, count: usize) {
        self.lengths[slot] += count;
    }
}
