//! Classic tc attachment through rtnetlink, for kernels without TCX (before 6.6): a
//! `clsact` qdisc on the device and a `cls_bpf` filter in direct-action mode on its
//! ingress or egress hook. Never used where the kernel has TCX (see [`crate::loader`]).
//!
//! A filter is no link: nothing is pinned for it and it stays until deleted, so
//! forwarding outlives the agent as with TCX's pinned links. The agent's filter on a
//! hook is the one at priority [`PRIORITY`] with handle [`HANDLE`]; `tc filter show dev
//! DEV ingress` shows it as `pref 1 bpf chain 0 handle 0x53590001 swy_tc_ingress
//! direct-action`. Replacing its program (the same priority and handle, without
//! `NLM_F_EXCL`) swaps it in one step: no packet meets the hook without a program.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_MULTIPART, NLM_F_REQUEST,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The priority (`pref`) of the agent's filters: 1, the first to run, as TCX programs
/// run before every classic filter.
pub const PRIORITY: u16 = 1;
/// The handle of the agent's filters: `0x5359` ("SY"), 1.
pub const HANDLE: u32 = 0x5359_0001;
/// `ETH_P_ALL`: the filter sees every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// Linux errnos the requests expect.
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;

/// Which hook of the `clsact` qdisc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }

    /// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)`.
    fn parent(self) -> TcHandle {
        TcHandle {
            major: u16::MAX,
            minor: match self {
                Hook::Ingress => TcHandle::MIN_INGRESS,
                Hook::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// The agent's filter on a hook, as a dump shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The id of the program it runs.
    pub prog_id: u32,
    /// The name it was attached with (the program's name).
    pub name: String,
}

/// A failed tc operation, naming it. Not retryable by itself: the kernel refused
/// (another qdisc or filter in the way), lacks a part, or the socket failed.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    /// The kernel (or the socket) refused the operation.
    #[error("{operation}: {source}")]
    Io {
        operation: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be decoded.
    #[error("{operation}: cannot decode the kernel's answer: {message}")]
    Decode { operation: String, message: String },
    /// The kernel has no such qdisc or classifier (`ENOENT`): not built, or its module
    /// not loadable.
    #[error("{operation}: the kernel has no {kind} (module {module})")]
    Unsupported {
        operation: String,
        kind: &'static str,
        module: &'static str,
    },
}

impl TcError {
    fn errno(&self) -> Option<i32> {
        match self {
            TcError::Io { source, .. } => source.raw_os_error(),
            TcError::Decode { .. } | TcError::Unsupported { .. } => None,
        }
    }

    /// `self`, or [`TcError::Unsupported`] when the kernel answered `ENOENT`.
    fn unsupported_if_enoent(self, kind: &'static str, module: &'static str) -> Self {
        match self {
            TcError::Io { operation, source } if source.raw_os_error() == Some(ENOENT) => {
                TcError::Unsupported {
                    operation,
                    kind,
                    module,
                }
            }
            other => other,
        }
    }
}

fn header(ifindex: u32, hook: Hook) -> TcHeader {
    TcHeader {
        family: AddressFamily::Unspec,
        index: ifindex as i32,
        parent: hook.parent(),
        ..TcHeader::default()
    }
}

/// `tcm_info` of the agent's filters: priority above, protocol (network order) below.
fn filter_info() -> u32 {
    (u32::from(PRIORITY) << 16) | u32::from(u16::from_ne_bytes(ETH_P_ALL.to_be_bytes()))
}

/// `tc qdisc add dev IFINDEX clsact`.
pub fn clsact_message(ifindex: u32) -> TcMessage {
    TcMessage::from_parts(
        TcHeader {
            family: AddressFamily::Unspec,
            index: ifindex as i32,
            handle: TcHandle {
                major: u16::MAX,
                minor: 0,
            },
            parent: TcHandle::CLSACT,
            info: 0,
        },
        vec![TcAttribute::Kind("clsact".into())],
    )
}

/// The agent's filter on `hook` running program `prog_fd` (direct action).
pub fn filter_message(ifindex: u32, hook: Hook, prog_fd: u32, name: &str) -> TcMessage {
    TcMessage::from_parts(
        TcHeader {
            handle: HANDLE.into(),
            info: filter_info(),
            ..header(ifindex, hook)
        },
        vec![
            TcAttribute::Kind("bpf".into()),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgFd(prog_fd)),
                TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
                TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
            ]),
        ],
    )
}

/// The agent's filter among the messages of a filter dump.
pub fn find_filter(messages: &[TcMessage]) -> Option<Filter> {
    messages
        .iter()
        .filter(|m| {
            u32::from(m.header.handle) == HANDLE && m.header.info >> 16 == u32::from(PRIORITY)
        })
        .find_map(|m| {
            let mut prog_id = None;
            let mut name = String::new();
            for attribute in &m.attributes {
                let TcAttribute::Options(options) = attribute else {
                    continue;
                };
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = n.clone(),
                        _ => {}
                    }
                }
            }
            Some(Filter {
                prog_id: prog_id?,
                name,
            })
        })
}

/// A blocking rtnetlink socket for tc requests.
pub struct Tc {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Tc {
    pub fn open() -> Result<Self, TcError> {
        let open = |source| TcError::Io {
            operation: "opening an rtnetlink socket".into(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(open)?;
        socket.bind_auto().map_err(open)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(open)?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    /// Sends one request and collects what it answered: a dump's messages, nothing for
    /// an acknowledged change.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
        operation: &str,
    ) -> Result<Vec<TcMessage>, TcError> {
        let io = |source| TcError::Io {
            operation: operation.to_string(),
            source,
        };
        self.seq = self.seq.wrapping_add(1);
        let mut packet = NetlinkMessage::from(message);
        packet.header.flags = flags | NLM_F_REQUEST;
        packet.header.sequence_number = self.seq;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(io)?;
        let mut answers = Vec::new();
        loop {
            let n = loop {
                match self.socket.recv(&mut &mut self.buf[..], 0) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io(e)),
                }
            };
            let mut offset = 0;
            while offset < n {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                        .map_err(|e| TcError::Decode {
                            operation: operation.to_string(),
                            message: e.to_string(),
                        })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                let multipart = reply.header.flags & NLM_F_MULTIPART != 0;
                match reply.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => {
                        answers.push(m);
                        if !multipart {
                            return Ok(answers);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(answers),
                            Some(code) => Err(io(io::Error::from_raw_os_error(-code.get()))),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Adds a `clsact` qdisc to the device unless it has one.
    pub fn add_clsact(&mut self, ifindex: u32, device: &str) -> Result<(), TcError> {
        match self.request(
            RouteNetlinkMessage::NewQueueDiscipline(clsact_message(ifindex)),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            &format!("tc qdisc add dev {device} clsact"),
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Some(EEXIST) => Ok(()),
            Err(e) => Err(e.unsupported_if_enoent("clsact qdisc", "sch_ingress")),
        }
    }

    /// The agent's filter on `hook` of the device, if there is one.
    pub fn filter(
        &mut self,
        ifindex: u32,
        device: &str,
        hook: Hook,
    ) -> Result<Option<Filter>, TcError> {
        let operation = format!("tc filter show dev {device} {}", hook.name());
        match self.request(
            RouteNetlinkMessage::GetTrafficFilter(TcMessage::from_parts(
                header(ifindex, hook),
                Vec::new(),
            )),
            NLM_F_DUMP,
            &operation,
        ) {
            Ok(messages) => Ok(find_filter(&messages)),
            // No clsact qdisc: no filter either.
            Err(e) if matches!(e.errno(), Some(EINVAL | ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Puts program `prog_fd` (called `name`) in the agent's filter on `hook`: a new
    /// filter, or with `replace` the program of the existing one swapped in one step.
    pub fn attach(
        &mut self,
        ifindex: u32,
        device: &str,
        hook: Hook,
        prog_fd: BorrowedFd<'_>,
        name: &str,
        replace: bool,
    ) -> Result<(), TcError> {
        let flags = if replace {
            NLM_F_ACK
        } else {
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        };
        let message = filter_message(ifindex, hook, prog_fd.as_raw_fd() as u32, name);
        match self.request(
            RouteNetlinkMessage::NewTrafficFilter(message),
            flags,
            &format!(
                "tc filter {} dev {device} {} pref {PRIORITY} handle {HANDLE:#x} bpf da {name}",
                if replace { "replace" } else { "add" },
                hook.name()
            ),
        ) {
            Ok(_) => Ok(()),
            Err(e) if !replace => Err(e.unsupported_if_enoent("bpf classifier", "cls_bpf")),
            Err(e) => Err(e),
        }
    }

    /// Deletes the agent's filter on `hook`; one already gone is no error.
    pub fn detach(&mut self, ifindex: u32, device: &str, hook: Hook) -> Result<(), TcError> {
        let message = TcMessage::from_parts(
            TcHeader {
                handle: HANDLE.into(),
                info: filter_info(),
                ..header(ifindex, hook)
            },
            vec![TcAttribute::Kind("bpf".into())],
        );
        match self.request(
            RouteNetlinkMessage::DelTrafficFilter(message),
            NLM_F_ACK,
            &format!(
                "tc filter del dev {device} {} pref {PRIORITY} handle {HANDLE:#x} bpf",
                hook.name()
            ),
        ) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.errno(), Some(ENOENT | EINVAL)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    fn roundtrip(message: &TcMessage) -> TcMessage {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        TcMessage::parse(&bytes[..]).expect("parses")
    }

    #[test]
    fn the_filter_message_names_the_agent_s_priority_handle_and_hook_in_direct_action() {
        let message = filter_message(7, Hook::Egress, 42, "swy_tc_egress");
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        // struct tcmsg: family, pad, ifindex, handle, parent, info (host order).
        assert_eq!(bytes[4..8], 7i32.to_ne_bytes());
        assert_eq!(bytes[8..12], 0x5359_0001u32.to_ne_bytes());
        assert_eq!(bytes[12..16], 0xffff_fff3u32.to_ne_bytes());
        assert_eq!(bytes[16..18], [0x00, 0x03], "ETH_P_ALL in network order");
        assert_eq!(u16::from_ne_bytes([bytes[18], bytes[19]]), PRIORITY);
        let back = roundtrip(&message);
        assert_eq!(back.attributes[0], TcAttribute::Kind("bpf".into()));
        assert!(back.attributes.iter().any(|a| matches!(
            a,
            TcAttribute::Options(o) if o.contains(&TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)))
        )));
        let ingress = filter_message(7, Hook::Ingress, 42, "swy_tc_ingress");
        assert_eq!(u32::from(ingress.header.parent), 0xffff_fff2);
        assert_eq!(u32::from(clsact_message(7).header.parent), 0xffff_fff1);
    }

    #[test]
    fn a_kernel_without_the_qdisc_or_classifier_is_told_which_module_it_lacks() {
        let enoent = TcError::Io {
            operation: "tc qdisc add dev eth0 clsact".into(),
            source: io::Error::from_raw_os_error(ENOENT),
        };
        assert_eq!(
            enoent
                .unsupported_if_enoent("clsact qdisc", "sch_ingress")
                .to_string(),
            "tc qdisc add dev eth0 clsact: the kernel has no clsact qdisc (module sch_ingress)"
        );
        let busy = TcError::Io {
            operation: "x".into(),
            source: io::Error::from_raw_os_error(EEXIST),
        };
        assert!(matches!(
            busy.unsupported_if_enoent("clsact qdisc", "sch_ingress"),
            TcError::Io { .. }
        ));
    }

    #[test]
    fn a_dump_yields_the_agent_s_filter_and_no_other() {
        let with_id = |handle: u32, info: u32, id: u32| {
            TcMessage::from_parts(
                TcHeader {
                    handle: handle.into(),
                    info,
                    ..header(3, Hook::Ingress)
                },
                vec![
                    TcAttribute::Kind("bpf".into()),
                    TcAttribute::Options(vec![
                        TcOption::Bpf(TcFilterBpfOption::ProgName("swy_tc_ingress".into())),
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)),
                    ]),
                ],
            )
        };
        // The chain's own entry (handle 0), someone else's filter, then the agent's.
        let chain = TcMessage::from_parts(
            TcHeader {
                info: filter_info(),
                ..header(3, Hook::Ingress)
            },
            vec![TcAttribute::Kind("bpf".into())],
        );
        let dump = [
            roundtrip(&chain),
            roundtrip(&with_id(1, filter_info(), 10)),
            roundtrip(&with_id(HANDLE, (2 << 16) | 0x0300, 11)),
            roundtrip(&with_id(HANDLE, filter_info(), 12)),
        ];
        assert_eq!(
            find_filter(&dump),
            Some(Filter {
                prog_id: 12,
                name: "swy_tc_ingress".into()
            })
        );
        assert_eq!(find_filter(&dump[..3]), None);
    }
}
