//! Shared by the fixture test (host) and the kernel tests (guest): the `ipvsadm` setup
//! whose dump the fixture holds, the values it must decode to, and the fixture format.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use switchyard_agent_ipvs::netlink::codec::{self, Reply};
use switchyard_agent_ipvs::netlink::{
    Destination, ForwardMethod, Protocol, Service, ServiceId, flags,
};

/// The commands that build the table `tests/fixtures/ipvs-dump.hex` was captured from.
pub const FIXTURE_SETUP: &[&str] = &[
    "ipvsadm -A -t 10.96.0.10:80 -s rr",
    "ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1",
    "ipvsadm -a -t 10.96.0.10:80 -r 10.244.2.3:8080 -m -w 3",
    "ipvsadm -A -u [fd00::10]:53 -s mh -b mh-fallback,mh-port -p 60 -M 64 -o",
    "ipvsadm -a -u [fd00::10]:53 -r [fd00:244::5]:5353 -m -w 2",
    "ipvsadm -A --sctp-service 10.96.0.11:9999 -s wrr",
    "ipvsadm -a --sctp-service 10.96.0.11:9999 -r 10.244.1.7:9999 -m -x 100 -y 10",
    "ipvsadm -A -t 10.96.0.12:443 -s sh -b sh-fallback,sh-port -p 10800 -M 255.255.255.0",
    // ipvsadm gives direct-routing and tunnel destinations the service's port.
    "ipvsadm -a -t 10.96.0.12:443 -r 10.244.3.4 -g -w 1",
    "ipvsadm -a -t 10.96.0.12:443 -r 10.244.3.5 -i -w 1",
    "ipvsadm -A -t [fd00::12]:80 -s wlc",
    "ipvsadm -a -t [fd00::12]:80 -r [fd00:244::7]:8080 -m -w 0",
    "ipvsadm -a -t [fd00::12]:80 -r [fd00:244::8]:8080 -m -w 5",
    "ipvsadm -A -f 7 -s rr",
];

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn id(protocol: Protocol, addr: &str, port: u16) -> ServiceId {
    ServiceId::new(protocol, ip(addr), port)
}

fn dest(addr: &str, port: u16, weight: u32, fwd: ForwardMethod) -> Destination {
    Destination {
        fwd,
        ..Destination::new(ip(addr), port, weight)
    }
}

/// What the fixture's table decodes to, sorted by service id; stats left out.
pub fn fixture_expected() -> Vec<(Service, Vec<Destination>)> {
    use ForwardMethod::*;
    let mut mh = Service::new(id(Protocol::Udp, "fd00::10", 53), "mh").persistent(60);
    mh.flags |= flags::MH_FALLBACK | flags::MH_PORT | flags::ONEPACKET;
    mh.netmask = 64;
    let mut sh = Service::new(id(Protocol::Tcp, "10.96.0.12", 443), "sh").persistent(10800);
    sh.flags |= flags::SH_FALLBACK | flags::SH_PORT;
    sh.netmask = 0xffff_ff00;
    let mut thresholds = dest("10.244.1.7", 9999, 1, Masquerade);
    thresholds.upper_threshold = 100;
    thresholds.lower_threshold = 10;
    let mut want = vec![
        (
            Service::new(id(Protocol::Tcp, "10.96.0.10", 80), "rr"),
            vec![
                dest("10.244.1.2", 8080, 1, Masquerade),
                dest("10.244.2.3", 8080, 3, Masquerade),
            ],
        ),
        (mh, vec![dest("fd00:244::5", 5353, 2, Masquerade)]),
        (
            Service::new(id(Protocol::Sctp, "10.96.0.11", 9999), "wrr"),
            vec![thresholds],
        ),
        (
            sh,
            vec![
                dest("10.244.3.4", 443, 1, DirectRoute),
                dest("10.244.3.5", 443, 1, Tunnel),
            ],
        ),
        (
            Service::new(id(Protocol::Tcp, "fd00::12", 80), "wlc"),
            vec![
                dest("fd00:244::7", 8080, 0, Masquerade),
                dest("fd00:244::8", 8080, 5, Masquerade),
            ],
        ),
    ];
    want.sort_by_key(|(s, _)| s.id);
    want
}

/// Clears the counters and sorts, so a dump compares with [`fixture_expected`].
pub fn normalized(mut table: Vec<(Service, Vec<Destination>)>) -> Vec<(Service, Vec<Destination>)> {
    for (service, dests) in &mut table {
        service.stats = None;
        for d in dests.iter_mut() {
            d.stats = None;
        }
        dests.sort_by_key(Destination::id);
    }
    table.sort_by_key(|(s, _)| s.id);
    table
}

/// Where the committed fixture lives.
pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ipvs-dump.hex")
}

/// The captured datagrams of one dump: the services dump, then each service's
/// destination dump.
pub struct Capture {
    /// The IPVS family id on the capturing kernel.
    pub family_id: u16,
    /// Datagrams of the `IPVS_CMD_GET_SERVICE` dump.
    pub services: Vec<Vec<u8>>,
    /// Per service, the datagrams of its `IPVS_CMD_GET_DEST` dump.
    pub dests: Vec<(ServiceId, Vec<Vec<u8>>)>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// `10.96.0.10:80/TCP` → the id.
pub fn parse_service_id(s: &str) -> ServiceId {
    let (addr, proto) = s.rsplit_once('/').expect("ADDR:PORT/PROTO");
    let addr: SocketAddr = addr.parse().expect("socket address");
    let protocol = match proto {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        other => panic!("protocol {other}"),
    };
    ServiceId::new(protocol, addr.ip(), addr.port())
}

impl Capture {
    /// The fixture file's text.
    pub fn to_text(&self, kernel: &str) -> String {
        let mut out = format!(
            "# Raw IPVS generic-netlink dump replies, one received datagram per line (hex),\n\
             # captured in a user-mode Linux guest (kernel {kernel}) by\n\
             # tests/netlink_kernel.rs real_kernel_dumps_decode_like_the_committed_fixture\n\
             # (SWITCHYARD_WRITE_FIXTURES=1) after these commands:\n"
        );
        for cmd in FIXTURE_SETUP {
            out.push_str(&format!("#   {cmd}\n"));
        }
        out.push_str(&format!("family {}\n", self.family_id));
        for d in &self.services {
            out.push_str(&format!("services {}\n", hex(d)));
        }
        for (id, datagrams) in &self.dests {
            for d in datagrams {
                out.push_str(&format!("dests {id} {}\n", hex(d)));
            }
        }
        out
    }

    /// Reads the fixture file's text.
    pub fn parse(text: &str) -> Capture {
        let mut capture = Capture {
            family_id: 0,
            services: Vec::new(),
            dests: Vec::new(),
        };
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let mut words = line.split(' ');
            match words.next() {
                Some("family") => capture.family_id = words.next().unwrap().parse().unwrap(),
                Some("services") => capture.services.push(unhex(words.next().unwrap())),
                Some("dests") => {
                    let id = parse_service_id(words.next().unwrap());
                    let bytes = unhex(words.next().unwrap());
                    match capture.dests.iter_mut().find(|(i, _)| *i == id) {
                        Some((_, v)) => v.push(bytes),
                        None => capture.dests.push((id, vec![bytes])),
                    }
                }
                other => panic!("unknown fixture line {other:?}"),
            }
        }
        capture
    }

    /// Decodes the captured dumps the way `IpvsSocket::dump` does: every message until
    /// `NLMSG_DONE`, services through `decode_service`, destinations through
    /// `decode_dest`. Returns the table and how many entries were skipped (fwmark).
    pub fn decode(&self) -> (Vec<(Service, Vec<Destination>)>, usize) {
        let mut services = Vec::new();
        let mut skipped = 0;
        for msg in messages(&self.services, self.family_id) {
            match codec::decode_service(msg.service().expect("service attrs")).expect("decode") {
                Ok(s) => services.push(s),
                Err(_) => skipped += 1,
            }
        }
        let table = services
            .into_iter()
            .map(|s| {
                let datagrams = &self
                    .dests
                    .iter()
                    .find(|(i, _)| *i == s.id)
                    .unwrap_or_else(|| panic!("no destination dump for {}", s.id))
                    .1;
                let dests = messages(datagrams, self.family_id)
                    .iter()
                    .map(|m| {
                        codec::decode_dest(&s.id.addr, m.dest().expect("dest attrs"))
                            .expect("decode")
                    })
                    .collect();
                (s, dests)
            })
            .collect();
        (table, skipped)
    }
}

/// The IPVS messages of one dump's datagrams; panics unless it ends with NLMSG_DONE.
fn messages(datagrams: &[Vec<u8>], family_id: u16) -> Vec<codec::IpvsMessage> {
    let mut out = Vec::new();
    let mut done = false;
    for d in datagrams {
        for reply in codec::parse_datagram(d, family_id).expect("datagram parses") {
            assert!(!done, "messages after NLMSG_DONE");
            match reply.reply {
                Reply::Ipvs(m) => out.push(m),
                Reply::Done(0) => done = true,
                other => panic!("unexpected reply in a dump: {other:?}"),
            }
        }
    }
    assert!(done, "dump without NLMSG_DONE");
    out
}
