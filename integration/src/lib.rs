//! Shared parts of switchyard's end-to-end tests and benchmarks: an in-process
//! controller on loopback, a simulated agent speaking the real protocol, builders for
//! cluster objects, the end-to-end scenarios every agent must pass ([`e2e`]), network
//! namespaces and cgroups with probes run from inside them ([`netns`], [`cgroup`]),
//! user-mode Linux guests for kernels the host lacks ([`uml`]), the side-by-side
//! comparison of the three dataplanes ([`compare`]), and certificates made in the test
//! ([`pki`]).
#![forbid(unsafe_code)]

pub mod bench;
pub mod cgroup;
pub mod compare;
pub mod conformance;
pub mod controller;
pub mod e2e;
pub mod etcd;
pub mod fixtures;
pub mod netns;
pub mod pki;
pub mod queries;
pub mod sim_agent;
pub mod uml;
