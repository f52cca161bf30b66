//! eBPF agent apply times: an initial sync of N Services with two endpoints each (N =
//! 1,000 and 10,000), one Service changed with N in place (median of 20), and a
//! read-back, each initial sync into fresh maps of a fresh pin directory; against the
//! iptables agent on the same state in the same run (the backend it detects here).
//! `cargo bench -p switchyard-agent-ebpf --bench apply` (as root).
//!
//! The dataplanes run inside their namespace, as on a node. Loading and attaching the
//! programs (before the initial sync) is not part of the figures; it is printed apart.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use switchyard_agent_core::dataplane::{Dataplane, Desired};
use switchyard_agent_ebpf::{Attach, EbpfConfig, EbpfDataplane};
use switchyard_agent_iptables::{IptablesConfig, IptablesDataplane, RenderConfig};
use switchyard_integration::{bench::median, cgroup::Cgroup, netns::Netns};

const ROUNDS: usize = 5;
const CHANGES: usize = 20;

/// One Service changed `CHANGES` times ([`churn`]): the median time of an apply.
fn changes(want: &mut Desired, mut apply: impl FnMut(&Desired, &str) -> Duration) -> Duration {
    let took = (0..CHANGES)
        .map(|round| {
            let name = churn(want, round);
            apply(want, name)
        })
        .collect();
    median(took)
}

/// Inside `ns`: makes a dataplane (how long that took), then syncs `want` into it (how
/// long that took).
fn fresh_sync<D: Dataplane + Send>(
    ns: &Netns,
    make: impl FnOnce() -> D + Send,
    want: &Desired,
) -> (Duration, Duration, D) {
    ns.run(|| {
        let started = Instant::now();
        let mut dp = make();
        let made = started.elapsed();
        let started = Instant::now();
        let outcome = dp.apply(want, &full()).expect("the initial sync");
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        (made, started.elapsed(), dp)
    })
    .expect("entering the namespace")
}

struct Figures {
    load: Duration,
    initial: Duration,
    change: Duration,
    read_back: Duration,
}

fn ebpf(n: usize) -> Figures {
    let mut want = bench_services(n);
    let mut loads = Vec::new();
    let mut initial = Vec::new();
    let mut last = None;
    for _ in 0..ROUNDS {
        let ns = Netns::create("bench-ebpf").unwrap();
        ns.ip(["link", "add", "a0", "type", "veth", "peer", "name", "b0"])
            .unwrap();
        ns.ip(["link", "set", "a0", "up"]).unwrap();
        let cgroup = Cgroup::create("bench").unwrap();
        let pins = PinDir::new();
        let config = EbpfConfig::new(Attach {
            bpffs: pins.path().to_path_buf(),
            cgroup: cgroup.path().to_path_buf(),
            devices: vec!["a0".into()],
        });
        let (load, took, dp) = fresh_sync(
            &ns,
            || EbpfDataplane::new(config).expect("eBPF dataplane"),
            &want,
        );
        loads.push(load);
        initial.push(took);
        // Older rounds go here, outside the measurements.
        last = Some((dp, pins, cgroup, ns));
    }
    let (mut dp, _pins, _cgroup, _ns) = last.unwrap();
    let change = changes(&mut want, |want, name| {
        let started = Instant::now();
        dp.apply(want, &upsert(&[name])).unwrap();
        started.elapsed()
    });
    let started = Instant::now();
    let back = dp.read_back().unwrap();
    let read_back = started.elapsed();
    assert_eq!(back.len(), n);
    Figures {
        load: median(loads),
        initial: median(initial),
        change,
        read_back,
    }
}

/// Removes what the iptables dataplane installed, then the namespace, and lets the
/// kernel free it before the next measurement.
fn iptables_teardown(ns: Netns, mut dp: IptablesDataplane) {
    ns.run(|| dp.cleanup().unwrap()).unwrap();
    drop(ns);
    std::thread::sleep(Duration::from_millis(500));
}

fn iptables(n: usize) -> (switchyard_agent_iptables::Backend, Figures) {
    let mut want = bench_services(n);
    let config = || IptablesConfig {
        render: RenderConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..RenderConfig::default()
        },
        disable_ipv6: true,
        ..IptablesConfig::default()
    };
    let mut initial = Vec::new();
    let mut last: Option<(Netns, IptablesDataplane)> = None;
    for _ in 0..3 {
        let ns = Netns::create("bench-ipt").unwrap();
        let (_, took, dp) = fresh_sync(&ns, || IptablesDataplane::new(config()), &want);
        initial.push(took);
        if let Some((ns, dp)) = last.replace((ns, dp)) {
            iptables_teardown(ns, dp);
        }
    }
    let (ns, mut dp) = last.unwrap();
    let backend = dp.backend();
    let (change, read_back) = ns
        .run(|| {
            let change = changes(&mut want, |want, name| {
                let started = Instant::now();
                dp.apply(want, &upsert(&[name])).unwrap();
                started.elapsed()
            });
            let started = Instant::now();
            assert_eq!(dp.read_back().unwrap().len(), n);
            (change, started.elapsed())
        })
        .unwrap();
    iptables_teardown(ns, dp);
    (
        backend,
        Figures {
            load: Duration::ZERO,
            initial: median(initial),
            change,
            read_back,
        },
    )
}

fn main() {
    for n in [1000usize, 10000] {
        let e = ebpf(n);
        let (backend, i) = iptables(n);
        println!(
            "eBPF n={n}: initial sync {:.1?} (median of {ROUNDS}; loading and attaching the programs before it {:.0?}), one-Service change {:.1?} (median of {CHANGES}), read back {:.1?}",
            e.initial, e.load, e.change, e.read_back
        );
        println!(
            "  iptables ({backend:?}) on the same state: initial sync {:.0?} (median of 3), one-Service change {:.1?}, read back {:.0?}; eBPF initial sync {:.1}x faster, one change {:.0}x",
            i.initial,
            i.change,
            i.read_back,
            i.initial.as_secs_f64() / e.initial.as_secs_f64(),
            i.change.as_secs_f64() / e.change.as_secs_f64()
        );
    }
}
