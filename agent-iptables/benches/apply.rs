//! iptables agent apply times: an initial sync of N Services with two endpoints each,
//! one change with N in place, and a read-back, per backend, each in a fresh network
//! namespace. `cargo bench -p switchyard-agent-iptables` (as root). Also a median of 20
//! one-Service changes, as issue 3 asks.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use switchyard_agent_core::dataplane::{Dataplane, Desired};
use switchyard_agent_iptables::Backend;
use switchyard_proto::state::Protocol;

fn main() {
    for backend in [Backend::Nft, Backend::Legacy] {
        for n in [1000usize, 10000] {
            let ns = NetNs::new("bench");
            let mut dp = dataplane(&ns, backend);
            let mut want = Desired::new();
            for i in 0..n {
                let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
                let a = format!("10.244.{}.{}", (i / 128) % 256, (i % 128) * 2);
                let b = format!("10.245.{}.{}", (i / 128) % 256, (i % 128) * 2);
                let s = service(
                    &format!("bench/s{i}"),
                    &[&ip],
                    vec![port(
                        "http",
                        Protocol::Tcp,
                        80,
                        vec![ep(&a, 8080, true), ep(&b, 8080, false)],
                    )],
                );
                want.insert(format!("bench/s{i}"), desired(s));
            }
            if let Some(dir) = std::env::var_os("SWY_DUMP") {
                let path = std::path::Path::new(&dir).join(format!("dry-run-{n}.rules"));
                std::fs::write(path, dp.dry_run(&want)).unwrap();
                continue;
            }
            let start = std::time::Instant::now();
            dp.apply(&want, &full()).unwrap();
            let initial = start.elapsed();
            // One Service changes 20 times with N in place: drop, then restore, an endpoint.
            let mut changes = Vec::new();
            for round in 0..20 {
                let entry = want.get_mut("bench/s7").unwrap();
                if round % 2 == 0 {
                    entry.state.ports[0].cluster_endpoints.pop();
                } else {
                    entry.state.ports[0]
                        .cluster_endpoints
                        .push(ep("10.246.0.7", 8080, false));
                }
                entry.version = version_of(&entry.state);
                let start = std::time::Instant::now();
                dp.apply(&want, &upsert(&["bench/s7"])).unwrap();
                changes.push(start.elapsed());
            }
            changes.sort();
            let one = changes[changes.len() / 2];
            let start = std::time::Instant::now();
            let back = dp.read_back().unwrap();
            let read = start.elapsed();
            assert_eq!(back.len(), n);
            println!(
                "{backend:?} n={n}: initial sync {initial:.2?}, one-Service change median of 20 {one:.2?}, read back {read:.2?}"
            );
        }
    }
}
