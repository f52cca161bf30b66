//! The IPVS netlink client against a real IPVS kernel: the machine's own when it has
//! IPVS (each test in a fresh network namespace), else a user-mode Linux guest per test
//! (see `switchyard_integration::uml`).
//!
//! Needs root, `ipvsadm` and `ip`; without IPVS on the host also `linux.uml`
//! (`user-mode-linux`) and `modprobe` (`kmod`). A missing prerequisite fails the test
//! with what to install.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use switchyard_agent_ipvs::netlink::codec::Skipped;
use switchyard_agent_ipvs::netlink::{
    DestId, Destination, IpvsError, IpvsSocket, Op, Protocol, Service, ServiceId, Timeouts, flags,
};
use switchyard_integration::netns::Netns;
use switchyard_integration::uml::{self, Guest};

fn socket() -> IpvsSocket {
    IpvsSocket::open().expect("open the IPVS netlink socket")
}

/// Runs `script` with `sh -c`; its stdout, or a panic with its stderr.
fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("run {script:?}: {e}"));
    assert!(
        out.status.success(),
        "{script:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` services over TCP/UDP/SCTP and both families with `dests` destinations each, in
/// every shape the agent programs: round robin and weighted schedulers, persistence
/// (ClientIP affinity), `sh`/`mh` with their flags, weights 0 (terminating) and up.
fn generated(n: usize, dests: usize) -> Vec<(Service, Vec<Destination>)> {
    const SCHEDULERS: [&str; 5] = ["rr", "wrr", "sh", "mh", "lc"];
    (0..n)
        .map(|i| {
            let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][i % 3];
            let v6 = i % 2 == 1;
            let addr = if v6 {
                ip(&format!("fd00::{:x}", i + 1))
            } else {
                ip(&format!("10.96.{}.{}", i / 250, i % 250 + 1))
            };
            let scheduler = SCHEDULERS[i % SCHEDULERS.len()];
            let mut service = Service::new(
                ServiceId::new(protocol, addr, 80 + (i % 7) as u16),
                scheduler,
            );
            if i % 4 == 0 {
                service = service.persistent(10800);
            }
            match scheduler {
                "sh" => service.flags |= flags::SH_FALLBACK | flags::SH_PORT,
                "mh" => service.flags |= flags::MH_PORT,
                _ => {}
            }
            let dests = (0..dests)
                .map(|j| {
                    let addr = if v6 {
                        ip(&format!("fd00:244::{:x}:{:x}", i + 1, j + 1))
                    } else {
                        ip(&format!("10.{}.{}.{}", 100 + j, i / 250, i % 250 + 1))
                    };
                    Destination::new(addr, 8080, ((i + j) % 4) as u32)
                })
                .collect();
            (service, dests)
        })
        .collect()
}

fn ops_for(table: &[(Service, Vec<Destination>)]) -> Vec<Op> {
    table
        .iter()
        .flat_map(|(s, dests)| {
            std::iter::once(Op::NewService(s.clone()))
                .chain(dests.iter().map(|d| Op::NewDest(s.id, d.clone())))
        })
        .collect()
}

fn assert_all_ok(ops: &[Op], results: &[Result<(), IpvsError>]) {
    assert_eq!(results.len(), ops.len(), "one result per operation");
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
        .take(5)
        .collect();
    assert!(
        failed.is_empty(),
        "refused operations, first ones: {failed:#?}"
    );
}

/// `ipvsadm -Ln --persistent-conn` as (service line, destination lines), whitespace
/// normalized and sorted, so it compares with [`ipvsadm_expected`].
fn ipvsadm_blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut blocks: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().skip(3) {
        let words = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if words.starts_with("->") {
            blocks.last_mut().expect("a service first").1.push(words);
        } else if !words.is_empty() {
            blocks.push((words, Vec::new()));
        }
    }
    for (_, dests) in &mut blocks {
        dests.sort();
    }
    blocks.sort();
    blocks
}

/// How `ipvsadm -Ln --persistent-conn` shows `table` (no traffic yet).
fn ipvsadm_expected(table: &[(Service, Vec<Destination>)]) -> Vec<(String, Vec<String>)> {
    let mut blocks: Vec<(String, Vec<String>)> = table
        .iter()
        .map(|(s, dests)| {
            let mut line = format!(
                "{} {} {}",
                s.id.protocol,
                SocketAddr::new(s.id.addr, s.id.port),
                s.scheduler
            );
            let (one, two) = match s.scheduler.as_str() {
                "sh" => ("sh-fallback", "sh-port"),
                "mh" => ("mh-fallback", "mh-port"),
                _ => ("flag-1", "flag-2"),
            };
            let names: Vec<&str> = [(flags::SCHED1, one), (flags::SCHED2, two)]
                .into_iter()
                .filter(|(bit, _)| s.flags & bit != 0)
                .map(|(_, name)| name)
                .collect();
            if !names.is_empty() {
                line.push_str(&format!(" ({})", names.join(",")));
            }
            if s.flags & flags::PERSISTENT != 0 {
                line.push_str(&format!(" persistent {}", s.timeout));
            }
            let mut dests: Vec<String> = dests
                .iter()
                .map(|d| {
                    format!(
                        "-> {} {} {} {} {}",
                        SocketAddr::new(d.addr, d.port),
                        d.weight,
                        d.persist_conns,
                        d.active_conns,
                        d.inactive_conns
                    )
                })
                .collect();
            dests.sort();
            (line, dests)
        })
        .collect();
    blocks.sort();
    blocks
}

#[test]
fn info_and_timeouts_read_back() {
    uml::in_ipvs_kernel(|| {
        let mut ipvs = socket();
        let info = ipvs.info().expect("info");
        assert_eq!(info.version_string(), "1.2.1");
        assert!(info.conn_table_size > 0, "{info:?}");
        assert_eq!(
            ipvs.timeouts().expect("timeouts"),
            Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            },
            "the kernel's defaults"
        );
        ipvs.set_timeouts(&Timeouts {
            tcp: 600,
            tcp_fin: 30,
            udp: 0,
        })
        .expect("set timeouts");
        assert_eq!(
            ipvs.timeouts().expect("timeouts"),
            Timeouts {
                tcp: 600,
                tcp_fin: 30,
                udp: 300
            },
            "0 leaves the UDP timeout as it was"
        );
        assert_eq!(
            sh("ipvsadm -Ln --timeout").trim(),
            "Timeout (tcp tcpfin udp): 600 30 300"
        );
    });
}

#[test]
fn a_batch_of_a_thousand_operations_reads_back_as_sent() {
    uml::in_ipvs_kernel(|| {
        let table = generated(500, 2);
        let ops = ops_for(&table);
        assert_eq!(ops.len(), 1500);
        let mut ipvs = socket();
        let started = Instant::now();
        let results = ipvs.execute(&ops);
        let applied = started.elapsed();
        assert_all_ok(&ops, &results);
        let dump = ipvs.dump().expect("dump");
        assert_eq!(normalized(dump), normalized(table.clone()));
        assert_eq!(
            ipvsadm_blocks(&sh("ipvsadm -Ln --persistent-conn")),
            ipvsadm_expected(&table),
            "ipvsadm sees what was sent"
        );
        println!("1,500 operations in {applied:?}");
    });
}

#[test]
fn a_small_receive_buffer_splits_a_batch_without_losing_acknowledgements() {
    uml::in_ipvs_kernel(|| {
        // Every acknowledgement takes ~730 bytes of receive buffer here (measured: 45
        // fit in 32 KiB); a batch sized only by the send buffer would overrun.
        let table = generated(700, 2);
        let ops = ops_for(&table);
        let mut ipvs = IpvsSocket::open_with_buffers(1 << 20, 16 << 10).expect("open");
        let (bytes, count) = ipvs.batch_limits();
        assert!(
            count <= 64,
            "{count} operations ({bytes} bytes) per sendmsg"
        );
        assert_all_ok(&ops, &ipvs.execute(&ops));
        assert_eq!(normalized(ipvs.dump().expect("dump")), normalized(table));
    });
}

#[test]
fn a_refused_operation_fails_only_itself() {
    uml::in_ipvs_kernel(|| {
        let web = Service::new(id(Protocol::Tcp, "10.96.0.10", 80), "rr");
        let absent = id(Protocol::Udp, "10.96.0.99", 53);
        let first = Destination::new(ip("10.244.1.2"), 8080, 1);
        let second = Destination::new(ip("10.244.1.3"), 8080, 1);
        let nowhere = DestId {
            addr: ip("10.244.9.9"),
            port: 8080,
        };
        let mut unknown_scheduler = Service::new(id(Protocol::Tcp, "10.96.0.11", 80), "nope");
        unknown_scheduler.scheduler = "nope".into();
        let ops = vec![
            Op::NewService(web.clone()),
            Op::NewService(web.clone()),
            Op::NewDest(web.id, first.clone()),
            Op::NewDest(absent, first.clone()),
            Op::DelDest(web.id, nowhere),
            Op::NewService(unknown_scheduler),
            Op::NewDest(web.id, second.clone()),
        ];
        let mut ipvs = socket();
        let results = ipvs.execute(&ops);
        let errnos: Vec<Option<i32>> = results
            .iter()
            .map(|r| r.as_ref().err().map(|e| e.errno().expect("an errno")))
            .collect();
        assert_eq!(
            errnos,
            [
                None,
                Some(libc::EEXIST),
                None,
                Some(libc::ESRCH),
                Some(libc::ENOENT),
                Some(libc::ENOENT),
                None
            ],
            "{results:#?}"
        );
        assert_eq!(
            results[1].as_ref().unwrap_err().to_string(),
            "IPVS_CMD_NEW_SERVICE 10.96.0.10:80/TCP: File exists (os error 17)"
        );
        assert_eq!(
            results[3].as_ref().unwrap_err().to_string(),
            "IPVS_CMD_NEW_DEST 10.96.0.99:53/UDP → 10.244.1.2:8080: No such process (os error 3)"
        );
        assert_eq!(
            normalized(ipvs.dump().expect("dump")),
            vec![(web, vec![first, second])]
        );
    });
}

#[test]
fn changes_and_deletions_read_back() {
    uml::in_ipvs_kernel(|| {
        let web = Service::new(id(Protocol::Tcp, "10.96.0.10", 80), "rr");
        let dns = Service::new(id(Protocol::Udp, "fd00::10", 53), "rr");
        let a = Destination::new(ip("10.244.1.2"), 8080, 1);
        let b = Destination::new(ip("10.244.1.3"), 8080, 1);
        let c = Destination::new(ip("fd00:244::1"), 5353, 1);
        let mut ipvs = socket();
        let setup = ops_for(&[
            (web.clone(), vec![a.clone(), b.clone()]),
            (dns.clone(), vec![c.clone()]),
        ]);
        assert_all_ok(&setup, &ipvs.execute(&setup));

        let sticky = web.clone().persistent(300);
        let sticky = Service {
            scheduler: "wrr".into(),
            ..sticky
        };
        let draining = Destination {
            weight: 0,
            ..a.clone()
        };
        let changes = vec![
            Op::SetService(sticky.clone()),
            Op::SetDest(web.id, draining.clone()),
            Op::DelDest(web.id, b.id()),
            Op::DelService(dns.id),
        ];
        assert_all_ok(&changes, &ipvs.execute(&changes));
        assert_eq!(
            normalized(ipvs.dump().expect("dump")),
            vec![(sticky, vec![draining])]
        );
        assert_eq!(
            ipvs.destinations(&dns.id).expect("destinations"),
            [],
            "the kernel answers an empty dump for a service that does not exist"
        );

        ipvs.flush().expect("flush");
        assert_eq!(ipvs.services().expect("services"), []);
    });
}

#[test]
fn real_kernel_dumps_decode_like_the_committed_fixture() {
    uml::in_ipvs_kernel(|| {
        for cmd in FIXTURE_SETUP {
            sh(cmd);
        }
        let mut ipvs = socket();
        ipvs.capture_replies(true);
        let (services, skipped) = ipvs.services_and_skipped().expect("services");
        assert_eq!(skipped, [Skipped::Fwmark(7)]);
        let service_datagrams = ipvs.take_captured();
        let mut table = Vec::new();
        let mut dest_datagrams = Vec::new();
        for service in services {
            let dests = ipvs.destinations(&service.id).expect("destinations");
            dest_datagrams.push((service.id, ipvs.take_captured()));
            table.push((service, dests));
        }
        assert!(
            table.iter().all(|(s, _)| s.stats.is_some()),
            "dumps carry counters"
        );
        assert_eq!(normalized(table), fixture_expected());

        let capture = Capture {
            family_id: ipvs.family_id(),
            services: service_datagrams,
            dests: dest_datagrams,
        };
        let (decoded, skipped) = capture.decode();
        assert_eq!(skipped, 1);
        assert_eq!(normalized(decoded), fixture_expected());
        if std::env::var_os("SWITCHYARD_WRITE_FIXTURES").is_some_and(|v| v == "1") {
            let kernel = sh("uname -r");
            std::fs::write(fixture_path(), capture.to_text(kernel.trim()))
                .expect("write the fixture");
            println!("wrote {}", fixture_path().display());
        }
    });
}

#[test]
fn an_open_connection_counts_as_active_until_closed() {
    uml::in_ipvs_kernel(|| {
        // A VIP on a dummy device, one backend in a namespace behind a veth pair with a
        // default route back, as kube-proxy's IPVS mode lays it out.
        sh(
            "ip link add swy-ipvs0 type dummy && ip addr add 10.96.0.10/32 dev swy-ipvs0 \
            && ip link set swy-ipvs0 up && sysctl -qw net.ipv4.ip_forward=1",
        );
        let backend = Netns::create("backend").expect("backend namespace");
        sh(&format!(
            "ip link add swy-n type veth peer name swy-b netns {} \
             && ip addr add 10.244.0.1/24 dev swy-n && ip link set swy-n up",
            backend.name()
        ));
        for args in [
            &["addr", "add", "10.244.0.2/24", "dev", "swy-b"][..],
            &["link", "set", "swy-b", "up"],
            &["route", "add", "default", "via", "10.244.0.1"],
        ] {
            backend.ip(args).expect("backend network");
        }
        let listener = backend
            .tcp_listener("10.244.0.2:8080".parse().unwrap())
            .expect("listen in the backend");

        let web = Service::new(id(Protocol::Tcp, "10.96.0.10", 80), "rr");
        let dest = Destination::new(ip("10.244.0.2"), 8080, 1);
        let mut ipvs = socket();
        let ops = ops_for(&[(web.clone(), vec![dest])]);
        assert_all_ok(&ops, &ipvs.execute(&ops));
        let counts = |ipvs: &mut IpvsSocket| {
            let d = &ipvs.destinations(&web.id).expect("destinations")[0];
            (d.active_conns, d.inactive_conns)
        };
        assert_eq!(counts(&mut ipvs), (0, 0));

        let mut client =
            TcpStream::connect_timeout(&"10.96.0.10:80".parse().unwrap(), Duration::from_secs(5))
                .expect("connect through the VIP");
        let (mut server, peer) = listener.accept().expect("the backend accepts");
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        println!("backend saw the client as {peer}");
        assert_eq!(counts(&mut ipvs), (1, 0), "one established connection");

        drop(client);
        drop(server);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = counts(&mut ipvs);
        while seen.0 != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            seen = counts(&mut ipvs);
        }
        println!("after close: active {}, inactive {}", seen.0, seen.1);
        assert_eq!(seen.0, 0, "no active connection after both sides closed");
        assert!(
            seen.1 <= 1,
            "the closed connection may linger as inactive: {seen:?}"
        );
    });
}

#[test]
fn without_the_module_opening_says_modprobe_ip_vs() {
    uml::always_in_guest(Guest::new(), || {
        // Keep the kernel from loading ip_vs again on demand (the module answers to
        // the genetlink family name), then unload it and everything using it.
        std::fs::write("/proc/sys/kernel/modprobe", "/bin/false").expect("kernel.modprobe");
        // /proc/modules: NAME SIZE REFCOUNT USERS, STATE ADDRESS
        let modules = std::fs::read_to_string("/proc/modules").expect("/proc/modules");
        let users: Vec<&str> = modules
            .lines()
            .find(|l| l.starts_with("ip_vs "))
            .expect("ip_vs is loaded")
            .split(' ')
            .nth(3)
            .unwrap_or_default()
            .split(',')
            .filter(|m| !m.is_empty() && *m != "-")
            .collect();
        sh(&format!("rmmod {} && rmmod ip_vs", users.join(" ")));
        let err = IpvsSocket::open().expect_err("no IPVS family");
        assert!(matches!(err, IpvsError::NotAvailable), "{err:?}");
        assert!(err.to_string().contains("(modprobe ip_vs)"), "{err}");
    });
}

#[test]
fn ten_thousand_services_with_two_destinations_apply_in_one_batch() {
    uml::in_ipvs_kernel_with(Guest::new().timeout(Duration::from_secs(1200)), || {
        let table = generated(10_000, 2);
        let ops = ops_for(&table);
        assert_eq!(ops.len(), 30_000);
        let mut ipvs = socket();

        let started = Instant::now();
        let results = ipvs.execute(&ops);
        let apply = started.elapsed();
        assert_all_ok(&ops, &results);

        let started = Instant::now();
        let dump = ipvs.dump().expect("dump");
        let dump_time = started.elapsed();
        assert_eq!(dump.len(), 10_000);
        assert_eq!(normalized(dump), normalized(table.clone()));

        let (service, dests) = &table[4321];
        let change = [Op::SetDest(
            service.id,
            Destination {
                weight: 0,
                ..dests[0].clone()
            },
        )];
        let started = Instant::now();
        let result = ipvs.execute(&change);
        let single = started.elapsed();
        assert_all_ok(&change, &result);

        let started = Instant::now();
        let services = ipvs.services().expect("services");
        let services_time = started.elapsed();
        assert_eq!(services.len(), 10_000);
        println!(
            "30,000 operations (10,000 services x 2 destinations) in one execute: {apply:?}\n\
             one SetDest with 10,000 services present: {single:?}\n\
             dump of 10,000 services with their destinations: {dump_time:?} \
             (service dump alone: {services_time:?})"
        );
    });
}
