//! The IPVS generic-netlink client: programs and reads the kernel's IPVS table in
//! process, never through `ipvsadm`.
//!
//! Start at [`IpvsSocket::open`]. Changes go in batches through
//! [`IpvsSocket::execute`], which packs many requests into each `sendmsg` and returns
//! one result per [`Op`]; reads are dumps ([`IpvsSocket::services`],
//! [`IpvsSocket::destinations`], [`IpvsSocket::dump`]). The wire format lives in
//! [`codec`] (pure, tested without a kernel); [`types`] holds the domain types.

pub mod codec;
pub mod types;

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_sys::{Socket, protocols::NETLINK_GENERIC};

pub use codec::Skipped;
use codec::{IpvsCmd, IpvsMessage, Reply};
pub use types::{
    DestId, Destination, ForwardMethod, Info, Op, Protocol, Service, ServiceId, Stats, Timeouts,
    flags,
};

/// What went wrong talking to IPVS.
///
/// [`IpvsError::Kernel`] is the kernel refusing one request (EEXIST, ENOENT, ESRCH,
/// EINVAL …): retrying the same request gets the same answer, the caller decides (an
/// existing service may be fine). [`IpvsError::NoAck`] leaves the outcome unknown: read
/// the table back before retrying. [`IpvsError::Interrupted`] and [`IpvsError::Socket`]
/// errors may be transient (a busy table, ENOBUFS); [`IpvsError::NotAvailable`] and
/// [`IpvsError::Decode`] are not.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// The kernel has no "IPVS" generic-netlink family: the module is not loaded.
    #[error(
        "IPVS is not available (modprobe ip_vs): the kernel has no generic netlink family \"IPVS\""
    )]
    NotAvailable,
    /// A socket call failed (creating, binding, sending, receiving).
    #[error("{op}: {source}")]
    Socket {
        /// The call and what it was for.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request.
    #[error("{op}: {source}{}", message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// The request, e.g. `IPVS_CMD_NEW_DEST 10.96.0.10:80/TCP → 10.244.1.2:8080`.
        op: String,
        /// The errno the kernel answered.
        #[source]
        source: io::Error,
        /// The kernel's extended-ack message, if it sent one.
        message: Option<String>,
    },
    /// No acknowledgement came back for a request; whether it took effect is unknown.
    #[error("{op}: no acknowledgement from the kernel{}", if *.overrun { " (the receive buffer overran and replies were dropped)" } else { "" })]
    NoAck {
        /// The request.
        op: String,
        /// True when the socket reported an overrun (ENOBUFS).
        overrun: bool,
    },
    /// The kernel marked a dump as interrupted by concurrent changes every time it
    /// was tried.
    #[error("{op}: dump interrupted by concurrent changes, {DUMP_RETRIES} times")]
    Interrupted {
        /// The dump request.
        op: String,
    },
    /// A reply could not be decoded.
    #[error("{op}: undecodable reply: {reason}")]
    Decode {
        /// The request.
        op: String,
        /// What was wrong.
        reason: String,
    },
}

impl IpvsError {
    /// The errno of a refused request or failed socket call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            IpvsError::Kernel { source, .. } | IpvsError::Socket { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    fn socket(op: impl Into<String>, source: io::Error) -> Self {
        IpvsError::Socket {
            op: op.into(),
            source,
        }
    }

    fn kernel(op: impl Into<String>, errno: i32, message: Option<String>) -> Self {
        IpvsError::Kernel {
            op: op.into(),
            source: io::Error::from_raw_os_error(errno),
            message,
        }
    }
}

/// Socket buffer sizes asked for (the kernel doubles them). `SO_*BUFFORCE` goes past
/// `net.core.[rw]mem_max` with CAP_NET_ADMIN, which programming IPVS needs anyway.
const SEND_BUFFER: usize = 4 << 20;
const RECV_BUFFER: usize = 8 << 20;
/// The largest datagram `execute` sends.
const MAX_DATAGRAM: usize = 1 << 20;
/// Receive-buffer bytes one acknowledgement may occupy (an skb's truesize, ~730 bytes
/// measured on 6.1), so that the acknowledgements of one datagram never overrun the
/// receive buffer.
const ACK_TRUESIZE: usize = 1024;
/// Receive buffer for one datagram: dumps come in skbs of at most 32 KiB.
const RECV_CHUNK: usize = 64 << 10;
/// How long a blocking receive waits before the request counts as unanswered.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a dump the kernel marks as interrupted (`NLM_F_DUMP_INTR`) is restarted.
const DUMP_RETRIES: usize = 3;

/// A blocking generic-netlink socket bound to the IPVS family of the calling thread's
/// network namespace (the namespace is fixed when the socket is opened; IPVS tables are
/// per namespace). `Send`, so it can live on a blocking worker thread.
///
/// Every call takes `&mut self`: one request or batch at a time. Replies are matched to
/// requests by sequence number, so stray replies of an earlier call are ignored.
pub struct IpvsSocket {
    socket: Socket,
    family_id: u16,
    seq: u32,
    buf: Vec<u8>,
    max_datagram: usize,
    max_batch: usize,
    capture: Option<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for IpvsSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsSocket")
            .field("family_id", &self.family_id)
            .field("max_datagram", &self.max_datagram)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

impl IpvsSocket {
    /// Opens a socket and resolves the "IPVS" family once.
    ///
    /// Fails with [`IpvsError::NotAvailable`] when the kernel has no IPVS (module not
    /// loaded).
    pub fn open() -> Result<Self, IpvsError> {
        Self::open_with_buffers(SEND_BUFFER, RECV_BUFFER)
    }

    /// [`IpvsSocket::open`] asking for other socket buffer sizes (`SO_SNDBUF`,
    /// `SO_RCVBUF`, in bytes, before the kernel doubles them). [`IpvsSocket::execute`]
    /// sizes its datagrams to what the kernel grants: smaller buffers mean more
    /// `sendmsg` calls, never lost acknowledgements.
    pub fn open_with_buffers(send: usize, recv: usize) -> Result<Self, IpvsError> {
        let mut socket = Socket::new(NETLINK_GENERIC)
            .map_err(|e| IpvsError::socket("socket(AF_NETLINK, NETLINK_GENERIC)", e))?;
        socket
            .bind_auto()
            .map_err(|e| IpvsError::socket("bind netlink socket", e))?;
        // Errors name the request without echoing it back; the kernel's own message
        // comes along where it has one. Both exist since Linux 4.12.
        socket
            .set_cap_ack(true)
            .map_err(|e| IpvsError::socket("setsockopt NETLINK_CAP_ACK", e))?;
        socket
            .set_ext_ack(true)
            .map_err(|e| IpvsError::socket("setsockopt NETLINK_EXT_ACK", e))?;
        let fd = socket.as_fd();
        if rustix::net::sockopt::set_socket_send_buffer_size_force(fd, send).is_err() {
            rustix::net::sockopt::set_socket_send_buffer_size(fd, send)
                .map_err(|e| IpvsError::socket("setsockopt SO_SNDBUF", e.into()))?;
        }
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(fd, recv).is_err() {
            rustix::net::sockopt::set_socket_recv_buffer_size(fd, recv)
                .map_err(|e| IpvsError::socket("setsockopt SO_RCVBUF", e.into()))?;
        }
        rustix::net::sockopt::set_socket_timeout(
            fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(RECV_TIMEOUT),
        )
        .map_err(|e| IpvsError::socket("setsockopt SO_RCVTIMEO", e.into()))?;
        let send_buffer = rustix::net::sockopt::socket_send_buffer_size(fd)
            .map_err(|e| IpvsError::socket("getsockopt SO_SNDBUF", e.into()))?;
        let recv_buffer = rustix::net::sockopt::socket_recv_buffer_size(fd)
            .map_err(|e| IpvsError::socket("getsockopt SO_RCVBUF", e.into()))?;

        let mut ipvs = IpvsSocket {
            socket,
            family_id: 0,
            seq: 0,
            buf: vec![0; RECV_CHUNK],
            // netlink_sendmsg refuses datagrams above sk_sndbuf - 32.
            max_datagram: (send_buffer / 2).min(MAX_DATAGRAM),
            max_batch: (recv_buffer / ACK_TRUESIZE).max(16),
            capture: None,
        };
        ipvs.family_id = ipvs.resolve_family()?;
        Ok(ipvs)
    }

    /// The most bytes and operations one `sendmsg` of [`IpvsSocket::execute`] carries,
    /// as derived from the socket buffers the kernel granted.
    pub fn batch_limits(&self) -> (usize, usize) {
        (self.max_datagram, self.max_batch)
    }

    /// The family id the kernel assigned to "IPVS" (for decoding captured replies).
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// Starts (or stops) keeping a copy of every datagram received, for fixtures and
    /// debugging; [`IpvsSocket::take_captured`] hands them over.
    pub fn capture_replies(&mut self, on: bool) {
        self.capture = on.then(Vec::new);
    }

    /// The datagrams captured since the last call.
    pub fn take_captured(&mut self) -> Vec<Vec<u8>> {
        self.capture
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Version and connection table size.
    pub fn info(&mut self) -> Result<Info, IpvsError> {
        let op = IpvsCmd::GetInfo.name();
        let reply = self.request(IpvsMessage::bare(IpvsCmd::GetInfo), op)?;
        codec::decode_info(&reply).map_err(|e| decode(op, e))
    }

    /// Every TCP, UDP and SCTP service (firewall-mark services and other protocols are
    /// left out: switchyard never creates them).
    pub fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        self.services_and_skipped().map(|(services, _)| services)
    }

    /// [`IpvsSocket::services`], plus what the dump held that this client does not
    /// model.
    pub fn services_and_skipped(&mut self) -> Result<(Vec<Service>, Vec<Skipped>), IpvsError> {
        let op = IpvsCmd::GetService.name();
        let mut services = Vec::new();
        let mut skipped = Vec::new();
        for msg in self.dump_messages(IpvsMessage::bare(IpvsCmd::GetService), op)? {
            let attrs = msg
                .service()
                .ok_or_else(|| decode(op, "entry without IPVS_CMD_ATTR_SERVICE"))?;
            match codec::decode_service(attrs).map_err(|e| decode(op, e))? {
                Ok(service) => services.push(service),
                Err(other) => skipped.push(other),
            }
        }
        Ok((services, skipped))
    }

    /// The destinations of one service, with their connection counts. A service that
    /// does not exist has none (the kernel answers an empty dump, not an error).
    pub fn destinations(&mut self, id: &ServiceId) -> Result<Vec<Destination>, IpvsError> {
        let op = format!("{} {id}", IpvsCmd::GetDest.name());
        self.dump_messages(IpvsMessage::get_dests(id), &op)?
            .iter()
            .map(|msg| {
                let attrs = msg
                    .dest()
                    .ok_or_else(|| decode(&op, "entry without IPVS_CMD_ATTR_DEST"))?;
                codec::decode_dest(&id.addr, attrs).map_err(|e| decode(&op, e))
            })
            .collect()
    }

    /// Every service with its destinations: one service dump, then one destination
    /// dump per service. A service deleted in between shows with no destinations.
    pub fn dump(&mut self) -> Result<Vec<(Service, Vec<Destination>)>, IpvsError> {
        let services = self.services()?;
        let mut out = Vec::with_capacity(services.len());
        for service in services {
            let dests = self.destinations(&service.id)?;
            out.push((service, dests));
        }
        Ok(out)
    }

    /// Carries out `ops` in order, as few `sendmsg` calls as the socket buffers allow
    /// (several netlink messages per datagram, each with `NLM_F_ACK`), then collects
    /// every acknowledgement: one result per operation, in the same order, so one
    /// refused operation never hides the others. Operations after a refused one still
    /// run (the kernel handles each message of a datagram on its own).
    pub fn execute(&mut self, ops: &[Op]) -> Vec<Result<(), IpvsError>> {
        let mut results: Vec<Option<Result<(), IpvsError>>> =
            std::iter::repeat_with(|| None).take(ops.len()).collect();
        let mut start = 0;
        let mut datagram = Vec::new();
        while start < ops.len() {
            datagram.clear();
            let first_seq = self.seq.wrapping_add(1);
            let mut end = start;
            while end < ops.len() && end - start < self.max_batch {
                let seq = self.next_seq();
                let bytes = codec::encode(
                    IpvsMessage::for_op(&ops[end]),
                    self.family_id,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                );
                if !datagram.is_empty() && datagram.len() + bytes.len() > self.max_datagram {
                    // Give the number back: the next datagram starts with this op.
                    self.seq = self.seq.wrapping_sub(1);
                    break;
                }
                datagram.extend_from_slice(&bytes);
                end += 1;
            }
            self.run_batch(
                &ops[start..end],
                first_seq,
                &datagram,
                &mut results[start..end],
            );
            start = end;
        }
        results
            .into_iter()
            .zip(ops)
            .map(|(r, op)| {
                r.unwrap_or_else(|| {
                    Err(IpvsError::NoAck {
                        op: op.to_string(),
                        overrun: false,
                    })
                })
            })
            .collect()
    }

    /// Sends one datagram of requests numbered `first_seq..` and fills in `results`
    /// from their acknowledgements.
    fn run_batch(
        &mut self,
        ops: &[Op],
        first_seq: u32,
        datagram: &[u8],
        results: &mut [Option<Result<(), IpvsError>>],
    ) {
        if let Err(e) = self.send(datagram) {
            let errno = e.raw_os_error();
            for (slot, op) in results.iter_mut().zip(ops) {
                *slot = Some(Err(IpvsError::Socket {
                    op: format!("sendmsg {op}"),
                    source: errno.map_or_else(
                        || io::Error::other(e.to_string()),
                        io::Error::from_raw_os_error,
                    ),
                }));
            }
            return;
        }
        // The kernel handles a generic-netlink datagram inside sendmsg, so every
        // acknowledgement is queued by now: drain without blocking.
        let mut missing = ops.len();
        let mut overrun = false;
        while missing > 0 {
            let n = match self.recv(true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // ENOBUFS: acknowledgements were dropped; read what is left.
                    overrun = true;
                    continue;
                }
                Err(e) => {
                    for (slot, op) in results.iter_mut().zip(ops).filter(|(s, _)| s.is_none()) {
                        *slot = Some(Err(IpvsError::socket(
                            format!("recvmsg acknowledgement of {op}"),
                            io::Error::new(e.kind(), e.to_string()),
                        )));
                    }
                    return;
                }
            };
            let replies = match codec::parse_datagram(&self.buf[..n], self.family_id) {
                Ok(r) => r,
                Err(e) => {
                    for (slot, op) in results.iter_mut().zip(ops).filter(|(s, _)| s.is_none()) {
                        *slot = Some(Err(decode(&op.to_string(), e.to_string())));
                    }
                    return;
                }
            };
            for reply in replies {
                let index = reply.seq.wrapping_sub(first_seq) as usize;
                let Some(slot) = results.get_mut(index) else {
                    continue;
                };
                if slot.is_some() {
                    continue;
                }
                let outcome = match reply.reply {
                    Reply::Ack => Ok(()),
                    Reply::Error { errno, message } => {
                        Err(IpvsError::kernel(ops[index].to_string(), errno, message))
                    }
                    _ => continue,
                };
                *slot = Some(outcome);
                missing -= 1;
            }
        }
        for (slot, op) in results.iter_mut().zip(ops).filter(|(s, _)| s.is_none()) {
            *slot = Some(Err(IpvsError::NoAck {
                op: op.to_string(),
                overrun,
            }));
        }
    }

    /// The connection timeouts.
    pub fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let reply = self.request(
            IpvsMessage::bare(IpvsCmd::GetConfig),
            IpvsCmd::GetConfig.name(),
        )?;
        Ok(codec::decode_timeouts(&reply))
    }

    /// Sets the connection timeouts; a 0 leaves that one unchanged.
    pub fn set_timeouts(&mut self, t: &Timeouts) -> Result<(), IpvsError> {
        let op = format!(
            "{} tcp {} tcpfin {} udp {}",
            IpvsCmd::SetConfig.name(),
            t.tcp,
            t.tcp_fin,
            t.udp
        );
        self.request_ack(IpvsMessage::set_config(t), &op)
    }

    /// Deletes every service (and with them every destination).
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        self.request_ack(IpvsMessage::bare(IpvsCmd::Flush), IpvsCmd::Flush.name())
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, datagram: &[u8]) -> io::Result<()> {
        loop {
            match self.socket.send(datagram, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one datagram into `self.buf`; returns its length.
    fn recv(&mut self, nonblocking: bool) -> io::Result<usize> {
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        loop {
            let mut slice: &mut [u8] = &mut self.buf[..];
            match self.socket.recv(&mut slice, flags) {
                Ok(n) if n > self.buf.len() => {
                    return Err(io::Error::other(format!(
                        "a {n}-byte datagram does not fit the {}-byte buffer",
                        self.buf.len()
                    )));
                }
                Ok(n) => {
                    if let Some(captured) = &mut self.capture {
                        captured.push(self.buf[..n].to_vec());
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `msg` with `flags` and hands each IPVS message answering it to
    /// `on_message`, until the exchange ends: `NLMSG_DONE` or an error for a dump, an
    /// acknowledgement or error with `NLM_F_ACK`, else the first reply message.
    ///
    /// A dump is always read to its end, even after `on_message` failed or a message
    /// did not decode, so the kernel never keeps a half-read dump running on this
    /// socket (it would refuse the next one with EBUSY). The first failure is returned.
    fn exchange(
        &mut self,
        msg: IpvsMessage,
        flags: u16,
        op: &str,
        mut on_message: impl FnMut(IpvsMessage) -> Result<(), IpvsError>,
    ) -> Result<(), IpvsError> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let acked = flags & NLM_F_ACK != 0;
        let seq = self.next_seq();
        let bytes = codec::encode(msg, self.family_id, flags, seq);
        self.send(&bytes)
            .map_err(|e| IpvsError::socket(format!("sendmsg {op}"), e))?;
        let mut failure = None;
        loop {
            let n = match self.recv(false) {
                Ok(n) => n,
                // An overrun left by an earlier batch: reported once, nothing of ours.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) => {
                    let what = if e.kind() == io::ErrorKind::WouldBlock {
                        format!("recvmsg {op} (no reply within {RECV_TIMEOUT:?})")
                    } else {
                        format!("recvmsg {op}")
                    };
                    return Err(IpvsError::socket(what, e));
                }
            };
            let replies =
                codec::parse_datagram(&self.buf[..n], self.family_id).map_err(|e| decode(op, e))?;
            for reply in replies.into_iter().filter(|r| r.seq == seq) {
                if dump && reply.flags & NLM_F_DUMP_INTR != 0 {
                    failure.get_or_insert(IpvsError::Interrupted { op: op.to_owned() });
                }
                let end = match reply.reply {
                    Reply::Ipvs(m) => {
                        if failure.is_none()
                            && let Err(e) = on_message(m)
                        {
                            failure = Some(e);
                        }
                        !dump && !acked
                    }
                    Reply::Invalid(reason) => {
                        failure.get_or_insert(decode(op, reason));
                        !dump && !acked
                    }
                    Reply::Ack => true,
                    Reply::Done(0) => true,
                    Reply::Done(code) => {
                        failure.get_or_insert(IpvsError::kernel(op, code.saturating_neg(), None));
                        true
                    }
                    Reply::Error { errno, message } => {
                        failure.get_or_insert(IpvsError::kernel(op, errno, message));
                        true
                    }
                    Reply::Family(_) | Reply::Other(_) => false,
                };
                if end {
                    return failure.map_or(Ok(()), Err);
                }
            }
        }
    }

    /// A request answered by one IPVS message.
    fn request(&mut self, msg: IpvsMessage, op: &str) -> Result<IpvsMessage, IpvsError> {
        let mut answer = None;
        self.exchange(msg, NLM_F_REQUEST, op, |m| {
            answer = Some(m);
            Ok(())
        })?;
        answer.ok_or_else(|| decode(op, "no reply message"))
    }

    /// A request answered by an acknowledgement.
    fn request_ack(&mut self, msg: IpvsMessage, op: &str) -> Result<(), IpvsError> {
        self.exchange(msg, NLM_F_REQUEST | NLM_F_ACK, op, |_| Ok(()))
    }

    /// A dump: every message until `NLMSG_DONE`, restarted when the kernel marks it
    /// interrupted by a concurrent change (`NLM_F_DUMP_INTR`).
    fn dump_messages(&mut self, msg: IpvsMessage, op: &str) -> Result<Vec<IpvsMessage>, IpvsError> {
        let mut attempt = 0;
        loop {
            let mut messages = Vec::new();
            match self.exchange(msg.clone(), NLM_F_REQUEST | NLM_F_DUMP, op, |m| {
                messages.push(m);
                Ok(())
            }) {
                Err(IpvsError::Interrupted { .. }) if attempt + 1 < DUMP_RETRIES => attempt += 1,
                Err(e) => return Err(e),
                Ok(()) => return Ok(messages),
            }
        }
    }

    /// Asks the generic-netlink controller for the id of "IPVS".
    fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        const OP: &str = "CTRL_CMD_GETFAMILY IPVS";
        let seq = self.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = seq;
        let ctrl = GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(codec::FAMILY_NAME.to_owned())],
        };
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::from(GenlMessage::from_payload(ctrl)),
        );
        msg.finalize();
        let mut bytes = vec![0; msg.buffer_len()];
        msg.serialize(&mut bytes);
        self.send(&bytes)
            .map_err(|e| IpvsError::socket(format!("sendmsg {OP}"), e))?;
        loop {
            let n = self
                .recv(false)
                .map_err(|e| IpvsError::socket(format!("recvmsg {OP}"), e))?;
            let replies = codec::parse_datagram(&self.buf[..n], 0).map_err(|e| decode(OP, e))?;
            for reply in replies.into_iter().filter(|r| r.seq == seq) {
                match reply.reply {
                    Reply::Family(Some(id)) => return Ok(id),
                    Reply::Family(None) => {
                        return Err(decode(OP, "reply without CTRL_ATTR_FAMILY_ID"));
                    }
                    // The controller knows no such family, and loading ip_vs on demand
                    // (it answers to "net-pf-16-proto-16-family-IPVS") did not help.
                    Reply::Error { errno, .. } if errno == libc::ENOENT => {
                        return Err(IpvsError::NotAvailable);
                    }
                    Reply::Error { errno, message } => {
                        return Err(IpvsError::kernel(OP, errno, message));
                    }
                    _ => {}
                }
            }
        }
    }
}

fn decode(op: &str, reason: impl ToString) -> IpvsError {
    IpvsError::Decode {
        op: op.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_can_move_to_a_worker_thread() {
        fn send<T: Send>() {}
        send::<IpvsSocket>();
        send::<IpvsError>();
    }
}
