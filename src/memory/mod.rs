//! Neural procedural memory: experiences (episodes as JSON lines), the agent context built from
//! them, distillation of success-minus-failure steering directions into a memory bank (one
//! safetensors file), retrieval of memories for a task by the cosine similarity of keys, and
//! analysis of a bank (similarity, basis directions, the steps behind them, labels, reports).

pub mod analyze;
pub mod apply;
pub mod bank;
pub mod checkpoint;
pub mod context;
pub mod distill;
pub mod experience;
pub mod label;
pub mod report;
pub mod retrieve;

pub use bank::{Memory, MemoryBank};
pub use context::Position;
pub use experience::{Episode, EpisodeSource, ExperienceReader, Step};
