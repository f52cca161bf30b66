//! Round trips between rendered entries and map entries.

use switchyard_agent_core::{dataplane::DesiredService, fixtures as states};
use switchyard_proto::state::{LbAlgorithm, Protocol, ServiceState};

use super::*;
use crate::render::{RenderConfig, render_service};

/// Every kind of entry: the shared kitchen sink (two families, node ports, LB IPs with
/// source ranges, eTP Local, affinity, an SCTP port), with Maglev and a rejecting port.
fn kitchen_sink() -> ServiceState {
    let mut s = states::kitchen_sink();
    s.ebpf_lb = Some(LbAlgorithm::Maglev);
    s.ports
        .push(states::port("gone", Protocol::Udp, 54, vec![]));
    s
}

fn dump_of(name: &str, version: u64, res_id: u32, encoded: &Encoded, dirty: bool) -> Dump {
    Dump {
        services: encoded.services.clone(),
        slots: encoded.slots.clone(),
        maglev: encoded.maglev.clone(),
        ranges: encoded.ranges.clone(),
        versions: vec![(
            VersionKey::of(name).unwrap(),
            VersionValue {
                version,
                res_id,
                flags: if dirty { abi::VERSION_F_DIRTY } else { 0 },
            },
        )],
    }
}

#[test]
fn every_entry_kind_reads_back_as_it_was_rendered() {
    let cfg = RenderConfig {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        maglev_size: 1031,
        ..RenderConfig::default()
    };
    let desired = DesiredService::new(7, kitchen_sink());
    let rendered = render_service("shop/front", &desired, &cfg).unwrap();
    let revs: Vec<u32> = (0..rendered.sets.len() as u32).map(|i| 100 + i).collect();
    let encoded = encode(&rendered, 42, &revs, &vec![true; revs.len()]).unwrap();
    assert_eq!(
        encoded.maglev.len(),
        rendered.sets.len() * 2,
        "1031 entries: two chunks each"
    );

    let back = assemble(dump_of("shop/front", 7, 42, &encoded, false));
    let installed = &back.services["shop/front"];
    assert_eq!(installed.version, Some(7));
    assert_eq!(installed.res_id, 42);
    assert_eq!(installed.objects(), rendered.objects().unwrap());
    assert!(back.orphan_keys.is_empty() && back.orphan_revs.is_empty());
    assert!(back.orphan_ranges.is_empty());
    assert_eq!(back.max_rev, 100 + rendered.sets.len() as u32 - 1);
}

#[test]
fn a_dirty_service_has_no_version_and_a_missing_slot_shows() {
    let desired = DesiredService::new(7, kitchen_sink());
    let rendered = render_service("shop/front", &desired, &RenderConfig::default()).unwrap();
    let revs: Vec<u32> = (1..=rendered.sets.len() as u32).collect();
    let mut encoded = encode(&rendered, 9, &revs, &vec![true; revs.len()]).unwrap();
    encoded.slots.pop();
    let back = assemble(dump_of("shop/front", 7, 9, &encoded, true));
    let installed = &back.services["shop/front"];
    assert_eq!(installed.version, None);
    assert_ne!(installed.objects(), rendered.objects().unwrap());
    assert!(
        installed
            .objects()
            .iter()
            .any(|o| o.contains("(slots missing)"))
    );
}

#[test]
fn entries_and_ranges_of_no_recorded_service_are_orphans() {
    let desired = DesiredService::new(7, kitchen_sink());
    let rendered = render_service("shop/front", &desired, &RenderConfig::default()).unwrap();
    let revs: Vec<u32> = (1..=rendered.sets.len() as u32).collect();
    let encoded = encode(&rendered, 9, &revs, &vec![true; revs.len()]).unwrap();
    let mut dump = dump_of("shop/front", 7, 9, &encoded, false);
    dump.versions.clear();
    dump.slots
        .push((SlotKey { rev: 999, slot: 0 }, Backend::default()));
    let back = assemble(dump);
    assert!(back.services.is_empty());
    assert_eq!(back.orphan_keys.len(), encoded.services.len());
    assert_eq!(back.orphan_ranges.len(), encoded.ranges.len());
    assert!(back.orphan_revs.contains(&999));
}

#[test]
fn source_ranges_keep_their_prefix_through_the_lpm_key() {
    for text in [
        "203.0.113.0/24",
        "198.51.100.10/32",
        "2001:db8::/48",
        "0.0.0.0/0",
    ] {
        let net: IpNet = text.parse().unwrap();
        let (prefixlen, data) = range_key(5, &net);
        assert_eq!(range_net(prefixlen, &data), Some(net), "{text}");
    }
}
