//! Controller replicas coordinated through etcd (`--etcd-endpoints`): every replica
//! watches the API and serves any node; etcd holds only coordination.
//!
//! # Keys (under `--etcd-prefix`, default `/switchyard`)
//! - `replicas/<replica>` → the address agents reach it at, under the replica's lease:
//!   membership, for balancing.
//! - `sessions/<node>` → a [`v1::RegisteredSession`] written by the replica serving that
//!   node's agent, under its lease: `ListNodes` and `GetNodeState` on any replica show
//!   every node with its replica, and a dead replica's records expire with its lease. A
//!   closed stream's record is deleted only while it is still this replica's (a
//!   transaction comparing the key's lease), so a node that moved on keeps its new one.
//! - `loads/<replica>` → how many streams the replica serves (decimal), under its lease,
//!   rewritten at a publish when it changed: balancing counts each replica by it.
//! - `leader/…` → etcd's election ([`run`] campaigns with the lease). The leader holds a
//!   [`Fence`]: its key's creation revision; an action taken as leader first checks, in
//!   a transaction, that the key still exists with that revision, so a leader paused past
//!   its lease (another has been elected since) cannot act.
//!
//! # Losing etcd
//! Streams and queries go on: the registry stays as last read, marked possibly stale in
//! every answer built from it, and this replica's own sessions are answered live.
//! [`run`] reconnects with backoff, takes a new lease and writes everything again.
//!
//! # Even load
//! With `total` streams served over `replicas` live replicas, a replica holding
//! more than `ceil(total / replicas) + 1` streams sheds the excess, at most
//! [`SHED_PER_ROUND`] per [`BALANCE_EVERY`], youngest streams first, with the status
//! that sends the agent to another controller of its list ([`to_shed`]). The slack of
//! one keeps two replicas from trading a stream back and forth. A replica sheds only
//! once it has been above its share for longer than the lease: a crashed replica stays
//! registered until its lease expires, and in that time the survivors, which took its
//! agents, would otherwise count it as live and shed those agents again.
//!
//! `total` is this replica's own streams, counted live, plus each other replica's
//! `loads/` count ([`served_elsewhere`]). A replica's session records can trail its
//! streams by seconds when thousands of agents connect at once on a busy machine (one
//! count is one small write; thousands of records are not), and counted from them it
//! looked as if others held less than they did, and this replica shed streams for
//! nothing. Only a replica that has written no count yet (it just started) is counted
//! by its records.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use prost::Message;
use switchyard_proto::v1;
use tokio::sync::watch;

use crate::{
    hub::Generation,
    server::{
        metrics::CoordinationMetrics,
        query::{in_sync, registry_status},
        sessions::{Dataplanes, Session, Sessions},
    },
};

pub mod events;

/// Most streams one balancing round sheds.
pub const SHED_PER_ROUND: usize = 5;
/// How often a replica checks whether it holds more than its share.
pub const BALANCE_EVERY: Duration = Duration::from_secs(2);
/// How often this replica's changed sessions are written to etcd.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(500);
/// How stale the record of a node out of sync may grow in its counters (pending, lag,
/// versions, sent): rewriting every changing record each [`PUBLISH_EVERY`] cost etcd
/// and every replica's watch thousands of writes per second during an initial sync or
/// a stream of changes. What an operator acts on is written at the next publish (see
/// [`Urgent`]); readers add the time since `written` to the lag.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How stale the record of a node in sync may grow in its versions and counters: while
/// Services change, every node's versions move with each change, and etcd is the
/// cluster's own (5,000 nodes refreshed every 5 s would be 1,000 writes a second).
pub const IN_SYNC_REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Publishes per [`REFRESH_EVERY`] and [`IN_SYNC_REFRESH_EVERY`]: each publish refreshes
/// the sessions whose turn it is (by session id), so thousands of sessions that
/// connected together are not all rewritten in one burst, which held up the changes it
/// coincided with.
const REFRESH_TURNS: u64 = (REFRESH_EVERY.as_millis() / PUBLISH_EVERY.as_millis()) as u64;
const IN_SYNC_REFRESH_TURNS: u64 =
    (IN_SYNC_REFRESH_EVERY.as_millis() / PUBLISH_EVERY.as_millis()) as u64;
/// Most operations per etcd transaction (etcd's default `--max-txn-ops` is 128).
const OPS_PER_TXN: usize = 100;

/// How to reach etcd and who this replica is.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    /// This replica's name (`--replica-name`): unique among replicas.
    pub replica: String,
    /// Where agents reach this replica, as the registry shows it.
    pub advertise: String,
    pub prefix: String,
    /// The lease's time to live: how long a dead replica's records and leadership last.
    pub lease_ttl: Duration,
}

/// TLS to etcd: its CA, and a client certificate when etcd asks for one.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What this replica last read from etcd: the other replicas' sessions, the replicas,
/// the leader. Shared with the query API.
#[derive(Clone, Debug, Default)]
pub struct RegistryView {
    /// Whether this replica holds a live lease now; when not, the rest is as last read.
    pub etcd_up: bool,
    /// Replica name → the address agents reach it at.
    pub replicas: BTreeMap<String, String>,
    /// Node → its session as the serving replica registered it.
    pub sessions: BTreeMap<String, v1::RegisteredSession>,
    /// Replica → how many streams it serves, as it last wrote.
    pub loads: BTreeMap<String, usize>,
    /// The leader replica, if one is elected.
    pub leader: Option<String>,
    /// Election keys by creation revision (the lowest leads) and the revision by key.
    election: BTreeMap<i64, String>,
    election_keys: HashMap<Vec<u8>, i64>,
}

/// The leader's proof of leadership: its election key and that key's creation revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

impl Fence {
    /// The transaction condition that holds while this leadership does.
    pub fn holds(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }
}

/// This replica's handle on the coordination: its name, the registry view, its
/// leadership. Cloned into the query API.
#[derive(Clone, Debug)]
pub struct Coordination {
    pub replica: String,
    view: Arc<RwLock<RegistryView>>,
    fence: Arc<RwLock<Option<Fence>>>,
}

impl Coordination {
    pub fn new(replica: impl Into<String>) -> Self {
        Self {
            replica: replica.into(),
            view: Arc::default(),
            fence: Arc::default(),
        }
    }

    /// The registry as last read.
    pub fn view(&self) -> RegistryView {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this replica holds a live lease now (the registry is current).
    pub fn etcd_up(&self) -> bool {
        self.view.read().unwrap_or_else(|e| e.into_inner()).etcd_up
    }

    /// One node's registered session, if any replica registered it.
    pub fn registered(&self, node: &str) -> Option<(v1::RegisteredSession, bool)> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.sessions
            .get(node)
            .map(|record| (record.clone(), !view.etcd_up))
    }

    /// Nodes any replica registered.
    pub fn registered_nodes(&self) -> Vec<String> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.sessions.keys().cloned().collect()
    }

    /// This replica's leadership, if it leads now.
    pub fn fence(&self) -> Option<Fence> {
        self.fence.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut RegistryView)) {
        f(&mut self.view.write().unwrap_or_else(|e| e.into_inner()));
    }

    fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.write().unwrap_or_else(|e| e.into_inner()) = fence;
    }
}

/// `key` after `prefix`, when it is a text key under it.
fn under<'k>(prefix: &str, key: &'k [u8]) -> Option<&'k str> {
    std::str::from_utf8(key).ok()?.strip_prefix(prefix)
}

impl RegistryView {
    /// Takes in one key as etcd holds it (a put), under `prefix`.
    fn put(&mut self, prefix: &str, key: &[u8], value: &[u8], create_revision: i64) {
        let Some(rest) = under(prefix, key) else {
            return;
        };
        if let Some(replica) = rest.strip_prefix("/replicas/") {
            let address = String::from_utf8_lossy(value).into_owned();
            self.replicas.insert(replica.to_owned(), address);
        } else if let Some(node) = rest.strip_prefix("/sessions/") {
            match v1::RegisteredSession::decode(value) {
                Ok(record) => {
                    self.sessions.insert(node.to_owned(), record);
                }
                Err(error) => tracing::warn!(
                    node = %switchyard_proto::names::quote_bounded(node),
                    %error,
                    "ignoring a session record that does not decode"
                ),
            }
        } else if let Some(replica) = rest.strip_prefix("/loads/") {
            // A u32 at most: the sum over replicas stays far from overflowing, whatever
            // a broken or hostile writer put there.
            match std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u32>().ok())
            {
                Some(load) => {
                    self.loads.insert(replica.to_owned(), load as usize);
                }
                None => tracing::warn!(
                    replica = %switchyard_proto::names::quote_bounded(replica),
                    "ignoring a load record that is not a number"
                ),
            }
        } else if rest.starts_with("/leader/") {
            let replica = String::from_utf8_lossy(value).into_owned();
            if let Some(old) = self.election_keys.insert(key.to_vec(), create_revision) {
                self.election.remove(&old);
            }
            self.election.insert(create_revision, replica);
            self.leader = self.election.values().next().cloned();
        }
    }

    /// Takes in the deletion of one key.
    fn delete(&mut self, prefix: &str, key: &[u8]) {
        let Some(rest) = under(prefix, key) else {
            return;
        };
        if let Some(replica) = rest.strip_prefix("/replicas/") {
            self.replicas.remove(replica);
        } else if let Some(node) = rest.strip_prefix("/sessions/") {
            self.sessions.remove(node);
        } else if let Some(replica) = rest.strip_prefix("/loads/") {
            self.loads.remove(replica);
        } else if let Some(revision) = self.election_keys.remove(key) {
            self.election.remove(&revision);
            self.leader = self.election.values().next().cloned();
        }
    }
}

/// The streams the replicas other than `me` serve: each one's `loads/` count, or for one
/// that has written none, the sessions registered to it. Pure.
pub fn served_elsewhere(view: &RegistryView, me: &str) -> usize {
    let mut by_records: HashMap<&str, usize> = HashMap::new();
    for status in view.sessions.values().filter_map(|r| r.status.as_ref()) {
        *by_records.entry(status.replica.as_str()).or_default() += 1;
    }
    let uncounted: usize = by_records
        .iter()
        .filter(|(replica, _)| **replica != me && !view.loads.contains_key(**replica))
        .map(|(_, records)| records)
        .sum();
    let counted: usize = view
        .loads
        .iter()
        .filter(|(replica, _)| *replica != me)
        .map(|(_, load)| load)
        .sum();
    counted + uncounted
}

/// How many of its `local` streams a replica sheds this round so that none holds more
/// than `ceil(total / replicas) + 1`: at most `step`. Pure.
pub fn to_shed(local: usize, total: usize, replicas: usize, step: usize) -> usize {
    if replicas <= 1 {
        return 0;
    }
    let share = total.max(local).div_ceil(replicas) + 1;
    local.saturating_sub(share).min(step)
}

/// Runs the coordination until the process ends: connect, lease, register, watch,
/// campaign, publish this replica's sessions, balance; on any failure, mark the registry
/// stale and start over with backoff.
///
/// When `stop` turns true (a graceful shutdown) the lease is revoked, so this replica's
/// records and leadership go at once instead of after the lease's time to live.
///
/// While it leads, a replica given a `reporter` (the Kubernetes source's API client)
/// reports agents' trouble as Events on their Nodes ([`events`]).
pub async fn run(
    options: EtcdOptions,
    coordination: Coordination,
    sessions: Sessions,
    generations: watch::Receiver<Arc<Generation>>,
    metrics: CoordinationMetrics,
    stop: watch::Receiver<bool>,
    reporter: Option<events::Reporter>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        let started = std::time::Instant::now();
        let mut round = Round {
            options: &options,
            coordination: &coordination,
            sessions: &sessions,
            generations: &generations,
            metrics: &metrics,
            published: HashMap::new(),
            stop: stop.clone(),
            reporter: reporter.as_ref(),
            over_share_since: None,
            publishes: 0,
            load_written: None,
        };
        let Err(error) = round.run().await else {
            tracing::info!("left the replicas: lease revoked");
            return;
        };
        coordination.set_fence(None);
        coordination.update(|view| view.etcd_up = false);
        metrics.etcd_up.set(0);
        metrics.leader.set(0);
        metrics.etcd_losses.inc();
        if started.elapsed() > Duration::from_secs(30) {
            delay = Duration::from_millis(200);
        }
        tracing::warn!(error = %format!("{error:#}"), retry_in = ?delay, "etcd coordination lost; serving on, the registry is possibly stale");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A session record as last written, to decide when to write it again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Published {
    urgent: Urgent,
    in_sync: bool,
    status: Vec<u8>,
}

/// What of a session is written at the next publish when it changes: which stream it
/// is (so where, from which peer, since when, which agent version), whether its Node is
/// in the cluster, the dataplanes, and the last NACK. Read from the session without
/// building its status, which a replica serving thousands of agents would otherwise do
/// for every one of them twice a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Urgent {
    session: u64,
    in_cluster: bool,
    dataplanes: Dataplanes,
    last_nack: Option<SystemTime>,
}

impl Urgent {
    /// The session's urgent part and whether its node is in sync.
    fn of(session: &Session, generation: &Generation) -> (Self, bool) {
        let protocol = session.protocol();
        let urgent = Self {
            session: session.id,
            in_cluster: generation.snapshot.nodes.contains_key(&session.node),
            dataplanes: session.dataplanes(),
            last_nack: protocol.last_nack.as_ref().map(|n| n.time),
        };
        (urgent, in_sync(generation, session, &protocol))
    }
}

/// Whether to write a session's record now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// Yes: nothing was written, its [`Urgent`] part changed, or the node is back in
    /// sync after a record that said it was not.
    Now,
    /// If its status differs from what was written: it is the session's turn
    /// ([`refresh_turn`]). Versions, counters, lag and leaving sync wait for this: a
    /// node that leaves sync for a change and is back within seconds costs no write,
    /// and one that stays behind shows so within seconds, long before it counts as
    /// lagging.
    IfChanged,
    No,
}

/// Whether a session's record may be refreshed at the `publishes`-th publish: every
/// [`IN_SYNC_REFRESH_EVERY`] while its node is and was written in sync, every
/// [`REFRESH_EVERY`] otherwise; sessions take turns by id. Pure.
fn refresh_turn(session: u64, publishes: u64, in_sync: bool, last: Option<&Published>) -> bool {
    let turns = if in_sync && last.is_some_and(|l| l.in_sync) {
        IN_SYNC_REFRESH_TURNS
    } else {
        REFRESH_TURNS
    };
    session % turns == publishes % turns
}

/// Pure.
fn due(last: Option<&Published>, urgent: Urgent, in_sync: bool, refresh_turn: bool) -> Due {
    match last {
        None => Due::Now,
        Some(last) if last.urgent != urgent || (in_sync && !last.in_sync) => Due::Now,
        Some(_) if refresh_turn => Due::IfChanged,
        Some(_) => Due::No,
    }
}

/// One connection's worth of coordination; returns only with why it ended.
struct Round<'a> {
    options: &'a EtcdOptions,
    coordination: &'a Coordination,
    sessions: &'a Sessions,
    generations: &'a watch::Receiver<Arc<Generation>>,
    metrics: &'a CoordinationMetrics,
    /// Node → what this round last wrote for it.
    published: HashMap<String, Published>,
    stop: watch::Receiver<bool>,
    reporter: Option<&'a events::Reporter>,
    /// Since when this replica has held more than its share, if it does.
    over_share_since: Option<std::time::Instant>,
    /// Publishes so far, whose count says which sessions' turn it is to be refreshed.
    publishes: u64,
    /// The `loads/` count this round last wrote.
    load_written: Option<usize>,
}

impl Round<'_> {
    async fn connect(&self) -> anyhow::Result<Client> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &self.options.tls {
            let read = |path: &PathBuf| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                config = config.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            connect = connect.with_tls(config);
        }
        Client::connect(&self.options.endpoints, Some(connect))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.options.endpoints.join(",")))
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let prefix = self.options.prefix.as_str();
        let mut client = self.connect().await?;
        let ttl = self.options.lease_ttl.as_secs().max(2) as i64;
        let lease = client
            .lease_grant(ttl, None)
            .await
            .context("granting a lease")?
            .id();
        let (mut keeper, mut alive) = client.lease_keep_alive(lease).await?;
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let replica = &self.coordination.replica;
        client
            .put(
                format!("{prefix}/replicas/{replica}"),
                self.options.advertise.clone(),
                with_lease(),
            )
            .await
            .context("registering this replica")?;
        let everything = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .context("reading the registry")?;
        let revision = everything.header().map_or(0, |h| h.revision());
        let mut view = RegistryView {
            etcd_up: true,
            ..Default::default()
        };
        for kv in everything.kvs() {
            view.put(prefix, kv.key(), kv.value(), kv.create_revision());
        }
        self.show(view);
        let mut watch = client
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .context("watching the registry")?;
        tracing::info!(%replica, lease, endpoints = %self.options.endpoints.join(","), "coordinating through etcd");
        let campaign = tokio::spawn(campaign(
            client.clone(),
            format!("{prefix}/leader"),
            replica.clone(),
            lease,
            self.coordination.clone(),
            self.metrics.clone(),
        ));
        let _campaign = AbortOnDrop(campaign);

        let mut keepalive = tokio::time::interval(self.options.lease_ttl / 3);
        let mut publish = tokio::time::interval(PUBLISH_EVERY);
        let mut balance = tokio::time::interval(BALANCE_EVERY);
        let mut report = tokio::time::interval(
            self.reporter
                .map_or(Duration::from_secs(3600), |r| r.options.every),
        );
        loop {
            if *self.stop.borrow() {
                client
                    .lease_revoke(lease)
                    .await
                    .context("revoking the lease")?;
                return Ok(());
            }
            tokio::select! {
                // A dropped sender never stops the coordination (the branch just stays idle).
                Ok(()) = self.stop.changed() => {}
                _ = keepalive.tick() => keeper.keep_alive().await.context("keeping the lease alive")?,
                answer = alive.message() => match answer.context("keeping the lease alive")? {
                    Some(answer) if answer.ttl() > 0 => {}
                    _ => bail!("the lease expired"),
                },
                message = watch.message() => {
                    let Some(message) = message.context("watching the registry")? else {
                        bail!("the registry watch ended");
                    };
                    if message.canceled() {
                        bail!("the registry watch was cancelled: {}", message.cancel_reason());
                    }
                    self.coordination.update(|view| {
                        for event in message.events() {
                            let Some(kv) = event.kv() else { continue };
                            match event.event_type() {
                                etcd_client::EventType::Put => {
                                    view.put(prefix, kv.key(), kv.value(), kv.create_revision())
                                }
                                etcd_client::EventType::Delete => view.delete(prefix, kv.key()),
                            }
                        }
                    });
                    self.count();
                }
                _ = publish.tick() => self.publish(&mut client, lease).await?,
                _ = balance.tick() => self.balance(),
                _ = report.tick() => self.report(&mut client).await,
            }
        }
    }

    fn show(&self, view: RegistryView) {
        self.coordination.update(|shown| *shown = view);
        self.metrics.etcd_up.set(1);
        self.count();
    }

    fn count(&self) {
        let view = self
            .coordination
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner());
        self.metrics.replicas.set(view.replicas.len() as i64);
        self.metrics
            .registered_sessions
            .set(view.sessions.len() as i64);
    }

    /// Writes the sessions of this replica whose status changed, and deletes the
    /// records of streams that closed here while the record is still this replica's.
    async fn publish(&mut self, client: &mut Client, lease: i64) -> anyhow::Result<()> {
        let prefix = &self.options.prefix;
        let generation = self.generations.borrow().clone();
        let now = SystemTime::now();
        self.publishes += 1;
        // Node, what is compared next time, and the write.
        let mut puts: Vec<(String, Published, TxnOp)> = Vec::new();
        let mut live = HashSet::new();
        for session in self.sessions.all() {
            if !session.is_connected() {
                continue;
            }
            live.insert(session.node.clone());
            let (urgent, in_sync) = Urgent::of(&session, &generation);
            let last = self.published.get(&session.node);
            let turn = refresh_turn(session.id, self.publishes, in_sync, last);
            let due = due(last, urgent, in_sync, turn);
            if due == Due::No {
                continue;
            }
            let mut status = registry_status(&session.node, &generation, &session);
            status.replica = self.coordination.replica.clone();
            let bytes = status.encode_to_vec();
            if due == Due::IfChanged && last.is_some_and(|last| last.status == bytes) {
                continue;
            }
            let written = Published {
                urgent,
                in_sync,
                status: bytes,
            };
            let record = v1::RegisteredSession {
                status: Some(status),
                written: Some(now.into()),
            };
            let key = format!("{prefix}/sessions/{}", session.node);
            let with_lease = Some(PutOptions::new().with_lease(lease));
            let put = TxnOp::put(key, record.encode_to_vec(), with_lease);
            puts.push((session.node.clone(), written, put));
        }
        // The count goes in the first transaction, ahead of what may be thousands of
        // records, and costs no round trip of its own when records are written too.
        let load = live.len();
        let mut load_put = (self.load_written != Some(load)).then(|| {
            let key = format!("{prefix}/loads/{}", self.coordination.replica);
            let with_lease = Some(PutOptions::new().with_lease(lease));
            TxnOp::put(key, load.to_string(), with_lease)
        });
        for chunk in puts.chunks(OPS_PER_TXN - 1) {
            let ops: Vec<TxnOp> = load_put
                .take()
                .into_iter()
                .chain(chunk.iter().map(|(_, _, put)| put.clone()))
                .collect();
            client
                .txn(Txn::new().and_then(ops))
                .await
                .context("writing session records")?;
            for (node, written, _) in chunk {
                self.published.insert(node.clone(), written.clone());
            }
        }
        if let Some(put) = load_put {
            client
                .txn(Txn::new().and_then([put]))
                .await
                .context("writing this replica's load")?;
        }
        self.load_written = Some(load);
        let closed: Vec<String> = self
            .published
            .keys()
            .filter(|node| !live.contains(*node))
            .cloned()
            .collect();
        for node in closed {
            // Only while the record is still this replica's: the node may have moved on.
            let key = format!("{prefix}/sessions/{node}");
            let mine = Compare::lease(key.clone(), CompareOp::Equal, lease);
            client
                .txn(Txn::new().when([mine]).and_then([TxnOp::delete(key, None)]))
                .await
                .context("deleting a session record")?;
            self.published.remove(&node);
        }
        Ok(())
    }

    /// As leader, reports what is new as Events (see [`events`]).
    async fn report(&self, client: &mut Client) {
        let (Some(reporter), Some(fence)) = (self.reporter, self.coordination.fence()) else {
            return;
        };
        let cluster = self
            .generations
            .borrow()
            .snapshot
            .nodes
            .keys()
            .cloned()
            .collect();
        let sessions = self.coordination.view().sessions;
        match reporter.pass(client, &fence, &cluster, &sessions).await {
            Ok(created) => {
                self.metrics.events.inc_by(created as u64);
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "reporting Events as leader failed")
            }
        }
    }

    /// Sheds streams above this replica's share (see the module docs).
    fn balance(&mut self) {
        // The counts only: the registry itself is not copied every round. This
        // replica's own streams are counted live, the others' by their published loads
        // (see the module docs).
        let replica = &self.coordination.replica;
        let (etcd_up, registered_elsewhere, replicas) = {
            let view = self
                .coordination
                .view
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let elsewhere = served_elsewhere(&view, replica);
            (view.etcd_up, elsewhere, view.replicas.len())
        };
        if !etcd_up {
            self.over_share_since = None;
            return;
        }
        let mut local: Vec<Arc<Session>> = self
            .sessions
            .all()
            .into_iter()
            .filter(|s| s.is_connected())
            .collect();
        let registered = registered_elsewhere + local.len();
        let shed = to_shed(local.len(), registered, replicas, SHED_PER_ROUND);
        if shed == 0 {
            self.over_share_since = None;
            return;
        }
        let since = *self
            .over_share_since
            .get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < self.options.lease_ttl + BALANCE_EVERY {
            return;
        }
        local.sort_by_key(|s| std::cmp::Reverse(s.connected_since));
        tracing::info!(
            shed,
            local = local.len(),
            registered,
            replicas,
            "shedding streams to even the load across replicas"
        );
        for session in local.iter().take(shed) {
            session.shed();
        }
    }
}

/// Campaigns for leadership with `lease` until elected, then holds the [`Fence`] until
/// the round (and so the lease) ends.
async fn campaign(
    mut client: Client,
    name: String,
    replica: String,
    lease: i64,
    coordination: Coordination,
    metrics: CoordinationMetrics,
) {
    match client.campaign(name, replica.clone(), lease).await {
        Ok(elected) => {
            let Some(leader) = elected.leader() else {
                tracing::warn!("etcd answered the campaign without a leader key");
                return;
            };
            let fence = Fence {
                key: leader.key().to_vec(),
                revision: leader.rev(),
            };
            tracing::info!(%replica, revision = fence.revision, "this replica leads");
            coordination.set_fence(Some(fence));
            metrics.leader.set(1);
            metrics.leaderships.inc();
        }
        Err(error) => tracing::warn!(%error, "campaigning for leadership failed"),
    }
}

/// Whether `fence` still holds: its election key exists with its creation revision.
/// A leader checks it right before each action it takes as leader.
pub async fn still_leader(client: &mut Client, fence: &Fence) -> anyhow::Result<bool> {
    let answer = client.txn(Txn::new().when([fence.holds()])).await?;
    Ok(answer.succeeded())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_sheds_only_what_it_holds_above_an_even_share_and_a_few_at_a_time() {
        // (local, total, replicas) → shed, with at most 5 per round.
        let cases = [
            ((90, 90, 1), 0), // alone: nothing to shed
            ((90, 90, 2), 5), // a second replica joined: share 46, shed 5 now
            ((47, 90, 2), 1), // one above share + slack
            ((46, 90, 2), 0), // at share + slack
            ((30, 90, 3), 0), // even
            ((31, 90, 3), 0), // within the slack of one
            ((33, 90, 3), 2), // share 30 + 1
            ((10, 3, 3), 5),  // the registry lags behind this replica's own count
            ((0, 0, 3), 0),
        ];
        for ((local, total, replicas), shed) in cases {
            assert_eq!(
                to_shed(local, total, replicas, SHED_PER_ROUND),
                shed,
                "{local} of {total} over {replicas}"
            );
        }
    }

    #[test]
    fn a_record_is_rewritten_at_once_for_what_operators_act_on_and_otherwise_every_refresh() {
        let urgent = Urgent {
            session: 1,
            in_cluster: true,
            dataplanes: Dataplanes::default(),
            last_nack: None,
        };
        let written = |in_sync| Published {
            urgent,
            in_sync,
            status: vec![1],
        };
        // Whether it is the session's turn to be refreshed.
        let (soon, later) = (false, true);
        let nacked = Urgent {
            last_nack: Some(SystemTime::UNIX_EPOCH),
            ..urgent
        };
        let moved = Urgent {
            session: 2,
            ..urgent
        };
        let relabelled = Urgent {
            dataplanes: Dataplanes {
                wanted: v1::Dataplane::Ebpf,
                ..Dataplanes::default()
            },
            ..urgent
        };
        // (written in sync, now: urgent, in sync, when) → due
        let cases = [
            ((true, urgent, true, soon), Due::No),
            ((true, urgent, true, later), Due::IfChanged), // versions, counters
            ((true, urgent, false, soon), Due::No),        // leaving sync may be over in a moment
            ((true, urgent, false, later), Due::IfChanged),
            ((false, urgent, false, soon), Due::No),
            ((false, urgent, true, soon), Due::Now), // back in sync
            ((true, nacked, true, soon), Due::Now),
            ((true, moved, true, soon), Due::Now),
            ((true, relabelled, true, soon), Due::Now),
        ];
        for ((was_in_sync, urgent, in_sync, at), expected) in cases {
            assert_eq!(
                due(Some(&written(was_in_sync)), urgent, in_sync, at),
                expected,
                "{was_in_sync} {urgent:?} {in_sync}"
            );
        }
        assert_eq!(due(None, urgent, false, soon), Due::Now, "a new record");
    }

    #[test]
    fn in_sync_records_are_refreshed_every_30_s_the_others_every_5_s_in_turns() {
        let written = |in_sync| Published {
            urgent: Urgent {
                session: 0,
                in_cluster: true,
                dataplanes: Dataplanes::default(),
                last_nack: None,
            },
            in_sync,
            status: Vec::new(),
        };
        let turns = |in_sync, was_in_sync: Option<bool>| {
            let last = was_in_sync.map(written);
            (0..120)
                .filter(|p| refresh_turn(7, *p, in_sync, last.as_ref()))
                .count()
        };
        // Over 120 publishes (60 s): in sync and written so, twice; otherwise 12 times.
        assert_eq!(turns(true, Some(true)), 2);
        assert_eq!(turns(false, Some(true)), 12, "left sync: shown within 5 s");
        assert_eq!(turns(true, Some(false)), 12);
        assert_eq!(turns(false, None), 12);
        // Each publish refreshes a tenth of the sessions out of sync.
        let at_once = (0..1000)
            .filter(|id| refresh_turn(*id, 3, false, None))
            .count();
        assert_eq!(at_once, 100);
    }

    #[test]
    fn the_view_follows_puts_and_deletes_and_the_earliest_candidate_leads() {
        let mut view = RegistryView::default();
        let record = v1::RegisteredSession {
            status: Some(v1::NodeStatus {
                node_name: "node-a".into(),
                replica: "r1".into(),
                ..Default::default()
            }),
            written: None,
        };
        view.put("/sy", b"/sy/replicas/r1", b"10.0.0.1:9740", 5);
        view.put("/sy", b"/sy/sessions/node-a", &record.encode_to_vec(), 6);
        view.put("/sy", b"/sy/leader/694d", b"r2", 9);
        view.put("/sy", b"/sy/leader/694c", b"r1", 7);
        view.put("/other/sessions/node-b", b"/other/sessions/node-b", b"", 8);
        assert_eq!(view.replicas["r1"], "10.0.0.1:9740");
        assert_eq!(view.sessions["node-a"], record);
        assert_eq!(
            view.sessions.len(),
            1,
            "keys outside the prefix are not ours"
        );
        assert_eq!(view.leader.as_deref(), Some("r1"));

        view.delete("/sy", b"/sy/leader/694c");
        assert_eq!(
            view.leader.as_deref(),
            Some("r2"),
            "the next candidate leads"
        );
        view.delete("/sy", b"/sy/sessions/node-a");
        view.delete("/sy", b"/sy/replicas/r1");
        assert!(view.sessions.is_empty() && view.replicas.is_empty());
        // A record that does not decode is skipped, not trusted.
        view.put("/sy", b"/sy/sessions/node-c", b"\xff\xff", 10);
        assert!(view.sessions.is_empty());
        view.put("/sy", b"/sy/loads/r1", b"1667", 11);
        view.put("/sy", b"/sy/loads/r2", b"many", 12);
        view.put("/sy", b"/sy/loads/r3", b"18446744073709551615", 13);
        assert_eq!(view.loads, BTreeMap::from([("r1".to_string(), 1667)]));
        view.delete("/sy", b"/sy/loads/r1");
        assert!(view.loads.is_empty());
    }

    #[test]
    fn others_are_counted_by_their_loads_and_by_their_records_only_before_they_wrote_one() {
        let mut view = RegistryView::default();
        let mut register = |node: &str, replica: &str| {
            let record = v1::RegisteredSession {
                status: Some(v1::NodeStatus {
                    node_name: node.into(),
                    replica: replica.into(),
                    ..Default::default()
                }),
                written: None,
            };
            view.sessions.insert(node.into(), record);
        };
        // Records trailing the streams: r2 registered 2 of the 900 it serves.
        register("a", "me");
        register("b", "r2");
        register("c", "r2");
        register("d", "r3");
        register("e", "r3");
        register("f", "r3");
        // Loads written so far, in order, and what the others then count.
        type Step<'a> = (&'a [(&'a str, usize)], usize, &'a str);
        let steps: [Step; 4] = [
            (&[], 5, "no loads yet: by records"),
            (&[("r2", 900)], 903, "r2 by its load, r3 by records"),
            (
                &[("r3", 0), ("me", 7)],
                900,
                "a load beats records, this replica's own counts for nothing here",
            ),
            (&[("r4", 10)], 910, "a replica with no records yet"),
        ];
        for (loads, want, why) in steps {
            for (replica, load) in loads {
                view.loads.insert(replica.to_string(), *load);
            }
            assert_eq!(served_elsewhere(&view, "me"), want, "{why}");
        }
    }
}
