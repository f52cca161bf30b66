//! Kernel-facing part of the iptables agent: render desired state into
//! `iptables-restore` input the way kube-proxy's iptables mode would, apply it, read it
//! back.
//!
//! Entry point: [`IptablesDataplane`]. The pure parts are [`render`] (state → rules) and
//! [`readback`] (`iptables-save` → rules per Service); agent-core's `netfilter` picks nft
//! or legacy.
#![forbid(unsafe_code)]

pub mod cli;
pub mod dataplane;
pub mod readback;
pub mod render;

pub use dataplane::{IptablesConfig, IptablesDataplane};
pub use render::RenderConfig;
pub use switchyard_agent_core::netfilter::Backend;
