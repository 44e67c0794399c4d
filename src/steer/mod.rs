//! Steering: vectors and their files, plans of what to add where, capture and readouts, all
//! resolved once per batch into tables the fused residual step reads.

pub mod compute;
pub mod files;
pub mod vector;

pub use vector::SteeringVector;
