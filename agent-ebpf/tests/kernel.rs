//! The eBPF dataplane's maps, pins and links against the machine's kernel: each test in
//! namespaces, a cgroup and a bpffs directory of its own, all removed at the end. Needs
//! root, `ip` (iproute2) and a kernel with cgroup v2 (6.1 or later). Pins, restarts,
//! upgrades and cleanup are tested with TCX and with classic tc filters; the last test
//! reruns the representative ones in user-mode Linux 6.1 (no TCX, no kernel BTF,
//! interpreted BPF).

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use aya::programs::links::{FdLink, PinnedLink};
use common::*;
use switchyard_agent_core::{
    Agent, AgentOptions,
    dataplane::{Dataplane, Desired},
};
use switchyard_agent_ebpf::{
    Features, SnatSource, TcAttachMode, TcMode,
    abi::{self, Meta, SvcKey, SvcValue, VersionKey, VersionValue},
    maps,
    tc::{Hook, Tc},
};
use switchyard_integration::{
    controller::TestController,
    fixtures,
    uml::{self, Guest},
};
use switchyard_proto::{
    state::{LbAlgorithm, Protocol},
    v1::{self, agent_query_client::AgentQueryClient},
};

/// Everything the Services of a dataplane put into the maps, sorted.
#[derive(Debug, PartialEq)]
struct Contents {
    services: Vec<(SvcKey, SvcValue)>,
    slots: Vec<(abi::SlotKey, abi::Backend)>,
    maglev: Vec<abi::MaglevKey>,
    ranges: usize,
    versions: Vec<(String, VersionValue)>,
}

fn contents(lab: &mut Lab) -> Contents {
    let m = lab.dp().maps();
    let mut services = maps::entries(&m.services, "swy_services").unwrap();
    services.sort_by_key(|(k, _)| *k);
    let mut slots = maps::entries(&m.slots, "swy_slots").unwrap();
    slots.sort_by_key(|(k, _)| *k);
    let mut maglev = maps::keys(&m.maglev, "swy_maglev").unwrap();
    maglev.sort();
    let ranges = maps::lpm_keys(&m.ranges, "swy_ranges").unwrap().len();
    let mut versions: Vec<(String, VersionValue)> = maps::entries(&m.versions, "swy_versions")
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.name().unwrap().to_string(), v))
        .collect();
    versions.sort_by(|a, b| a.0.cmp(&b.0));
    Contents {
        services,
        slots,
        maglev,
        ranges,
        versions,
    }
}

/// The shared kitchen sink (every entry kind but Maglev) with Maglev and a port without
/// endpoints.
fn kitchen_sink() -> switchyard_proto::state::ServiceState {
    let mut s = common::kitchen_sink();
    s.ebpf_lb = Some(LbAlgorithm::Maglev);
    s.ports.push(port("gone", Protocol::Tcp, 81, vec![]));
    s
}

fn web(backends: &[u8]) -> switchyard_proto::state::ServiceState {
    lab_service("web", "10.96.0.10", Protocol::Tcp, (80, 8080), backends)
}

fn dns() -> switchyard_proto::state::ServiceState {
    lab_service("dns", "10.96.0.11", Protocol::Udp, (53, 5353), &[3])
}

#[test]
fn every_entry_kind_reads_back_exactly_as_rendered_and_a_second_full_sync_rewrites_nothing() {
    let mut lab = Lab::start_with(1, |c| {
        c.render.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    });
    let mut want = Desired::new();
    put(&mut want, kitchen_sink());
    put(&mut want, web(&[1, 2]));
    lab.apply(&want, &full());

    let back = lab.dp().read_back().unwrap();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        ["default/web", "shop/front"]
    );
    for (name, service) in &want {
        assert_eq!(back[name].version, Some(service.version), "{name}");
        assert_eq!(
            back[name].kernel_objects,
            lab.dp().expected(name, service),
            "{name}: kernel (left) differs from rendered (right)"
        );
    }
    let before = contents(&mut lab);
    assert!(before.services.len() > 30, "{}", before.services.len());
    assert_eq!(before.ranges, 2, "a source range per family");
    lab.apply(&want, &full());
    assert_eq!(
        contents(&mut lab),
        before,
        "a full sync of the same state rewrites nothing"
    );
}

fn restart_reuses_everything(mode: TcAttachMode) {
    let mut lab = Lab::start_with(1, |c| c.tc_attach = mode);
    let mut want = Desired::new();
    put(&mut want, web(&[1]));
    put(&mut want, dns());
    lab.apply(&want, &full());
    let links = attachments(&lab);
    assert_eq!(
        links.len(),
        9 + 2 * 2,
        "socket programs, egress, tc both ways on 2 devices: {links:?}"
    );
    let before = contents(&mut lab);

    lab.dataplane = None; // the agent exits: the pins keep everything in place
    lab.attach();
    assert!(lab.dp().reused_links(), "the same build reuses its links");
    assert_eq!(attachments(&lab), links, "no link was replaced");
    let back = lab.dp().read_back().unwrap();
    for (name, service) in &want {
        assert_eq!(back[name].version, Some(service.version), "{name}");
    }
    lab.apply(&want, &full());
    assert_eq!(
        contents(&mut lab),
        before,
        "nothing rewritten after the restart"
    );
    // A filter deleted by hand (classic tc has no link to hold it) comes back at the
    // next start; the rest stays as it is.
    if lab.dp().features().tc == TcMode::Classic {
        lab.topology
            .node()
            .run(|| {
                let index = nix::net::if_::if_nametoindex("to-client").unwrap();
                Tc::open()
                    .unwrap()
                    .detach(index, "to-client", Hook::Ingress)
                    .unwrap()
            })
            .unwrap();
        assert_eq!(attachments(&lab).len(), links.len() - 1);
        lab.dataplane = None;
        lab.attach();
        assert!(!lab.dp().reused_links());
        let again = attachments(&lab);
        assert_eq!(again.len(), links.len());
        assert_eq!(
            again.iter().filter(|a| !links.contains(a)).count(),
            1,
            "only the deleted filter is new: {again:?}"
        );
    }
}

#[test]
fn a_restarted_dataplane_reuses_the_pinned_maps_and_links_and_rewrites_nothing() {
    restart_reuses_everything(TcAttachMode::Auto);
}

#[test]
fn a_restarted_dataplane_reuses_its_classic_tc_filters_and_rewrites_nothing() {
    restart_reuses_everything(TcAttachMode::Classic);
}

fn another_build_takes_over(mode: TcAttachMode) {
    let mut lab = Lab::start_with(1, |c| c.tc_attach = mode);
    let mut want = Desired::new();
    put(&mut want, web(&[1]));
    lab.apply(&want, &full());
    let old = attachments(&lab);
    // Pretend the pinned links run another build.
    lab.dp()
        .maps()
        .meta
        .set(
            0,
            Meta {
                object_hash: 1,
                cgroup_id: 1,
            },
            0,
        )
        .unwrap();
    lab.dataplane = None;
    lab.attach();
    assert!(!lab.dp().reused_links());
    let new = attachments(&lab);
    assert_eq!(new.len(), old.len());
    assert!(old.is_disjoint(&new), "every link replaced");
    assert!(new.iter().all(Attachment::live));
    wait_until_released(
        &old,
        "the old links (and programs) are gone once their pins are",
    );
    let back = lab.dp().read_back().unwrap();
    assert_eq!(
        back["default/web"].version,
        Some(want["default/web"].version)
    );
}

#[test]
fn another_build_takes_over_the_links_and_the_old_ones_are_released() {
    another_build_takes_over(TcAttachMode::Auto);
}

#[test]
fn another_build_replaces_the_programs_of_classic_tc_filters_and_the_old_ones_are_released() {
    another_build_takes_over(TcAttachMode::Classic);
}

#[test]
fn a_node_switched_between_tcx_and_classic_tc_keeps_one_attachment_per_hook() {
    let mut lab = Lab::start_with(1, |c| c.tc_attach = TcAttachMode::Tcx);
    let mut want = Desired::new();
    put(&mut want, web(&[1]));
    lab.apply(&want, &full());
    let tc_pins = |lab: &Lab| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(lab.pins.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("-tc-"))
            .collect();
        names.sort();
        names
    };
    assert!(tc_pins(&lab).iter().all(|n| n.starts_with("link-tc-")));
    for (mode, prefix) in [
        (TcAttachMode::Classic, "prog-tc-"),
        (TcAttachMode::Tcx, "link-tc-"),
    ] {
        let before = attachments(&lab);
        lab.config.tc_attach = mode;
        lab.dataplane = None;
        lab.attach();
        let pins = tc_pins(&lab);
        assert_eq!(pins.len(), 4, "{pins:?}");
        assert!(pins.iter().all(|n| n.starts_with(prefix)), "{pins:?}");
        let after = attachments(&lab);
        assert_eq!(after.len(), 9 + 4, "{after:?}");
        let gone: BTreeSet<Attachment> = before.difference(&after).cloned().collect();
        assert_eq!(
            gone.len(),
            4,
            "the other mode's tc attachments went: {gone:?}"
        );
        wait_until_released(&gone, "the other mode's attachments are released");
    }
}

/// One attachment of the lab's programs: a pinned link (by id), or a classic tc filter
/// (by device, hook and the id of the program it runs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Attachment {
    Link(u32),
    Filter(String, &'static str, u32),
}

impl Attachment {
    fn live(&self) -> bool {
        match self {
            Attachment::Link(id) => aya::programs::loaded_links()
                .filter_map(Result::ok)
                .any(|l| l.id() == *id),
            Attachment::Filter(_, _, id) => aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .any(|p| p.id() == *id),
        }
    }
}

/// Every link pinned in the lab's pin directory and every classic tc filter of the
/// agent on the lab's devices.
fn attachments(lab: &Lab) -> BTreeSet<Attachment> {
    let mut out: BTreeSet<Attachment> = std::fs::read_dir(lab.pins.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link-"))
        .map(|e| {
            let link: FdLink = PinnedLink::from_pin(e.path()).unwrap().into();
            Attachment::Link(link.info().unwrap().id())
        })
        .collect();
    out.extend(filters(lab));
    out
}

/// The agent's classic tc filters on the lab's devices.
fn filters(lab: &Lab) -> Vec<Attachment> {
    let devices = lab.config.attach.devices.clone();
    lab.topology
        .node()
        .run(move || {
            let mut tc = Tc::open().unwrap();
            let mut found = Vec::new();
            for device in devices {
                let index = nix::net::if_::if_nametoindex(device.as_str()).unwrap();
                for hook in [Hook::Ingress, Hook::Egress] {
                    if let Some(f) = tc.filter(index, &device, hook).unwrap() {
                        found.push(Attachment::Filter(device.clone(), hook.name(), f.prog_id));
                    }
                }
            }
            found
        })
        .unwrap()
}

/// Waits (a classic filter frees its old program after an RCU grace period) until
/// none of `gone` is in the kernel any more.
fn wait_until_released(gone: &BTreeSet<Attachment>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gone.iter().any(Attachment::live) {
        assert!(Instant::now() < deadline, "{what}: {gone:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn partial_syncs_touch_only_the_named_services_and_removals_leave_nothing_behind() {
    let mut lab = Lab::start(1);
    let mut want = Desired::new();
    put(&mut want, web(&[1, 2]));
    put(&mut want, dns());
    lab.apply(&want, &full());
    let dns_before: Vec<_> = contents(&mut lab)
        .services
        .into_iter()
        .filter(|(k, _)| abi::host_port(k.port) == 53)
        .collect();

    put(&mut want, web(&[2, 3]));
    lab.apply(&want, &upsert(&["default/web"]));
    let after = contents(&mut lab);
    let dns_after: Vec<_> = after
        .services
        .iter()
        .filter(|(k, _)| abi::host_port(k.port) == 53)
        .copied()
        .collect();
    assert_eq!(dns_after, dns_before, "dns untouched");
    assert_eq!(after.slots.len(), 2 + 1, "the old range of web is gone");
    let back = lab.dp().read_back().unwrap();
    assert_eq!(
        back["default/web"].kernel_objects,
        lab.dp().expected("default/web", &want["default/web"])
    );

    want.remove("default/web");
    lab.apply(&want, &remove(&["default/web"]));
    let left = contents(&mut lab);
    assert!(
        left.services
            .iter()
            .all(|(k, _)| abi::host_port(k.port) == 53)
    );
    assert_eq!(left.slots.len(), 1);
    assert_eq!(left.versions.len(), 1);
    assert_eq!(left.versions[0].0, "default/dns");
}

#[test]
fn a_service_caught_mid_write_reads_back_without_a_version_and_leftovers_go_at_the_next_full_sync()
{
    let mut lab = Lab::start(1);
    let mut want = Desired::new();
    put(&mut want, web(&[1]));
    lab.apply(&want, &full());
    // An apply of web stopped midway: the dirty flag is still set.
    let key = VersionKey::of("default/web").unwrap();
    let m = lab.dp().maps();
    let mut value = m.versions.get(&key, 0).unwrap();
    value.flags |= abi::VERSION_F_DIRTY;
    maps::insert(&mut m.versions, "swy_versions", &key, &value).unwrap();
    // And an entry of a Service whose write never recorded it.
    let mut stray = maps::entries(&m.services, "swy_services").unwrap()[0];
    stray.0.port = abi::port(9999);
    stray.1.res_id = 12345;
    maps::insert(&mut m.services, "swy_services", &stray.0, &stray.1).unwrap();

    let back = lab.dp().read_back().unwrap();
    assert_eq!(
        back["default/web"].version, None,
        "a dirty Service has no version"
    );
    assert_eq!(back.len(), 1, "the stray entry belongs to no Service");
    lab.apply(&want, &full());
    let back = lab.dp().read_back().unwrap();
    assert_eq!(
        back["default/web"].version,
        Some(want["default/web"].version)
    );
    let m = lab.dp().maps();
    assert!(
        m.services.get(&stray.0, 0).is_err(),
        "the full sync removed what no Service claims"
    );
}

fn cleanup_detaches_everything(mode: TcAttachMode) {
    let mut lab = Lab::start_with(1, |c| c.tc_attach = mode);
    let mut want = Desired::new();
    put(&mut want, web(&[1]));
    lab.apply(&want, &full());
    let links = attachments(&lab);
    assert_eq!(links.len(), 9 + 4);
    // Cleanup runs where the agent runs: in the node's network namespace.
    let mut dp = lab.dataplane.take().unwrap();
    lab.topology.node().run(|| dp.cleanup().unwrap()).unwrap();
    assert!(!lab.pins.path().exists(), "the pin directory is gone");
    assert_eq!(filters(&lab), [], "no filter of the agent's is left");
    wait_until_released(&links, "every link detached, every program released");
}

#[test]
fn cleanup_detaches_every_program_and_removes_the_pins() {
    cleanup_detaches_everything(TcAttachMode::Auto);
}

#[test]
fn cleanup_deletes_the_classic_tc_filters_and_removes_the_pins() {
    cleanup_detaches_everything(TcAttachMode::Classic);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_agent_state_shows_the_map_entries_and_a_hand_deleted_entry_comes_back() {
    let controller = TestController::start().await.unwrap();
    controller.replace("test", fixtures::cluster(1, 3, 2)).await;
    let mut lab = Lab::start(1);
    let dataplane = lab.dataplane.take().unwrap();
    let state = tempfile::tempdir().unwrap();
    let listener = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let agent = Agent::start(
        AgentOptions {
            controller: controller.endpoint(),
            tls: Default::default(),
            node_name: "node-0000".into(),
            state_dir: state.path().to_path_buf(),
            drift_interval: Duration::from_millis(500),
            full_sync_period: Duration::ZERO,
            agent_version: "test".into(),
            policy: None,
        },
        dataplane,
        listener().await.unwrap(),
        listener().await.unwrap(),
    )
    .await
    .unwrap();
    let mut query = AgentQueryClient::connect(format!("http://{}", agent.query_addr()))
        .await
        .unwrap();
    let get = async |query: &mut AgentQueryClient<tonic::transport::Channel>| {
        query
            .get_agent_state(v1::GetAgentStateRequest {
                include_kernel_objects: true,
            })
            .await
            .unwrap()
            .into_inner()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let state = loop {
        let state = get(&mut query).await;
        if state.effective.len() == 3 && state.drift.is_empty() {
            break state;
        }
        assert!(tokio::time::Instant::now() < deadline, "{state:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(state.dataplane, v1::Dataplane::Ebpf as i32);
    let svc0 = state
        .effective
        .iter()
        .find(|s| s.name == "default/svc-00000")
        .unwrap();
    assert!(
        svc0.kernel_objects
            .iter()
            .any(|o| o.starts_with("sock tcp 10.0.0.0:80 forward random [")),
        "{:#?}",
        svc0.kernel_objects
    );

    // Someone deletes the socket entry of svc-00000 by hand.
    let pins = lab.pins.path().to_path_buf();
    let mut services: aya::maps::HashMap<_, SvcKey, SvcValue> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(pins.join("swy_services")).unwrap()),
    )
    .unwrap();
    let key = SvcKey {
        addr: abi::addr("10.0.0.0".parse().unwrap()),
        port: abi::port(80),
        proto: 6,
        scope: abi::SCOPE_SOCK,
    };
    services.remove(&key).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while services.get(&key, 0).is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted entry never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = get(&mut query).await;
    assert!(state.drift_repairs >= 1, "{state:#?}");
    drop(agent);
}

/// Which paths the dataplane takes on this kernel with these flags.
fn features(tc_attach: TcAttachMode, snat_source: SnatSource) -> Features {
    let lab = Lab::start_with(1, |c| {
        c.tc_attach = tc_attach;
        c.snat_source = snat_source;
    });
    lab.dataplane.as_ref().unwrap().features()
}

#[test]
fn the_paths_taken_follow_the_kernel_and_the_flags() {
    use aya::util::KernelVersion;
    let version = KernelVersion::current().unwrap();
    if version >= KernelVersion::new(6, 7, 0) {
        assert_eq!(
            features(TcAttachMode::Auto, SnatSource::Auto),
            Features {
                tc: TcMode::Tcx,
                fib_src: true
            },
            "kernel {version:?}"
        );
    }
    assert_eq!(
        features(TcAttachMode::Classic, SnatSource::Devices),
        Features {
            tc: TcMode::Classic,
            fib_src: false
        }
    );
}

/// The representative tests above in user-mode Linux 6.1 (Debian's `linux.uml`: no
/// TCX, no kernel BTF, BPF interpreted), in two guests that run side by side: what the
/// kernel offers and the read-back here, the lifecycle of the attachments in the next.
#[test]
fn in_user_mode_linux_6_1_the_classic_path_is_taken_and_entries_read_back() {
    uml::always_in_guest(Guest::new().timeout(Duration::from_secs(600)), || {
        // Debian's 6.1.176 has BPF_FIB_LOOKUP_SRC by backport (and no TCX).
        assert_eq!(
            features(TcAttachMode::Auto, SnatSource::Auto),
            Features {
                tc: TcMode::Classic,
                fib_src: true
            }
        );
        every_entry_kind_reads_back_exactly_as_rendered_and_a_second_full_sync_rewrites_nothing();
    });
}

#[test]
fn in_user_mode_linux_6_1_restarts_reuse_upgrades_replace_and_cleanup_removes_the_filters() {
    uml::always_in_guest(Guest::new().timeout(Duration::from_secs(600)), || {
        restart_reuses_everything(TcAttachMode::Auto);
        another_build_takes_over(TcAttachMode::Auto);
        cleanup_detaches_everything(TcAttachMode::Auto);
    });
}
