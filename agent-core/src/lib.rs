//! What every switchyard agent shares; the dataplane crates add only kernel code.
//!
//! The stream client, desired-state cache and `Dataplane` trait arrive with the agent
//! runtime (issue 3); until then this crate only re-exports the state agents program.
#![forbid(unsafe_code)]

pub use switchyard_proto::state;
