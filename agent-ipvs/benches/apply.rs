//! IPVS agent apply times against the iptables agent (legacy backend) on the same state,
//! in one kernel (user-mode Linux when the host has no IPVS): an initial sync of N
//! Services with two endpoints each, one change with N in place (median of 20), and a
//! read-back, each dataplane in a fresh network namespace.
//! `cargo bench -p switchyard-agent-ipvs --bench apply` (as root).

use std::time::{Duration, Instant};

use switchyard_agent_core::{
    dataplane::{Dataplane, Desired},
    fixtures::*,
    netfilter::Backend,
};
use switchyard_agent_iptables::{IptablesConfig, IptablesDataplane, RenderConfig};
use switchyard_agent_ipvs::{IpvsConfig, IpvsDataplane};
use switchyard_integration::{bench::median, netns::Netns, uml};

/// What one dataplane took.
struct Timings {
    initial: Duration,
    change: Duration,
    read_back: Duration,
    /// Where the initial sync and the last change spent their time (IPVS only).
    initial_phases: String,
    change_phases: String,
    read_phases: String,
}

/// Programs `want` with a dataplane made inside a fresh namespace, changes one Service
/// 20 times (drop, then restore, an endpoint), reads back, removes everything.
fn measure<D: Dataplane>(
    make: impl FnOnce() -> D + Send,
    mut want: Desired,
    phases: fn(&D) -> String,
    read_phases: fn(&D) -> String,
) -> Timings {
    let ns = Netns::create("bench").unwrap();
    let n = want.len();
    ns.run(move || {
        let mut dp = make();
        let start = Instant::now();
        let outcome = dp.apply(&want, &full()).unwrap();
        let initial = start.elapsed();
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
        let initial_phases = phases(&dp);
        let mut changes = Vec::new();
        for round in 0..20 {
            let name = churn(&mut want, round);
            let start = Instant::now();
            dp.apply(&want, &upsert(&[name])).unwrap();
            changes.push(start.elapsed());
        }
        let change_phases = phases(&dp);
        let start = Instant::now();
        let back = dp.read_back().unwrap();
        let read_back = start.elapsed();
        assert_eq!(back.len(), n);
        let read_phases = read_phases(&dp);
        dp.cleanup().unwrap();
        Timings {
            initial,
            change: median(changes),
            read_back,
            initial_phases,
            change_phases,
            read_phases,
        }
    })
    .unwrap()
}

fn main() {
    uml::main_in_ipvs_kernel(
        uml::Guest::new()
            .mem_mib(4096)
            .timeout(Duration::from_secs(1800)),
        || {
            println!(
                "kernel {}",
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
            );
            for n in [1000usize, 10000] {
                let want = bench_services(n);
                let ipvs = measure(
                    || {
                        IpvsDataplane::new(IpvsConfig {
                            backend: Some(Backend::Legacy),
                            disable_ipv6: true,
                            ..IpvsConfig::default()
                        })
                        .unwrap()
                    },
                    want.clone(),
                    |d: &IpvsDataplane| d.last_phases().to_string(),
                    |d: &IpvsDataplane| d.last_read_phases().to_string(),
                );
                let iptables = measure(
                    || {
                        IptablesDataplane::new(IptablesConfig {
                            render: RenderConfig {
                                cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                                ..RenderConfig::default()
                            },
                            backend: Some(Backend::Legacy),
                            disable_ipv6: true,
                            ..IptablesConfig::default()
                        })
                    },
                    want,
                    |_: &IptablesDataplane| String::new(),
                    |_: &IptablesDataplane| String::new(),
                );
                println!(
                    "n={n}: IPVS initial sync {:.2?}, one-Service change median of 20 {:.2?}, read back {:.2?}",
                    ipvs.initial, ipvs.change, ipvs.read_back
                );
                println!("  initial sync: {}", ipvs.initial_phases);
                println!("  last change: {}", ipvs.change_phases);
                println!("  read back: {}", ipvs.read_phases);
                println!(
                    "n={n}: iptables-legacy initial sync {:.2?}, one-Service change median of 20 {:.2?}, read back {:.2?}",
                    iptables.initial, iptables.change, iptables.read_back
                );
                println!(
                    "n={n}: IPVS / iptables: initial {:.2}, change {:.3}, read back {:.2}",
                    ipvs.initial.as_secs_f64() / iptables.initial.as_secs_f64(),
                    ipvs.change.as_secs_f64() / iptables.change.as_secs_f64(),
                    ipvs.read_back.as_secs_f64() / iptables.read_back.as_secs_f64()
                );
            }
        },
    );
}
