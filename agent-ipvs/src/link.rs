//! The dummy device that holds every VIP, and the node's own addresses, through rtnetlink
//! on a blocking socket.
//!
//! Each VIP is a host route of type `local` in the `local` table through `swy-ipvs0`
//! (protocol [`ROUTE_PROTOCOL`]), which makes the node accept its packets (IPVS sees
//! them on LOCAL_IN) as an address would, without an address: IPv4 keeps a device's
//! addresses in a list that every insertion walks, so 10,000 addresses cost quadratic
//! time (1.5 s in user-mode Linux, against about 0.3 s for as many routes, which go into
//! the FIB trie), and node traffic to a VIP takes a node address as its source, as with
//! iptables. Many route changes go in one datagram, each acknowledged on its own, so a
//! refused one never hides the others.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_MULTIPART, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::nlbatch;

/// The routing protocol number of switchyard's VIP routes (`ip route show table local
/// proto 83`): 'S'.
pub const ROUTE_PROTOCOL: u8 = 83;
/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u8 = 255;

/// A failed rtnetlink operation, naming it. Retryable: the dataplane reports it and the
/// runtime tries again.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket or the kernel refused the operation.
    #[error("{operation}: {source}")]
    Io {
        operation: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be decoded.
    #[error("{operation}: cannot decode the kernel's answer: {message}")]
    Decode { operation: String, message: String },
}

impl LinkError {
    fn io(operation: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            operation: operation.into(),
            source,
        }
    }

    /// The errno the kernel answered with, if it was one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } => source.raw_os_error(),
            Self::Decode { .. } => None,
        }
    }
}

/// An address of an interface, as a dump shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// An rtnetlink socket.
pub struct Links {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    /// Requests per datagram (see [`nlbatch::configure`]).
    per_datagram: usize,
}

impl Links {
    pub fn open() -> Result<Self, LinkError> {
        let open = |e| LinkError::io("opening an rtnetlink socket", e);
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(open)?;
        let per_datagram = nlbatch::configure(&mut socket).map_err(open)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 1 << 16],
            per_datagram,
        })
    }

    fn encode(&mut self, message: RouteNetlinkMessage, flags: u16) -> (u32, Vec<u8>) {
        self.seq = self.seq.wrapping_add(1);
        let mut packet = NetlinkMessage::from(message);
        packet.header.flags = flags;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        (self.seq, bytes)
    }

    /// Receives one datagram and decodes its messages.
    fn receive(
        &mut self,
        operation: &str,
    ) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, LinkError> {
        let n = loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LinkError::io(operation, e)),
            }
        };
        let mut messages = Vec::new();
        let mut offset = 0;
        while offset < n {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                .map_err(|e| LinkError::Decode {
                    operation: operation.to_string(),
                    message: e.to_string(),
                })?;
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            offset += (len + 3) & !3;
            messages.push(message);
        }
        Ok(messages)
    }

    /// Sends one request and returns what it answered (a dump's messages; nothing for
    /// an acknowledged change).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        operation: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, LinkError> {
        let (seq, bytes) = self.encode(message, flags | NLM_F_REQUEST);
        self.socket
            .send(&bytes, 0)
            .map_err(|e| LinkError::io(operation, e))?;
        let mut answers = Vec::new();
        loop {
            for reply in self.receive(operation)? {
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if reply.header.flags & NLM_F_MULTIPART == 0 {
                            return Ok(answers);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(answers),
                            Some(code) => Err(LinkError::io(
                                operation,
                                io::Error::from_raw_os_error(-code.get()),
                            )),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// The index of the link called `name`, if there is one.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, LinkError> {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.into()));
        match self.request(
            RouteNetlinkMessage::GetLink(message),
            0,
            &format!("RTM_GETLINK {name}"),
        ) {
            Ok(answers) => Ok(answers.into_iter().find_map(|a| match a {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })),
            Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the dummy device `name` unless it exists, brings it up, and returns its
    /// index.
    pub fn ensure_dummy(&mut self, name: &str) -> Result<u32, LinkError> {
        if self.link_index(name)?.is_none() {
            let mut message = LinkMessage::default();
            message.attributes.push(LinkAttribute::IfName(name.into()));
            message
                .attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Dummy,
                )]));
            match self.request(
                RouteNetlinkMessage::NewLink(message),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                &format!("RTM_NEWLINK dummy {name} (modprobe dummy?)"),
            ) {
                Ok(_) => {}
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        let index = self.link_index(name)?.ok_or_else(|| {
            LinkError::io(
                format!("RTM_GETLINK {name} after creating it"),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })?;
        let mut up = LinkMessage::default();
        up.header.index = index;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        self.request(
            RouteNetlinkMessage::SetLink(up),
            NLM_F_ACK,
            &format!("RTM_SETLINK {name} up"),
        )?;
        Ok(index)
    }

    /// Deletes the link with `index`.
    pub fn delete_link(&mut self, index: u32, name: &str) -> Result<(), LinkError> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        self.request(
            RouteNetlinkMessage::DelLink(message),
            NLM_F_ACK,
            &format!("RTM_DELLINK {name}"),
        )?;
        Ok(())
    }

    /// Every address of every interface.
    pub fn addresses(&mut self) -> Result<Vec<InterfaceAddress>, LinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            "RTM_GETADDR dump",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| {
                let RouteNetlinkMessage::NewAddress(message) = answer else {
                    return None;
                };
                // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's
                // on point-to-point links); IPv6 has only IFA_ADDRESS.
                let local = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                Some(InterfaceAddress {
                    index: message.header.index,
                    addr: local.or(address)?,
                    prefix_len: message.header.prefix_len,
                })
            })
            .collect())
    }

    /// The VIPs routed locally through link `index` (switchyard's routes).
    pub fn vips(&mut self, index: u32) -> Result<Vec<IpAddr>, LinkError> {
        let answers = self.request(
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            NLM_F_DUMP,
            "RTM_GETROUTE dump",
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| {
                let RouteNetlinkMessage::NewRoute(route) = answer else {
                    return None;
                };
                let header = &route.header;
                let host = match header.address_family {
                    AddressFamily::Inet => 32,
                    AddressFamily::Inet6 => 128,
                    _ => return None,
                };
                if header.table != RT_TABLE_LOCAL
                    || header.kind != RouteType::Local
                    || header.destination_prefix_length != host
                    || !route.attributes.contains(&RouteAttribute::Oif(index))
                {
                    return None;
                }
                route.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Routes `add` locally through link `index` and removes the routes of `del`,
    /// batched; one result per VIP, adds first. A route already there (or already gone)
    /// counts as done.
    pub fn change_vips(
        &mut self,
        index: u32,
        add: &[IpAddr],
        del: &[IpAddr],
    ) -> Vec<(IpAddr, Result<(), LinkError>)> {
        let changes: Vec<(IpAddr, bool)> = add
            .iter()
            .map(|a| (*a, true))
            .chain(del.iter().map(|a| (*a, false)))
            .collect();
        let requests: Vec<(u32, Vec<u8>)> = changes
            .iter()
            .map(|(addr, add)| {
                let route = local_route(index, *addr);
                if *add {
                    self.encode(
                        RouteNetlinkMessage::NewRoute(route),
                        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                    )
                } else {
                    self.encode(
                        RouteNetlinkMessage::DelRoute(route),
                        NLM_F_REQUEST | NLM_F_ACK,
                    )
                }
            })
            .collect();
        let results = nlbatch::exchange(&self.socket, &mut self.buf, &requests, self.per_datagram);
        changes
            .into_iter()
            .zip(results)
            .map(|((addr, add), result)| {
                let result = match result {
                    Err(e) if add && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                    Err(e) if !add && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                    other => other,
                };
                let operation = if add { "RTM_NEWROUTE" } else { "RTM_DELROUTE" };
                (
                    addr,
                    result.map_err(|e| {
                        LinkError::io(format!("{operation} local {addr} dev swy-ipvs0"), e)
                    }),
                )
            })
            .collect()
    }
}

/// The local host route of `addr` through link `index`.
fn local_route(index: u32, addr: IpAddr) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    route.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
    route.header.table = RT_TABLE_LOCAL;
    route.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route
        .attributes
        .push(RouteAttribute::Destination(addr.into()));
    route.attributes.push(RouteAttribute::Oif(index));
    route
}
