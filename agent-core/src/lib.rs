//! What every switchyard agent shares; the dataplane crates add only kernel code.
//!
//! Entry point: [`run`] (or [`Agent::start`]) with an [`AgentArgs`] and a
//! [`dataplane::Dataplane`] implementation. The runtime streams the node's state from a
//! controller, failing over between the replicas it lists ([`client`]), keeps the
//! desired cache on disk ([`cache`]), repairs drift ([`drift`]), serves the local query
//! API ([`query`]), `/healthz`, `/livez` and `/metrics` ([`health`], [`metrics`]) and the
//! Services' health-check node ports ([`healthcheck`]).
#![forbid(unsafe_code)]

pub mod agent;
pub mod cache;
pub mod client;
pub mod conntrack;
pub mod dataplane;
pub mod drift;
mod engine;
pub mod fixtures;
pub mod flags;
pub mod health;
pub mod healthcheck;
mod http;
pub mod metrics;
pub mod netfilter;
pub mod query;
pub mod switch;
pub mod telemetry;
pub mod testing;

pub use agent::{Agent, AgentArgs, AgentOptions, LogFormat, desired_from_controller, run};
pub use engine::ApplyTiming;
pub use switchyard_proto::{policy, state};
