//! Resumable distillation: the activations of every step are appended to a checkpoint file block
//! by block as they are captured, so an interrupted `memory distill` loses at most the block in
//! flight and a rerun on the same inputs continues where it stopped.
//!
//! File layout: one JSON header line (format, fingerprint of the exact inputs, item count,
//! layers, hidden size, block size), then for each finished block, every layer's `[block items,
//! hidden]` activations as little-endian f32. A trailing partial block is cut off on resume.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    format: u32,
    /// FNV-1a of every item's tokens and span start, the layers and the hidden size.
    fingerprint: String,
    items: usize,
    layers: Vec<usize>,
    hidden: usize,
    block: usize,
}

/// FNV-1a over the distillation inputs: the same tokens (so the same experiences, context
/// layout, history, position and tokenizer), layers and width give the same fingerprint.
pub fn fingerprint(items: &[(Vec<u32>, usize)], layers: &[usize], hidden: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(hidden as u64);
    eat(layers.len() as u64);
    layers.iter().for_each(|&l| eat(l as u64));
    eat(items.len() as u64);
    for (tokens, start) in items {
        eat(tokens.len() as u64);
        eat(*start as u64);
        tokens.iter().for_each(|&t| eat(t as u64));
    }
    format!("{h:016x}")
}

/// An open checkpoint: the blocks already on disk, and the file to append the next ones to.
pub struct Checkpoint {
    path: PathBuf,
    file: File,
    layers: usize,
    hidden: usize,
    /// Items whose activations are already stored (a multiple of the block size, or all).
    pub done: usize,
    /// Per layer, the stored activations `[done, hidden]`.
    pub stored: Vec<Vec<f32>>,
    /// A line for the user when an existing file was not used (other inputs) or was cut.
    pub note: Option<String>,
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::InvalidInput(format!("{} ({what}): {e}", path.display()))
}

impl Checkpoint {
    /// Opens `path` for the given inputs: resumes from it when its header matches, otherwise
    /// (missing, other inputs, unreadable header) starts it afresh.
    pub fn open(path: &Path, items: &[(Vec<u32>, usize)], layers: &[usize], hidden: usize, block: usize) -> Result<Checkpoint> {
        let header = Header { format: 1, fingerprint: fingerprint(items, layers, hidden), items: items.len(), layers: layers.to_vec(), hidden, block };
        let block_items = |b: usize| block.min(items.len() - b * block);
        let mut note = None;
        if path.exists() {
            let file = File::open(path).map_err(|e| io_error(path, "reading the checkpoint", e))?;
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            let read_header = reader.read_line(&mut line).ok().and_then(|_| serde_json::from_str::<Header>(line.trim_end()).ok());
            if read_header.as_ref() == Some(&header) {
                let mut stored = vec![Vec::new(); layers.len()];
                let mut done = 0;
                let mut kept = line.len() as u64;
                let mut bytes = Vec::new();
                while done < items.len() {
                    let n = block_items(done / block);
                    bytes.resize(layers.len() * n * hidden * 4, 0);
                    if reader.read_exact(&mut bytes).is_err() {
                        break;
                    }
                    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                    for (k, layer) in values.chunks(n * hidden).enumerate() {
                        stored[k].extend_from_slice(layer);
                    }
                    done += n;
                    kept += bytes.len() as u64;
                }
                let file = OpenOptions::new().write(true).open(path).map_err(|e| io_error(path, "opening the checkpoint", e))?;
                // Cut a partial block written when the previous run stopped.
                file.set_len(kept).map_err(|e| io_error(path, "truncating the checkpoint", e))?;
                let mut file = file;
                use std::io::Seek;
                file.seek(std::io::SeekFrom::End(0)).map_err(|e| io_error(path, "seeking the checkpoint", e))?;
                if done > 0 {
                    note = Some(format!("resuming from {}: {done} of {} steps already captured", path.display(), items.len()));
                }
                return Ok(Checkpoint { path: path.to_path_buf(), file, layers: layers.len(), hidden, done, stored, note });
            }
            note = Some(format!("{} was made from other inputs (experiences, options or model); starting over", path.display()));
        }
        let mut file = File::create(path).map_err(|e| io_error(path, "creating the checkpoint", e))?;
        let line = serde_json::to_string(&header).expect("header serializes") + "\n";
        file.write_all(line.as_bytes()).map_err(|e| io_error(path, "writing the checkpoint", e))?;
        Ok(Checkpoint { path: path.to_path_buf(), file, layers: layers.len(), hidden, done: 0, stored: vec![Vec::new(); layers.len()], note })
    }

    /// Appends one finished block (`activations[layer]` is `[block items, hidden]`) and flushes
    /// it to the disk.
    pub fn append(&mut self, activations: &[Vec<f32>]) -> Result<()> {
        debug_assert_eq!(activations.len(), self.layers);
        let items = activations.first().map_or(0, |a| a.len() / self.hidden);
        let mut bytes = Vec::with_capacity(self.layers * items * self.hidden * 4);
        for layer in activations {
            bytes.extend(layer.iter().flat_map(|v| v.to_le_bytes()));
        }
        self.file.write_all(&bytes).map_err(|e| io_error(&self.path, "writing the checkpoint", e))?;
        self.file.sync_data().map_err(|e| io_error(&self.path, "syncing the checkpoint", e))?;
        self.done += items;
        Ok(())
    }
}
