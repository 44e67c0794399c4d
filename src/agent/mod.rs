//! The agent: the environment protocol and its process client, the built-in environment, the
//! model's policy, the episode runner, and evaluation under memory conditions with statistics.

pub mod builtin;
pub mod eval;
pub mod policy;
pub mod protocol;
pub mod runner;
pub mod stats;

pub use protocol::{EnvCommand, EnvError, EnvInfo, EnvState, Environment, ProcessEnv};
pub use runner::{EpisodeSpec, RunLimits};
