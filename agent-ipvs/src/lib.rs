//! Kernel-facing part of the IPVS agent: render each Service into IPVS virtual services,
//! VIPs on a dummy device and ipset elements (for a fixed set of iptables rules), apply
//! them incrementally, read them back.
//!
//! Entry point: [`IpvsDataplane`]. The pure parts are [`render`] (state → kernel objects),
//! [`rules`] (the fixed iptables rules), [`ipset`] (set notation), [`readback`] (kernel
//! dumps → objects per Service) and [`transition`] (the operations of a change).
//! [`netlink`] is the in-process IPVS client that programs and reads the kernel, [`link`]
//! the rtnetlink side (the dummy device and its VIPs).
#![forbid(unsafe_code)]

pub mod cli;
pub mod dataplane;
pub mod ipset;
pub mod ipset_netlink;
pub mod link;
pub mod netlink;
pub mod nlbatch;
pub mod readback;
pub mod render;
pub mod rules;
pub mod transition;

pub use dataplane::{IpvsConfig, IpvsDataplane};
