//! Shared parts of switchyard's end-to-end tests and benchmarks: an in-process
//! controller on loopback, a simulated agent speaking the real protocol, builders for
//! cluster objects, network namespaces and cgroups with probes run from inside them
//! ([`netns`], [`cgroup`]), and the end-to-end scenarios every agent must pass ([`e2e`]).
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod controller;
pub mod e2e;
pub mod fixtures;
pub mod netns;
pub mod sim_agent;
