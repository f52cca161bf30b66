//! Kernel-facing part of the iptables agent: render desired state, apply it, read it back.
//!
//! Not implemented yet: the agent runtime and dataplanes are the next issues.
#![forbid(unsafe_code)]
