//! The switchyard.v1 wire contract: generated messages and services, the descriptor set
//! for server reflection, and [`state`], the typed form the rest of the code works with.
//!
//! Generated types stay at the boundary: controller and agents convert them to and
//! from [`state`] with `From` / `TryFrom` and never pass them further in.
#![forbid(unsafe_code)]

pub mod names;
pub mod policy;
pub mod reflection;
pub mod state;

/// Generated code for package `switchyard.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("switchyard.v1");
}

/// Server-side twin of `NodeStateDiscovery` that sends already-encoded resources; see
/// `proto/switchyard/v1/encoded/node_state_server.proto`. Agents use [`v1`].
pub mod encoded {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/encoded/switchyard.v1.rs"));
}

/// Encoded `FileDescriptorSet` of every `switchyard.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));

pub use state::{format_version, parse_version, resource_version, version_hash};

/// Trailer a controller replica sets (value [`RECONNECT_ELSEWHERE`]) on the
/// `UNAVAILABLE` status that ends an agent's stream to move it to another replica
/// (load balancing across replicas): the agent reconnects at once to another controller
/// of its list, resuming with the versions it holds.
pub const RECONNECT_METADATA: &str = "switchyard-reconnect";
/// The value of [`RECONNECT_METADATA`].
pub const RECONNECT_ELSEWHERE: &str = "elsewhere";
