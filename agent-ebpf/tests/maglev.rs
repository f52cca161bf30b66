//! Maglev in the kernel: the tc program's own choice for a large set of synthetic flows,
//! measured with `BPF_PROG_TEST_RUN` on the attached dataplane's maps, before and after
//! one of N backends goes. Needs root and a kernel 6.1 or later.

mod common;

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use common::*;
use switchyard_agent_core::dataplane::Desired;
use switchyard_agent_ebpf::loader;
use switchyard_proto::state::{LbAlgorithm, Protocol, ServiceState};

const BACKENDS: usize = 10;
const FLOWS: u32 = 20_000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

fn hashed(algorithm: LbAlgorithm, backends: &[usize]) -> ServiceState {
    let mut s = service(
        "default/hashed",
        &[&VIP.to_string()],
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            backends
                .iter()
                .map(|i| ep(&format!("10.250.0.{i}"), 8080, false))
                .collect(),
        )],
    );
    s.ebpf_lb = Some(algorithm);
    s
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP SYN from `src:sport` to the VIP's port 80.
fn syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&VIP.octets());
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    p
}

/// The backend (last octet of the new destination) the ingress program picks for each
/// synthetic flow.
fn choices(program: &SchedClassifier) -> BTreeMap<u32, u8> {
    let mut out = BTreeMap::new();
    let mut data_out = vec![0u8; 256];
    for flow in 0..FLOWS {
        let src = Ipv4Addr::new(172, 16, (flow >> 8) as u8, flow as u8);
        let packet = syn(src, 10_000 + (flow % 50_000) as u16);
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                data_out: Some(&mut data_out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert!(result.data_size_out as usize >= 54);
        let dst = Ipv4Addr::new(data_out[30], data_out[31], data_out[32], data_out[33]);
        assert_eq!(
            &dst.octets()[..3],
            &[10, 250, 0],
            "flow {flow} went to {dst}"
        );
        out.insert(flow, dst.octets()[3]);
    }
    out
}

/// Fraction of flows whose backend changed, and whether every flow of the removed
/// backend moved.
fn moved(before: &BTreeMap<u32, u8>, after: &BTreeMap<u32, u8>, removed: u8) -> f64 {
    let mut changed = 0;
    for (flow, b) in before {
        if after[flow] != *b {
            changed += 1;
        }
        assert_ne!(
            after[flow], removed,
            "a flow still goes to the removed backend"
        );
    }
    f64::from(changed) / before.len() as f64
}

/// Runs the flows against `algorithm` with N backends, then N - 1; returns the fraction
/// of flows that moved.
fn remap(algorithm: LbAlgorithm) -> f64 {
    let mut lab = Lab::start(1);
    let all: Vec<usize> = (1..=BACKENDS).collect();
    let mut want = Desired::new();
    put(&mut want, hashed(algorithm, &all));
    lab.apply(&want, &full());
    let pins = lab.pins.path().to_path_buf();
    // The same object over the pinned maps; only the ingress program is loaded.
    let mut ebpf = lab
        .topology
        .node()
        .run(move || {
            aya::EbpfLoader::new()
                .default_map_pin_directory(&pins)
                .load(loader::OBJECT)
        })
        .unwrap()
        .unwrap();
    let program: &mut SchedClassifier = ebpf
        .program_mut("swy_tc_ingress")
        .unwrap()
        .try_into()
        .unwrap();
    program.load().unwrap();
    let node = lab.topology.node();
    let before = node.run(|| choices(program)).unwrap();
    let mut per_backend = BTreeMap::<u8, u32>::new();
    for b in before.values() {
        *per_backend.entry(*b).or_default() += 1;
    }
    assert_eq!(per_backend.len(), BACKENDS, "{per_backend:?}");

    let removed = 5u8;
    let rest: Vec<usize> = all
        .into_iter()
        .filter(|i| *i != usize::from(removed))
        .collect();
    put(&mut want, hashed(algorithm, &rest));
    lab.apply(&want, &upsert(&["default/hashed"]));
    let after = lab.topology.node().run(|| choices(program)).unwrap();
    let fraction = moved(&before, &after, removed);
    eprintln!(
        "{algorithm:?}: removing 1 of {BACKENDS} backends moved {:.2}% of {FLOWS} flows (spread {per_backend:?})",
        100.0 * fraction
    );
    fraction
}

#[test]
fn removing_one_of_n_backends_moves_about_one_nth_of_the_flows_in_the_kernel_with_maglev() {
    let fraction = remap(LbAlgorithm::Maglev);
    let own = 1.0 / BACKENDS as f64;
    assert!(fraction >= own * 0.9, "{fraction}");
    assert!(
        fraction <= own * 1.2,
        "moved {fraction}, its own share is {own}"
    );
}

#[test]
fn random_choice_moves_most_flows_for_contrast() {
    let fraction = remap(LbAlgorithm::Random);
    assert!(fraction > 0.5, "{fraction}");
}
