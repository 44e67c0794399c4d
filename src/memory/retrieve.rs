//! Retrieval: the memories whose keys are nearest (cosine) to a task's key, and their blend.

use super::bank::MemoryBank;
use crate::error::{Error, Result};
use crate::steer::SteeringVector;

/// One retrieved memory and its similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Retrieved {
    /// Index into the bank's memories.
    pub index: usize,
    pub name: String,
    /// Cosine similarity of the query key and the memory's key.
    pub score: f64,
}

/// Cosine similarity (0 where either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na.sqrt() * nb.sqrt()) }
}

/// The memories whose key was taken at `key_layer`, ranked by centred cosine similarity to
/// `query` (best first, ties by name); at most `top_k`, and none scoring below `threshold`.
///
/// Centred: with two or more candidate memories, their mean key is subtracted from the query
/// and from every key before the cosine. Mean residual activations share a large component
/// that carries no task information (raw cosines between instructions of different kinds are
/// ~0.9999 on SmolLM2), which centring removes, so scores spread over [-1, 1] by kind.
pub fn retrieve(bank: &MemoryBank, query: &[f32], key_layer: usize, top_k: usize, threshold: f64) -> Result<Vec<Retrieved>> {
    if query.len() != bank.hidden_size {
        return Err(Error::Shape(format!("query key of width {} for a bank of hidden size {}", query.len(), bank.hidden_size)));
    }
    if query.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidInput("query key has a non-finite value".into()));
    }
    let candidates: Vec<usize> = (0..bank.memories.len()).filter(|&i| bank.memories[i].meta.key_layer == key_layer).collect();
    let mut center = vec![0.0f32; bank.hidden_size];
    if candidates.len() >= 2 {
        for &i in &candidates {
            for (c, &k) in center.iter_mut().zip(&bank.memories[i].key) {
                *c += k / candidates.len() as f32;
            }
        }
    }
    let centred = |v: &[f32]| -> Vec<f32> { v.iter().zip(&center).map(|(a, c)| a - c).collect() };
    let query = centred(query);
    let mut hits: Vec<Retrieved> = candidates
        .iter()
        .map(|&index| {
            let m = &bank.memories[index];
            Retrieved { index, name: m.meta.name.clone(), score: cosine(&query, &centred(&m.key)) }
        })
        .filter(|r| r.score >= threshold)
        .collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    hits.truncate(top_k);
    Ok(hits)
}

/// The similarity-weighted sum of the retrieved memories' directions, per layer: weights are the
/// positive scores divided by their sum (so one memory blends to itself, and the scale of the
/// blend stays that of a single memory); memories scoring 0 or less get no weight. Layers where
/// no retrieved memory has a direction stay empty. No positive score at all is an error.
pub fn blend(bank: &MemoryBank, retrieved: &[Retrieved]) -> Result<SteeringVector> {
    let retrieved: Vec<&Retrieved> = retrieved.iter().filter(|r| r.score > 0.0).collect();
    let total: f64 = retrieved.iter().map(|r| r.score).sum();
    if retrieved.is_empty() || total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::InvalidInput("nothing to blend: no memories retrieved with a positive similarity".into()));
    }
    let mut out = SteeringVector::new(bank.hidden_size, bank.layer_count);
    out.model_hint = bank.model_hint.clone();
    for layer in 0..bank.layer_count {
        let mut sum: Option<Vec<f64>> = None;
        for r in &retrieved {
            let memory = bank.memories.get(r.index).ok_or_else(|| Error::InvalidInput(format!("memory index {} outside the bank", r.index)))?;
            if let Some(d) = memory.direction.get(layer) {
                let w = r.score / total;
                let acc = sum.get_or_insert_with(|| vec![0.0; bank.hidden_size]);
                for (a, &v) in acc.iter_mut().zip(d) {
                    *a += w * v as f64;
                }
            }
        }
        if let Some(sum) = sum {
            out.set(layer, sum.into_iter().map(|v| v as f32).collect())?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::bank::tests::memory;

    #[test]
    fn ranks_thresholds_and_blends() {
        let mut bank = MemoryBank::new(None, 8, 3);
        bank.add(memory("a", 8, 3, 0.0)).unwrap();
        bank.add(memory("b", 8, 3, 1.5)).unwrap();
        let query = bank.memories[1].key.clone();
        let hits = retrieve(&bank, &query, 1, 3, -1.0).unwrap();
        assert_eq!(hits[0].name, "b");
        assert!((hits[0].score - 1.0).abs() < 1e-9);
        assert_eq!(hits.len(), 2);
        assert_eq!(retrieve(&bank, &query, 1, 1, -1.0).unwrap().len(), 1);
        assert!(retrieve(&bank, &query, 1, 3, 1.1).unwrap().is_empty());
        assert!(retrieve(&bank, &query, 0, 3, -1.0).unwrap().is_empty());

        let one = blend(&bank, &hits[..1]).unwrap();
        assert_eq!(one.get(1).unwrap(), bank.memories[1].direction.get(1).unwrap());
        assert!(one.get(0).is_none());
        // Centred scores of two memories are opposite: only the positive one is blended.
        assert!((hits[1].score + 1.0).abs() < 1e-9);
        assert_eq!(blend(&bank, &hits).unwrap(), one);
        let weighted = [Retrieved { index: 0, name: "a".into(), score: 0.25 }, Retrieved { index: 1, name: "b".into(), score: 0.75 }];
        let two = blend(&bank, &weighted).unwrap();
        let expect = bank.memories[0].direction.get(1).unwrap()[3] as f64 * 0.25 + bank.memories[1].direction.get(1).unwrap()[3] as f64 * 0.75;
        assert!((two.get(1).unwrap()[3] as f64 - expect).abs() < 1e-5);
        assert!(blend(&bank, &[]).is_err());
    }

    #[test]
    fn centring_removes_the_shared_component_of_keys() {
        // Keys dominated by one shared offset, as mean residual activations are.
        let shared: Vec<f32> = (0..8).map(|i| 100.0 + i as f32).collect();
        let with = |d: [f32; 8]| -> Vec<f32> { shared.iter().zip(d).map(|(s, x)| s + x).collect() };
        let mut bank = MemoryBank::new(None, 8, 3);
        for (name, d) in [("a", [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), ("b", [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), ("c", [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])] {
            let mut m = memory(name, 8, 3, 0.0);
            m.key = with(d);
            bank.add(m).unwrap();
        }
        let query = with([0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(cosine(&query, &bank.memories[1].key) > 0.999, "raw cosine cannot tell the kinds apart");
        let hits = retrieve(&bank, &query, 1, 3, -1.0).unwrap();
        assert_eq!(hits[0].name, "a");
        assert!(hits[0].score - hits[1].score > 0.5, "centred scores separate: {hits:?}");
    }
}
