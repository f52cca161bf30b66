//! iptables agent apply times: an initial sync of N Services with two endpoints each,
//! one change with N in place (median of 20, as issue 3 asks), and a read-back, per
//! backend, each in a fresh network namespace; against the time `iptables-restore` alone
//! takes to load the same ruleset (the agent's `--dry-run` output, jumps from built-in
//! chains included) into an empty namespace (flushing, so without the `--noflush` an
//! agent sharing the tables with other components needs).
//! `cargo bench -p switchyard-agent-iptables --bench apply` (as root).
//!
//! The agent runs inside the namespace, as on a node: no `ip netns exec` in front of
//! each command. `SWY_CHUNK_CHAINS=N` overrides the chunk size of large syncs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use switchyard_agent_core::dataplane::Dataplane;
use switchyard_agent_iptables::{Backend, IptablesDataplane};
use switchyard_integration::netns::Netns;

/// `iptables-restore` alone: the dry-run ruleset of each family loaded in one flushing
/// transaction into an empty namespace.
fn restore_alone(backend: Backend, dry_run: &str) -> Duration {
    let ns = Netns::create("bench-restore").unwrap();
    let mut sections = dry_run.split("# ").filter(|s| !s.is_empty());
    let took = ns
        .run(|| {
            let start = Instant::now();
            for (family, tool) in [("ipv4\n", "iptables"), ("ipv6\n", "ip6tables")] {
                let input = sections.next().unwrap().strip_prefix(family).unwrap();
                let tool = format!("{tool}-{}-restore", backend.name());
                let mut child = Command::new(&tool).stdin(Stdio::piped()).spawn().unwrap();
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "{tool}");
            }
            start.elapsed()
        })
        .unwrap();
    teardown(ns, backend);
    took
}

/// Empties the namespace's tables, then deletes it and lets the kernel settle: deleting
/// a namespace that still holds 40,000 chains frees them on a kernel worker, which would
/// run during the next measurement.
fn teardown(ns: Netns, backend: Backend) {
    for tool in ["iptables", "ip6tables"] {
        let tool = format!("{tool}-{}-restore", backend.name());
        let mut child = ns.command(&tool).stdin(Stdio::piped()).spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"*nat\nCOMMIT\n*filter\nCOMMIT\n")
            .unwrap();
        assert!(child.wait().unwrap().success(), "{tool}");
    }
    drop(ns);
    std::thread::sleep(Duration::from_millis(500));
}

/// Rounds of the initial sync and of `iptables-restore` alone, interleaved; the figures
/// are medians, and the ratio is the median of each round's ratio (the machine's drift
/// between runs is larger than the difference under study).
const ROUNDS: usize = 5;

fn median<T: PartialOrd + Copy>(mut samples: Vec<T>) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    samples[samples.len() / 2]
}

fn main() {
    let chunk_chains = std::env::var("SWY_CHUNK_CHAINS")
        .ok()
        .map(|v| v.parse().expect("SWY_CHUNK_CHAINS: a number"))
        .unwrap_or(0);
    for backend in [Backend::Nft, Backend::Legacy] {
        for n in [1000usize, 10000] {
            let mut want = bench_services(n);
            let dry_run = IptablesDataplane::new(config(backend, 0)).dry_run(&want);
            if let Some(dir) = std::env::var_os("SWY_DUMP") {
                let path = std::path::Path::new(&dir).join(format!("dry-run-{n}.rules"));
                std::fs::write(path, &dry_run).unwrap();
                continue;
            }
            let mut alone = Vec::new();
            let mut initial = Vec::new();
            let mut last = None;
            for _ in 0..ROUNDS {
                alone.push(restore_alone(backend, &dry_run));
                let ns = Netns::create("bench").unwrap();
                let (took, dp) = ns
                    .run(|| {
                        let mut dp = IptablesDataplane::new(config(backend, chunk_chains));
                        let start = Instant::now();
                        dp.apply(&want, &full()).unwrap();
                        (start.elapsed(), dp)
                    })
                    .unwrap();
                initial.push(took);
                if let Some((ns, _)) = last.replace((ns, dp)) {
                    teardown(ns, backend);
                }
            }
            let ratio = median(
                alone
                    .iter()
                    .zip(&initial)
                    .map(|(a, i)| i.as_secs_f64() / a.as_secs_f64())
                    .collect(),
            );
            let (alone, initial) = (median(alone), median(initial));
            let (ns, mut dp) = last.unwrap();
            let (one, read) = ns
                .run(|| {
                    // One Service changes 20 times with N in place: drop, then restore, an
                    // endpoint.
                    let mut changes = Vec::new();
                    for round in 0..20 {
                        let name = churn(&mut want, round);
                        let start = Instant::now();
                        dp.apply(&want, &upsert(&[name])).unwrap();
                        changes.push(start.elapsed());
                    }
                    let start = Instant::now();
                    let back = dp.read_back().unwrap();
                    let read = start.elapsed();
                    assert_eq!(back.len(), n);
                    (median(changes), read)
                })
                .unwrap();
            let cleanup = ns
                .run(|| {
                    let start = Instant::now();
                    dp.cleanup().unwrap();
                    start.elapsed()
                })
                .unwrap();
            teardown(ns, backend);
            println!(
                "{backend:?} n={n}: initial sync {initial:.2?} (iptables-restore alone {alone:.2?}; paired {:+.0}%; medians of {ROUNDS}), one-Service change median of 20 {one:.2?}, read back {read:.2?}, cleanup {cleanup:.2?}",
                100.0 * (ratio - 1.0)
            );
        }
    }
}
