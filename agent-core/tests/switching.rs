//! Live dataplane switching through the runtime, against the real controller, with
//! in-memory dataplanes standing in for the kernel's (each kind its own "kernel"): the
//! Node label moves the node, a switch that fails leaves the old dataplane in force and
//! is tried again, and a changed flag moves a restarted agent. The real kernels' switches
//! are tested with real packets in `switchyard-agent`'s tests.

use std::{collections::BTreeMap, time::Duration};

use switchyard_agent_core::{
    Agent,
    dataplane::{Dataplane, DataplaneError},
    state::DataplaneKind,
    switch::{DataplanePolicy, DataplaneRecord, Switchable},
    testing::{MemoryDataplane, MemoryKernel, start_agent},
};
use switchyard_controller::model::{Node, Object};
use switchyard_integration::{controller::TestController, fixtures};
use switchyard_proto::v1;

const WAIT: Duration = Duration::from_secs(20);
const NODE: &str = "node-0000";

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One in-memory "kernel" per dataplane kind.
#[derive(Clone, Default)]
struct Kernels(BTreeMap<DataplaneKind, MemoryKernel>);

impl Kernels {
    fn new() -> Self {
        Self(
            DataplaneKind::ALL
                .into_iter()
                .map(|k| (k, MemoryKernel::default()))
                .collect(),
        )
    }

    fn of(&self, kind: DataplaneKind) -> &MemoryKernel {
        &self.0[&kind]
    }

    /// How many Services each kind's kernel holds.
    fn counts(&self) -> BTreeMap<DataplaneKind, usize> {
        self.0
            .iter()
            .map(|(k, m)| (*k, m.versions().len()))
            .collect()
    }

    fn switchable(&self, initial: DataplaneKind) -> Switchable {
        let kernels = self.clone();
        Switchable::new(
            initial,
            Box::new(move |kind| {
                Ok(Box::new(MemoryDataplane::of_kind(
                    kernels.of(kind).clone(),
                    kind.to_wire(),
                )) as Box<dyn Dataplane>)
            }),
        )
        .unwrap()
    }
}

fn labelled(objects: &[Object], label: Option<DataplaneKind>) -> Vec<Object> {
    objects
        .iter()
        .map(|o| match o {
            Object::Node(n) if n.name == NODE => Object::Node(Node {
                dataplane: label,
                ..n.clone()
            }),
            other => other.clone(),
        })
        .collect()
}

fn in_force(controller: &TestController) -> Option<v1::Dataplane> {
    controller
        .sessions
        .get(NODE)
        .map(|s| s.dataplanes().in_force)
}

struct Running {
    controller: TestController,
    objects: Vec<Object>,
    kernels: Kernels,
    dir: tempfile::TempDir,
    agent: Agent<Switchable>,
}

async fn running(policy: DataplanePolicy, label: Option<DataplaneKind>) -> Running {
    let controller = TestController::start().await.unwrap();
    let objects = fixtures::cluster(1, 20, 2);
    controller.replace("test", labelled(&objects, label)).await;
    let kernels = Kernels::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        controller.endpoint(),
        NODE,
        kernels.switchable(DataplaneKind::Iptables),
        Some(policy),
        dir.path(),
    )
    .await;
    Running {
        controller,
        objects,
        kernels,
        dir,
        agent,
    }
}

#[tokio::test]
async fn the_node_label_moves_the_node_between_dataplanes_and_the_controller_sees_it() {
    let r = running(DataplanePolicy::FollowLabel, None).await;
    let all = |kind| {
        let mut counts: BTreeMap<DataplaneKind, usize> =
            DataplaneKind::ALL.into_iter().map(|k| (k, 0)).collect();
        counts.insert(kind, 20);
        counts
    };
    eventually("iptables holds everything (no label)", || {
        r.kernels.counts() == all(DataplaneKind::Iptables)
    })
    .await;

    for kind in [
        DataplaneKind::Ipvs,
        DataplaneKind::Ebpf,
        DataplaneKind::Iptables,
    ] {
        r.controller
            .replace("test", labelled(&r.objects, Some(kind)))
            .await;
        eventually(
            &format!("{kind} holds everything, the old one nothing"),
            || r.kernels.counts() == all(kind),
        )
        .await;
        eventually("the controller sees the dataplane in force", || {
            in_force(&r.controller) == Some(kind.to_wire())
        })
        .await;
        let session = r.controller.sessions.get(NODE).unwrap();
        assert_eq!(session.dataplanes().wanted, kind.to_wire());
        assert_eq!(
            DataplaneRecord::load(r.dir.path()).in_force,
            Some(kind),
            "recorded for a restart"
        );
    }
    assert!(
        r.agent
            .metrics_text()
            .contains("switchyard_dataplane_switches_total{to=\"ipvs\",result=\"switched\"} 1")
    );
}

#[tokio::test]
async fn a_switch_that_fails_leaves_the_old_dataplane_whole_and_is_tried_again() {
    let r = running(DataplanePolicy::FollowLabel, None).await;
    eventually("iptables holds everything", || {
        r.kernels.of(DataplaneKind::Iptables).versions().len() == 20
    })
    .await;
    // The eBPF "kernel" refuses one Service: the switch must not happen.
    r.kernels
        .of(DataplaneKind::Ebpf)
        .lock()
        .fail_resources
        .insert("default/svc-00003".into(), "refused".into());
    r.controller
        .replace("test", labelled(&r.objects, Some(DataplaneKind::Ebpf)))
        .await;
    eventually("the failed switch is counted", || {
        r.agent
            .metrics_text()
            .contains("switchyard_dataplane_switches_total{to=\"ebpf\",result=\"failed\"}")
    })
    .await;
    assert_eq!(r.kernels.of(DataplaneKind::Iptables).versions().len(), 20);
    assert_eq!(
        r.kernels.of(DataplaneKind::Ebpf).versions().len(),
        0,
        "what the refused dataplane wrote is removed"
    );
    assert_eq!(in_force(&r.controller), Some(v1::Dataplane::Iptables));

    // Fixed: the next drift check tries again, and the node moves.
    r.kernels
        .of(DataplaneKind::Ebpf)
        .lock()
        .fail_resources
        .clear();
    r.agent.repair_drift().await.unwrap();
    r.agent.reconcile_dataplane().await.unwrap();
    eventually("eBPF holds everything", || {
        r.kernels.of(DataplaneKind::Ebpf).versions().len() == 20
            && r.kernels.of(DataplaneKind::Iptables).versions().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_changed_flag_moves_a_restarted_agent_and_an_unchanged_restart_moves_nothing() {
    let r = running(DataplanePolicy::Fixed(DataplaneKind::Iptables), None).await;
    eventually("iptables holds everything", || {
        r.kernels.of(DataplaneKind::Iptables).versions().len() == 20
    })
    .await;
    let Running {
        controller,
        kernels,
        dir,
        agent,
        ..
    } = r;
    drop(agent);

    // Restarted with the same flag: resumes, writes nothing. The dropped agent's last
    // apply may still be finishing on a blocking thread: count once the count settles.
    let mut applies = kernels.of(DataplaneKind::Iptables).apply_count();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = kernels.of(DataplaneKind::Iptables).apply_count();
        if now == applies {
            break;
        }
        applies = now;
    }
    let agent = start_agent(
        controller.endpoint(),
        NODE,
        kernels.switchable(DataplaneKind::Iptables),
        Some(DataplanePolicy::Fixed(DataplaneKind::Iptables)),
        dir.path(),
    )
    .await;
    eventually("connected", || agent.connected()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kernels.of(DataplaneKind::Iptables).apply_count(), applies);
    drop(agent);

    // Restarted with --dataplane ipvs: the kernel's iptables state moves to IPVS.
    let agent = start_agent(
        controller.endpoint(),
        NODE,
        kernels.switchable(DataplaneKind::Iptables),
        Some(DataplanePolicy::Fixed(DataplaneKind::Ipvs)),
        dir.path(),
    )
    .await;
    eventually("IPVS holds everything, iptables nothing", || {
        kernels.of(DataplaneKind::Ipvs).versions().len() == 20
            && kernels.of(DataplaneKind::Iptables).versions().is_empty()
    })
    .await;
    eventually("the controller sees IPVS", || {
        in_force(&controller) == Some(v1::Dataplane::Ipvs)
    })
    .await;
    assert_eq!(agent.dataplane(), v1::Dataplane::Ipvs);
}

#[test]
fn a_dataplane_that_cannot_switch_says_so() {
    let mut plain = MemoryDataplane::new(MemoryKernel::default());
    let switched: Result<bool, DataplaneError> =
        plain.switch_to(DataplaneKind::Ebpf, &Default::default());
    assert!(!switched.unwrap());
}
