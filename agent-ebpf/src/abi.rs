//! The map keys and values shared with the eBPF programs, field for field as
//! `bpf/swy.h` declares them (sizes are asserted on both sides), with the conversions
//! between them and Rust addresses. Addresses are 16 bytes in network order, IPv4 ones
//! IPv4-mapped; ports are in network order.
#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `SWY_SCOPE_*`: which path a service entry decides for.
pub const SCOPE_SOCK: u8 = 0;
pub const SCOPE_EXT: u8 = 1;
pub const SCOPE_EXT_POD: u8 = 2;

/// `SWY_ACT_*`: what a service entry does.
pub const ACT_FORWARD: u8 = 0;
pub const ACT_REJECT: u8 = 1;
pub const ACT_DROP: u8 = 2;

/// `SWY_F_*`: service entry flags.
pub const F_AFFINITY: u8 = 1 << 0;
pub const F_MAGLEV: u8 = 1 << 1;
pub const F_SNAT: u8 = 1 << 2;
pub const F_SNAT_NON_POD: u8 = 1 << 3;
pub const F_SRC_RANGES: u8 = 1 << 4;
pub const F_POD_SET: u8 = 1 << 5;

/// Entries of one Maglev chunk (`SWY_MAGLEV_CHUNK`).
pub const MAGLEV_CHUNK: usize = 1024;
/// `SWY_NODE_F_NODEPORT`: node ports answer on this address.
pub const NODE_F_NODEPORT: u32 = 1 << 0;
/// Bytes of a Service name in the versions map (`SWY_NAME_LEN`).
pub const NAME_LEN: usize = 128;
/// `SWY_VERSION_F_DIRTY`: an apply of the Service started and did not finish.
pub const VERSION_F_DIRTY: u32 = 1 << 0;
/// `SWY_CT_*`.
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;
pub const CT_F_SNAT: u8 = 1 << 0;
/// `SWY_CFG_F_FIB_SRC`: `bpf_fib_lookup` names source-NAT addresses (Linux 6.7).
pub const CFG_F_FIB_SRC: u32 = 1 << 0;

/// An address as the maps hold it: four words whose bytes are the address in network
/// order (IPv4-mapped for IPv4).
pub type Addr = [u32; 4];

pub fn addr(ip: IpAddr) -> Addr {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes(chunk.try_into().expect("chunks of 4"));
    }
    words
}

pub fn ip(addr: &Addr) -> IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The node-port form of an address of `ip`'s family: `::ffff:0.0.0.0` or `::`.
pub fn any_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(_) => addr(Ipv4Addr::UNSPECIFIED.into()),
        IpAddr::V6(_) => addr(Ipv6Addr::UNSPECIFIED.into()),
    }
}

/// A port in network order, as a `__be16` field holds it.
pub fn port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// A `__be16` field's port in host order.
pub fn host_port(field: u16) -> u16 {
    u16::from_be_bytes(field.to_ne_bytes())
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    pub rev: u32,
    pub count: u16,
    pub action: u8,
    pub flags: u8,
    pub res_id: u32,
    pub affinity_timeout: u32,
    pub affinity_id: u32,
    pub maglev_size: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub rev: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaglevKey {
    pub rev: u32,
    pub chunk: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevChunk {
    pub slot: [u16; MAGLEV_CHUNK],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeAddrKey {
    pub addr: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RangeData {
    pub res_id: u32,
    pub addr: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrData {
    pub addr: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VersionKey {
    pub name: [u8; NAME_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VersionValue {
    pub version: u64,
    pub res_id: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub sock_blackholes: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub flags: u32,
    pub pad: u32,
}

/// The data of a `swy_src_addrs` key (`struct swy_src_key` after its prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcData {
    pub ifindex: u32,
    pub addr: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcValue {
    pub addr: Addr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub object_hash: u64,
    pub cgroup_id: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub addr: Addr,
    pub addr2: Addr,
    pub port: u16,
    pub port2: u16,
    pub flags: u8,
    /// `CT_FORWARD` or `CT_REPLY`.
    pub dir: u8,
    pub pad: [u8; 2],
    pub last_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: Addr,
    pub affinity_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub addr: Addr,
    pub port: u16,
    pub pad: u16,
    pub rev: u32,
    pub slot: u32,
    pub pad2: u32,
    pub last_ns: u64,
}

impl VersionKey {
    /// The key of a Service name; `None` when it does not fit (names are validated DNS
    /// labels, `namespace/name` at most 127 bytes, so it always fits).
    pub fn of(name: &str) -> Option<Self> {
        let bytes = name.as_bytes();
        if bytes.len() >= NAME_LEN || bytes.contains(&0) {
            return None;
        }
        let mut key = Self {
            name: [0; NAME_LEN],
        };
        key.name[..bytes.len()].copy_from_slice(bytes);
        Some(key)
    }

    /// The name, if the key holds UTF-8 up to its first NUL.
    pub fn name(&self) -> Option<&str> {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
        std::str::from_utf8(&self.name[..end]).ok()
    }
}

// SAFETY: every type is `repr(C)`, made only of integers and arrays of integers, with
// no padding the compiler adds (the sizes below equal the sum of the fields), so any
// bit pattern is a valid value and the bytes the kernel copies in and out are the value.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcValue {}
unsafe impl aya::Pod for SlotKey {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for MaglevKey {}
unsafe impl aya::Pod for MaglevChunk {}
unsafe impl aya::Pod for NodeAddrKey {}
unsafe impl aya::Pod for RangeData {}
unsafe impl aya::Pod for CidrData {}
unsafe impl aya::Pod for VersionKey {}
unsafe impl aya::Pod for VersionValue {}
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for SrcData {}
unsafe impl aya::Pod for SrcValue {}
unsafe impl aya::Pod for Meta {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shared_type_has_the_size_the_c_header_asserts() {
        use std::mem::size_of;
        assert_eq!(size_of::<SvcKey>(), 20);
        assert_eq!(size_of::<SvcValue>(), 24);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<MaglevChunk>(), 2 * MAGLEV_CHUNK);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityValue>(), 40);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 48);
        // LPM keys: the 4-byte prefix length aya adds, then the data.
        assert_eq!(size_of::<RangeData>() + 4, 24);
        assert_eq!(size_of::<CidrData>() + 4, 20);
        assert_eq!(size_of::<SrcData>() + 4, 24);
        assert_eq!(size_of::<SrcValue>(), 16);
        assert_eq!(size_of::<VersionKey>(), NAME_LEN);
        assert_eq!(size_of::<VersionValue>(), 16);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<Meta>(), 16);
    }

    #[test]
    fn addresses_survive_the_map_form_and_ipv4_is_mapped() {
        for text in ["10.96.0.10", "0.0.0.0", "fd00::10", "::", "2001:db8::1"] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(super::ip(&addr(ip)), ip, "{text}");
        }
        let v4 = addr("10.96.0.10".parse().unwrap());
        let bytes: Vec<u8> = v4.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(port(80).to_ne_bytes(), [0, 80]);
        assert_eq!(host_port(port(30080)), 30080);
    }

    #[test]
    fn service_names_fit_the_versions_key_and_come_back() {
        let key = VersionKey::of("default/web").unwrap();
        assert_eq!(key.name(), Some("default/web"));
        assert!(VersionKey::of(&"x".repeat(NAME_LEN)).is_none());
        assert!(VersionKey::of("a\0b").is_none());
    }
}
