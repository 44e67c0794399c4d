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

/// The memories whose key was taken at `key_layer`, ranked by cosine similarity to `query`
/// (best first, ties by name); at most `top_k`, and none scoring below `threshold`.
pub fn retrieve(bank: &MemoryBank, query: &[f32], key_layer: usize, top_k: usize, threshold: f64) -> Result<Vec<Retrieved>> {
    if query.len() != bank.hidden_size {
        return Err(Error::Shape(format!("query key of width {} for a bank of hidden size {}", query.len(), bank.hidden_size)));
    }
    if query.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidInput("query key has a non-finite value".into()));
    }
    let mut hits: Vec<Retrieved> = bank
        .memories
        .iter()
        .enumerate()
        .filter(|(_, m)| m.meta.key_layer == key_layer)
        .map(|(index, m)| Retrieved { index, name: m.meta.name.clone(), score: cosine(query, &m.key) })
        .filter(|r| r.score >= threshold)
        .collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    hits.truncate(top_k);
    Ok(hits)
}

/// The similarity-weighted sum of the retrieved memories' directions, per layer: weights are the
/// scores divided by their sum (so one memory blends to itself, and the scale of the blend stays
/// that of a single memory). Layers where no retrieved memory has a direction stay empty.
/// An empty list, or scores that do not sum to a positive number, is an error.
pub fn blend(bank: &MemoryBank, retrieved: &[Retrieved]) -> Result<SteeringVector> {
    let total: f64 = retrieved.iter().map(|r| r.score).sum();
    if retrieved.is_empty() || total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return Err(Error::InvalidInput("nothing to blend: no memories retrieved with a positive similarity".into()));
    }
    let mut out = SteeringVector::new(bank.hidden_size, bank.layer_count);
    out.model_hint = bank.model_hint.clone();
    for layer in 0..bank.layer_count {
        let mut sum: Option<Vec<f64>> = None;
        for r in retrieved {
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
        let two = blend(&bank, &hits).unwrap();
        let (wa, wb) = (hits[1].score / (hits[0].score + hits[1].score), hits[0].score / (hits[0].score + hits[1].score));
        let expect = bank.memories[0].direction.get(1).unwrap()[3] as f64 * wa + bank.memories[1].direction.get(1).unwrap()[3] as f64 * wb;
        assert!((two.get(1).unwrap()[3] as f64 - expect).abs() < 1e-5);
        assert!(blend(&bank, &[]).is_err());
    }
}
