//! What every switchyard agent shares; the dataplane crates add only kernel code.
//!
//! Entry point: the [`dataplane::Dataplane`] trait a dataplane implements.
#![forbid(unsafe_code)]

pub mod dataplane;

pub use switchyard_proto::state;
