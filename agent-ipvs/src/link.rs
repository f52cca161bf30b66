//! The dummy device that holds every VIP, and the node's own addresses, through rtnetlink
//! on a blocking socket: many address changes go in one datagram, each acknowledged on
//! its own, so a refused one never hides the others.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_MULTIPART, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

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

/// Requests per datagram: each address message is under 64 bytes and each
/// acknowledgement under 40, far inside the socket buffers set below.
const BATCH: usize = 512;

/// An rtnetlink socket.
pub struct Links {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Links {
    pub fn open() -> Result<Self, LinkError> {
        let open = |e| LinkError::io("opening an rtnetlink socket", e);
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(open)?;
        socket.set_rx_buf_sz(1 << 20).map_err(open)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 1 << 16],
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

    /// Adds `add` and deletes `del` as host addresses of link `index`, batched; one
    /// result per address, adds first. An address already there (or already gone) counts
    /// as done.
    pub fn change_addresses(
        &mut self,
        index: u32,
        add: &[IpAddr],
        del: &[IpAddr],
    ) -> Vec<(IpAddr, Result<(), LinkError>)> {
        let requests: Vec<(IpAddr, bool)> = add
            .iter()
            .map(|a| (*a, true))
            .chain(del.iter().map(|a| (*a, false)))
            .collect();
        let mut results = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(BATCH) {
            results.extend(self.change_chunk(index, chunk));
        }
        results
    }

    fn change_chunk(
        &mut self,
        index: u32,
        chunk: &[(IpAddr, bool)],
    ) -> Vec<(IpAddr, Result<(), LinkError>)> {
        let mut datagram = Vec::new();
        let mut seqs = Vec::with_capacity(chunk.len());
        for (addr, add) in chunk {
            let message = host_address(index, *addr);
            let (seq, bytes) = if *add {
                self.encode(
                    RouteNetlinkMessage::NewAddress(message),
                    NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                )
            } else {
                self.encode(
                    RouteNetlinkMessage::DelAddress(message),
                    NLM_F_REQUEST | NLM_F_ACK,
                )
            };
            seqs.push(seq);
            datagram.extend_from_slice(&bytes);
        }
        let operation = |addr: &IpAddr, add: bool| {
            format!(
                "{} {addr} on the dummy device",
                if add { "RTM_NEWADDR" } else { "RTM_DELADDR" }
            )
        };
        let mut outcomes: Vec<Option<Result<(), LinkError>>> =
            (0..chunk.len()).map(|_| None).collect();
        if let Err(e) = self.socket.send(&datagram, 0) {
            let errno = e.raw_os_error();
            return chunk
                .iter()
                .map(|(addr, add)| {
                    let source = errno.map_or_else(
                        || io::Error::other(e.to_string()),
                        io::Error::from_raw_os_error,
                    );
                    (*addr, Err(LinkError::io(operation(addr, *add), source)))
                })
                .collect();
        }
        let first = seqs[0];
        let mut missing = chunk.len();
        while missing > 0 {
            let replies = match self.receive("receiving address acknowledgements") {
                Ok(replies) => replies,
                Err(e) => {
                    tracing::warn!(%e, "rtnetlink acknowledgements lost");
                    break;
                }
            };
            for reply in replies {
                let i = reply.header.sequence_number.wrapping_sub(first) as usize;
                let (Some(slot), NetlinkPayload::Error(error)) =
                    (outcomes.get_mut(i), reply.payload)
                else {
                    continue;
                };
                if slot.is_some() {
                    continue;
                }
                let (addr, add) = chunk[i];
                *slot = Some(match error.code.map(|c| -c.get()) {
                    None => Ok(()),
                    Some(errno) if add && errno == libc::EEXIST => Ok(()),
                    Some(errno) if !add && errno == libc::EADDRNOTAVAIL => Ok(()),
                    Some(errno) => Err(LinkError::io(
                        operation(&addr, add),
                        io::Error::from_raw_os_error(errno),
                    )),
                });
                missing -= 1;
            }
        }
        chunk
            .iter()
            .zip(outcomes)
            .map(|((addr, add), outcome)| {
                (
                    *addr,
                    outcome.unwrap_or_else(|| {
                        Err(LinkError::io(
                            operation(addr, *add),
                            io::Error::other("no acknowledgement"),
                        ))
                    }),
                )
            })
            .collect()
    }
}

/// A host address (/32, /128) of link `index`.
fn host_address(index: u32, addr: IpAddr) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.prefix_len = if addr.is_ipv4() { 32 } else { 128 };
    message.attributes.push(AddressAttribute::Address(addr));
    if addr.is_ipv4() {
        message.attributes.push(AddressAttribute::Local(addr));
    }
    message
}
