//! The IPVS objects as the rest of the agent sees them: virtual services, their real
//! servers (destinations), the operations that change them, and global settings.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The protocols IPVS balances, as the rest of switchyard knows them.
pub use switchyard_agent_core::state::Protocol;

/// What identifies a virtual service: protocol, address and port.
///
/// Shown as `10.96.0.10:80/TCP` or `[fd00::10]:53/UDP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Virtual address; its family is the service's family.
    pub addr: IpAddr,
    /// Virtual port.
    pub port: u16,
}

impl ServiceId {
    /// A service id.
    pub fn new(protocol: Protocol, addr: IpAddr, port: u16) -> Self {
        ServiceId {
            protocol,
            addr,
            port,
        }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.protocol
        )
    }
}

/// Service flags (`IP_VS_SVC_F_*`), for [`Service::flags`].
pub mod flags {
    /// Persistent service: a client sticks to one destination for [`timeout`] seconds
    /// (ClientIP session affinity).
    ///
    /// [`timeout`]: super::Service::timeout
    pub const PERSISTENT: u32 = 0x0001;
    /// Kernel-internal ("hashed entry"): never sent, and cleared from what dumps report.
    pub const HASHED: u32 = 0x0002;
    /// One-packet scheduling (UDP: every datagram scheduled anew).
    pub const ONEPACKET: u32 = 0x0004;
    /// Scheduler flag 1.
    pub const SCHED1: u32 = 0x0008;
    /// Scheduler flag 2.
    pub const SCHED2: u32 = 0x0010;
    /// Scheduler flag 3.
    pub const SCHED3: u32 = 0x0020;
    /// `sh`: fall back to another destination when the hashed one is unavailable.
    pub const SH_FALLBACK: u32 = SCHED1;
    /// `sh`: hash the source port too.
    pub const SH_PORT: u32 = SCHED2;
    /// `mh`: fall back to another destination when the hashed one is unavailable.
    pub const MH_FALLBACK: u32 = SCHED1;
    /// `mh`: hash the source port too.
    pub const MH_PORT: u32 = SCHED2;
}

/// A virtual service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Protocol, virtual address and port.
    pub id: ServiceId,
    /// Scheduler name (`rr`, `wrr`, `sh`, `mh`, …); a dump of a service without one
    /// says `none`.
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` bits, see [`flags`]; [`flags::HASHED`] is never reported.
    pub flags: u32,
    /// Persistence timeout in seconds (meaningful with [`flags::PERSISTENT`]).
    pub timeout: u32,
    /// Persistence granularity: for IPv4 a mask as a number (`0xffff_ffff` for one
    /// client address, `0xffff_ff00` for its /24); for IPv6 a prefix length (`128`).
    /// [`Service::new`] picks the one-address value of the service's family.
    pub netmask: u32,
    /// Persistence engine (`sip`), if any.
    pub persistence_engine: Option<String>,
    /// Traffic counters; read only: filled in by dumps, ignored when sent.
    pub stats: Option<Stats>,
}

impl Service {
    /// A service with `scheduler`, no flags, no persistence, one-address netmask.
    pub fn new(id: ServiceId, scheduler: impl Into<String>) -> Self {
        Service {
            id,
            scheduler: scheduler.into(),
            flags: 0,
            timeout: 0,
            netmask: Self::single_address_netmask(&id.addr),
            persistence_engine: None,
            stats: None,
        }
    }

    /// Makes the service persistent for `timeout` seconds (ClientIP session affinity).
    pub fn persistent(mut self, timeout: u32) -> Self {
        self.flags |= flags::PERSISTENT;
        self.timeout = timeout;
        self
    }

    /// The netmask value that makes persistence per client address: `0xffff_ffff` for
    /// IPv4, `128` for IPv6 (what `ipvsadm` sends by default).
    pub fn single_address_netmask(addr: &IpAddr) -> u32 {
        match addr {
            IpAddr::V4(_) => u32::MAX,
            IpAddr::V6(_) => 128,
        }
    }

    /// True when everything an operation sets is equal (counters are not compared).
    pub fn same_config(&self, other: &Service) -> bool {
        Service {
            stats: None,
            ..self.clone()
        } == Service {
            stats: None,
            ..other.clone()
        }
    }
}

/// How IPVS forwards packets to a destination (`IP_VS_CONN_F_*` forwarding methods).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForwardMethod {
    /// NAT (`IP_VS_CONN_F_MASQ`, 0): what kube-proxy uses.
    Masquerade,
    /// Local node (1).
    Local,
    /// IP-in-IP tunnel (2).
    Tunnel,
    /// Direct routing (3).
    DirectRoute,
    /// Cache bypass (4).
    Bypass,
}

impl ForwardMethod {
    /// The kernel's value.
    pub fn value(self) -> u32 {
        match self {
            ForwardMethod::Masquerade => 0,
            ForwardMethod::Local => 1,
            ForwardMethod::Tunnel => 2,
            ForwardMethod::DirectRoute => 3,
            ForwardMethod::Bypass => 4,
        }
    }

    /// The method with the kernel's value `v`.
    pub fn from_value(v: u32) -> Option<Self> {
        Some(match v {
            0 => ForwardMethod::Masquerade,
            1 => ForwardMethod::Local,
            2 => ForwardMethod::Tunnel,
            3 => ForwardMethod::DirectRoute,
            4 => ForwardMethod::Bypass,
            _ => return None,
        })
    }
}

/// What identifies a destination inside its service: address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestId {
    /// Real server address (its family may differ from the service's only with tunnel
    /// forwarding).
    pub addr: IpAddr,
    /// Real server port.
    pub port: u16,
}

impl fmt::Display for DestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.addr, self.port).fmt(f)
    }
}

/// A destination (real server) of a virtual service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Real server address.
    pub addr: IpAddr,
    /// Real server port.
    pub port: u16,
    /// Weight; 0 stops new connections (kube-proxy's graceful termination).
    pub weight: u32,
    /// Forwarding method.
    pub fwd: ForwardMethod,
    /// Upper connection threshold (0: none).
    pub upper_threshold: u32,
    /// Lower connection threshold (0: none).
    pub lower_threshold: u32,
    /// Established connections; read only (dumps fill it in, ignored when sent).
    pub active_conns: u32,
    /// Other connections (closing, or waiting for their timeout); read only.
    pub inactive_conns: u32,
    /// Persistence templates; read only.
    pub persist_conns: u32,
    /// Traffic counters; read only.
    pub stats: Option<Stats>,
}

impl Destination {
    /// A masqueraded destination with `weight` and no thresholds.
    pub fn new(addr: IpAddr, port: u16, weight: u32) -> Self {
        Destination {
            addr,
            port,
            weight,
            fwd: ForwardMethod::Masquerade,
            upper_threshold: 0,
            lower_threshold: 0,
            active_conns: 0,
            inactive_conns: 0,
            persist_conns: 0,
            stats: None,
        }
    }

    /// Address and port.
    pub fn id(&self) -> DestId {
        DestId {
            addr: self.addr,
            port: self.port,
        }
    }

    /// True when everything an operation sets is equal (connection counts and counters
    /// are not compared).
    pub fn same_config(&self, other: &Destination) -> bool {
        self.addr == other.addr
            && self.port == other.port
            && self.weight == other.weight
            && self.fwd == other.fwd
            && self.upper_threshold == other.upper_threshold
            && self.lower_threshold == other.lower_threshold
    }
}

/// Traffic counters of a service or destination (64-bit when the kernel sends them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections scheduled.
    pub conns: u64,
    /// Incoming packets.
    pub inpkts: u64,
    /// Outgoing packets.
    pub outpkts: u64,
    /// Incoming bytes.
    pub inbytes: u64,
    /// Outgoing bytes.
    pub outbytes: u64,
    /// Current connection rate.
    pub cps: u64,
    /// Current incoming packet rate.
    pub inpps: u64,
    /// Current outgoing packet rate.
    pub outpps: u64,
    /// Current incoming byte rate.
    pub inbps: u64,
    /// Current outgoing byte rate.
    pub outbps: u64,
}

/// One change to the IPVS table, for [`IpvsSocket::execute`](super::IpvsSocket::execute).
///
/// Shown as the kernel command and its objects, e.g.
/// `IPVS_CMD_NEW_DEST 10.96.0.10:80/TCP → 10.244.1.2:8080`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add a service (fails with EEXIST when it exists).
    NewService(Service),
    /// Change an existing service's scheduler, flags, timeout, netmask.
    SetService(Service),
    /// Delete a service and its destinations.
    DelService(ServiceId),
    /// Add a destination to a service (EEXIST when it exists).
    NewDest(ServiceId, Destination),
    /// Change an existing destination's weight, forwarding method, thresholds.
    SetDest(ServiceId, Destination),
    /// Delete a destination (its connections stay until they expire).
    DelDest(ServiceId, DestId),
}

impl Op {
    /// The kernel command's name, `IPVS_CMD_NEW_SERVICE` …
    pub fn command_name(&self) -> &'static str {
        match self {
            Op::NewService(_) => "IPVS_CMD_NEW_SERVICE",
            Op::SetService(_) => "IPVS_CMD_SET_SERVICE",
            Op::DelService(_) => "IPVS_CMD_DEL_SERVICE",
            Op::NewDest(..) => "IPVS_CMD_NEW_DEST",
            Op::SetDest(..) => "IPVS_CMD_SET_DEST",
            Op::DelDest(..) => "IPVS_CMD_DEL_DEST",
        }
    }

    /// The service the operation is about.
    pub fn service(&self) -> &ServiceId {
        match self {
            Op::NewService(s) | Op::SetService(s) => &s.id,
            Op::DelService(id) | Op::NewDest(id, _) | Op::SetDest(id, _) | Op::DelDest(id, _) => id,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.command_name(), self.service())?;
        match self {
            Op::NewDest(_, d) | Op::SetDest(_, d) => write!(f, " → {}", d.id()),
            Op::DelDest(_, d) => write!(f, " → {d}"),
            _ => Ok(()),
        }
    }
}

/// What `IPVS_CMD_GET_INFO` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    /// IPVS version, `0x010201` for 1.2.1.
    pub version: u32,
    /// Size of the connection hash table.
    pub conn_table_size: u32,
}

impl Info {
    /// The version as `major.minor.patch`.
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            (self.version >> 16) & 0xff,
            (self.version >> 8) & 0xff,
            self.version & 0xff
        )
    }
}

/// Connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`).
///
/// When set, 0 leaves that timeout unchanged (the kernel's rule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// Established TCP connections.
    pub tcp: u32,
    /// TCP connections after a FIN.
    pub tcp_fin: u32,
    /// UDP flows.
    pub udp: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_show_their_command_and_objects() {
        let id = ServiceId::new(Protocol::Tcp, "10.96.0.10".parse().unwrap(), 80);
        let dest = Destination::new("10.244.1.2".parse().unwrap(), 8080, 1);
        assert_eq!(
            Op::NewDest(id, dest.clone()).to_string(),
            "IPVS_CMD_NEW_DEST 10.96.0.10:80/TCP → 10.244.1.2:8080"
        );
        assert_eq!(
            Op::DelDest(id, dest.id()).to_string(),
            "IPVS_CMD_DEL_DEST 10.96.0.10:80/TCP → 10.244.1.2:8080"
        );
        let v6 = ServiceId::new(Protocol::Udp, "fd00::10".parse().unwrap(), 53);
        assert_eq!(
            Op::DelService(v6).to_string(),
            "IPVS_CMD_DEL_SERVICE [fd00::10]:53/UDP"
        );
    }

    #[test]
    fn new_services_persist_per_client_address_of_their_family() {
        let v4 = ServiceId::new(Protocol::Tcp, "10.0.0.1".parse().unwrap(), 80);
        let v6 = ServiceId::new(Protocol::Tcp, "fd00::1".parse().unwrap(), 80);
        assert_eq!(Service::new(v4, "rr").netmask, 0xffff_ffff);
        assert_eq!(Service::new(v6, "rr").netmask, 128);
        let sticky = Service::new(v4, "rr").persistent(10800);
        assert_eq!((sticky.flags, sticky.timeout), (flags::PERSISTENT, 10800));
    }

    #[test]
    fn the_version_reads_as_three_numbers() {
        let info = Info {
            version: 0x010201,
            conn_table_size: 4096,
        };
        assert_eq!(info.version_string(), "1.2.1");
    }
}
