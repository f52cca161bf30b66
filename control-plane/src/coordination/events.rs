//! What the leader reports to the Kubernetes API: a `Warning` Event on a Node whose
//! agent rejected a change (NACK), has had no stream on any replica for longer than
//! `--event-disconnected-after`, or has lagged behind for longer than
//! `--event-lagging-after`. Only the leader reports, each case once.
//!
//! # Once, across leaders
//! What was reported lives in etcd (`<prefix>/reported/<node>/<reason>` → the case's
//! key: the NACK's nonce, or when the agent went missing or fell behind), written in a
//! transaction that also checks the leader's [`Fence`]: a paused old leader writes
//! nothing, and a new leader does not repeat what the old one reported. The Event goes
//! to the API only once that write succeeded (at most once: a crash in between loses
//! it). When an agent went missing is recorded the same way (`<prefix>/missing/<node>`),
//! so a new leader does not restart the clock. The Event's name is derived from the
//! case, so the API server refuses a duplicate (`409`) too. Nothing is ever deleted
//! from the API: Events expire there on their own.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::api::{Api, PostParams};
use switchyard_proto::{names::escape_bounded, v1};

use super::Fence;

/// When the leader reports and how often it looks.
#[derive(Clone, Copy, Debug)]
pub struct EventOptions {
    /// An agent without a stream on any replica for this long gets an Event.
    pub disconnected_after: Duration,
    /// An agent behind the desired state for this long gets an Event.
    pub lagging_after: Duration,
    pub every: Duration,
}

impl Default for EventOptions {
    fn default() -> Self {
        Self {
            disconnected_after: Duration::from_secs(120),
            lagging_after: Duration::from_secs(60),
            every: Duration::from_secs(5),
        }
    }
}

/// Why a Node gets an Event (its `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    ChangeRejected,
    AgentDisconnected,
    AgentLagging,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ChangeRejected => "SwitchyardChangeRejected",
            Reason::AgentDisconnected => "SwitchyardAgentDisconnected",
            Reason::AgentLagging => "SwitchyardAgentLagging",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Reason::ChangeRejected => "rejected",
            Reason::AgentDisconnected => "disconnected",
            Reason::AgentLagging => "lagging",
        }
    }
}

/// One case worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub node: String,
    pub reason: Reason,
    /// What makes this case this one (a nonce, a time in seconds): reported once.
    pub key: String,
    pub message: String,
}

/// The cases in `sessions` (every replica's registered sessions) and `cluster` (the
/// Nodes), at `now`. `missing` holds since when each Node without a session has been
/// missing, as recorded. Pure.
pub fn findings(
    now: SystemTime,
    cluster: &BTreeSet<String>,
    sessions: &BTreeMap<String, v1::RegisteredSession>,
    missing: &BTreeMap<String, SystemTime>,
    options: &EventOptions,
) -> Vec<Finding> {
    let mut found = Vec::new();
    let seconds = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    for node in cluster {
        match sessions
            .get(node)
            .and_then(|r| r.status.as_ref().map(|s| (r, s)))
        {
            None => {
                let Some(since) = missing.get(node) else {
                    continue;
                };
                let gone = now.duration_since(*since).unwrap_or_default();
                if gone >= options.disconnected_after {
                    found.push(Finding {
                        node: node.clone(),
                        reason: Reason::AgentDisconnected,
                        key: seconds(*since).to_string(),
                        message: format!(
                            "no switchyard agent of this node has been connected to any controller \
                             replica for {}s; its rules stay as they were (fail-static) but \
                             receive no changes",
                            gone.as_secs()
                        ),
                    });
                }
            }
            Some((record, status)) => {
                if let Some(nack) = &status.last_nack
                    && let Some(first) = nack.errors.first()
                {
                    found.push(Finding {
                        node: node.clone(),
                        reason: Reason::ChangeRejected,
                        key: nack.nonce.clone(),
                        message: format!(
                            "the switchyard agent rejected {} resource(s) of response {} \
                             (replica {}): {}: {}",
                            nack.errors.len(),
                            nack.nonce,
                            status.replica,
                            first.resource_name,
                            first.message
                        ),
                    });
                }
                let written = record
                    .written
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .unwrap_or(now);
                let lag = status
                    .lag
                    .and_then(|l| Duration::try_from(l).ok())
                    .unwrap_or_default();
                let behind_since = written.checked_sub(lag).unwrap_or(written);
                let behind = now.duration_since(behind_since).unwrap_or_default();
                if status.pending_changes > 0 && behind >= options.lagging_after {
                    found.push(Finding {
                        node: node.clone(),
                        reason: Reason::AgentLagging,
                        key: seconds(behind_since).to_string(),
                        message: format!(
                            "the switchyard agent has been {}s behind the desired state with {} \
                             change(s) pending (replica {})",
                            behind.as_secs(),
                            status.pending_changes,
                            status.replica
                        ),
                    });
                }
            }
        }
    }
    found
}

/// The Event for `finding`, named after the case so that it is created once.
pub fn event(finding: &Finding, replica: &str, now: SystemTime) -> Event {
    let digest = {
        use std::hash::BuildHasher;
        foldhash::quality::FixedState::with_seed(0x6576_656e_7473).hash_one((
            &finding.node,
            finding.reason.slug(),
            &finding.key,
        ))
    };
    let name = format!(
        "{}.switchyard-{}-{digest:016x}",
        finding.node,
        finding.reason.slug()
    );
    let time = Timestamp::try_from(now).unwrap_or(Timestamp::UNIX_EPOCH);
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some("default".into()),
            ..Default::default()
        },
        // As kubelet refers to its Node, so `kubectl describe node` shows it.
        involved_object: ObjectReference {
            kind: Some("Node".into()),
            name: Some(finding.node.clone()),
            uid: Some(finding.node.clone()),
            api_version: Some("v1".into()),
            ..Default::default()
        },
        reason: Some(finding.reason.as_str().into()),
        message: Some(escape_bounded(&finding.message, 1024)),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("switchyard-controller".into()),
            host: None,
        }),
        reporting_component: Some("switchyard.io/controller".into()),
        reporting_instance: Some(replica.to_owned()),
        first_timestamp: Some(Time(time)),
        last_timestamp: Some(Time(time)),
        event_time: Some(MicroTime(time)),
        action: Some("Report".into()),
        count: Some(1),
        ..Default::default()
    }
}

/// The leader's reporting: reads what was recorded, records what is new under the
/// fence, and creates the Events.
pub struct Reporter {
    pub api: kube::Client,
    pub options: EventOptions,
    pub prefix: String,
    pub replica: String,
}

impl Reporter {
    /// One pass as leader holding `fence`: records Nodes newly missing (and forgets
    /// those back), then reports every finding not yet reported. Returns the Events
    /// created.
    pub async fn pass(
        &self,
        client: &mut Client,
        fence: &Fence,
        cluster: &BTreeSet<String>,
        sessions: &BTreeMap<String, v1::RegisteredSession>,
    ) -> anyhow::Result<usize> {
        let prefix = &self.prefix;
        let holds = || fence.holds();
        let now = SystemTime::now();
        let missing_prefix = format!("{prefix}/missing/");
        let recorded = client
            .get(
                missing_prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut missing = BTreeMap::new();
        for kv in recorded.kvs() {
            let node = String::from_utf8_lossy(&kv.key()[missing_prefix.len()..]).into_owned();
            let since = std::str::from_utf8(kv.value())
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
            if let Some(since) = since {
                missing.insert(node, since);
            }
        }
        let mut ops = Vec::new();
        for node in cluster {
            let has_agent = sessions.contains_key(node);
            match (has_agent, missing.contains_key(node)) {
                (false, false) => {
                    let since = now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    ops.push(TxnOp::put(
                        format!("{missing_prefix}{node}"),
                        since.to_string(),
                        None,
                    ));
                    missing.insert(node.clone(), now);
                }
                (true, true) => {
                    ops.push(TxnOp::delete(format!("{missing_prefix}{node}"), None));
                    missing.remove(node);
                }
                _ => {}
            }
        }
        for node in missing
            .keys()
            .filter(|n| !cluster.contains(*n))
            .cloned()
            .collect::<Vec<_>>()
        {
            ops.push(TxnOp::delete(format!("{missing_prefix}{node}"), None));
            missing.remove(&node);
        }
        for chunk in ops.chunks(100) {
            let done = client
                .txn(Txn::new().when([holds()]).and_then(chunk.to_vec()))
                .await?;
            if !done.succeeded() {
                anyhow::bail!("no longer the leader");
            }
        }

        let api: Api<Event> = Api::namespaced(self.api.clone(), "default");
        let mut created = 0;
        for finding in findings(now, cluster, sessions, &missing, &self.options) {
            let key = format!(
                "{prefix}/reported/{}/{}",
                finding.node,
                finding.reason.slug()
            );
            let new = Compare::value(key.clone(), CompareOp::NotEqual, finding.key.clone());
            let unset = Compare::version(key.clone(), CompareOp::Equal, 0);
            let record = TxnOp::put(key.clone(), finding.key.clone(), None);
            // Reported unless the same case is already recorded (a missing key compares
            // as unset; a present one by value), and only while this replica leads.
            let txn = Txn::new()
                .when([holds(), unset])
                .and_then([record.clone()])
                .or_else([TxnOp::txn(
                    Txn::new().when([holds(), new]).and_then([record]),
                )]);
            let answer = client.txn(txn).await?;
            let recorded = answer.succeeded()
                || answer.op_responses().into_iter().any(|op| match op {
                    etcd_client::TxnOpResponse::Txn(inner) => inner.succeeded(),
                    _ => false,
                });
            if !recorded {
                continue;
            }
            match api
                .create(&PostParams::default(), &event(&finding, &self.replica, now))
                .await
            {
                Ok(_) => {
                    created += 1;
                    tracing::info!(node = %finding.node, reason = finding.reason.as_str(), "reported an Event on the Node");
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => {
                    tracing::warn!(node = %finding.node, reason = finding.reason.as_str(), %error, "creating the Event failed; it is not retried")
                }
            }
        }
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(status: v1::NodeStatus, written: SystemTime) -> v1::RegisteredSession {
        v1::RegisteredSession {
            status: Some(status),
            written: Some(written.into()),
        }
    }

    #[test]
    fn nacks_long_disconnections_and_long_lags_are_findings_each_with_a_stable_key() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let options = EventOptions::default();
        let cluster: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        let nack = v1::Nack {
            nonce: "7-3".into(),
            time: None,
            errors: vec![v1::ResourceError {
                resource_name: "shop/web".into(),
                message: "bad port".into(),
            }],
        };
        let lag = |secs| {
            Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            })
        };
        let sessions: BTreeMap<String, v1::RegisteredSession> = [
            // a: NACKed.
            (
                "a",
                v1::NodeStatus {
                    replica: "r1".into(),
                    last_nack: Some(nack),
                    ..Default::default()
                },
                now,
            ),
            // b: 50 s behind as written 20 s ago: 70 s, past the 60 s threshold.
            (
                "b",
                v1::NodeStatus {
                    pending_changes: 3,
                    lag: lag(50),
                    ..Default::default()
                },
                now - Duration::from_secs(20),
            ),
            // c: 30 s behind: not yet.
            (
                "c",
                v1::NodeStatus {
                    pending_changes: 1,
                    lag: lag(30),
                    ..Default::default()
                },
                now,
            ),
        ]
        .into_iter()
        .map(|(n, s, w)| (n.to_string(), registered(s, w)))
        .collect();
        // d missing for 300 s, e for 10 s.
        let missing: BTreeMap<String, SystemTime> = [
            ("d".to_string(), now - Duration::from_secs(300)),
            ("e".to_string(), now - Duration::from_secs(10)),
        ]
        .into();
        let found = findings(now, &cluster, &sessions, &missing, &options);
        let summary: Vec<(&str, Reason, &str)> = found
            .iter()
            .map(|f| (f.node.as_str(), f.reason, f.key.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", Reason::ChangeRejected, "7-3"),
                ("b", Reason::AgentLagging, "9930"),
                ("d", Reason::AgentDisconnected, "9700"),
            ]
        );
        assert!(
            found[0].message.contains("shop/web: bad port"),
            "{}",
            found[0].message
        );
        // A minute later c is behind long enough too, and the same cases keep their keys
        // (and so are not reported again).
        let later = findings(
            now + Duration::from_secs(60),
            &cluster,
            &sessions,
            &missing,
            &options,
        );
        let keys: Vec<(&str, &str)> = later
            .iter()
            .map(|f| (f.node.as_str(), f.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            [("a", "7-3"), ("b", "9930"), ("c", "9970"), ("d", "9700")]
        );
    }

    #[test]
    fn an_event_refers_to_its_node_as_kubelet_does_and_is_named_after_its_case() {
        let finding = Finding {
            node: "node-a".into(),
            reason: Reason::ChangeRejected,
            key: "7-3".into(),
            message: "rejected\nwith a newline".into(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let event = event(&finding, "r1", now);
        let again = super::event(&finding, "r2", now + Duration::from_secs(5));
        assert_eq!(
            event.metadata.name, again.metadata.name,
            "one name per case"
        );
        assert!(
            event
                .metadata
                .name
                .as_deref()
                .unwrap()
                .starts_with("node-a.switchyard-rejected-")
        );
        assert_eq!(event.involved_object.kind.as_deref(), Some("Node"));
        assert_eq!(event.involved_object.uid.as_deref(), Some("node-a"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("SwitchyardChangeRejected"));
        assert!(!event.message.unwrap().contains('\n'), "escaped");
        let other = Finding {
            key: "8-1".into(),
            ..finding
        };
        assert_ne!(
            super::event(&other, "r1", now).metadata.name,
            again.metadata.name
        );
    }
}
