//! Shared parts of switchyard's end-to-end tests and benchmarks: an in-process
//! controller on loopback, a simulated agent speaking the real protocol, and builders
//! for cluster objects.
#![forbid(unsafe_code)]

pub mod controller;
pub mod fixtures;
pub mod netns;
pub mod sim_agent;
