//! The IPVS dataplane on a real IPVS kernel (user-mode Linux when the host has none,
//! see `switchyard_integration::uml`): what it programs reads back as rendered, cleanup
//! removes exactly what it created, removed TCP endpoints drain, each scheduler does what
//! it promises with real connections, drift is repaired, a restart finds everything in
//! place, and a Service the kernel refuses fails alone.
//!
//! Each test lays out a node namespace (where the dataplane programs), a client and
//! backend namespaces with an echo server each on port 9000 (`EchoServer`, so a
//! connection can stay open and ask again which backend serves it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use switchyard_agent_core::{
    dataplane::{ApplyOutcome, Change, Dataplane, Desired, Programmed},
    fixtures::*,
    netfilter::Backend,
};
use switchyard_agent_ipvs::{IpvsConfig, IpvsDataplane, netlink::Timeouts};
use switchyard_integration::{
    netns::{EchoServer, HeldConnection, Netns, Topology, topology::backend_ip},
    uml::{Guest, in_ipvs_kernel_with},
};
use switchyard_proto::state::{IpvsScheduler, Protocol, ServiceState};

const PORT: u16 = 9000;

fn guest() -> Guest {
    Guest::new().mem_mib(1024).timeout(Duration::from_secs(240))
}

/// Namespaces, echo servers and the dataplane programming the node.
struct Lab {
    topology: Topology,
    _servers: Vec<EchoServer>,
    dataplane: Option<IpvsDataplane>,
}

fn config() -> IpvsConfig {
    IpvsConfig {
        backend: Some(Backend::Legacy),
        // Closed connections leave IPVS quickly, so drained real servers can be checked.
        timeouts: Timeouts {
            tcp: 0,
            tcp_fin: 2,
            udp: 0,
        },
        ..IpvsConfig::default()
    }
}

impl Lab {
    fn new(backends: u8) -> Self {
        let topology = Topology::builder()
            .backends(backends)
            .local_backend(1)
            .node_name("node-a")
            .build()
            .unwrap();
        let servers = topology
            .backends()
            .iter()
            .map(|b| {
                EchoServer::start(b.ns(), b.name(), SocketAddr::new(b.ip().into(), PORT)).unwrap()
            })
            .collect();
        let dataplane = topology
            .node()
            .run(|| IpvsDataplane::new(config()))
            .unwrap()
            .unwrap();
        Self {
            topology,
            _servers: servers,
            dataplane: Some(dataplane),
        }
    }

    fn node(&self) -> &Netns {
        self.topology.node()
    }

    fn client(&self) -> &Netns {
        self.topology.client()
    }

    /// Runs `f` on the dataplane inside the node namespace (the commands it starts
    /// inherit that namespace).
    fn on_node<T: Send>(&mut self, f: impl FnOnce(&mut IpvsDataplane) -> T + Send) -> T {
        let dataplane = self.dataplane.as_mut().expect("dataplane");
        self.topology.node().run(|| f(dataplane)).unwrap()
    }

    fn apply(&mut self, desired: &Desired, change: Change) -> ApplyOutcome {
        self.on_node(|d| d.apply(desired, &change)).unwrap()
    }

    fn read_back(&mut self) -> Programmed {
        self.on_node(|d| d.read_back()).unwrap()
    }

    /// Every Service of `desired` reads back exactly as rendered.
    fn assert_in_force(&mut self, desired: &Desired) {
        let kernel = self.read_back();
        let dataplane = self.dataplane.as_ref().unwrap();
        for (name, service) in desired {
            let want = dataplane.expected(name, service);
            let have = kernel.get(name).map(|p| p.kernel_objects.clone());
            assert_eq!(have.as_ref(), Some(&want), "{name}");
            assert_eq!(kernel[name].version, Some(service.version), "{name}");
        }
        assert_eq!(
            kernel.keys().collect::<BTreeSet<_>>(),
            desired.keys().collect::<BTreeSet<_>>()
        );
    }

    fn sh(&self, script: &str) -> String {
        self.node().exec(["sh", "-c", script]).unwrap()
    }

    /// Which backend answers a new connection to `vip` from `source`.
    fn backend_for(&self, vip: &str, source: Option<IpAddr>) -> String {
        let target = SocketAddr::new(vip.parse().unwrap(), 80);
        HeldConnection::open(self.client(), source, target)
            .and_then(|mut c| c.ask())
            .unwrap_or_else(|e| panic!("{vip} from {source:?}: {e}"))
    }
}

/// A Service on `vip`:80 → port 9000 of the given backends (1-based).
fn svc(name: &str, vip: &str, backends: &[u8], protocol: Protocol) -> ServiceState {
    service(
        name,
        &[vip],
        vec![port(
            "echo",
            protocol,
            80,
            backends
                .iter()
                .map(|i| ep(&backend_ip(*i).to_string(), PORT, *i == 1))
                .collect(),
        )],
    )
}

fn desired_of(states: impl IntoIterator<Item = ServiceState>) -> Desired {
    states
        .into_iter()
        .map(|s| (s.key.to_string(), desired(s)))
        .collect()
}

#[test]
fn every_service_reads_back_as_rendered_and_cleanup_removes_exactly_what_the_agent_created() {
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(2);
        // Someone else's virtual service, set and chain: never touched.
        lab.sh(
            "ipvsadm -A -t 192.0.2.99:80 -s wlc && ipset create FOREIGN hash:ip && \
             iptables-legacy -t nat -N FOREIGN-CHAIN",
        );
        let mut sink = kitchen_sink();
        sink.ipvs_scheduler = Some(IpvsScheduler::Sh);
        let want = desired_of([
            sink,
            svc("default/web", "10.96.0.10", &[1, 2], Protocol::Tcp),
            svc("default/dns", "10.96.0.11", &[1, 2], Protocol::Udp),
            svc("default/empty", "10.96.0.12", &[], Protocol::Tcp),
        ]);
        let outcome = lab.apply(&want, full());
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        lab.assert_in_force(&want);
        let ipvsadm = lab.sh("ipvsadm -Ln");
        assert!(
            ipvsadm.contains("TCP  10.96.0.20:80 sh persistent 10800"),
            "{ipvsadm}"
        );
        assert!(ipvsadm.contains("-> 10.244.1.2:9000"), "{ipvsadm}");
        let vips = lab.sh("ip route show table local dev swy-ipvs0");
        assert!(
            vips.contains("local 10.96.0.12 proto 83 scope host"),
            "{vips}"
        );

        lab.on_node(|d| d.cleanup()).unwrap();
        let ipvsadm = lab.sh("ipvsadm -Ln");
        assert!(ipvsadm.contains("192.0.2.99:80 wlc"), "{ipvsadm}");
        assert_eq!(
            ipvsadm.matches("TCP  ").count() + ipvsadm.matches("UDP  ").count(),
            1
        );
        let sets = lab.sh("ipset list -n");
        assert_eq!(sets.trim(), "FOREIGN", "{sets}");
        let rules = lab.sh("iptables-legacy-save; ip6tables-legacy-save");
        assert!(!rules.contains("SWY-"), "{rules}");
        assert!(rules.contains(":FOREIGN-CHAIN"), "{rules}");
        assert!(
            lab.node()
                .exec(["ip", "link", "show", "swy-ipvs0"])
                .is_err()
        );
    });
}

#[test]
fn a_long_lived_connection_to_a_removed_endpoint_keeps_working_while_new_ones_avoid_it() {
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(2);
        let both = desired_of([svc("default/web", "10.96.0.10", &[1, 2], Protocol::Tcp)]);
        assert!(lab.apply(&both, full()).failed.is_empty());
        let mut held = HeldConnection::open(
            lab.client(),
            None,
            SocketAddr::new("10.96.0.10".parse().unwrap(), 80),
        )
        .unwrap();
        let pinned = held.ask().unwrap();
        let kept: u8 = if pinned == "backend-1" { 2 } else { 1 };
        let one = desired_of([svc("default/web", "10.96.0.10", &[kept], Protocol::Tcp)]);
        assert!(lab.apply(&one, upsert(&["default/web"])).failed.is_empty());
        lab.assert_in_force(&one);

        let gone = if kept == 1 {
            "10.244.2.2"
        } else {
            "10.244.1.2"
        };
        let drained = format!("-> {gone}:9000");
        let ipvsadm = lab.sh("ipvsadm -Ln");
        let line = ipvsadm
            .lines()
            .find(|l| l.contains(&drained))
            .unwrap_or_else(|| {
                panic!("the removed real server drains instead of going at once: {ipvsadm}")
            });
        assert!(
            line.contains("Masq    0"),
            "weight 0 while draining: {line}"
        );
        for _ in 0..5 {
            assert_eq!(
                held.ask().unwrap(),
                pinned,
                "the established connection keeps working"
            );
            assert_eq!(
                lab.backend_for("10.96.0.10", None),
                format!("backend-{kept}")
            );
        }
        drop(held);
        // Once the connection is gone, the next apply or read-back deletes the drained
        // real server (its closing connection still counts as inactive for a while).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            lab.read_back();
            if !lab.sh("ipvsadm -Ln").contains(&drained) {
                break;
            }
            assert!(Instant::now() < deadline, "{}", lab.sh("ipvsadm -Ln"));
            std::thread::sleep(Duration::from_millis(500));
        }
    });
}

#[test]
fn each_scheduler_does_what_it_promises_and_one_the_kernel_lacks_fails_alone() {
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(4);
        // 40 client addresses, for schedulers that hash the source.
        let sources: Vec<IpAddr> = (100..140)
            .map(|i| format!("10.201.0.{i}").parse().unwrap())
            .collect();
        for source in &sources {
            lab.client()
                .ip(["addr", "add", &format!("{source}/24"), "dev", "eth0"])
                .unwrap();
        }
        let with = |name: &str, vip: &str, backends: &[u8], scheduler| {
            let mut s = svc(name, vip, backends, Protocol::Tcp);
            s.ipvs_scheduler = Some(scheduler);
            s
        };
        let services = |mh_backends: &[u8]| {
            desired_of([
                with("default/rr", "10.96.1.1", &[1, 2, 3], IpvsScheduler::Rr),
                with("default/sh", "10.96.1.2", &[1, 2, 3], IpvsScheduler::Sh),
                with("default/lc", "10.96.1.3", &[1, 2], IpvsScheduler::Lc),
                with("default/mh", "10.96.1.4", mh_backends, IpvsScheduler::Mh),
                with("default/dh", "10.96.1.5", &[1, 2, 3], IpvsScheduler::Dh),
                with("default/twos", "10.96.1.6", &[1, 2], IpvsScheduler::Twos),
                svc("default/plain", "10.96.1.7", &[1, 2], Protocol::Tcp),
            ])
        };
        let kernel_has_twos = lab.sh("ls /lib/modules/$(uname -r)/kernel/net/netfilter/ipvs/ 2>/dev/null; ls /usr/lib/uml/modules/$(uname -r)/kernel/net/netfilter/ipvs/ 2>/dev/null").contains("ip_vs_twos");
        let outcome = lab.apply(&services(&[1, 2, 3]), full());
        if kernel_has_twos {
            assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        } else {
            assert_eq!(
                outcome.failed.keys().collect::<Vec<_>>(),
                ["default/twos"],
                "only the Service whose scheduler the kernel lacks fails"
            );
            let error = &outcome.failed["default/twos"];
            assert!(error.contains("modprobe ip_vs_twos"), "{error}");
            assert!(
                lab.sh("ipvsadm -Ln").contains("10.96.1.7:80 rr"),
                "the others land"
            );
        }

        // rr: consecutive connections cycle through every backend.
        let rr: Vec<String> = (0..6).map(|_| lab.backend_for("10.96.1.1", None)).collect();
        assert_eq!(rr[..3].iter().collect::<BTreeSet<_>>().len(), 3, "{rr:?}");
        assert_eq!(rr[..3], rr[3..], "round robin repeats its cycle: {rr:?}");

        // sh: one source always lands on the same backend; sources spread.
        let by_source: Vec<String> = sources
            .iter()
            .map(|s| lab.backend_for("10.96.1.2", Some(*s)))
            .collect();
        for (source, backend) in sources.iter().zip(&by_source).take(5) {
            for _ in 0..3 {
                assert_eq!(&lab.backend_for("10.96.1.2", Some(*source)), backend);
            }
        }
        assert!(
            by_source.iter().collect::<BTreeSet<_>>().len() > 1,
            "{by_source:?}"
        );

        // lc: with a connection held on one backend, new ones go to the idle one.
        let target = SocketAddr::new("10.96.1.3".parse().unwrap(), 80);
        let mut held = HeldConnection::open(lab.client(), None, target).unwrap();
        let busy = held.ask().unwrap();
        for _ in 0..4 {
            assert_ne!(
                lab.backend_for("10.96.1.3", None),
                busy,
                "lc avoids the busy backend"
            );
        }
        drop(held);

        // dh: every source reaching one VIP lands on one backend.
        let dh: BTreeSet<String> = sources[..10]
            .iter()
            .map(|s| lab.backend_for("10.96.1.5", Some(*s)))
            .collect();
        assert_eq!(dh.len(), 1, "{dh:?}");

        // mh: adding a backend moves only sources that now go to it.
        let before: BTreeMap<IpAddr, String> = sources
            .iter()
            .map(|s| (*s, lab.backend_for("10.96.1.4", Some(*s))))
            .collect();
        let outcome = lab.apply(&services(&[1, 2, 3, 4]), upsert(&["default/mh"]));
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        let (mut to_new, mut between_old) = (0, 0);
        for (source, old) in &before {
            let new = lab.backend_for("10.96.1.4", Some(*source));
            match (&new != old, new == "backend-4") {
                (true, true) => to_new += 1,
                (true, false) => between_old += 1,
                (false, _) => {}
            }
        }
        // Maglev's promise: about 1/N of flows move, nearly all of them to the new
        // backend (the lookup table may shift a few entries between old backends).
        assert!(
            (1..=16).contains(&(to_new + between_old)) && between_old * 3 <= to_new,
            "of 40 sources, {to_new} moved to the new backend and {between_old} between old ones"
        );
    });
}

#[test]
fn drift_is_found_per_service_and_repaired_and_a_restart_finds_everything_in_place() {
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(2);
        let want = desired_of([
            svc("default/web", "10.96.0.10", &[1, 2], Protocol::Tcp),
            svc("default/other", "10.96.0.11", &[1, 2], Protocol::Udp),
            svc("default/empty", "10.96.0.12", &[], Protocol::Tcp),
        ]);
        assert!(lab.apply(&want, full()).failed.is_empty());
        lab.assert_in_force(&want);

        // By hand: a real server, an element and a VIP go.
        lab.sh("ipvsadm -d -t 10.96.0.10:80 -r 10.244.2.2:9000 && \
             ipset del SWY-REJECT 10.96.0.12,tcp:80 && \
             ip route del local 10.96.0.11 dev swy-ipvs0 table local");
        let kernel = lab.read_back();
        let drifted: Vec<&String> = want
            .iter()
            .filter(|(name, service)| {
                kernel.get(*name).map(|p| &p.kernel_objects)
                    != Some(&lab.dataplane.as_ref().unwrap().expected(name, service))
            })
            .map(|(name, _)| name)
            .collect();
        assert_eq!(drifted, ["default/empty", "default/other", "default/web"]);
        let outcome = lab.apply(
            &want,
            upsert(&["default/empty", "default/other", "default/web"]),
        );
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        lab.assert_in_force(&want);

        // A new dataplane over the same kernel (an agent restart) reads everything back,
        // versions included, and has nothing to change.
        lab.dataplane = Some(
            lab.node()
                .run(|| IpvsDataplane::new(config()))
                .unwrap()
                .unwrap(),
        );
        lab.assert_in_force(&want);
        assert!(lab.apply(&want, upsert(&["default/web"])).failed.is_empty());
        let ops = lab.dataplane.as_ref().unwrap().last_transition().clone();
        assert!(
            ops.is_empty(),
            "an unchanged Service is not rewritten: {ops:?}"
        );
    });
}

#[test]
fn a_one_service_change_leaves_every_other_service_and_its_connections_alone() {
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(3);
        let mut want = desired_of([
            svc("default/a", "10.96.0.10", &[1, 2, 3], Protocol::Tcp),
            svc("default/b", "10.96.0.11", &[1, 2, 3], Protocol::Tcp),
        ]);
        assert!(lab.apply(&want, full()).failed.is_empty());
        let mut held = HeldConnection::open(
            lab.client(),
            None,
            SocketAddr::new("10.96.0.11".parse().unwrap(), 80),
        )
        .unwrap();
        let serving = held.ask().unwrap();
        let stats = |lab: &Lab| lab.sh("ipvsadm -Ln --stats -t 10.96.0.11:80");
        // The kernel totals IPVS's counters in its rate estimator, every 2 s: read them
        // once two reads 2.5 s apart agree, or they may still be catching up with the
        // held connection (seen once in CI: all zeros here, the connection's afterwards).
        let mut b_before = stats(&lab);
        for _ in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(2500));
            let again = stats(&lab);
            if again == b_before {
                break;
            }
            b_before = again;
        }
        let connections = b_before
            .lines()
            .find(|l| l.starts_with("TCP"))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_default()
            .to_string();
        assert_eq!(
            connections, "1",
            "the held connection is counted: {b_before}"
        );

        let a = svc("default/a", "10.96.0.10", &[1], Protocol::Tcp);
        want.insert("default/a".into(), desired(a));
        assert!(lab.apply(&want, upsert(&["default/a"])).failed.is_empty());
        let t = lab.dataplane.as_ref().unwrap().last_transition().clone();
        let owners: BTreeSet<&String> = t
            .ipvs_first
            .iter()
            .chain(&t.ipvs_last)
            .map(|(n, _)| n)
            .chain(t.element_adds.iter().chain(&t.element_dels).map(|(_, n)| n))
            .chain(t.versions.iter().map(|(n, _)| n))
            .collect();
        assert_eq!(owners, BTreeSet::from([&"default/a".to_string()]), "{t:?}");
        assert_eq!(t.ipvs_last.len(), 2, "two real servers drain: {t:?}");
        lab.assert_in_force(&want);
        assert_eq!(stats(&lab), b_before, "b's virtual service was not touched");
        assert_eq!(held.ask().unwrap(), serving);
        assert_eq!(lab.backend_for("10.96.0.10", None), "backend-1");
    });
}

#[test]
fn a_removed_udp_endpoint_goes_at_once_with_its_conntrack_entries() {
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(2);
        let _udp = lab.topology.start_backends(&[], &[PORT + 1]).unwrap();
        let dns = |backends: &[u8]| {
            let mut s = svc("default/dns", "10.96.0.53", backends, Protocol::Udp);
            s.ports[0]
                .cluster_endpoints
                .iter_mut()
                .for_each(|e| e.port = PORT + 1);
            desired_of([s])
        };
        assert!(lab.apply(&dns(&[1, 2]), full()).failed.is_empty());
        let vip: IpAddr = "10.96.0.53".parse().unwrap();
        let mut seen = BTreeSet::new();
        for _ in 0..10 {
            let answer = switchyard_integration::netns::udp_request(lab.client(), vip, 80).unwrap();
            seen.insert(answer.split_whitespace().next().unwrap().to_string());
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        let flows =
            |lab: &Lab| lab.sh("conntrack -L -p udp --orig-dst 10.96.0.53 2>/dev/null || true");
        assert!(flows(&lab).contains("src=10.244.2.2"), "{}", flows(&lab));

        assert!(
            lab.apply(&dns(&[1]), upsert(&["default/dns"]))
                .failed
                .is_empty()
        );
        let ipvsadm = lab.sh("ipvsadm -Ln -u 10.96.0.53:80");
        assert!(
            !ipvsadm.contains("10.244.2.2"),
            "no draining for UDP: {ipvsadm}"
        );
        assert!(!flows(&lab).contains("src=10.244.2.2"), "{}", flows(&lab));
        for _ in 0..5 {
            let answer = switchyard_integration::netns::udp_request(lab.client(), vip, 80).unwrap();
            assert!(answer.starts_with("backend-1 "), "{answer}");
        }
    });
}

#[test]
fn a_sync_of_thousands_of_services_lands_whole_and_reads_back() {
    // Thousands of VIP routes and set elements go in batches whose acknowledgements must
    // all come back: a lost one would leave the apply waiting.
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(1);
        let want = bench_services(3000);
        let outcome = lab.apply(&want, full());
        assert!(
            outcome.failed.is_empty(),
            "{:?}",
            outcome.failed.first_key_value()
        );
        lab.assert_in_force(&want);
        let routes = lab.sh("ip route show table local dev swy-ipvs0 | wc -l");
        assert_eq!(routes.trim(), "3000");
    });
}

#[test]
fn traffic_straight_to_an_endpoint_still_flows_through_the_node() {
    // Pods reach each other without a Service; a real server of a virtual service is
    // such a pod too.
    in_ipvs_kernel_with(guest(), || {
        let mut lab = Lab::new(2);
        let direct = SocketAddr::new(backend_ip(2).into(), PORT);
        assert_eq!(
            HeldConnection::open(lab.client(), None, direct)
                .and_then(|mut c| c.ask())
                .unwrap(),
            "backend-2"
        );
        let want = desired_of([svc("default/web", "10.96.0.10", &[1, 2], Protocol::Tcp)]);
        assert!(lab.apply(&want, full()).failed.is_empty());
        let answer = HeldConnection::open(lab.client(), None, direct).and_then(|mut c| c.ask());
        if answer.is_err() {
            println!("{}", lab.sh("iptables-legacy-save -c; ipvsadm -Ln; sysctl -a 2>/dev/null | grep -E 'vs\\.|ip_forward'; conntrack -L 2>&1 | head"));
        }
        assert_eq!(answer.unwrap(), "backend-2");
    });
}
