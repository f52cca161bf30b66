//! The switchyard controller: sources → cluster snapshot → per-node state → delta streams.
//!
//! Entry points: [`store::Store`] gathers what the [`sources`] report into a
//! [`model::ClusterSnapshot`]; [`compute`] turns it into each node's state (pure);
//! [`hub`] keeps every node's versioned resources; [`server`] streams them to agents and
//! answers queries.
#![forbid(unsafe_code)]

pub mod compute;
pub mod convert;
pub mod coordination;
pub mod files;
pub mod hub;
pub mod model;
pub mod name_ids;
pub mod server;
pub mod sources;
pub mod store;
pub mod telemetry;
