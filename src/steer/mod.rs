//! Steering: vectors and their files, plans of what to add where, capture and readouts, all
//! resolved once per batch into tables the fused residual step reads.

pub mod capture;
pub mod collect;
pub mod compute;
pub mod files;
pub mod plan;
pub mod tables;
pub mod vector;

pub use capture::{CaptureRecord, ReadoutRecord};
pub use plan::{CapturePlan, CapturePositions, Point, ReadoutPlan, Schedule, SteeringMode, SteeringPlan, SteeringTerm};
pub use vector::SteeringVector;
