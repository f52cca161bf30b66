//! The conformance matrix: scenarios of kube-proxy behaviour, each run with real packets
//! through a dataplane, recording what each kind of client reached; the dataplanes must
//! agree exactly with each other and with what the controller's state for the node says.
//!
//! Entry points: [`scenarios`] (the cluster, probes and what they check), [`run`] (one
//! dataplane: a [`Cluster`] holding every scenario's Services at once, then every probe)
//! and [`Matrix`] (the runs side by side, the expectation, the verdict per probe and the
//! summary line `conformance: X of Y scenarios agree across …`).
//!
//! # What a probe records
//! [`Outcome`]: the set of backends that answered (and, for traffic from outside,
//! whether the backend saw the client's own address), `sticky` when one client always
//! met one backend (affinity: which one is chance), `refused` (a TCP reset or ICMP
//! port unreachable), `no answer` (dropped), or the mix seen. The expectation comes from
//! the node's state as the controller computed it, read through agent-core's
//! [`PortPolicy`] (which endpoint set serves which traffic, reject vs drop) — the same
//! decisions every dataplane renders, checked here against real packets.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use switchyard_proto::policy::{Family, PortPolicy};
use switchyard_proto::state::ServiceState;

use crate::{
    e2e::{AgentSpec, Cluster, Layout, NODE},
    netns::{ProbeError, ProbeOptions, topology::CLIENT_IP, topology::CLIENT_IP6},
};

/// Who sends a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Client {
    /// A pod on the node (socket-level balancing applies to it).
    Pod,
    /// A process on the node itself.
    Node,
    /// A client outside the node (node ports, external IPs).
    Outside,
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Client::Pod => "pod",
            Client::Node => "node",
            Client::Outside => "outside",
        })
    }
}

/// One probe of a scenario: requests from a client to an address, and which port of
/// which Service it exercises (for the expectation).
#[derive(Clone, Debug)]
pub struct Probe {
    pub client: Client,
    pub target: SocketAddr,
    pub udp: bool,
    /// Requests sent (each a fresh connection or socket).
    pub requests: usize,
    /// `namespace/name` and port name of the Service port the target belongs to.
    pub service: &'static str,
    pub port: &'static str,
    /// The target is a node port, external or load-balancer IP (external policy).
    pub external: bool,
    /// Session affinity: expect one backend, whichever.
    pub sticky: bool,
}

impl Probe {
    fn name(&self) -> String {
        format!(
            "{} → {}{}",
            self.client,
            self.target,
            if self.udp { "/udp" } else { "" }
        )
    }
}

/// One behaviour under test.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// What it checks, in a line.
    pub about: &'static str,
    pub probes: Vec<Probe>,
}

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Every request answered; by these backends; whether the backends saw the client's
    /// own address (only told for traffic from outside).
    Reached {
        backends: BTreeSet<String>,
        source_kept: Option<bool>,
    },
    /// Every request answered by one backend (affinity).
    Sticky,
    Refused,
    NoAnswer,
    /// Anything else, described.
    Mixed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reached {
                backends,
                source_kept,
            } => {
                let list: Vec<&str> = backends.iter().map(String::as_str).collect();
                write!(f, "{}", list.join(" "))?;
                match source_kept {
                    Some(true) => f.write_str(", client address kept"),
                    Some(false) => f.write_str(", client address masqueraded"),
                    None => Ok(()),
                }
            }
            Outcome::Sticky => f.write_str("sticky: one backend"),
            Outcome::Refused => f.write_str("refused"),
            Outcome::NoAnswer => f.write_str("no answer"),
            Outcome::Mixed(what) => write!(f, "mixed: {what}"),
        }
    }
}

/// The cluster every scenario's Services live in (one manifest), its backends and the
/// ports they serve: backends 1–3 serve TCP 8080 and UDP 5353 (backend 1 on the node,
/// in zone `zone-a` with backend 2; backend 3 elsewhere in `zone-b`); backends 1 and 2
/// also serve 9001 and backend 3 serves 9002, for a named port that resolves per slice.
pub fn layout() -> Layout {
    Layout {
        manifests: manifests(),
        backends: vec![
            (vec![8080, 9001], vec![5353]),
            (vec![8080, 9001], vec![5353]),
            (vec![8080, 9002], vec![5353]),
        ],
        ipv6: true,
        ready: "10.96.1.1:80".parse().expect("an address"),
        ..Layout::example()
    }
}

/// An endpoint line of a slice: backend `i`, with optional conditions and hints.
fn endpoint(i: u8, conditions: &str, hints: &str) -> String {
    let node = if i == 1 { NODE } else { "swy-remote-node" };
    let zone = if i == 3 { "zone-b" } else { "zone-a" };
    format!(
        "  - addresses: [\"10.244.{i}.2\"]\n    nodeName: {node}\n    zone: {zone}\n{conditions}{hints}"
    )
}

fn slice(name: &str, service: &str, family: &str, ports: &str, endpoints: &[String]) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: {family}\nports: {ports}\nendpoints:\n{}",
        endpoints.concat()
    )
}

fn all(conditions: &str) -> Vec<String> {
    (1..=3).map(|i| endpoint(i, conditions, "")).collect()
}

fn v6_endpoints() -> Vec<String> {
    (1..=3)
        .map(|i| {
            let node = if i == 1 { NODE } else { "swy-remote-node" };
            format!("  - addresses: [\"fd00:244:{i}::2\"]\n    nodeName: {node}\n")
        })
        .collect()
}

const HTTP: &str = "[{name: http, port: 8080, protocol: TCP}]";

fn manifests() -> String {
    let terminating = "    conditions: {ready: false, serving: true, terminating: true}\n";
    let gone = "    conditions: {ready: false, serving: false, terminating: true}\n";
    let documents = vec![
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}, labels: {{topology.kubernetes.io/zone: zone-a}}}}\n"
        ),
        // Plain ClusterIP, TCP and UDP.
        "apiVersion: v1\nkind: Service\nmetadata: {name: plain}\n\
         spec: {clusterIP: 10.96.1.1, ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]}\n"
            .into(),
        slice(
            "plain-1",
            "plain",
            "IPv4",
            "[{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]",
            &all(""),
        ),
        // Terminating fallback: no ready endpoint; the serving terminating ones are used.
        "apiVersion: v1\nkind: Service\nmetadata: {name: terminating}\n\
         spec: {clusterIP: 10.96.1.2, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice(
            "terminating-1",
            "terminating",
            "IPv4",
            HTTP,
            &[
                endpoint(1, terminating, ""),
                endpoint(2, terminating, ""),
                endpoint(3, gone, ""),
            ],
        ),
        // internalTrafficPolicy: Local, with and without a local endpoint.
        "apiVersion: v1\nkind: Service\nmetadata: {name: itp-local}\n\
         spec: {clusterIP: 10.96.1.3, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("itp-local-1", "itp-local", "IPv4", HTTP, &all("")),
        "apiVersion: v1\nkind: Service\nmetadata: {name: itp-remote}\n\
         spec: {clusterIP: 10.96.1.4, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice(
            "itp-remote-1",
            "itp-remote",
            "IPv4",
            HTTP,
            &[endpoint(2, "", ""), endpoint(3, "", "")],
        ),
        // externalTrafficPolicy: Local on a node port and an external IP.
        "apiVersion: v1\nkind: Service\nmetadata: {name: etp-local}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.1.5\n  externalIPs: [10.202.1.5]\n  \
         externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30105}]\n"
            .into(),
        slice("etp-local-1", "etp-local", "IPv4", HTTP, &all("")),
        // Topology: node hints name this node for backend 1 only.
        "apiVersion: v1\nkind: Service\nmetadata: {name: node-hints}\n\
         spec: {clusterIP: 10.96.1.6, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice(
            "node-hints-1",
            "node-hints",
            "IPv4",
            HTTP,
            &[
                endpoint(1, "", &format!("    hints: {{forNodes: [{{name: {NODE}}}]}}\n")),
                endpoint(2, "", "    hints: {forNodes: [{name: other-a}]}\n"),
                endpoint(3, "", "    hints: {forNodes: [{name: other-b}]}\n"),
            ],
        ),
        // Topology: zone hints put backends 1 and 2 in this node's zone.
        "apiVersion: v1\nkind: Service\nmetadata: {name: zone-hints}\n\
         spec: {clusterIP: 10.96.1.7, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice(
            "zone-hints-1",
            "zone-hints",
            "IPv4",
            HTTP,
            &[
                endpoint(1, "", "    hints: {forZones: [{name: zone-a}]}\n"),
                endpoint(2, "", "    hints: {forZones: [{name: zone-a}]}\n"),
                endpoint(3, "", "    hints: {forZones: [{name: zone-b}]}\n"),
            ],
        ),
        // A named target port resolved per slice: 9001 on backends 1–2, 9002 on 3.
        "apiVersion: v1\nkind: Service\nmetadata: {name: named}\n\
         spec: {clusterIP: 10.96.1.8, ports: [{name: web, port: 80, targetPort: web}]}\n"
            .into(),
        slice(
            "named-1",
            "named",
            "IPv4",
            "[{name: web, port: 9001, protocol: TCP}]",
            &[endpoint(1, "", ""), endpoint(2, "", "")],
        ),
        slice(
            "named-2",
            "named",
            "IPv4",
            "[{name: web, port: 9002, protocol: TCP}]",
            &[endpoint(3, "", "")],
        ),
        // ClientIP session affinity.
        "apiVersion: v1\nkind: Service\nmetadata: {name: sticky}\n\
         spec: {clusterIP: 10.96.1.9, sessionAffinity: ClientIP, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("sticky-1", "sticky", "IPv4", HTTP, &all("")),
        // No endpoints: reject.
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\n\
         spec: {clusterIP: 10.96.1.10, ports: [{name: http, port: 80}]}\n"
            .into(),
        // Dual-stack.
        "apiVersion: v1\nkind: Service\nmetadata: {name: dual}\n\
         spec: {clusterIP: 10.96.1.11, clusterIPs: [10.96.1.11, 'fd00:96::1:11'], ipFamilies: [IPv4, IPv6], ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("dual-4", "dual", "IPv4", HTTP, &all("")),
        slice("dual-6", "dual", "IPv6", HTTP, &v6_endpoints()),
        // Node port and external IP under the Cluster policy.
        "apiVersion: v1\nkind: Service\nmetadata: {name: exposed}\n\
         spec:\n  type: NodePort\n  clusterIP: 10.96.1.12\n  externalIPs: [10.202.1.12]\n  \
         ports: [{name: http, port: 80, nodePort: 30112}]\n"
            .into(),
        slice("exposed-1", "exposed", "IPv4", HTTP, &all("")),
        // Skipped: handled by another proxy; headless.
        "apiVersion: v1\nkind: Service\n\
         metadata: {name: other-proxy, labels: {service.kubernetes.io/service-proxy-name: other}}\n\
         spec: {clusterIP: 10.96.1.13, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("other-proxy-1", "other-proxy", "IPv4", HTTP, &all("")),
        "apiVersion: v1\nkind: Service\nmetadata: {name: headless}\n\
         spec: {clusterIP: None, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("headless-1", "headless", "IPv4", HTTP, &all("")),
    ];
    documents.join("---\n")
}

fn probe(client: Client, target: &str, service: &'static str, port: &'static str) -> Probe {
    Probe {
        client,
        target: target.parse().expect("a socket address"),
        udp: false,
        requests: 40,
        service,
        port,
        external: false,
        sticky: false,
    }
}

/// Every scenario, with the probes it sends (against [`layout`]).
pub fn scenarios() -> Vec<Scenario> {
    let once = |mut p: Probe| {
        p.requests = 1;
        p
    };
    let external = |mut p: Probe| {
        p.external = true;
        p
    };
    vec![
        Scenario {
            name: "clusterip",
            about: "a ClusterIP balances TCP and UDP over every ready endpoint",
            probes: vec![
                probe(Client::Pod, "10.96.1.1:80", "default/plain", "http"),
                probe(Client::Node, "10.96.1.1:80", "default/plain", "http"),
                Probe {
                    udp: true,
                    ..probe(Client::Pod, "10.96.1.1:53", "default/plain", "dns")
                },
            ],
        },
        Scenario {
            name: "terminating-fallback",
            about: "without ready endpoints, the serving terminating ones are used",
            probes: vec![probe(
                Client::Pod,
                "10.96.1.2:80",
                "default/terminating",
                "http",
            )],
        },
        Scenario {
            name: "itp-local",
            about: "internalTrafficPolicy Local: only the node's endpoints; none here drops",
            probes: vec![
                probe(Client::Pod, "10.96.1.3:80", "default/itp-local", "http"),
                once(probe(
                    Client::Pod,
                    "10.96.1.4:80",
                    "default/itp-remote",
                    "http",
                )),
            ],
        },
        Scenario {
            name: "etp-local",
            about: "externalTrafficPolicy Local: outside traffic to the local endpoint only, client address kept; cluster traffic everywhere",
            probes: vec![
                external(probe(
                    Client::Outside,
                    "10.201.0.1:30105",
                    "default/etp-local",
                    "http",
                )),
                external(probe(
                    Client::Outside,
                    "10.202.1.5:80",
                    "default/etp-local",
                    "http",
                )),
                probe(Client::Pod, "10.96.1.5:80", "default/etp-local", "http"),
            ],
        },
        Scenario {
            name: "node-hints",
            about: "topology: node hints naming this node are followed",
            probes: vec![probe(
                Client::Pod,
                "10.96.1.6:80",
                "default/node-hints",
                "http",
            )],
        },
        Scenario {
            name: "zone-hints",
            about: "topology: zone hints for this node's zone are followed",
            probes: vec![probe(
                Client::Pod,
                "10.96.1.7:80",
                "default/zone-hints",
                "http",
            )],
        },
        Scenario {
            name: "named-port",
            about: "a named target port resolves per slice (9001 here, 9002 there)",
            probes: vec![probe(Client::Pod, "10.96.1.8:80", "default/named", "web")],
        },
        Scenario {
            name: "session-affinity",
            about: "ClientIP affinity keeps a client on one backend",
            probes: vec![Probe {
                sticky: true,
                requests: 20,
                ..probe(Client::Pod, "10.96.1.9:80", "default/sticky", "http")
            }],
        },
        Scenario {
            name: "no-endpoints",
            about: "a Service without endpoints refuses at once",
            probes: vec![
                once(probe(Client::Pod, "10.96.1.10:80", "default/empty", "http")),
                once(probe(
                    Client::Node,
                    "10.96.1.10:80",
                    "default/empty",
                    "http",
                )),
            ],
        },
        Scenario {
            name: "dual-stack",
            about: "a dual-stack Service balances over each family's endpoints",
            probes: vec![
                probe(Client::Pod, "10.96.1.11:80", "default/dual", "http"),
                probe(Client::Pod, "[fd00:96::1:11]:80", "default/dual", "http"),
            ],
        },
        Scenario {
            name: "node-port",
            about: "a node port under the Cluster policy balances everywhere, masqueraded",
            probes: vec![external(probe(
                Client::Outside,
                "10.201.0.1:30112",
                "default/exposed",
                "http",
            ))],
        },
        Scenario {
            name: "external-ip",
            about: "an external IP under the Cluster policy balances everywhere, masqueraded",
            probes: vec![external(probe(
                Client::Outside,
                "10.202.1.12:80",
                "default/exposed",
                "http",
            ))],
        },
        Scenario {
            name: "skipped",
            about: "Services of another proxy and headless ones are left alone",
            probes: vec![once(probe(
                Client::Pod,
                "10.96.1.13:80",
                "default/other-proxy",
                "http",
            ))],
        },
    ]
}

/// The backend behind an endpoint address (`10.244.2.2`, `fd00:244:2::2` → `backend-2`).
fn backend_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("backend-{}", v4.octets()[2]),
        IpAddr::V6(v6) => format!("backend-{:x}", v6.segments()[2]),
    }
}

/// What `probe` should see, from the node's state as the controller computed it
/// (`None`: the Service is not in the node's state).
pub fn expected(state: Option<&ServiceState>, probe: &Probe) -> Outcome {
    let Some(state) = state else {
        return Outcome::NoAnswer;
    };
    let Some(port) = state.ports.iter().find(|p| p.name == probe.port) else {
        return Outcome::Mixed(format!("no port {} in the state", probe.port));
    };
    let family = Family::of(probe.target.ip());
    let policy = PortPolicy::new(state, port, family);
    let endpoints = if probe.external {
        policy.external_endpoints()
    } else {
        policy.internal_endpoints()
    };
    if !policy.has_endpoints {
        return Outcome::Refused;
    }
    if endpoints.is_empty() {
        return Outcome::NoAnswer;
    }
    if probe.sticky {
        return Outcome::Sticky;
    }
    Outcome::Reached {
        backends: endpoints.iter().map(|e| backend_name(e.ip())).collect(),
        source_kept: (probe.client == Client::Outside).then_some(policy.external_local),
    }
}

/// What the answers to one probe add up to.
fn outcome(probe: &Probe, results: Vec<Result<String, ProbeError>>) -> Outcome {
    let mut backends = BTreeSet::new();
    let mut peers = BTreeSet::new();
    let mut refused = 0;
    let mut silent = 0;
    let mut other = BTreeSet::new();
    // Kept for the report: which way the unanswered ones failed, and when.
    let mut silences = Vec::new();
    for result in &results {
        match result {
            // "backend-1 from 10.201.0.2:53422"
            Ok(answer) => {
                let mut words = answer.split_whitespace();
                backends.insert(words.next().unwrap_or_default().to_string());
                if let Some(peer) = words.nth(1).and_then(|p| p.parse::<SocketAddr>().ok()) {
                    peers.insert(peer.ip());
                }
            }
            Err(e) if e.is_refused() => refused += 1,
            Err(e) if e.is_timeout() || matches!(e, ProbeError::Unreachable { .. }) => {
                silent += 1;
                silences.push(e.to_string());
            }
            Err(e) => {
                other.insert(e.to_string());
            }
        }
    }
    let n = results.len();
    match (backends.len(), refused, silent) {
        (_, 0, 0) if other.is_empty() && probe.sticky && backends.len() == 1 => Outcome::Sticky,
        (b, 0, 0) if other.is_empty() && b > 0 && !probe.sticky => Outcome::Reached {
            backends,
            source_kept: (probe.client == Client::Outside).then(|| {
                peers
                    .iter()
                    .all(|p| *p == IpAddr::from(CLIENT_IP) || *p == IpAddr::from(CLIENT_IP6))
            }),
        },
        (0, r, 0) if r == n => Outcome::Refused,
        (0, 0, s) if s == n => Outcome::NoAnswer,
        _ => Outcome::Mixed(format!(
            "{} answered by {backends:?}, {refused} refused, {silent} unanswered {silences:?}, {other:?}",
            n - refused - silent - other.len()
        )),
    }
}

/// Every probe's outcome, by scenario and probe name.
pub type Results = BTreeMap<(String, String), Outcome>;

/// Runs every scenario through the agent `spec` describes (one cluster holding them
/// all), then has the agent remove what it made; returns the outcomes and the
/// expectations from the controller's state.
pub async fn run(spec: AgentSpec, scenarios: &[Scenario]) -> (Results, Results) {
    let mut cluster = Cluster::start_with(spec, layout()).await;
    // Everything is programmed once the last Service in the manifest answers.
    cluster
        .eventually("every Service programmed", |c| {
            c.pod()
                .tcp(
                    "10.96.1.12:80".parse().expect("an address"),
                    &ProbeOptions::default(),
                )
                .is_ok()
        })
        .await;
    let generation = cluster
        .controller
        .as_ref()
        .expect("the controller runs")
        .hub
        .generations
        .borrow()
        .clone();
    let quick = ProbeOptions {
        connect_timeout: Duration::from_millis(700),
        io_timeout: Duration::from_secs(2),
    };
    let mut results = Results::new();
    let mut expectations = Results::new();
    for scenario in scenarios {
        for probe in &scenario.probes {
            let origin = match probe.client {
                Client::Pod => cluster.pod(),
                Client::Node => cluster.on_node(),
                Client::Outside => cluster.outside(),
            };
            let answers = origin.requests(probe.target, probe.requests, probe.udp, &quick);
            let key = (scenario.name.to_string(), probe.name());
            results.insert(key.clone(), outcome(probe, answers));
            let state = generation
                .resource(probe.service, NODE)
                .and_then(|r| r.decode().service)
                .and_then(|s| ServiceState::try_from(&s).ok());
            expectations.insert(key, expected(state.as_ref(), probe));
        }
    }
    // What the agent made outside the cluster's namespaces (pinned eBPF objects) goes
    // with it.
    cluster
        .stop_and_clean_up_agent()
        .expect("the agent's --cleanup removes what it made");
    (results, expectations)
}

/// The runs of several dataplanes side by side, with the expectation.
#[derive(Clone, Debug, Default)]
pub struct Matrix {
    pub runs: Vec<(String, Results)>,
    pub expected: Results,
}

/// One probe the dataplanes disagree on, or disagree with the expectation on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub scenario: String,
    pub probe: String,
    /// The expectation and each dataplane's outcome.
    pub outcomes: Vec<(String, String)>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {}:", self.scenario, self.probe)?;
        for (who, outcome) in &self.outcomes {
            write!(f, " {who}: {outcome};")?;
        }
        Ok(())
    }
}

impl Matrix {
    /// Adds one dataplane's run; the expectation of the first run is kept (every run
    /// computes the same one from the same state).
    pub fn add(&mut self, dataplane: &str, results: Results, expected: Results) {
        if self.expected.is_empty() {
            self.expected = expected;
        }
        self.runs.push((dataplane.to_string(), results));
    }

    /// The probes where some dataplane differs from the expectation.
    pub fn differences(&self) -> Vec<Difference> {
        self.expected
            .iter()
            .filter(|(key, want)| {
                self.runs
                    .iter()
                    .any(|(_, results)| results.get(*key) != Some(*want))
            })
            .map(|((scenario, probe), want)| Difference {
                scenario: scenario.clone(),
                probe: probe.clone(),
                outcomes: std::iter::once(("expected".to_string(), want.to_string()))
                    .chain(self.runs.iter().map(|(name, results)| {
                        (
                            name.clone(),
                            results
                                .get(&(scenario.clone(), probe.clone()))
                                .map_or("not run".into(), ToString::to_string),
                        )
                    }))
                    .collect(),
            })
            .collect()
    }

    /// Prints the table and the summary; panics with the summary and every difference
    /// unless every dataplane agrees with the expectation (what the conformance tests
    /// assert).
    pub fn assert_agreement(&self) {
        println!("{}\n{}", self.table(), self.summary());
        let differences = self.differences();
        assert!(
            differences.is_empty(),
            "{}\n{}",
            self.summary(),
            differences
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// `conformance: X of Y scenarios agree across iptables, ipvs and ebpf`.
    pub fn summary(&self) -> String {
        let scenarios: BTreeSet<&String> = self.expected.keys().map(|(s, _)| s).collect();
        let failing: BTreeSet<String> =
            self.differences().into_iter().map(|d| d.scenario).collect();
        let names: Vec<&str> = self.runs.iter().map(|(n, _)| n.as_str()).collect();
        let across = match names.as_slice() {
            [] => String::new(),
            [one] => one.to_string(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        };
        format!(
            "conformance: {} of {} scenarios agree across {across}",
            scenarios.len() - failing.len(),
            scenarios.len()
        )
    }

    /// A Markdown table: one row per probe, one column per dataplane.
    pub fn table(&self) -> String {
        let mut out = String::from("| scenario | probe | expected |");
        for (name, _) in &self.runs {
            out.push_str(&format!(" {name} |"));
        }
        out.push_str("\n|---|---|---|");
        for _ in &self.runs {
            out.push_str("---|");
        }
        out.push('\n');
        for ((scenario, probe), want) in &self.expected {
            out.push_str(&format!("| {scenario} | {probe} | {want} |"));
            for (_, results) in &self.runs {
                let got = results.get(&(scenario.clone(), probe.clone()));
                let cell = match got {
                    Some(o) if o == want => "✓".to_string(),
                    Some(o) => format!("**{o}**"),
                    None => "not run".into(),
                };
                out.push_str(&format!(" {cell} |"));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reached(backends: &[&str]) -> Outcome {
        Outcome::Reached {
            backends: backends.iter().map(|b| b.to_string()).collect(),
            source_kept: None,
        }
    }

    #[test]
    fn a_dataplane_that_differs_fails_its_scenario_and_names_it() {
        let key = ("clusterip".to_string(), "pod → 10.96.1.1:80".to_string());
        let want: Results = [(key.clone(), reached(&["backend-1", "backend-2"]))].into();
        let mut matrix = Matrix::default();
        matrix.add("iptables", want.clone(), want.clone());
        matrix.add("ipvs", want.clone(), want.clone());
        assert_eq!(
            matrix.summary(),
            "conformance: 1 of 1 scenarios agree across iptables and ipvs"
        );
        matrix.assert_agreement();
        matrix.add("ebpf", [(key, reached(&["backend-1"]))].into(), want);
        assert_eq!(
            matrix.summary(),
            "conformance: 0 of 1 scenarios agree across iptables, ipvs and ebpf"
        );
        let differences = matrix.differences();
        assert_eq!(differences.len(), 1);
        assert!(
            differences[0].to_string().contains("ebpf: backend-1;"),
            "{}",
            differences[0]
        );
        assert!(matrix.table().contains("**backend-1**"));
        let failed = std::panic::catch_unwind(|| matrix.assert_agreement())
            .expect_err("a disagreement fails the assertion");
        let message = failed.downcast_ref::<String>().expect("a formatted panic");
        assert!(message.contains("0 of 1 scenarios agree"), "{message}");
        assert!(message.contains("ebpf: backend-1;"), "{message}");
    }

    #[test]
    fn answers_add_up_to_an_outcome() {
        let p = probe(
            Client::Outside,
            "10.201.0.1:30112",
            "default/exposed",
            "http",
        );
        let answer = |b: &str, peer: &str| Ok(format!("{b} from {peer}:40000"));
        assert_eq!(
            outcome(
                &p,
                vec![
                    answer("backend-1", "10.201.0.2"),
                    answer("backend-2", "10.201.0.2")
                ]
            ),
            Outcome::Reached {
                backends: ["backend-1".to_string(), "backend-2".into()].into(),
                source_kept: Some(true)
            }
        );
        assert_eq!(
            outcome(&p, vec![answer("backend-1", "10.244.1.1")]),
            Outcome::Reached {
                backends: ["backend-1".to_string()].into(),
                source_kept: Some(false)
            }
        );
        let sticky = Probe { sticky: true, ..p };
        assert_eq!(
            outcome(
                &sticky,
                vec![answer("backend-3", "x"), answer("backend-3", "x")]
            ),
            Outcome::Sticky
        );
        assert!(matches!(
            outcome(
                &sticky,
                vec![answer("backend-3", "x"), answer("backend-1", "x")]
            ),
            Outcome::Mixed(_)
        ));
    }

    #[test]
    fn backends_are_named_from_either_family() {
        assert_eq!(backend_name("10.244.3.2".parse().unwrap()), "backend-3");
        assert_eq!(backend_name("fd00:244:2::2".parse().unwrap()), "backend-2");
    }
}
