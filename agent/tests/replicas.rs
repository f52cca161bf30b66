//! Controller replicas with the real agent and real packets (issue 10): three replicas
//! coordinated through a real etcd (Debian's `etcd-server` on loopback), the
//! `switchyard-agent` binary (`--dataplane iptables`) in the node namespace listing every
//! replica (`--controller a,b,c,d`, shuffled by the agent), and a TCP connection loop
//! from a pod through a ClusterIP to the backends.
//!
//! The replica serving the node crashes under the loop: no connection fails (the agent
//! is fail-static: its rules stay while it moves), the agent is on a survivor within
//! seconds, the survivor resends nothing, every survivor lists the node on it, and a
//! change on disk still reaches the kernel. Then a replica joins on an address the agent
//! listed from the start (dead until then) and, once every other replica has crashed,
//! serves the agent in turn, again without a failed connection or a resend.
//!
//! The replicas run in this process (`switchyard_integration::e2e::Replicas`); crashing
//! one drops it: its streams break and its lease is left to expire.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use switchyard_integration::{
    e2e::{AgentSpec, Cluster, Layout, NODE, PATIENCE, Replicas, set},
    etcd::Etcd,
    netns::LoopStats,
    queries,
};
use switchyard_proto::v1;

/// The replicas' lease: how long a crashed replica stays registered.
const LEASE: Duration = Duration::from_secs(3);
/// How soon the agent must stream from another replica after the one serving it crashed.
const FAILOVER: Duration = Duration::from_secs(5);

fn agent() -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent")).args([
        "--dataplane",
        "iptables",
        "--disable-ipv6",
    ])
}

/// switchyard's chains and rules in the node namespace, as `iptables-save` prints them
/// (no counters): what the agent programmed.
fn swy_rules(cluster: &Cluster) -> Vec<String> {
    let save = cluster.node().exec(["iptables-save"]).unwrap();
    save.lines()
        .filter(|l| l.contains("SWY-"))
        .map(str::to_owned)
        .collect()
}

/// Why `status` (the node as one replica lists it) is not "connected, in sync, served by
/// `serving`", or `None` if it is.
fn not_agreed(status: &Option<v1::NodeStatus>, serving: &str) -> Option<String> {
    let Some(status) = status else {
        return Some("not listed".into());
    };
    queries::not_served_in_sync(status, serving)
}

/// Waits until every live replica lists the node connected, in sync, on `serving`.
async fn every_replica_lists_the_node_on(cluster: &Cluster, serving: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let disagreeing: Vec<String> = cluster
            .replicas()
            .iter()
            .filter_map(|replica| {
                let listed = cluster.listed_node(replica);
                let why = match &listed {
                    Ok(status) => not_agreed(status, serving),
                    Err(error) => Some(format!("ListNodes failed: {error}")),
                };
                why.map(|why| format!("{}: {why}", replica.name))
            })
            .collect();
        if disagreeing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas never agreed that {serving} serves the node: {disagreeing:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The replica serving the node now, and its stream's id there.
fn serving(cluster: &Cluster) -> Option<(String, u64)> {
    let replica = cluster.serving_replica()?;
    let session = replica.controller.sessions.get(NODE)?;
    Some((replica.name.clone(), session.id))
}

/// Waits (polling every 10 ms) until a replica serves the node; its name and how long
/// that took from `since`.
async fn on_a_replica_after(cluster: &Cluster, since: Instant) -> (String, Duration) {
    loop {
        if let Some((name, _)) = serving(cluster) {
            return (name, since.elapsed());
        }
        assert!(
            since.elapsed() < PATIENCE,
            "the agent streams from no replica {PATIENCE:?} after the crash"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The agent itself says it streams from `replica`'s address.
async fn agent_reports_it_is_on(cluster: &Cluster, replica: &str) {
    let endpoint = cluster.replica(replica).unwrap().endpoint();
    cluster
        .eventually(
            &format!("the agent reporting a stream up to {replica}"),
            |c| {
                c.agent_state(false)
                    .is_ok_and(|s| s.connected && s.controller == endpoint)
            },
        )
        .await;
}

/// Every replica lists the node with nothing sent on its current stream.
fn assert_nothing_resent(cluster: &Cluster, serving: &str) {
    for replica in cluster.replicas() {
        let status = cluster
            .listed_node(replica)
            .unwrap()
            .unwrap_or_else(|| panic!("{} does not list the node", replica.name));
        assert_eq!(status.replica, serving, "{}: {status:?}", replica.name);
        assert_eq!(
            (status.resources_sent, status.removals_sent),
            (0, 0),
            "{}: {serving} resent something unchanged: {status:?}",
            replica.name
        );
    }
}

/// Every request of the loop answered by a backend: none failed, none unaccounted for.
fn assert_no_failed_connection(stats: &LoopStats, backends: usize) {
    assert_eq!(stats.failed, 0, "failed connections: {:?}", stats.failures);
    assert_eq!(
        stats.attempts, stats.succeeded,
        "every attempt answered: {stats:?}"
    );
    assert!(stats.succeeded > 100, "{stats:?}");
    assert_eq!(stats.by_backend.len(), backends, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_serving_the_node_crashes_under_traffic_and_no_connection_fails() {
    let etcd = Etcd::start().expect("etcd (Debian package etcd-server)");
    let replicas = Replicas {
        lease: LEASE,
        ..Replicas::new(etcd.endpoint(), &["r0", "r1", "r2"]).spare(1)
    };
    let mut cluster = Cluster::start_with(
        agent(),
        Layout {
            replicas: Some(replicas),
            ..Layout::example()
        },
    )
    .await;
    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();

    // The agent is on one of the three, and all three say so.
    let (first, _) = on_a_replica_after(&cluster, Instant::now()).await;
    every_replica_lists_the_node_on(&cluster, &first).await;
    agent_reports_it_is_on(&cluster, &first).await;
    let rules = swy_rules(&cluster);
    assert!(rules.len() > 5, "the agent programmed iptables: {rules:?}");

    // The replica serving the node crashes under traffic.
    let traffic = cluster
        .pod()
        .connection_loop(target, Duration::from_millis(20))
        .unwrap();
    assert!(traffic.wait_for_successes(10, PATIENCE));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let crashed_at = Instant::now();
    cluster.crash_replica(&first);
    let (survivor, took) = on_a_replica_after(&cluster, crashed_at).await;
    eprintln!("{first} crashed: the agent streamed from {survivor} {took:?} later");
    assert_ne!(survivor, first);
    assert!(
        took < FAILOVER,
        "the agent took {took:?} to reach a survivor"
    );
    let (_, stream) = serving(&cluster).unwrap();
    agent_reports_it_is_on(&cluster, &survivor).await;

    // Every survivor lists the node on the survivor, in sync, nothing resent; the
    // kernel holds the same rules.
    every_replica_lists_the_node_on(&cluster, &survivor).await;
    assert_nothing_resent(&cluster, &survivor);
    assert_eq!(swy_rules(&cluster), rules, "the agent rewrote nothing");

    // Past the crashed replica's lease the agent stays where it is.
    tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
    assert_eq!(
        serving(&cluster),
        Some((survivor.clone(), stream)),
        "one move, no more"
    );
    assert_nothing_resent(&cluster, &survivor);
    let stats = traffic.stop();
    eprintln!("under the crash: {stats:?}");
    assert_no_failed_connection(&stats, 3);

    // A change on disk reaches the kernel through the survivor.
    cluster.set_web_endpoints(&[2, 3]);
    cluster
        .eventually("backend-1 out of web, through the survivor", |c| {
            c.spread(c.pod(), "10.96.0.10", 80, 20, false).0 == set(&["backend-2", "backend-3"])
        })
        .await;
    every_replica_lists_the_node_on(&cluster, &survivor).await;
    let status = cluster
        .listed_node(cluster.replica(&survivor).unwrap())
        .unwrap()
        .unwrap();
    assert!(
        status.resources_sent > 0,
        "{survivor} sent the change: {status:?}"
    );

    // r3 joins on the address the agent has listed from the start; nothing moves or
    // fails. Then every other replica crashes and the agent resumes on r3.
    let traffic = cluster
        .pod()
        .connection_loop(target, Duration::from_millis(20))
        .unwrap();
    assert!(traffic.wait_for_successes(10, PATIENCE));
    let rules = swy_rules(&cluster);
    cluster.join_replica("r3").await;
    every_replica_lists_the_node_on(&cluster, &survivor).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, stream) = serving(&cluster).unwrap();
    assert_eq!(
        serving(&cluster),
        Some((survivor.clone(), stream)),
        "a join moves no stream"
    );
    let others: Vec<String> = cluster
        .replicas()
        .iter()
        .map(|r| r.name.clone())
        .filter(|name| name != "r3")
        .collect();
    let crashed_at = Instant::now();
    for name in &others {
        cluster.crash_replica(name);
    }
    let (last, took) = on_a_replica_after(&cluster, crashed_at).await;
    eprintln!("{others:?} crashed: the agent streamed from {last} {took:?} later");
    assert_eq!(last, "r3");
    assert!(took < FAILOVER, "the agent took {took:?} to reach r3");
    agent_reports_it_is_on(&cluster, "r3").await;
    every_replica_lists_the_node_on(&cluster, "r3").await;
    assert_nothing_resent(&cluster, "r3");
    assert_eq!(swy_rules(&cluster), rules, "the agent rewrote nothing");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = traffic.stop();
    eprintln!("under the join and the second crash: {stats:?}");
    assert_no_failed_connection(&stats, 2);

    // And r3 carries changes to the kernel.
    cluster.set_web_endpoints(&[1, 2, 3]);
    cluster
        .eventually("backend-1 back in web, through r3", |c| {
            c.spread(c.pod(), "10.96.0.10", 80, 30, false).0
                == set(&["backend-1", "backend-2", "backend-3"])
        })
        .await;
}
