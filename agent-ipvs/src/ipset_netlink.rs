//! Adds and deletes elements of switchyard's ipsets in process, through nfnetlink's ipset
//! subsystem: one datagram carries many elements, each acknowledged on its own. An
//! `ipset restore` process per change cost 27–32 ms in user-mode Linux (1.5 ms on the
//! host), most of a one-Service change; a netlink request costs microseconds. Creating,
//! destroying sets stays with the `ipset` command (once, at setup); listing is a dump
//! here too (`ipset save` of 40,000 elements took 1–3 s in user-mode Linux).
//!
//! Messages follow the kernel's `include/uapi/linux/netfilter/ipset/ip_set.h`: an
//! `nfgenmsg`, then `IPSET_ATTR_PROTOCOL`, `IPSET_ATTR_SETNAME` and the element in a
//! nested `IPSET_ATTR_DATA` (addresses nested and in network byte order, the port in
//! network byte order, the protocol number, a second address or net, the comment).
//! Requests are sent without `NLM_F_EXCL`, which is `ipset -exist`: adding an element
//! that is there refreshes its comment, deleting one that is gone is no error.

use std::{io, net::IpAddr};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use switchyard_agent_core::{netfilter::Family, state::Protocol};

use crate::{
    ipset::{Saved, safe_comment, version_comment, version_key},
    nlbatch,
    render::{SetElement, SetKind},
};

const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_LIST: u16 = 7;
const IPSET_CMD_ADD: u16 = 9;
const IPSET_CMD_DEL: u16 = 10;
/// The oldest ipset protocol the kernel accepts (every kernel since 3.x speaks it).
const IPSET_PROTOCOL: u8 = 6;

const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_ATTR_DATA: u16 = 7;
const IPSET_ATTR_ADT: u16 = 8;
const IPSET_ATTR_IP: u16 = 1;
const IPSET_ATTR_PORT: u16 = 4;
const IPSET_ATTR_PROTO: u16 = 7;
const IPSET_ATTR_IP2: u16 = 20;
const IPSET_ATTR_CIDR2: u16 = 21;
const IPSET_ATTR_COMMENT: u16 = 26;
const IPSET_ATTR_IPADDR_IPV4: u16 = 1;
const IPSET_ATTR_IPADDR_IPV6: u16 = 2;

const NLA_F_NESTED: u16 = 1 << 15;
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A failed element change, naming it. Retryable.
#[derive(Debug, thiserror::Error)]
pub enum IpsetError {
    #[error("opening an nfnetlink socket: {0}")]
    Open(#[source] io::Error),
    /// Listing the sets failed.
    #[error("listing ipsets: {0}")]
    List(String),
    /// The element text is not one switchyard writes.
    #[error("ipset {verb} {set} {element}: cannot encode the element")]
    Element {
        verb: &'static str,
        set: String,
        element: String,
    },
    /// The kernel refused the change (errors above 4096 are ipset's own).
    #[error("ipset {verb} {set} {element}: {source}")]
    Kernel {
        verb: &'static str,
        set: String,
        element: String,
        #[source]
        source: io::Error,
    },
}

/// One change of one element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElementChange<'a> {
    Add(&'a SetElement, &'a str),
    Del(&'a SetElement),
    /// A Service's version record: written (`Some`) or deleted.
    Version(&'a str, Option<u64>),
}

/// The parts of an element in switchyard's notation (`ip`, `ip,proto:port`,
/// `ip,proto:port,ip` or `ip,proto:port,net`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Parts {
    ip: IpAddr,
    proto_port: Option<(u8, u16)>,
    /// The second address, with its prefix length for net types.
    second: Option<(IpAddr, Option<u8>)>,
}

fn parse(kind: SetKind, element: &str) -> Option<Parts> {
    let mut fields = element.split(',');
    let ip: IpAddr = fields.next()?.parse().ok()?;
    let proto_port = match fields.next() {
        None => None,
        Some(field) => {
            let (proto, port) = field.split_once(':')?;
            let number = Protocol::ALL
                .into_iter()
                .find(|p| p.lowercase() == proto)?
                .number();
            Some((number, port.parse().ok()?))
        }
    };
    let second = match fields.next() {
        None => None,
        Some(field) if kind == SetKind::LbSource => {
            let net: ipnet::IpNet = match field.parse::<IpAddr>() {
                Ok(ip) => ip.into(),
                Err(_) => field.parse().ok()?,
            };
            Some((net.addr(), Some(net.prefix_len())))
        }
        Some(field) => Some((field.parse().ok()?, None)),
    };
    if fields.next().is_some() {
        return None;
    }
    Some(Parts {
        ip,
        proto_port,
        second,
    })
}

/// Appends one attribute (4-byte aligned).
fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (4 - len % 4) % 4, 0);
}

/// Appends a nested attribute whose payload `fill` writes.
fn nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    fill(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

fn address(out: &mut Vec<u8>, kind: u16, ip: IpAddr) {
    nested(out, kind, |out| match ip {
        IpAddr::V4(v4) => attr(
            out,
            IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER,
            &v4.octets(),
        ),
        IpAddr::V6(v6) => attr(
            out,
            IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER,
            &v6.octets(),
        ),
    });
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = text.bytes().filter(|b| *b != 0).take(255).collect();
    bytes.push(0);
    bytes
}

/// One `IPSET_CMD_ADD` / `IPSET_CMD_DEL` message.
fn encode(
    add: bool,
    set: &str,
    family: Family,
    parts: &Parts,
    comment: Option<&str>,
    seq: u32,
) -> Vec<u8> {
    let mut out = vec![0; 16];
    out.push(match family {
        Family::V4 => AF_INET,
        Family::V6 => AF_INET6,
    });
    out.extend_from_slice(&[0, 0, 0]); // version NFNETLINK_V0, res_id 0
    attr(&mut out, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    attr(&mut out, IPSET_ATTR_SETNAME, &nul_terminated(set));
    nested(&mut out, IPSET_ATTR_DATA, |out| {
        address(out, IPSET_ATTR_IP, parts.ip);
        if let Some((proto, port)) = parts.proto_port {
            attr(
                out,
                IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER,
                &port.to_be_bytes(),
            );
            attr(out, IPSET_ATTR_PROTO, &[proto]);
        }
        if let Some((ip, cidr)) = parts.second {
            address(out, IPSET_ATTR_IP2, ip);
            if let Some(cidr) = cidr {
                attr(out, IPSET_ATTR_CIDR2, &[cidr]);
            }
        }
        if let Some(comment) = comment.filter(|_| add) {
            attr(out, IPSET_ATTR_COMMENT, &nul_terminated(comment));
        }
    });
    let command = if add { IPSET_CMD_ADD } else { IPSET_CMD_DEL };
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&((NFNL_SUBSYS_IPSET << 8) | command).to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    out
}

/// An nfnetlink socket for ipset element changes.
pub struct IpsetSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Requests per datagram (see [`nlbatch::configure`]).
    per_datagram: usize,
}

impl IpsetSocket {
    pub fn open() -> Result<Self, IpsetError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(IpsetError::Open)?;
        socket.bind_auto().map_err(IpsetError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(IpsetError::Open)?;
        let per_datagram = nlbatch::configure(&mut socket).map_err(IpsetError::Open)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 1 << 16],
            per_datagram,
        })
    }

    /// Every element of switchyard's sets (all sets are dumped; others are skipped).
    pub fn list(&mut self) -> Result<Saved, IpsetError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut request = vec![0; 16];
        request.extend_from_slice(&[0, 0, 0, 0]); // NFPROTO_UNSPEC, version 0, res_id 0
        attr(&mut request, IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
        let len = request.len() as u32;
        request[0..4].copy_from_slice(&len.to_ne_bytes());
        request[4..6].copy_from_slice(&((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_LIST).to_ne_bytes());
        request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        request[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.socket
            .send(&request, 0)
            .map_err(|e| IpsetError::List(format!("send: {e}")))?;
        let mut saved = Saved::default();
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(IpsetError::List(format!("recv: {e}"))),
            };
            if list_datagram(&self.buf[..n], seq, &mut saved)? {
                return Ok(saved);
            }
        }
    }

    /// Carries out `changes` in order, batched; one result per change.
    pub fn change(&mut self, changes: &[ElementChange<'_>]) -> Vec<Result<(), IpsetError>> {
        let versions = SetKind::Versions.name(Family::V6);
        let mut described = Vec::with_capacity(changes.len());
        let mut requests = Vec::with_capacity(changes.len());
        let mut results: Vec<Option<Result<(), IpsetError>>> =
            (0..changes.len()).map(|_| None).collect();
        for (i, change) in changes.iter().enumerate() {
            let (verb, set, family, element, comment, kind) = match change {
                ElementChange::Add(e, service) => (
                    "add",
                    e.set_name(),
                    e.family,
                    e.element.clone(),
                    Some(safe_comment(service)),
                    e.kind,
                ),
                ElementChange::Del(e) => (
                    "del",
                    e.set_name(),
                    e.family,
                    e.element.clone(),
                    None,
                    e.kind,
                ),
                ElementChange::Version(service, version) => (
                    if version.is_some() { "add" } else { "del" },
                    versions.clone(),
                    Family::V6,
                    version_key(service).to_string(),
                    version.map(|v| safe_comment(&version_comment(service, v))),
                    SetKind::Versions,
                ),
            };
            match parse(kind, &element) {
                Some(parts) => {
                    self.seq = self.seq.wrapping_add(1);
                    requests.push((
                        self.seq,
                        encode(
                            verb == "add",
                            &set,
                            family,
                            &parts,
                            comment.as_deref(),
                            self.seq,
                        ),
                    ));
                    described.push((i, verb, set, element));
                }
                None => {
                    results[i] = Some(Err(IpsetError::Element { verb, set, element }));
                }
            }
        }
        let outcomes = nlbatch::exchange(&self.socket, &mut self.buf, &requests, self.per_datagram);
        for ((i, verb, set, element), outcome) in described.into_iter().zip(outcomes) {
            results[i] = Some(outcome.map_err(|source| IpsetError::Kernel {
                verb,
                set,
                element,
                source,
            }));
        }
        results
            .into_iter()
            .map(|r| r.expect("every change has an outcome"))
            .collect()
    }
}

/// Reads one datagram of a LIST dump into `saved`; `true` once the dump is done.
fn list_datagram(datagram: &[u8], seq: u32, saved: &mut Saved) -> Result<bool, IpsetError> {
    let mut offset = 0;
    while offset + 16 <= datagram.len() {
        let len = u32::from_ne_bytes(datagram[offset..offset + 4].try_into().expect("4")) as usize;
        if len < 16 || offset + len > datagram.len() {
            return Err(IpsetError::List("a truncated message".into()));
        }
        let message = &datagram[offset..offset + len];
        offset += (len + 3) & !3;
        let kind = u16::from_ne_bytes([message[4], message[5]]);
        if u32::from_ne_bytes(message[8..12].try_into().expect("4")) != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = -i32::from_ne_bytes(message[16..20].try_into().expect("4"));
                if errno == 0 {
                    continue;
                }
                return Err(IpsetError::List(
                    io::Error::from_raw_os_error(errno).to_string(),
                ));
            }
            _ if message.len() >= 20 => list_message(&message[20..], saved)?,
            _ => {}
        }
    }
    Ok(false)
}

/// The attributes of `payload`: `(type without flags, value)`.
fn attributes(mut payload: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while payload.len() >= 4 {
        let len = u16::from_ne_bytes([payload[0], payload[1]]) as usize;
        let kind =
            u16::from_ne_bytes([payload[2], payload[3]]) & !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
        if len < 4 || len > payload.len() {
            break;
        }
        out.push((kind, &payload[4..len]));
        payload = &payload[((len + 3) & !3).min(payload.len())..];
    }
    out
}

fn nested_address(value: &[u8]) -> Option<IpAddr> {
    attributes(value)
        .into_iter()
        .find_map(|(kind, bytes)| match kind {
            IPSET_ATTR_IPADDR_IPV4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
            IPSET_ATTR_IPADDR_IPV6 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
            _ => None,
        })
}

/// One message of a LIST dump: a set's name and some of its elements.
fn list_message(payload: &[u8], saved: &mut Saved) -> Result<(), IpsetError> {
    let attrs = attributes(payload);
    let Some(name) = attrs
        .iter()
        .find(|(k, _)| *k == IPSET_ATTR_SETNAME)
        .map(|(_, v)| {
            String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        })
    else {
        return Ok(());
    };
    let Some((kind, family)) = SetKind::parse_name(&name) else {
        return Ok(());
    };
    if !saved.sets.contains(&name) {
        saved.sets.push(name.clone());
    }
    for (_, adt) in attrs.iter().filter(|(k, _)| *k == IPSET_ATTR_ADT) {
        for (_, data) in attributes(adt)
            .into_iter()
            .filter(|(k, _)| *k == IPSET_ATTR_DATA)
        {
            let mut ip = None;
            let mut port = None;
            let mut proto = None;
            let mut second = None;
            let mut cidr2 = None;
            let mut comment = None;
            for (k, v) in attributes(data) {
                match k {
                    IPSET_ATTR_IP => ip = nested_address(v),
                    IPSET_ATTR_PORT => port = <[u8; 2]>::try_from(v).ok().map(u16::from_be_bytes),
                    IPSET_ATTR_PROTO => proto = v.first().copied(),
                    IPSET_ATTR_IP2 => second = nested_address(v),
                    IPSET_ATTR_CIDR2 => cidr2 = v.first().copied(),
                    IPSET_ATTR_COMMENT => {
                        comment = Some(
                            String::from_utf8_lossy(
                                v.split(|b| *b == 0).next().unwrap_or_default(),
                            )
                            .into_owned(),
                        )
                    }
                    _ => {}
                }
            }
            let ip = ip.ok_or_else(|| {
                IpsetError::List(format!("an element of {name} without an address"))
            })?;
            let mut text = ip.to_string();
            if let (Some(port), Some(proto)) = (port, proto) {
                // A number switchyard never writes makes an element read-back skips.
                let proto = Protocol::from_number(proto).map_or("other", Protocol::lowercase);
                text.push_str(&format!(",{proto}:{port}"));
            }
            if let Some(second) = second {
                let host = if second.is_ipv4() { 32 } else { 128 };
                match cidr2.filter(|c| *c != host && kind == SetKind::LbSource) {
                    Some(cidr) => text.push_str(&format!(",{second}/{cidr}")),
                    None => text.push_str(&format!(",{second}")),
                }
            }
            if let Err(e) = saved.record(kind, family, &text, comment) {
                tracing::warn!(set = %name, error = %e, "an element switchyard cannot read");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_element_notation_switchyard_writes_parses() {
        assert_eq!(
            parse(SetKind::Reject, "10.96.0.12,tcp:80"),
            Some(Parts {
                ip: "10.96.0.12".parse().unwrap(),
                proto_port: Some((6, 80)),
                second: None
            })
        );
        assert_eq!(
            parse(SetKind::LoopBack, "fd00::5,sctp:3868,fd00::5")
                .unwrap()
                .second,
            Some(("fd00::5".parse().unwrap(), None))
        );
        assert_eq!(
            parse(SetKind::LbSource, "10.96.0.13,udp:53,203.0.113.0/24")
                .unwrap()
                .second,
            Some(("203.0.113.0".parse().unwrap(), Some(24)))
        );
        assert_eq!(
            parse(SetKind::LbSource, "10.96.0.13,udp:53,10.96.0.13")
                .unwrap()
                .second,
            Some(("10.96.0.13".parse().unwrap(), Some(32))),
            "a host net prints as a bare address"
        );
        assert!(
            parse(SetKind::Versions, "fd12::1")
                .unwrap()
                .proto_port
                .is_none()
        );
        for bad in [
            "",
            "10.0.0.1,icmp:1",
            "10.0.0.1,tcp:x",
            "10.0.0.1,tcp:1,a,b",
            "x",
        ] {
            assert_eq!(parse(SetKind::Reject, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_add_message_has_the_kernels_layout() {
        let parts = parse(SetKind::Reject, "10.96.0.12,tcp:80").unwrap();
        let bytes = encode(true, "SWY-REJECT", Family::V4, &parts, Some("a/b"), 7);
        let mut want: Vec<u8> = Vec::new();
        // nlmsghdr: length, type (IPSET << 8 | ADD), flags (REQUEST | ACK), seq, pid
        want.extend_from_slice(&(bytes.len() as u32).to_ne_bytes());
        want.extend_from_slice(&0x0609u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: AF_INET, version 0, res_id 0
        want.extend_from_slice(&[2, 0, 0, 0]);
        // PROTOCOL 6
        want.extend_from_slice(&[5, 0, 1, 0, 6, 0, 0, 0]);
        // SETNAME "SWY-REJECT\0" (11 bytes, padded to 12)
        want.extend_from_slice(&[15, 0, 2, 0]);
        want.extend_from_slice(b"SWY-REJECT\0\0");
        // DATA (nested): IP (nested: IPV4, net order), PORT (net order), PROTO, COMMENT
        want.extend_from_slice(&[40, 0, 7, 0x80]);
        want.extend_from_slice(&[12, 0, 1, 0x80, 8, 0, 1, 0x40, 10, 96, 0, 12]);
        want.extend_from_slice(&[6, 0, 4, 0x40, 0, 80, 0, 0]);
        want.extend_from_slice(&[5, 0, 7, 0, 6, 0, 0, 0]);
        want.extend_from_slice(&[8, 0, 26, 0]);
        want.extend_from_slice(b"a/b\0");
        assert_eq!(bytes, want);
    }

    #[test]
    fn a_delete_carries_no_comment() {
        let parts = parse(SetKind::LbSource, "10.96.0.13,udp:53,203.0.113.0/24").unwrap();
        let bytes = encode(false, "SWY-LB-SOURCE", Family::V4, &parts, Some("x/y"), 1);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x060a);
        assert!(!bytes.windows(4).any(|w| w == b"x/y\0"));
        // IP2 (nested) and CIDR2 24 are there.
        assert!(bytes.windows(4).any(|w| w == [12, 0, 20, 0x80]));
        assert!(bytes.windows(5).any(|w| w == [5, 0, 21, 0, 24]));
    }
}
