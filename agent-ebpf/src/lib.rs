//! Kernel-facing part of the eBPF agent: Services become entries of pinned BPF maps
//! that socket-level programs (at `connect()`) and tc programs (traffic from outside the
//! node) read. Entry point: [`EbpfDataplane`].
//!
//! The pure parts are [`render`] (state → map entries, kube-proxy's decisions) and
//! [`maglev`] (consistent-hashing tables); [`abi`] mirrors the C structs of `bpf/swy.h`;
//! [`maps`] and [`loader`] own the kernel objects (maps, programs, links, pins), [`tc`]
//! the classic tc filters of kernels without TCX.
#![deny(unsafe_code)]

pub mod abi;
pub mod cli;
pub mod codec;
pub mod dataplane;
pub mod host;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod render;
pub mod tc;

pub use dataplane::{EbpfConfig, EbpfDataplane};
pub use loader::{Attach, Features, SnatSource, TcAttachMode, TcMode};
pub use render::RenderConfig;
