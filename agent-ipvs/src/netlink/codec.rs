//! The IPVS generic-netlink family on the wire: commands and attributes as
//! `netlink-packet-core` [`Nla`]s, the [`IpvsMessage`] payload (a [`GenlFamily`]), and
//! the conversions between them and the domain types. Pure: no sockets.
//!
//! Wire facts that are easy to get wrong (from `include/uapi/linux/ip_vs.h` and
//! `net/netfilter/ipvs/ip_vs_ctl.c`):
//! - addresses (`IPVS_SVC_ATTR_ADDR`, `IPVS_DEST_ATTR_ADDR`) are a 16-byte
//!   `union nf_inet_addr`: an IPv4 address fills the first 4 bytes, the rest is zero.
//!   The kernel's policy is "binary, at most 16 bytes" and it copies what it gets into a
//!   zeroed union, so 4 bytes would do; the kernel always sends 16, and so does this
//!   client (as `ipvsadm` does). Which family the bytes are is told by `IPVS_SVC_ATTR_AF`
//!   (and, for a destination, `IPVS_DEST_ATTR_ADDR_FAMILY`, else the service's).
//! - ports (`*_ATTR_PORT`, `IPVS_DEST_ATTR_TUN_PORT`) are `__be16` in an `NLA_U16`,
//!   without `NLA_F_NET_BYTEORDER`. AF, protocol, weights, timeouts are host order.
//! - `IPVS_SVC_ATTR_NETMASK` is the kernel's `__be32 netmask` copied raw: an IPv4
//!   service holds a mask in network order, an IPv6 service a prefix length in host
//!   order.
//! - `IPVS_SVC_ATTR_FLAGS` is `struct ip_vs_flags { __u32 flags; __u32 mask; }`; the
//!   kernel keeps the bits under `mask`. Dumps send `mask = ~0` and include
//!   `IP_VS_SVC_F_HASHED`.
//! - Replies to `IPVS_CMD_GET_INFO` come as `IPVS_CMD_SET_INFO` with `IPVS_INFO_ATTR_*`
//!   at the top level, numbered like `IPVS_CMD_ATTR_SERVICE`/`_DEST`: top-level
//!   attributes are parsed by command.
//! - Counters come twice: `*_ATTR_STATS` (u32, bytes u64) and `*_ATTR_STATS64` (all u64,
//!   with `IPVS_STATS_ATTR_PAD` for alignment).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLMSG_DONE, NLMSG_ERROR,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator,
    Parseable, ParseableParametrized, emit_u16, emit_u32, emit_u64, parse_string, parse_u8,
    parse_u16, parse_u32, parse_u64,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use super::types::{
    DestId, Destination, ForwardMethod, Info, Op, Protocol, Service, ServiceId, Stats, Timeouts,
    flags,
};

/// The generic-netlink family name (`IPVS_GENL_NAME`).
pub const FAMILY_NAME: &str = "IPVS";
/// The family's version (`IPVS_GENL_VERSION`).
pub const FAMILY_VERSION: u8 = 1;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// IPVS commands (`IPVS_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IpvsCmd {
    /// Add a service.
    NewService = 1,
    /// Modify a service.
    SetService = 2,
    /// Delete a service.
    DelService = 3,
    /// Get a service, or dump all.
    GetService = 4,
    /// Add a destination.
    NewDest = 5,
    /// Modify a destination.
    SetDest = 6,
    /// Delete a destination.
    DelDest = 7,
    /// Dump a service's destinations.
    GetDest = 8,
    /// Start a sync daemon.
    NewDaemon = 9,
    /// Stop a sync daemon.
    DelDaemon = 10,
    /// Sync daemon status.
    GetDaemon = 11,
    /// Set timeouts.
    SetConfig = 12,
    /// Get timeouts.
    GetConfig = 13,
    /// Reply to [`IpvsCmd::GetInfo`].
    SetInfo = 14,
    /// Version and connection table size.
    GetInfo = 15,
    /// Zero counters.
    Zero = 16,
    /// Delete every service.
    Flush = 17,
}

impl IpvsCmd {
    /// `IPVS_CMD_NEW_SERVICE` …
    pub fn name(self) -> &'static str {
        match self {
            IpvsCmd::NewService => "IPVS_CMD_NEW_SERVICE",
            IpvsCmd::SetService => "IPVS_CMD_SET_SERVICE",
            IpvsCmd::DelService => "IPVS_CMD_DEL_SERVICE",
            IpvsCmd::GetService => "IPVS_CMD_GET_SERVICE",
            IpvsCmd::NewDest => "IPVS_CMD_NEW_DEST",
            IpvsCmd::SetDest => "IPVS_CMD_SET_DEST",
            IpvsCmd::DelDest => "IPVS_CMD_DEL_DEST",
            IpvsCmd::GetDest => "IPVS_CMD_GET_DEST",
            IpvsCmd::NewDaemon => "IPVS_CMD_NEW_DAEMON",
            IpvsCmd::DelDaemon => "IPVS_CMD_DEL_DAEMON",
            IpvsCmd::GetDaemon => "IPVS_CMD_GET_DAEMON",
            IpvsCmd::SetConfig => "IPVS_CMD_SET_CONFIG",
            IpvsCmd::GetConfig => "IPVS_CMD_GET_CONFIG",
            IpvsCmd::SetInfo => "IPVS_CMD_SET_INFO",
            IpvsCmd::GetInfo => "IPVS_CMD_GET_INFO",
            IpvsCmd::Zero => "IPVS_CMD_ZERO",
            IpvsCmd::Flush => "IPVS_CMD_FLUSH",
        }
    }
}

impl TryFrom<u8> for IpvsCmd {
    type Error = DecodeError;

    fn try_from(value: u8) -> Result<Self, DecodeError> {
        use IpvsCmd::*;
        Ok(match value {
            1 => NewService,
            2 => SetService,
            3 => DelService,
            4 => GetService,
            5 => NewDest,
            6 => SetDest,
            7 => DelDest,
            8 => GetDest,
            9 => NewDaemon,
            10 => DelDaemon,
            11 => GetDaemon,
            12 => SetConfig,
            13 => GetConfig,
            14 => SetInfo,
            15 => GetInfo,
            16 => Zero,
            17 => Flush,
            other => return Err(format!("unknown IPVS command {other}").into()),
        })
    }
}

/// `IPVS_CMD_ATTR_*`, `IPVS_SVC_ATTR_*`, `IPVS_DEST_ATTR_*`, `IPVS_STATS_ATTR_*`,
/// `IPVS_INFO_ATTR_*` numbers.
pub mod attr {
    #![allow(missing_docs)]
    pub const CMD_SERVICE: u16 = 1;
    pub const CMD_DEST: u16 = 2;
    pub const CMD_DAEMON: u16 = 3;
    pub const CMD_TIMEOUT_TCP: u16 = 4;
    pub const CMD_TIMEOUT_TCP_FIN: u16 = 5;
    pub const CMD_TIMEOUT_UDP: u16 = 6;

    pub const SVC_AF: u16 = 1;
    pub const SVC_PROTOCOL: u16 = 2;
    pub const SVC_ADDR: u16 = 3;
    pub const SVC_PORT: u16 = 4;
    pub const SVC_FWMARK: u16 = 5;
    pub const SVC_SCHED_NAME: u16 = 6;
    pub const SVC_FLAGS: u16 = 7;
    pub const SVC_TIMEOUT: u16 = 8;
    pub const SVC_NETMASK: u16 = 9;
    pub const SVC_STATS: u16 = 10;
    pub const SVC_PE_NAME: u16 = 11;
    pub const SVC_STATS64: u16 = 12;

    pub const DEST_ADDR: u16 = 1;
    pub const DEST_PORT: u16 = 2;
    pub const DEST_FWD_METHOD: u16 = 3;
    pub const DEST_WEIGHT: u16 = 4;
    pub const DEST_U_THRESH: u16 = 5;
    pub const DEST_L_THRESH: u16 = 6;
    pub const DEST_ACTIVE_CONNS: u16 = 7;
    pub const DEST_INACT_CONNS: u16 = 8;
    pub const DEST_PERSIST_CONNS: u16 = 9;
    pub const DEST_STATS: u16 = 10;
    pub const DEST_ADDR_FAMILY: u16 = 11;
    pub const DEST_STATS64: u16 = 12;
    pub const DEST_TUN_TYPE: u16 = 13;
    pub const DEST_TUN_PORT: u16 = 14;
    pub const DEST_TUN_FLAGS: u16 = 15;

    pub const STATS_CONNS: u16 = 1;
    pub const STATS_INPKTS: u16 = 2;
    pub const STATS_OUTPKTS: u16 = 3;
    pub const STATS_INBYTES: u16 = 4;
    pub const STATS_OUTBYTES: u16 = 5;
    pub const STATS_CPS: u16 = 6;
    pub const STATS_INPPS: u16 = 7;
    pub const STATS_OUTPPS: u16 = 8;
    pub const STATS_INBPS: u16 = 9;
    pub const STATS_OUTBPS: u16 = 10;
    pub const STATS_PAD: u16 = 11;

    pub const INFO_VERSION: u16 = 1;
    pub const INFO_CONN_TAB_SIZE: u16 = 2;
}

/// A top-level attribute of an IPVS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdAttr {
    /// `IPVS_CMD_ATTR_SERVICE`.
    Service(Vec<ServiceAttr>),
    /// `IPVS_CMD_ATTR_DEST`.
    Dest(Vec<DestAttr>),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP`, seconds.
    TimeoutTcp(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN`, seconds.
    TimeoutTcpFin(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_UDP`, seconds.
    TimeoutUdp(u32),
    /// `IPVS_INFO_ATTR_VERSION` (only in [`IpvsCmd::SetInfo`]).
    InfoVersion(u32),
    /// `IPVS_INFO_ATTR_CONN_TAB_SIZE` (only in [`IpvsCmd::SetInfo`]).
    InfoConnTabSize(u32),
    /// Anything else (sync daemon attributes, newer kernels' additions).
    Other(DefaultNla),
}

/// An attribute inside `IPVS_CMD_ATTR_SERVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceAttr {
    /// Address family (`AF_INET` 2, `AF_INET6` 10).
    Af(u16),
    /// IP protocol number.
    Protocol(u16),
    /// `union nf_inet_addr` bytes (16 sent; 4 or 16 accepted).
    Addr(Vec<u8>),
    /// Port (big-endian on the wire).
    Port(u16),
    /// Firewall mark of a fwmark service.
    Fwmark(u32),
    /// Scheduler name.
    SchedName(String),
    /// `struct ip_vs_flags`.
    Flags {
        /// The bits.
        flags: u32,
        /// Which bits to take.
        mask: u32,
    },
    /// Persistence timeout, seconds.
    Timeout(u32),
    /// The kernel's `__be32 netmask`, raw bytes.
    Netmask([u8; 4]),
    /// `IPVS_SVC_ATTR_STATS`.
    Stats(Vec<StatsAttr>),
    /// Persistence engine name.
    PeName(String),
    /// `IPVS_SVC_ATTR_STATS64`.
    Stats64(Vec<StatsAttr>),
    /// An attribute this client does not know.
    Other(DefaultNla),
}

/// An attribute inside `IPVS_CMD_ATTR_DEST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAttr {
    /// `union nf_inet_addr` bytes.
    Addr(Vec<u8>),
    /// Port (big-endian on the wire).
    Port(u16),
    /// Forwarding method (`IP_VS_CONN_F_*` & `IP_VS_CONN_F_FWD_MASK`).
    FwdMethod(u32),
    /// Weight.
    Weight(u32),
    /// Upper threshold.
    UThresh(u32),
    /// Lower threshold.
    LThresh(u32),
    /// Active connections.
    ActiveConns(u32),
    /// Inactive connections.
    InactConns(u32),
    /// Persistence templates.
    PersistConns(u32),
    /// `IPVS_DEST_ATTR_STATS`.
    Stats(Vec<StatsAttr>),
    /// Address family of the destination.
    AddrFamily(u16),
    /// `IPVS_DEST_ATTR_STATS64`.
    Stats64(Vec<StatsAttr>),
    /// Tunnel type.
    TunType(u8),
    /// Tunnel port (big-endian on the wire).
    TunPort(u16),
    /// Tunnel flags.
    TunFlags(u16),
    /// An attribute this client does not know.
    Other(DefaultNla),
}

/// A counter inside a stats attribute: kind and value, in the width it came in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatsAttr {
    /// A 32-bit counter.
    U32(u16, u32),
    /// A 64-bit counter.
    U64(u16, u64),
    /// Padding or anything else.
    Other(DefaultNla),
}

fn nested_len<T: Nla>(attrs: &[T]) -> usize {
    attrs.buffer_len()
}

impl Nla for CmdAttr {
    fn value_len(&self) -> usize {
        match self {
            CmdAttr::Service(a) => nested_len(a),
            CmdAttr::Dest(a) => nested_len(a),
            CmdAttr::TimeoutTcp(_)
            | CmdAttr::TimeoutTcpFin(_)
            | CmdAttr::TimeoutUdp(_)
            | CmdAttr::InfoVersion(_)
            | CmdAttr::InfoConnTabSize(_) => 4,
            CmdAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            CmdAttr::Service(_) => attr::CMD_SERVICE,
            CmdAttr::Dest(_) => attr::CMD_DEST,
            CmdAttr::TimeoutTcp(_) => attr::CMD_TIMEOUT_TCP,
            CmdAttr::TimeoutTcpFin(_) => attr::CMD_TIMEOUT_TCP_FIN,
            CmdAttr::TimeoutUdp(_) => attr::CMD_TIMEOUT_UDP,
            CmdAttr::InfoVersion(_) => attr::INFO_VERSION,
            CmdAttr::InfoConnTabSize(_) => attr::INFO_CONN_TAB_SIZE,
            CmdAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            CmdAttr::Service(a) => a.as_slice().emit(buffer),
            CmdAttr::Dest(a) => a.as_slice().emit(buffer),
            CmdAttr::TimeoutTcp(v)
            | CmdAttr::TimeoutTcpFin(v)
            | CmdAttr::TimeoutUdp(v)
            | CmdAttr::InfoVersion(v)
            | CmdAttr::InfoConnTabSize(v) => emit_u32(buffer, *v).expect("4-byte buffer"),
            CmdAttr::Other(nla) => nla.emit_value(buffer),
        }
    }

    // The kernel parses nested attributes with or without NLA_F_NESTED; like ipvsadm,
    // this client sends them without.
}

impl<T: AsRef<[u8]> + ?Sized> ParseableParametrized<NlaBuffer<&T>, IpvsCmd> for CmdAttr {
    fn parse_with_param(buf: &NlaBuffer<&T>, cmd: IpvsCmd) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match (cmd, buf.kind()) {
            (IpvsCmd::SetInfo, attr::INFO_VERSION) => CmdAttr::InfoVersion(parse_u32(v)?),
            (IpvsCmd::SetInfo, attr::INFO_CONN_TAB_SIZE) => CmdAttr::InfoConnTabSize(parse_u32(v)?),
            (IpvsCmd::SetInfo, _) => CmdAttr::Other(DefaultNla::parse(buf)?),
            (_, attr::CMD_SERVICE) => CmdAttr::Service(parse_nested(v, "IPVS_CMD_ATTR_SERVICE")?),
            (_, attr::CMD_DEST) => CmdAttr::Dest(parse_nested(v, "IPVS_CMD_ATTR_DEST")?),
            (_, attr::CMD_TIMEOUT_TCP) => CmdAttr::TimeoutTcp(parse_u32(v)?),
            (_, attr::CMD_TIMEOUT_TCP_FIN) => CmdAttr::TimeoutTcpFin(parse_u32(v)?),
            (_, attr::CMD_TIMEOUT_UDP) => CmdAttr::TimeoutUdp(parse_u32(v)?),
            _ => CmdAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

fn parse_nested<A>(value: &[u8], what: &str) -> Result<Vec<A>, DecodeError>
where
    A: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    NlasIterator::new(value)
        .map(|nla| nla.and_then(|nla| A::parse(&nla)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: {e}").into())
}

/// Prefixes a decoding error with the attribute's name.
fn what(name: &'static str) -> impl Fn(DecodeError) -> DecodeError {
    move |e| DecodeError::from(format!("{name}: {e}"))
}

fn parse_be16(v: &[u8]) -> Result<u16, DecodeError> {
    match v {
        [a, b] => Ok(u16::from_be_bytes([*a, *b])),
        _ => Err(DecodeError::invalid_number(2, v.len())),
    }
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            ServiceAttr::Af(_) | ServiceAttr::Protocol(_) | ServiceAttr::Port(_) => 2,
            ServiceAttr::Addr(a) => a.len(),
            ServiceAttr::Fwmark(_) | ServiceAttr::Timeout(_) | ServiceAttr::Netmask(_) => 4,
            ServiceAttr::SchedName(s) | ServiceAttr::PeName(s) => s.len() + 1,
            ServiceAttr::Flags { .. } => 8,
            ServiceAttr::Stats(a) | ServiceAttr::Stats64(a) => nested_len(a),
            ServiceAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            ServiceAttr::Af(_) => attr::SVC_AF,
            ServiceAttr::Protocol(_) => attr::SVC_PROTOCOL,
            ServiceAttr::Addr(_) => attr::SVC_ADDR,
            ServiceAttr::Port(_) => attr::SVC_PORT,
            ServiceAttr::Fwmark(_) => attr::SVC_FWMARK,
            ServiceAttr::SchedName(_) => attr::SVC_SCHED_NAME,
            ServiceAttr::Flags { .. } => attr::SVC_FLAGS,
            ServiceAttr::Timeout(_) => attr::SVC_TIMEOUT,
            ServiceAttr::Netmask(_) => attr::SVC_NETMASK,
            ServiceAttr::Stats(_) => attr::SVC_STATS,
            ServiceAttr::PeName(_) => attr::SVC_PE_NAME,
            ServiceAttr::Stats64(_) => attr::SVC_STATS64,
            ServiceAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            ServiceAttr::Af(v) | ServiceAttr::Protocol(v) => {
                emit_u16(buffer, *v).expect("2-byte buffer")
            }
            ServiceAttr::Port(v) => buffer.copy_from_slice(&v.to_be_bytes()),
            ServiceAttr::Addr(a) => buffer.copy_from_slice(a),
            ServiceAttr::Fwmark(v) | ServiceAttr::Timeout(v) => {
                emit_u32(buffer, *v).expect("4-byte buffer")
            }
            ServiceAttr::Netmask(raw) => buffer.copy_from_slice(raw),
            ServiceAttr::SchedName(s) | ServiceAttr::PeName(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            ServiceAttr::Flags { flags, mask } => {
                emit_u32(&mut buffer[..4], *flags).expect("4-byte buffer");
                emit_u32(&mut buffer[4..8], *mask).expect("4-byte buffer");
            }
            ServiceAttr::Stats(a) | ServiceAttr::Stats64(a) => a.as_slice().emit(buffer),
            ServiceAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            attr::SVC_AF => ServiceAttr::Af(parse_u16(v).map_err(what("IPVS_SVC_ATTR_AF"))?),
            attr::SVC_PROTOCOL => {
                ServiceAttr::Protocol(parse_u16(v).map_err(what("IPVS_SVC_ATTR_PROTOCOL"))?)
            }
            attr::SVC_ADDR => ServiceAttr::Addr(v.to_vec()),
            attr::SVC_PORT => ServiceAttr::Port(parse_be16(v).map_err(what("IPVS_SVC_ATTR_PORT"))?),
            attr::SVC_FWMARK => {
                ServiceAttr::Fwmark(parse_u32(v).map_err(what("IPVS_SVC_ATTR_FWMARK"))?)
            }
            attr::SVC_SCHED_NAME => {
                ServiceAttr::SchedName(parse_string(v).map_err(what("IPVS_SVC_ATTR_SCHED_NAME"))?)
            }
            attr::SVC_FLAGS => {
                if v.len() != 8 {
                    return Err(format!("IPVS_SVC_ATTR_FLAGS: {} bytes, want 8", v.len()).into());
                }
                ServiceAttr::Flags {
                    flags: parse_u32(&v[..4])?,
                    mask: parse_u32(&v[4..])?,
                }
            }
            attr::SVC_TIMEOUT => {
                ServiceAttr::Timeout(parse_u32(v).map_err(what("IPVS_SVC_ATTR_TIMEOUT"))?)
            }
            attr::SVC_NETMASK => ServiceAttr::Netmask(v.try_into().map_err(|_| {
                DecodeError::from(format!("IPVS_SVC_ATTR_NETMASK: {} bytes, want 4", v.len()))
            })?),
            attr::SVC_STATS => ServiceAttr::Stats(parse_nested(v, "IPVS_SVC_ATTR_STATS")?),
            attr::SVC_PE_NAME => {
                ServiceAttr::PeName(parse_string(v).map_err(what("IPVS_SVC_ATTR_PE_NAME"))?)
            }
            attr::SVC_STATS64 => ServiceAttr::Stats64(parse_nested(v, "IPVS_SVC_ATTR_STATS64")?),
            _ => ServiceAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            DestAttr::Addr(a) => a.len(),
            DestAttr::Port(_)
            | DestAttr::AddrFamily(_)
            | DestAttr::TunPort(_)
            | DestAttr::TunFlags(_) => 2,
            DestAttr::TunType(_) => 1,
            DestAttr::FwdMethod(_)
            | DestAttr::Weight(_)
            | DestAttr::UThresh(_)
            | DestAttr::LThresh(_)
            | DestAttr::ActiveConns(_)
            | DestAttr::InactConns(_)
            | DestAttr::PersistConns(_) => 4,
            DestAttr::Stats(a) | DestAttr::Stats64(a) => nested_len(a),
            DestAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DestAttr::Addr(_) => attr::DEST_ADDR,
            DestAttr::Port(_) => attr::DEST_PORT,
            DestAttr::FwdMethod(_) => attr::DEST_FWD_METHOD,
            DestAttr::Weight(_) => attr::DEST_WEIGHT,
            DestAttr::UThresh(_) => attr::DEST_U_THRESH,
            DestAttr::LThresh(_) => attr::DEST_L_THRESH,
            DestAttr::ActiveConns(_) => attr::DEST_ACTIVE_CONNS,
            DestAttr::InactConns(_) => attr::DEST_INACT_CONNS,
            DestAttr::PersistConns(_) => attr::DEST_PERSIST_CONNS,
            DestAttr::Stats(_) => attr::DEST_STATS,
            DestAttr::AddrFamily(_) => attr::DEST_ADDR_FAMILY,
            DestAttr::Stats64(_) => attr::DEST_STATS64,
            DestAttr::TunType(_) => attr::DEST_TUN_TYPE,
            DestAttr::TunPort(_) => attr::DEST_TUN_PORT,
            DestAttr::TunFlags(_) => attr::DEST_TUN_FLAGS,
            DestAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            DestAttr::Addr(a) => buffer.copy_from_slice(a),
            DestAttr::Port(v) | DestAttr::TunPort(v) => buffer.copy_from_slice(&v.to_be_bytes()),
            DestAttr::AddrFamily(v) | DestAttr::TunFlags(v) => {
                emit_u16(buffer, *v).expect("2-byte buffer")
            }
            DestAttr::TunType(v) => buffer[0] = *v,
            DestAttr::FwdMethod(v)
            | DestAttr::Weight(v)
            | DestAttr::UThresh(v)
            | DestAttr::LThresh(v)
            | DestAttr::ActiveConns(v)
            | DestAttr::InactConns(v)
            | DestAttr::PersistConns(v) => emit_u32(buffer, *v).expect("4-byte buffer"),
            DestAttr::Stats(a) | DestAttr::Stats64(a) => a.as_slice().emit(buffer),
            DestAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            attr::DEST_ADDR => DestAttr::Addr(v.to_vec()),
            attr::DEST_PORT => DestAttr::Port(parse_be16(v).map_err(what("IPVS_DEST_ATTR_PORT"))?),
            attr::DEST_FWD_METHOD => {
                DestAttr::FwdMethod(parse_u32(v).map_err(what("IPVS_DEST_ATTR_FWD_METHOD"))?)
            }
            attr::DEST_WEIGHT => {
                DestAttr::Weight(parse_u32(v).map_err(what("IPVS_DEST_ATTR_WEIGHT"))?)
            }
            attr::DEST_U_THRESH => {
                DestAttr::UThresh(parse_u32(v).map_err(what("IPVS_DEST_ATTR_U_THRESH"))?)
            }
            attr::DEST_L_THRESH => {
                DestAttr::LThresh(parse_u32(v).map_err(what("IPVS_DEST_ATTR_L_THRESH"))?)
            }
            attr::DEST_ACTIVE_CONNS => {
                DestAttr::ActiveConns(parse_u32(v).map_err(what("IPVS_DEST_ATTR_ACTIVE_CONNS"))?)
            }
            attr::DEST_INACT_CONNS => {
                DestAttr::InactConns(parse_u32(v).map_err(what("IPVS_DEST_ATTR_INACT_CONNS"))?)
            }
            attr::DEST_PERSIST_CONNS => {
                DestAttr::PersistConns(parse_u32(v).map_err(what("IPVS_DEST_ATTR_PERSIST_CONNS"))?)
            }
            attr::DEST_STATS => DestAttr::Stats(parse_nested(v, "IPVS_DEST_ATTR_STATS")?),
            attr::DEST_ADDR_FAMILY => {
                DestAttr::AddrFamily(parse_u16(v).map_err(what("IPVS_DEST_ATTR_ADDR_FAMILY"))?)
            }
            attr::DEST_STATS64 => DestAttr::Stats64(parse_nested(v, "IPVS_DEST_ATTR_STATS64")?),
            attr::DEST_TUN_TYPE => {
                DestAttr::TunType(parse_u8(v).map_err(what("IPVS_DEST_ATTR_TUN_TYPE"))?)
            }
            attr::DEST_TUN_PORT => {
                DestAttr::TunPort(parse_be16(v).map_err(what("IPVS_DEST_ATTR_TUN_PORT"))?)
            }
            attr::DEST_TUN_FLAGS => {
                DestAttr::TunFlags(parse_u16(v).map_err(what("IPVS_DEST_ATTR_TUN_FLAGS"))?)
            }
            _ => DestAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

impl Nla for StatsAttr {
    fn value_len(&self) -> usize {
        match self {
            StatsAttr::U32(..) => 4,
            StatsAttr::U64(..) => 8,
            StatsAttr::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            StatsAttr::U32(kind, _) | StatsAttr::U64(kind, _) => *kind,
            StatsAttr::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            StatsAttr::U32(_, v) => emit_u32(buffer, *v).expect("4-byte buffer"),
            StatsAttr::U64(_, v) => emit_u64(buffer, *v).expect("8-byte buffer"),
            StatsAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for StatsAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match (buf.kind(), v.len()) {
            (attr::STATS_PAD, _) => StatsAttr::Other(DefaultNla::parse(buf)?),
            (kind, 4) => StatsAttr::U32(kind, parse_u32(v)?),
            (kind, 8) => StatsAttr::U64(kind, parse_u64(v)?),
            _ => StatsAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// The payload of an IPVS generic-netlink message: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    /// The command.
    pub cmd: IpvsCmd,
    /// Its top-level attributes.
    pub attrs: Vec<CmdAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }

    fn command(&self) -> u8 {
        self.cmd as u8
    }

    fn version(&self) -> u8 {
        FAMILY_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let cmd = IpvsCmd::try_from(header.cmd)?;
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| CmdAttr::parse_with_param(&nla, cmd)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DecodeError::from(format!("{}: {e}", cmd.name())))?;
        Ok(IpvsMessage { cmd, attrs })
    }
}

impl IpvsMessage {
    /// A message with no attributes.
    pub fn bare(cmd: IpvsCmd) -> Self {
        IpvsMessage {
            cmd,
            attrs: Vec::new(),
        }
    }

    /// The request that carries out `op`.
    pub fn for_op(op: &Op) -> Self {
        let (cmd, attrs) = match op {
            Op::NewService(s) => (
                IpvsCmd::NewService,
                vec![CmdAttr::Service(service_attrs(s))],
            ),
            Op::SetService(s) => (
                IpvsCmd::SetService,
                vec![CmdAttr::Service(service_attrs(s))],
            ),
            Op::DelService(id) => (
                IpvsCmd::DelService,
                vec![CmdAttr::Service(service_id_attrs(id))],
            ),
            Op::NewDest(id, d) => (
                IpvsCmd::NewDest,
                vec![
                    CmdAttr::Service(service_id_attrs(id)),
                    CmdAttr::Dest(dest_attrs(id, d)),
                ],
            ),
            Op::SetDest(id, d) => (
                IpvsCmd::SetDest,
                vec![
                    CmdAttr::Service(service_id_attrs(id)),
                    CmdAttr::Dest(dest_attrs(id, d)),
                ],
            ),
            Op::DelDest(id, d) => (
                IpvsCmd::DelDest,
                vec![
                    CmdAttr::Service(service_id_attrs(id)),
                    CmdAttr::Dest(dest_id_attrs(id, d)),
                ],
            ),
        };
        IpvsMessage { cmd, attrs }
    }

    /// The dump request for a service's destinations.
    pub fn get_dests(id: &ServiceId) -> Self {
        IpvsMessage {
            cmd: IpvsCmd::GetDest,
            attrs: vec![CmdAttr::Service(service_id_attrs(id))],
        }
    }

    /// The request that sets timeouts (0 leaves one unchanged).
    pub fn set_config(t: &Timeouts) -> Self {
        IpvsMessage {
            cmd: IpvsCmd::SetConfig,
            attrs: vec![
                CmdAttr::TimeoutTcp(t.tcp),
                CmdAttr::TimeoutTcpFin(t.tcp_fin),
                CmdAttr::TimeoutUdp(t.udp),
            ],
        }
    }

    /// The nested service attributes, if any.
    pub fn service(&self) -> Option<&[ServiceAttr]> {
        self.attrs.iter().find_map(|a| match a {
            CmdAttr::Service(s) => Some(s.as_slice()),
            _ => None,
        })
    }

    /// The nested destination attributes, if any.
    pub fn dest(&self) -> Option<&[DestAttr]> {
        self.attrs.iter().find_map(|a| match a {
            CmdAttr::Dest(d) => Some(d.as_slice()),
            _ => None,
        })
    }
}

fn family_of(addr: &IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// The 16 bytes of `union nf_inet_addr` holding `addr`.
pub fn inet_addr_bytes(addr: &IpAddr) -> Vec<u8> {
    let mut bytes = vec![0; 16];
    match addr {
        IpAddr::V4(a) => bytes[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => bytes.copy_from_slice(&a.octets()),
    }
    bytes
}

fn addr_from_bytes(family: u16, bytes: &[u8], what: &str) -> Result<IpAddr, DecodeError> {
    match (family, bytes.len()) {
        (AF_INET, 4 | 16) => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        (AF_INET6, 16) => {
            let octets: [u8; 16] = bytes.try_into().expect("16 bytes");
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        (AF_INET | AF_INET6, n) => {
            Err(format!("{what}: {n}-byte address for family {family}").into())
        }
        _ => Err(format!("{what}: unknown address family {family}").into()),
    }
}

fn netmask_bytes(addr: &IpAddr, netmask: u32) -> [u8; 4] {
    match addr {
        // The kernel's __be32 mask: network order.
        IpAddr::V4(_) => netmask.to_be_bytes(),
        // A prefix length stored in the same __be32 field as a plain host-order number.
        IpAddr::V6(_) => netmask.to_ne_bytes(),
    }
}

fn netmask_value(addr: &IpAddr, raw: [u8; 4]) -> u32 {
    match addr {
        IpAddr::V4(_) => u32::from_be_bytes(raw),
        IpAddr::V6(_) => u32::from_ne_bytes(raw),
    }
}

/// The attributes that identify a service: AF, protocol, address, port.
pub fn service_id_attrs(id: &ServiceId) -> Vec<ServiceAttr> {
    vec![
        ServiceAttr::Af(family_of(&id.addr)),
        ServiceAttr::Protocol(id.protocol.number().into()),
        ServiceAttr::Addr(inet_addr_bytes(&id.addr)),
        ServiceAttr::Port(id.port),
    ]
}

/// All attributes of a service, for `IPVS_CMD_NEW_SERVICE` / `_SET_SERVICE` (the
/// kernel wants scheduler, flags, timeout and netmask in both).
pub fn service_attrs(s: &Service) -> Vec<ServiceAttr> {
    let mut attrs = service_id_attrs(&s.id);
    attrs.push(ServiceAttr::SchedName(s.scheduler.clone()));
    if let Some(pe) = &s.persistence_engine {
        attrs.push(ServiceAttr::PeName(pe.clone()));
    }
    attrs.extend([
        ServiceAttr::Flags {
            flags: s.flags & !flags::HASHED,
            mask: u32::MAX,
        },
        ServiceAttr::Timeout(s.timeout),
        ServiceAttr::Netmask(netmask_bytes(&s.id.addr, s.netmask)),
    ]);
    attrs
}

/// The attributes that identify a destination of service `svc`: address, port, and
/// the address family when it differs from the service's.
pub fn dest_id_attrs(svc: &ServiceId, d: &DestId) -> Vec<DestAttr> {
    let mut attrs = vec![
        DestAttr::Addr(inet_addr_bytes(&d.addr)),
        DestAttr::Port(d.port),
    ];
    if family_of(&d.addr) != family_of(&svc.addr) {
        attrs.push(DestAttr::AddrFamily(family_of(&d.addr)));
    }
    attrs
}

/// All attributes of a destination, for `IPVS_CMD_NEW_DEST` / `_SET_DEST`.
pub fn dest_attrs(svc: &ServiceId, d: &Destination) -> Vec<DestAttr> {
    let mut attrs = dest_id_attrs(svc, &d.id());
    attrs.extend([
        DestAttr::FwdMethod(d.fwd.value()),
        DestAttr::Weight(d.weight),
        DestAttr::UThresh(d.upper_threshold),
        DestAttr::LThresh(d.lower_threshold),
    ]);
    attrs
}

fn stats_from(attrs: &[StatsAttr]) -> Stats {
    let mut s = Stats::default();
    for a in attrs {
        let (kind, value) = match a {
            StatsAttr::U32(k, v) => (*k, u64::from(*v)),
            StatsAttr::U64(k, v) => (*k, *v),
            StatsAttr::Other(_) => continue,
        };
        let field = match kind {
            attr::STATS_CONNS => &mut s.conns,
            attr::STATS_INPKTS => &mut s.inpkts,
            attr::STATS_OUTPKTS => &mut s.outpkts,
            attr::STATS_INBYTES => &mut s.inbytes,
            attr::STATS_OUTBYTES => &mut s.outbytes,
            attr::STATS_CPS => &mut s.cps,
            attr::STATS_INPPS => &mut s.inpps,
            attr::STATS_OUTPPS => &mut s.outpps,
            attr::STATS_INBPS => &mut s.inbps,
            attr::STATS_OUTBPS => &mut s.outbps,
            _ => continue,
        };
        *field = value;
    }
    s
}

/// What a service dump entry is, when it is not an address service this client
/// models.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// A firewall-mark service (`ipvsadm -f`): switchyard never makes them.
    Fwmark(u32),
    /// A protocol other than TCP, UDP, SCTP.
    Protocol(u16),
}

/// Decodes the nested attributes of a service. `Ok(Err(skipped))` for services this
/// client does not model (fwmark services, other protocols): a dump reports them
/// without failing.
pub fn decode_service(attrs: &[ServiceAttr]) -> Result<Result<Service, Skipped>, DecodeError> {
    let mut af = None;
    let mut protocol = None;
    let mut addr = None;
    let mut port = None;
    let mut fwmark = None;
    let mut scheduler = None;
    let mut flags_value = 0;
    let mut timeout = 0;
    let mut netmask = None;
    let mut pe = None;
    let mut stats = None;
    let mut stats64 = None;
    for a in attrs {
        match a {
            ServiceAttr::Af(v) => af = Some(*v),
            ServiceAttr::Protocol(v) => protocol = Some(*v),
            ServiceAttr::Addr(v) => addr = Some(v.as_slice()),
            ServiceAttr::Port(v) => port = Some(*v),
            ServiceAttr::Fwmark(v) => fwmark = Some(*v),
            ServiceAttr::SchedName(v) => scheduler = Some(v.clone()),
            ServiceAttr::Flags { flags: f, mask } => flags_value = f & mask,
            ServiceAttr::Timeout(v) => timeout = *v,
            ServiceAttr::Netmask(v) => netmask = Some(*v),
            ServiceAttr::PeName(v) => pe = Some(v.clone()),
            ServiceAttr::Stats(v) => stats = Some(stats_from(v)),
            ServiceAttr::Stats64(v) => stats64 = Some(stats_from(v)),
            ServiceAttr::Other(_) => {}
        }
    }
    if let Some(mark) = fwmark.filter(|m| *m != 0) {
        return Ok(Err(Skipped::Fwmark(mark)));
    }
    let af = af.ok_or("service without IPVS_SVC_ATTR_AF")?;
    let number = protocol.ok_or("service without IPVS_SVC_ATTR_PROTOCOL")?;
    let Some(protocol) = u8::try_from(number).ok().and_then(Protocol::from_number) else {
        return Ok(Err(Skipped::Protocol(number)));
    };
    let addr = addr_from_bytes(
        af,
        addr.ok_or("service without IPVS_SVC_ATTR_ADDR")?,
        "IPVS_SVC_ATTR_ADDR",
    )?;
    let id = ServiceId {
        protocol,
        addr,
        port: port.ok_or("service without IPVS_SVC_ATTR_PORT")?,
    };
    Ok(Ok(Service {
        id,
        scheduler: scheduler.unwrap_or_default(),
        flags: flags_value & !flags::HASHED,
        timeout,
        netmask: netmask
            .map(|raw| netmask_value(&addr, raw))
            .unwrap_or_else(|| Service::single_address_netmask(&addr)),
        persistence_engine: pe,
        stats: stats64.or(stats),
    }))
}

/// Decodes the nested attributes of a destination of a service of family `service`
/// (the destination's own `IPVS_DEST_ATTR_ADDR_FAMILY` wins when present).
pub fn decode_dest(service: &IpAddr, attrs: &[DestAttr]) -> Result<Destination, DecodeError> {
    let mut addr = None;
    let mut family = family_of(service);
    let mut port = None;
    let mut d = Destination::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0);
    let mut stats = None;
    let mut stats64 = None;
    for a in attrs {
        match a {
            DestAttr::Addr(v) => addr = Some(v.as_slice()),
            DestAttr::AddrFamily(v) => family = *v,
            DestAttr::Port(v) => port = Some(*v),
            DestAttr::FwdMethod(v) => {
                d.fwd = ForwardMethod::from_value(*v)
                    .ok_or_else(|| format!("IPVS_DEST_ATTR_FWD_METHOD: unknown method {v}"))?
            }
            DestAttr::Weight(v) => d.weight = *v,
            DestAttr::UThresh(v) => d.upper_threshold = *v,
            DestAttr::LThresh(v) => d.lower_threshold = *v,
            DestAttr::ActiveConns(v) => d.active_conns = *v,
            DestAttr::InactConns(v) => d.inactive_conns = *v,
            DestAttr::PersistConns(v) => d.persist_conns = *v,
            DestAttr::Stats(v) => stats = Some(stats_from(v)),
            DestAttr::Stats64(v) => stats64 = Some(stats_from(v)),
            DestAttr::TunType(_)
            | DestAttr::TunPort(_)
            | DestAttr::TunFlags(_)
            | DestAttr::Other(_) => {}
        }
    }
    d.addr = addr_from_bytes(
        family,
        addr.ok_or("destination without IPVS_DEST_ATTR_ADDR")?,
        "IPVS_DEST_ATTR_ADDR",
    )?;
    d.port = port.ok_or("destination without IPVS_DEST_ATTR_PORT")?;
    d.stats = stats64.or(stats);
    Ok(d)
}

/// Decodes a `IPVS_CMD_SET_INFO` reply.
pub fn decode_info(msg: &IpvsMessage) -> Result<Info, DecodeError> {
    let mut version = None;
    let mut size = None;
    for a in &msg.attrs {
        match a {
            CmdAttr::InfoVersion(v) => version = Some(*v),
            CmdAttr::InfoConnTabSize(v) => size = Some(*v),
            _ => {}
        }
    }
    Ok(Info {
        version: version.ok_or("IPVS_CMD_SET_INFO without IPVS_INFO_ATTR_VERSION")?,
        conn_table_size: size.ok_or("IPVS_CMD_SET_INFO without IPVS_INFO_ATTR_CONN_TAB_SIZE")?,
    })
}

/// Decodes a `IPVS_CMD_SET_CONFIG` reply.
pub fn decode_timeouts(msg: &IpvsMessage) -> Timeouts {
    let mut t = Timeouts::default();
    for a in &msg.attrs {
        match a {
            CmdAttr::TimeoutTcp(v) => t.tcp = *v,
            CmdAttr::TimeoutTcpFin(v) => t.tcp_fin = *v,
            CmdAttr::TimeoutUdp(v) => t.udp = *v,
            _ => {}
        }
    }
    t
}

/// One netlink message as a request: header fields plus the IPVS payload, serialized.
pub fn encode(msg: IpvsMessage, family_id: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family_id);
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    nl.finalize();
    let mut buf = vec![0; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// What one message of a reply datagram says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// An IPVS message (dump entry or reply).
    Ipvs(IpvsMessage),
    /// `NLMSG_ERROR` with code 0: the request succeeded.
    Ack,
    /// `NLMSG_ERROR` with a negative errno.
    Error {
        /// The positive errno.
        errno: i32,
        /// The kernel's extended-ack message, if any.
        message: Option<String>,
    },
    /// `NLMSG_DONE`: end of a dump, with the dump's error code (0, or a negative errno).
    Done(i32),
    /// An IPVS message whose payload does not decode (the framing was fine, so the
    /// messages after it still count).
    Invalid(String),
    /// A generic-netlink controller reply, with the family id it names.
    Family(Option<u16>),
    /// Another control message (`NLMSG_NOOP`, `NLMSG_OVERRUN`, another family).
    Other(u16),
}

/// A message of a reply datagram with the header fields that matter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyMessage {
    /// The request's sequence number it answers.
    pub seq: u32,
    /// `NLM_F_*` flags (`NLM_F_MULTI`, `NLM_F_DUMP_INTR` …).
    pub flags: u16,
    /// The content.
    pub reply: Reply,
}

const NLMSGERR_ATTR_MSG: u16 = 1;
/// The generic-netlink controller's fixed family id.
pub const GENL_ID_CTRL: u16 = 16;
const CTRL_ATTR_FAMILY_ID: u16 = 1;

/// `CTRL_ATTR_FAMILY_ID` of a controller message (after its 4-byte genl header); other
/// attributes are not looked at, so newer kernels' additions cannot break this.
fn family_id_in(payload: &[u8]) -> Option<u16> {
    NlasIterator::new(payload.get(4..)?)
        .flatten()
        .find(|nla| nla.kind() == CTRL_ATTR_FAMILY_ID)
        .and_then(|nla| parse_u16(nla.value()).ok())
}
const NETLINK_HEADER_LEN: usize = 16;

/// Splits a received datagram into its messages; IPVS messages are recognized by
/// `family_id`.
pub fn parse_datagram(datagram: &[u8], family_id: u16) -> Result<Vec<ReplyMessage>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let buf = NetlinkBuffer::new_checked(rest)?;
        let len = buf.length() as usize;
        let payload = buf.payload();
        let reply = match buf.message_type() {
            NLMSG_ERROR => parse_error(payload, buf.flags())?,
            NLMSG_DONE => Reply::Done(match payload {
                [a, b, c, d, ..] => i32::from_ne_bytes([*a, *b, *c, *d]),
                _ => 0,
            }),
            t if t == family_id => match GenlMessage::<IpvsMessage>::parse_with_param(payload, t) {
                Ok(m) => Reply::Ipvs(m.payload),
                Err(e) => Reply::Invalid(e.to_string()),
            },
            GENL_ID_CTRL => Reply::Family(family_id_in(payload)),
            t => Reply::Other(t),
        };
        out.push(ReplyMessage {
            seq: buf.sequence_number(),
            flags: buf.flags(),
            reply,
        });
        let aligned = (len + 3) & !3;
        rest = rest.get(aligned..).unwrap_or_default();
    }
    Ok(out)
}

fn parse_error(payload: &[u8], flags: u16) -> Result<Reply, DecodeError> {
    let code = match payload {
        [a, b, c, d, ..] => i32::from_ne_bytes([*a, *b, *c, *d]),
        _ => return Err(DecodeError::invalid_number(4, payload.len())),
    };
    if code == 0 {
        return Ok(Reply::Ack);
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // After the code: the request's header, and its payload unless capped.
        let request_len = if flags & NLM_F_CAPPED != 0 {
            NETLINK_HEADER_LEN
        } else {
            payload
                .get(4..8)
                .map(|l| u32::from_ne_bytes(l.try_into().expect("4 bytes")) as usize)
                .unwrap_or(NETLINK_HEADER_LEN)
        };
        let tlvs = payload
            .get(4 + ((request_len + 3) & !3)..)
            .unwrap_or_default();
        for nla in NlasIterator::new(tlvs).flatten() {
            if nla.kind() == NLMSGERR_ATTR_MSG {
                message = parse_string(nla.value()).ok();
            }
        }
    }
    Ok(Reply::Error {
        errno: code.saturating_neg(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    fn svc(proto: Protocol, addr: &str, port: u16) -> ServiceId {
        ServiceId::new(proto, ip(addr), port)
    }

    /// Encodes, parses back as the kernel would see the datagram, returns the payload.
    fn round_trip(msg: &IpvsMessage) -> IpvsMessage {
        let bytes = encode(msg.clone(), 0x1c, NLM_F_REQUEST | NLM_F_ACK, 7);
        let replies = parse_datagram(&bytes, 0x1c).expect("parse");
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].seq, 7);
        assert_eq!(replies[0].flags, NLM_F_REQUEST | NLM_F_ACK);
        match &replies[0].reply {
            Reply::Ipvs(m) => m.clone(),
            other => panic!("not an IPVS message: {other:?}"),
        }
    }

    fn every_op() -> Vec<Op> {
        let tcp4 = svc(Protocol::Tcp, "10.96.0.10", 80);
        let udp6 = svc(Protocol::Udp, "fd00::10", 53);
        let sctp4 = svc(Protocol::Sctp, "10.96.0.11", 9999);
        let mut sticky = Service::new(tcp4, "sh").persistent(10800);
        sticky.flags |= flags::SH_FALLBACK | flags::SH_PORT;
        sticky.netmask = 0xffff_ff00;
        let mut sip = Service::new(udp6, "rr");
        sip.persistence_engine = Some("sip".into());
        sip.netmask = 64;
        let mut tunnel = Destination::new(ip("fd00:1::2"), 5353, 3);
        tunnel.fwd = ForwardMethod::Tunnel;
        tunnel.upper_threshold = 100;
        tunnel.lower_threshold = 10;
        vec![
            Op::NewService(sticky.clone()),
            Op::SetService(sip),
            Op::NewService(Service::new(sctp4, "mh")),
            Op::DelService(sctp4),
            Op::NewDest(tcp4, Destination::new(ip("10.244.1.2"), 8080, 1)),
            Op::SetDest(tcp4, Destination::new(ip("10.244.1.2"), 8080, 0)),
            Op::NewDest(tcp4, tunnel.clone()),
            Op::DelDest(tcp4, tunnel.id()),
            Op::DelDest(
                udp6,
                DestId {
                    addr: ip("fd00:2::1"),
                    port: 53,
                },
            ),
        ]
    }

    #[test]
    fn every_operation_parses_back_to_the_same_message() {
        for op in every_op() {
            let msg = IpvsMessage::for_op(&op);
            assert_eq!(round_trip(&msg), msg, "{op}");
        }
        for msg in [
            IpvsMessage::bare(IpvsCmd::GetService),
            IpvsMessage::bare(IpvsCmd::GetInfo),
            IpvsMessage::bare(IpvsCmd::GetConfig),
            IpvsMessage::bare(IpvsCmd::Flush),
            IpvsMessage::get_dests(&svc(Protocol::Udp, "fd00::10", 53)),
            IpvsMessage::set_config(&Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300,
            }),
        ] {
            assert_eq!(round_trip(&msg), msg, "{:?}", msg.cmd);
        }
    }

    #[test]
    fn every_operation_decodes_back_to_its_domain_values() {
        for op in every_op() {
            let msg = round_trip(&IpvsMessage::for_op(&op));
            let service = msg.service().expect("every op names a service");
            match &op {
                Op::NewService(s) | Op::SetService(s) => {
                    assert_eq!(decode_service(service).unwrap(), Ok(s.clone()), "{op}");
                }
                Op::NewDest(id, d) | Op::SetDest(id, d) => {
                    assert_eq!(decode_service(service).unwrap().unwrap().id, *id);
                    assert_eq!(
                        &decode_dest(&id.addr, msg.dest().unwrap()).unwrap(),
                        d,
                        "{op}"
                    );
                }
                Op::DelDest(id, d) => {
                    assert_eq!(decode_service(service).unwrap().unwrap().id, *id);
                    assert_eq!(decode_dest(&id.addr, msg.dest().unwrap()).unwrap().id(), *d);
                }
                Op::DelService(id) => {
                    assert_eq!(decode_service(service).unwrap().unwrap().id, *id);
                }
            }
        }
    }

    #[test]
    fn dump_entries_with_every_attribute_survive_emit_and_parse() {
        let stats = vec![
            StatsAttr::U32(attr::STATS_CONNS, 3),
            StatsAttr::U64(attr::STATS_INBYTES, 1 << 40),
            StatsAttr::U32(attr::STATS_OUTBPS, 7),
        ];
        let stats64 = vec![
            StatsAttr::Other(DefaultNla::new(attr::STATS_PAD, vec![])),
            StatsAttr::U64(attr::STATS_CONNS, 3),
            StatsAttr::U64(attr::STATS_INBYTES, 1 << 40),
        ];
        let mut service = service_attrs(&Service::new(svc(Protocol::Sctp, "fd00::1", 9), "mh"));
        service.extend([
            ServiceAttr::PeName("sip".into()),
            ServiceAttr::Stats(stats.clone()),
            ServiceAttr::Stats64(stats64.clone()),
            ServiceAttr::Other(DefaultNla::new(99, vec![1, 2, 3])),
        ]);
        let mut dest = dest_attrs(
            &svc(Protocol::Sctp, "fd00::1", 9),
            &Destination::new(ip("10.0.0.1"), 9, 1),
        );
        dest.extend([
            DestAttr::ActiveConns(1),
            DestAttr::InactConns(2),
            DestAttr::PersistConns(3),
            DestAttr::TunType(1),
            DestAttr::TunPort(6081),
            DestAttr::TunFlags(2),
            DestAttr::Stats(stats),
            DestAttr::Stats64(stats64),
        ]);
        for msg in [
            IpvsMessage {
                cmd: IpvsCmd::NewService,
                attrs: vec![CmdAttr::Service(service.clone())],
            },
            IpvsMessage {
                cmd: IpvsCmd::NewDest,
                attrs: vec![CmdAttr::Dest(dest.clone())],
            },
        ] {
            assert_eq!(round_trip(&msg), msg, "{:?}", msg.cmd);
        }
        let decoded = decode_dest(&ip("fd00::1"), &dest).unwrap();
        assert_eq!(
            (
                decoded.active_conns,
                decoded.inactive_conns,
                decoded.persist_conns
            ),
            (1, 2, 3)
        );
        let counters = decoded.stats.expect("counters");
        assert_eq!(
            (counters.conns, counters.inbytes),
            (3, 1 << 40),
            "STATS64 wins"
        );
        assert_eq!(
            decode_service(&service)
                .unwrap()
                .unwrap()
                .persistence_engine
                .as_deref(),
            Some("sip")
        );
    }

    #[test]
    fn timeouts_and_info_decode_from_their_replies() {
        let t = Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        };
        let reply = IpvsMessage {
            cmd: IpvsCmd::SetConfig,
            ..IpvsMessage::set_config(&t)
        };
        assert_eq!(decode_timeouts(&round_trip(&reply)), t);
        let info = IpvsMessage {
            cmd: IpvsCmd::SetInfo,
            attrs: vec![
                CmdAttr::InfoVersion(0x010201),
                CmdAttr::InfoConnTabSize(4096),
            ],
        };
        let back = round_trip(&info);
        assert_eq!(
            back, info,
            "info attributes are parsed by command, not as SERVICE/DEST"
        );
        assert_eq!(
            decode_info(&back).unwrap(),
            Info {
                version: 0x010201,
                conn_table_size: 4096
            }
        );
    }

    #[test]
    fn destination_of_another_family_carries_its_family() {
        let id = svc(Protocol::Tcp, "10.96.0.10", 80);
        let attrs = dest_id_attrs(
            &id,
            &DestId {
                addr: ip("fd00::1"),
                port: 80,
            },
        );
        assert!(attrs.contains(&DestAttr::AddrFamily(AF_INET6)), "{attrs:?}");
        let same = dest_id_attrs(
            &id,
            &DestId {
                addr: ip("10.0.0.1"),
                port: 80,
            },
        );
        assert!(
            !same.iter().any(|a| matches!(a, DestAttr::AddrFamily(_))),
            "{same:?}"
        );
    }

    #[test]
    fn hashed_is_neither_sent_nor_reported() {
        let mut s = Service::new(svc(Protocol::Tcp, "10.0.0.1", 80), "rr");
        s.flags = flags::HASHED | flags::PERSISTENT;
        let attrs = service_attrs(&s);
        assert!(attrs.contains(&ServiceAttr::Flags {
            flags: flags::PERSISTENT,
            mask: u32::MAX
        }));
        let mut dumped = service_id_attrs(&s.id);
        dumped.push(ServiceAttr::Flags {
            flags: flags::HASHED | flags::ONEPACKET,
            mask: u32::MAX,
        });
        assert_eq!(
            decode_service(&dumped).unwrap().unwrap().flags,
            flags::ONEPACKET
        );
    }

    #[test]
    fn fwmark_and_foreign_protocol_services_are_reported_as_skipped() {
        let fwmark = vec![ServiceAttr::Af(AF_INET), ServiceAttr::Fwmark(7)];
        assert_eq!(decode_service(&fwmark).unwrap(), Err(Skipped::Fwmark(7)));
        let mut ah = service_id_attrs(&svc(Protocol::Tcp, "10.0.0.1", 0));
        ah[1] = ServiceAttr::Protocol(51);
        assert_eq!(decode_service(&ah).unwrap(), Err(Skipped::Protocol(51)));
    }

    #[test]
    fn an_error_reply_carries_errno_and_the_extended_ack_message() {
        // NLMSG_ERROR, capped, with TLVs: code -17, the request's header, MSG "exists".
        let mut payload = (-17i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0u8; 16]);
        payload.extend_from_slice(&[11, 0, 1, 0, b'e', b'x', b'i', b's', b't', b's', 0, 0]);
        let mut datagram = ((16 + payload.len()) as u32).to_ne_bytes().to_vec();
        datagram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        datagram.extend_from_slice(&(NLM_F_CAPPED | NLM_F_ACK_TLVS).to_ne_bytes());
        datagram.extend_from_slice(&9u32.to_ne_bytes());
        datagram.extend_from_slice(&0u32.to_ne_bytes());
        datagram.extend_from_slice(&payload);
        let replies = parse_datagram(&datagram, 0x1c).unwrap();
        assert_eq!(
            replies[0].reply,
            Reply::Error {
                errno: 17,
                message: Some("exists".into())
            }
        );
        assert_eq!(replies[0].seq, 9);
    }
}
