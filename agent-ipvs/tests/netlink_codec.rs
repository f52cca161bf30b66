//! The IPVS netlink codec without a kernel: requests byte for byte as the kernel's
//! structures lay them out, and real kernel dumps (captured in a user-mode Linux guest,
//! committed under `tests/fixtures/`) decoded to the values `ipvsadm` was given.

mod common;

use common::*;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use switchyard_agent_ipvs::netlink::codec::{self, IpvsMessage};
use switchyard_agent_ipvs::netlink::{Destination, Op, Protocol, Service};

const FAMILY: u16 = 0x1c;

#[test]
fn a_new_service_request_has_the_kernel_s_layout() {
    let service = Service::new(id(Protocol::Tcp, "10.96.0.10", 80), "rr").persistent(10800);
    let bytes = codec::encode(
        IpvsMessage::for_op(&Op::NewService(service)),
        FAMILY,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
    );
    #[rustfmt::skip]
    let want: &[u8] = &[
        // struct nlmsghdr: len 104, type = family id, flags REQUEST|ACK, seq 1, pid 0
        0x68, 0, 0, 0,  0x1c, 0,  0x05, 0,  1, 0, 0, 0,  0, 0, 0, 0,
        // struct genlmsghdr: cmd IPVS_CMD_NEW_SERVICE, version 1, reserved
        1, 1, 0, 0,
        // IPVS_CMD_ATTR_SERVICE (1), 84 bytes, nested without NLA_F_NESTED as ipvsadm does
        0x54, 0, 1, 0,
        //   IPVS_SVC_ATTR_AF: u16 AF_INET, padded to 4
        6, 0, 1, 0,  2, 0, 0, 0,
        //   IPVS_SVC_ATTR_PROTOCOL: u16 IPPROTO_TCP
        6, 0, 2, 0,  6, 0, 0, 0,
        //   IPVS_SVC_ATTR_ADDR: union nf_inet_addr, 16 bytes, IPv4 in the first 4
        20, 0, 3, 0,  10, 96, 0, 10,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
        //   IPVS_SVC_ATTR_PORT: __be16 80
        6, 0, 4, 0,  0, 80, 0, 0,
        //   IPVS_SVC_ATTR_SCHED_NAME: "rr\0", padded
        7, 0, 6, 0,  b'r', b'r', 0, 0,
        //   IPVS_SVC_ATTR_FLAGS: struct ip_vs_flags { flags = PERSISTENT, mask = ~0 }
        12, 0, 7, 0,  1, 0, 0, 0,  0xff, 0xff, 0xff, 0xff,
        //   IPVS_SVC_ATTR_TIMEOUT: u32 10800 seconds
        8, 0, 8, 0,  0x30, 0x2a, 0, 0,
        //   IPVS_SVC_ATTR_NETMASK: __be32 255.255.255.255
        8, 0, 9, 0,  0xff, 0xff, 0xff, 0xff,
    ];
    assert_eq!(bytes, want);
}

#[test]
fn a_new_destination_request_has_the_kernel_s_layout() {
    let op = Op::NewDest(
        id(Protocol::Tcp, "fd00::10", 443),
        Destination::new(ip("fd00:244::5"), 8443, 2),
    );
    let bytes = codec::encode(
        IpvsMessage::for_op(&op),
        FAMILY,
        NLM_F_REQUEST | NLM_F_ACK,
        0x0102_0304,
    );
    #[rustfmt::skip]
    let want: &[u8] = &[
        // struct nlmsghdr: len 132, family, REQUEST|ACK, seq 0x01020304, pid 0
        0x84, 0, 0, 0,  0x1c, 0,  0x05, 0,  4, 3, 2, 1,  0, 0, 0, 0,
        // struct genlmsghdr: cmd IPVS_CMD_NEW_DEST, version 1
        5, 1, 0, 0,
        // IPVS_CMD_ATTR_SERVICE (1), 48 bytes: only what identifies the service
        0x30, 0, 1, 0,
        6, 0, 1, 0,  10, 0, 0, 0,                     // AF_INET6
        6, 0, 2, 0,  6, 0, 0, 0,                      // IPPROTO_TCP
        20, 0, 3, 0,  0xfd, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0x10,
        6, 0, 4, 0,  0x01, 0xbb, 0, 0,                // __be16 443
        // IPVS_CMD_ATTR_DEST (2), 64 bytes
        0x40, 0, 2, 0,
        20, 0, 1, 0,  0xfd, 0, 0x02, 0x44,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 5,
        6, 0, 2, 0,  0x20, 0xfb, 0, 0,                // __be16 8443
        8, 0, 3, 0,  0, 0, 0, 0,                      // IP_VS_CONN_F_MASQ
        8, 0, 4, 0,  2, 0, 0, 0,                      // weight 2
        8, 0, 5, 0,  0, 0, 0, 0,                      // upper threshold
        8, 0, 6, 0,  0, 0, 0, 0,                      // lower threshold
    ];
    assert_eq!(bytes, want);
}

#[test]
fn committed_kernel_dumps_decode_to_what_ipvsadm_was_given() {
    let text = std::fs::read_to_string(fixture_path()).expect("read the committed fixture");
    let capture = Capture::parse(&text);
    assert!(
        capture.services.len() >= 2,
        "the services dump spans datagrams (entries, then NLMSG_DONE)"
    );
    let (table, skipped) = capture.decode();
    assert_eq!(skipped, 1, "the fwmark service is reported as skipped");
    assert!(
        table
            .iter()
            .all(|(s, dests)| s.stats.is_some() && dests.iter().all(|d| d.stats.is_some())),
        "the kernel sends counters for every service and destination"
    );
    assert_eq!(normalized(table), fixture_expected());
}
