//! Kernel-facing part of the iptables agent: render desired state into
//! `iptables-restore` input the way kube-proxy's iptables mode would, apply it, read it
//! back.
//!
//! Entry point: [`IptablesDataplane`]. The pure parts are [`render`] (state → rules) and
//! [`readback`] (`iptables-save` → rules per Service); [`backend`] picks nft or legacy.
#![forbid(unsafe_code)]

pub mod backend;
pub mod conntrack;
pub mod dataplane;
pub mod readback;
pub mod render;

pub use backend::Backend;
pub use dataplane::{IptablesConfig, IptablesDataplane};
pub use render::RenderConfig;
