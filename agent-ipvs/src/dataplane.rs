//! The IPVS [`Dataplane`]: programs virtual services through generic netlink, VIPs
//! (local routes through the dummy device) through rtnetlink and ipset elements through
//! nfnetlink, all in process, in the order
//! [`crate::transition`] plans; reads all three back; drains removed TCP real servers.
//!
//! It owns the dummy device `swy-ipvs0`, the `SWY-` ipsets and iptables chains, and the
//! virtual services its ipset elements claim or whose address is on its device. It
//! never touches anything else.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use switchyard_agent_core::{
    conntrack,
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
        ProgrammedService,
    },
    netfilter::{Backend, Family, Runner},
    state::{Protocol, ServiceState},
};
use switchyard_proto::v1;

use crate::{
    ipset,
    ipset_netlink::{ElementChange, IpsetSocket},
    link::Links,
    netlink::{self, DestId, Destination, IpvsSocket, Op, ServiceId, Timeouts},
    readback::{self, KernelReal, KernelView, KernelVs},
    render::{
        DUMMY_DEVICE, RealServer, RenderConfig, ServicePlan, SetElement, SetKind, VsKey,
        render_service,
    },
    rules::{self, RulesConfig},
    transition::{IpvsOp, Mirror, Move, Refs, Transition, plan_transition},
};

/// Settings of the IPVS dataplane, in kube-proxy's terms.
#[derive(Clone, Debug)]
pub struct IpvsConfig {
    /// `--ipvs-scheduler` (node addresses are read from the kernel).
    pub render: RenderConfig,
    /// `--cluster-cidr`, `--masquerade-all`, the masquerade bit.
    pub rules: RulesConfig,
    /// `--nodeport-addresses`: node ports answer on node addresses inside these CIDRs;
    /// empty: on every address but loopback and link-local ones.
    pub nodeport_addresses: Vec<IpNet>,
    /// `--ipvs-exclude-cidrs`: virtual services there are never deleted as orphans.
    pub exclude_cidrs: Vec<IpNet>,
    /// `--ipvs-strict-arp`: `arp_ignore=1`, `arp_announce=2`, so the node does not answer
    /// ARP for the VIPs on the dummy device.
    pub strict_arp: bool,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout` in seconds; 0
    /// leaves the kernel's value.
    pub timeouts: Timeouts,
    /// How long a removed TCP or SCTP real server may drain before it is deleted even
    /// with connections left.
    pub graceful_termination_timeout: Duration,
    /// Force an iptables backend; `None`: detect it.
    pub backend: Option<Backend>,
    /// Program IPv4 only.
    pub disable_ipv6: bool,
    /// Do not run `conntrack` after UDP endpoint changes.
    pub disable_conntrack: bool,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        Self {
            render: RenderConfig::default(),
            rules: RulesConfig::default(),
            nodeport_addresses: Vec::new(),
            exclude_cidrs: Vec::new(),
            strict_arp: false,
            timeouts: Timeouts::default(),
            graceful_termination_timeout: Duration::from_secs(15 * 60),
            backend: None,
            disable_ipv6: false,
            disable_conntrack: false,
        }
    }
}

/// The sysctls kube-proxy's IPVS mode sets, with why:
/// - `vs/conntrack`: IPVS connections get netfilter conntrack entries, which the
///   MASQUERADE rules and conntrack cleanup need;
/// - `vs/expire_nodest_conn`: a connection whose real server was deleted is dropped at
///   its next packet instead of hanging;
/// - `vs/expire_quiescent_template`: persistence templates of a weight-0 (draining)
///   real server expire, so affinity moves new connections elsewhere;
/// - `ip_forward`: traffic to remote endpoints is forwarded.
///
/// `vs/conn_reuse_mode` stays at the kernel's default: kube-proxy sets 0 only on kernels
/// before 5.9, where 1 added a second of delay to reused ports.
pub const SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
];

/// With `--ipvs-strict-arp`.
pub const STRICT_ARP_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// Programs Services into IPVS; see the crate docs for the layout.
pub struct IpvsDataplane {
    config: IpvsConfig,
    ipvs: IpvsSocket,
    links: Links,
    ipsets: IpsetSocket,
    runner: Runner,
    backend: Backend,
    /// The dummy device's index, once it exists.
    dummy: Option<u32>,
    /// The node addresses node ports answer on.
    node_addresses: Vec<IpAddr>,
    /// What the kernel holds per Service (read back, then kept up to date).
    programmed: BTreeMap<String, ServicePlan>,
    mirror: Mirror,
    refs: Refs,
    /// Objects no Service claims, found by the last read-back; a full sync removes them.
    orphans: KernelView,
    /// When each draining real server started draining.
    draining_since: BTreeMap<(VsKey, SocketAddr), Instant>,
    /// The states last applied, to find UDP endpoints that went away.
    states: BTreeMap<String, Arc<ServiceState>>,
    /// Whether the device, sets, rules and sysctls were put in place since start.
    set_up: bool,
    /// The operations of the last apply, for tests and logs.
    last_transition: Transition,
    /// Where the last apply spent its time, phase by phase.
    last_phases: Phases,
    /// Where the last read of the kernel spent its time.
    last_read_phases: Phases,
}

/// Time spent per phase of an apply, for the debug log and the benchmarks.
#[derive(Clone, Debug, Default)]
pub struct Phases {
    pub phases: Vec<(&'static str, Duration)>,
    mark: Option<Instant>,
}

impl Phases {
    fn start() -> Self {
        Self {
            phases: Vec::new(),
            mark: Some(Instant::now()),
        }
    }

    /// Records the time since the previous mark as `phase`.
    fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        if let Some(mark) = self.mark.replace(now) {
            self.phases.push((phase, now - mark));
        }
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, took)) in self.phases.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{phase} {took:.2?}")?;
        }
        Ok(())
    }
}

fn failed(operation: impl Into<String>, error: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Command {
        command: operation.into(),
        message: error.to_string(),
    }
}

impl IpvsDataplane {
    /// Opens the IPVS and rtnetlink sockets in the calling thread's network namespace and
    /// reads the node addresses; detects the iptables backend unless the config forces
    /// one. Writes nothing.
    pub fn new(config: IpvsConfig) -> Result<Self, DataplaneError> {
        let ipvs = IpvsSocket::open().map_err(|e| failed("opening IPVS", e))?;
        let links = Links::open().map_err(|e| failed("opening rtnetlink", e))?;
        let ipsets = IpsetSocket::open().map_err(|e| failed("opening nfnetlink", e))?;
        let runner = Runner::default();
        let backend = config.backend.unwrap_or_else(|| runner.detect_backend());
        tracing::info!(?backend, "iptables backend for the IPVS agent's rules");
        let mut dataplane = Self {
            config,
            ipvs,
            links,
            ipsets,
            runner,
            backend,
            dummy: None,
            node_addresses: Vec::new(),
            programmed: BTreeMap::new(),
            mirror: Mirror::default(),
            refs: Refs::default(),
            orphans: KernelView::default(),
            draining_since: BTreeMap::new(),
            states: BTreeMap::new(),
            set_up: false,
            last_transition: Transition::default(),
            last_phases: Phases::default(),
            last_read_phases: Phases::default(),
        };
        dataplane.read_addresses()?;
        Ok(dataplane)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The kernel operations the last apply planned, each with the Service it was for.
    pub fn last_transition(&self) -> &Transition {
        &self.last_transition
    }

    /// Where the last apply spent its time.
    pub fn last_phases(&self) -> &Phases {
        &self.last_phases
    }

    /// Where the last read of the kernel spent its time.
    pub fn last_read_phases(&self) -> &Phases {
        &self.last_read_phases
    }

    /// The node addresses node ports answer on, as last read.
    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.node_addresses
    }

    fn families(&self) -> Vec<Family> {
        if self.config.disable_ipv6 {
            vec![Family::V4]
        } else {
            Family::ALL.to_vec()
        }
    }

    fn render_config(&self) -> RenderConfig {
        RenderConfig {
            node_addresses: self.node_addresses.clone(),
            ..self.config.render.clone()
        }
    }

    fn render(&self, service: &DesiredService, cfg: &RenderConfig) -> ServicePlan {
        let mut plan = render_service(service, cfg);
        if self.config.disable_ipv6 {
            let v4 = |ip: &IpAddr| ip.is_ipv4();
            plan.addresses.retain(v4);
            plan.virtual_services.retain(|k, _| k.addr.is_ipv4());
            plan.elements.retain(|e| e.family == Family::V4);
        }
        plan
    }

    /// Reads the dummy device's index, the VIPs routed through it, and the node
    /// addresses.
    fn read_addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        self.dummy = self
            .links
            .link_index(DUMMY_DEVICE)
            .map_err(|e| failed("reading the dummy device", e))?;
        let vips: BTreeSet<IpAddr> = match self.dummy {
            Some(index) => self
                .links
                .vips(index)
                .map_err(|e| failed("reading the VIP routes", e))?
                .into_iter()
                .collect(),
            None => BTreeSet::new(),
        };
        let all = self
            .links
            .addresses()
            .map_err(|e| failed("reading addresses", e))?;
        let mut node: Vec<IpAddr> = all
            .iter()
            .filter(|a| Some(a.index) != self.dummy)
            .map(|a| a.addr)
            .filter(|ip| node_port_address(*ip, &self.config.nodeport_addresses))
            .filter(|ip| ip.is_ipv4() || !self.config.disable_ipv6)
            .collect();
        node.sort();
        node.dedup();
        if node != self.node_addresses {
            tracing::info!(addresses = ?node, "node addresses for node ports");
            self.node_addresses = node;
        }
        Ok(vips)
    }

    /// Puts the device, the sets, the fixed rules, the sysctls and the timeouts in
    /// place; each step is idempotent.
    fn set_up(&mut self) -> Result<(), DataplaneError> {
        for (key, value) in SYSCTLS.iter().chain(if self.config.strict_arp {
            &STRICT_ARP_SYSCTLS[..]
        } else {
            &[]
        }) {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, value).map_err(|source| DataplaneError::Io {
                operation: format!("writing {value} to {path}"),
                source,
            })?;
        }
        let t = self.config.timeouts;
        if t != Timeouts::default() {
            self.ipvs
                .set_timeouts(&t)
                .map_err(|e| failed("setting the IPVS timeouts", e))?;
        }
        let index = self
            .links
            .ensure_dummy(DUMMY_DEVICE)
            .map_err(|e| failed("setting up the dummy device", e))?;
        self.dummy = Some(index);
        let families = self.families();
        self.runner.run(
            "ipset",
            &["-exist", "restore"],
            Some(&ipset::create_lines(&families)),
        )?;
        for family in families {
            let save = self.save(family)?;
            if !rules::in_force(family, &self.config.rules, &save) {
                let input = rules::restore_input(family, &self.config.rules, &save);
                self.runner.run(
                    &self.backend.restore(family),
                    &["--noflush", "-w", "5"],
                    Some(&input),
                )?;
            }
        }
        self.set_up = true;
        Ok(())
    }

    fn save(&self, family: Family) -> Result<String, DataplaneError> {
        let tool = self.backend.save(family);
        let mut text = self.runner.run(&tool, &["-t", "nat"], None)?;
        text.push_str(&self.runner.run(&tool, &["-t", "filter"], None)?);
        Ok(text)
    }

    /// Reads the kernel and makes it the dataplane's picture of what is programmed.
    fn refresh(&mut self) -> Result<(), DataplaneError> {
        let mut phases = Phases::start();
        let on_dummy = self.read_addresses()?;
        phases.mark("routes and addresses");
        let dump = self.ipvs.dump().map_err(|e| failed("dumping IPVS", e))?;
        phases.mark("IPVS dump");
        let sets = self
            .ipsets
            .list()
            .map_err(|e| DataplaneError::ReadBack(e.to_string()))?;
        phases.mark("ipset list");
        let virtual_services = dump
            .into_iter()
            .filter_map(|(service, dests)| kernel_vs(service, dests))
            .collect();
        let view = readback::attribute(virtual_services, sets, on_dummy);
        self.adopt(view);
        phases.mark("attribution");
        tracing::debug!(%phases, "IPVS read-back phases");
        self.last_read_phases = phases;
        Ok(())
    }

    fn adopt(&mut self, view: KernelView) {
        let now = Instant::now();
        let draining: BTreeSet<(VsKey, SocketAddr)> =
            view.draining.iter().map(|d| (d.key, d.real)).collect();
        self.draining_since.retain(|k, _| draining.contains(k));
        for key in &draining {
            self.draining_since.entry(*key).or_insert(now);
        }
        self.mirror = Mirror {
            virtual_services: view.virtual_services.clone(),
            draining,
            addresses: view.addresses.clone(),
            loop_backs: view.loop_backs.clone(),
        };
        self.refs = Refs::of(view.services.values());
        self.programmed = view.services.clone();
        self.orphans = view;
    }

    /// Deletes draining real servers without an established connection left (closing
    /// ones no longer carry data), or draining longer than the graceful-termination
    /// timeout.
    fn sweep_draining(&mut self, connections: &BTreeMap<(VsKey, SocketAddr), u32>) {
        let timeout = self.config.graceful_termination_timeout;
        let done: Vec<(VsKey, SocketAddr)> = self
            .draining_since
            .iter()
            .filter(|(key, since)| {
                connections.get(key).is_none_or(|c| *c == 0) || since.elapsed() >= timeout
            })
            .map(|(key, _)| *key)
            .collect();
        if done.is_empty() {
            return;
        }
        let ops: Vec<IpvsOp> = done
            .iter()
            .map(|(key, real)| IpvsOp::DeleteReal(*key, *real))
            .collect();
        let results = self
            .ipvs
            .execute(&ops.iter().map(netlink_op).collect::<Vec<_>>());
        for (op, result) in ops.iter().zip(results) {
            match result {
                Ok(()) => {
                    tracing::debug!(?op, "drained real server deleted");
                    self.mirror.record(op);
                    if let IpvsOp::DeleteReal(key, real) = op {
                        self.draining_since.remove(&(*key, *real));
                    }
                }
                // Gone already (its virtual service went, or someone deleted it).
                Err(e) if e.errno() == Some(libc::ENOENT) || e.errno() == Some(libc::ESRCH) => {
                    if let IpvsOp::DeleteReal(key, real) = op {
                        self.draining_since.remove(&(*key, *real));
                        self.mirror.draining.remove(&(*key, *real));
                    }
                }
                Err(e) => tracing::warn!(%e, "deleting a drained real server failed"),
            }
        }
    }

    /// Established connections of the draining real servers, from their virtual services.
    fn draining_connections(&mut self) -> BTreeMap<(VsKey, SocketAddr), u32> {
        let services: BTreeSet<VsKey> = self.draining_since.keys().map(|(k, _)| *k).collect();
        let mut counts = BTreeMap::new();
        for key in services {
            let Ok(dests) = self.ipvs.destinations(&service_id(&key)) else {
                continue;
            };
            for dest in dests {
                let real = SocketAddr::new(dest.addr, dest.port);
                if self.draining_since.contains_key(&(key, real)) {
                    counts.insert((key, real), dest.active_conns);
                }
            }
        }
        counts
    }

    /// Carries out `transition`; returns the Services that could not be programmed.
    fn execute(
        &mut self,
        t: &Transition,
        moves: &[Move<'_>],
        phases: &mut Phases,
    ) -> BTreeMap<String, String> {
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        let users = |addr: &IpAddr| -> Vec<String> {
            moves
                .iter()
                .filter(|m| {
                    m.new.is_some_and(|p| p.addresses.contains(addr))
                        || m.old.is_some_and(|p| p.addresses.contains(addr))
                })
                .map(|m| m.name.to_string())
                .collect()
        };
        let dummy = self.dummy.unwrap_or_default();

        // 1. VIPs.
        for (addr, result) in self.links.change_vips(dummy, &t.add_addresses, &[]) {
            match result {
                Ok(()) => {
                    self.mirror.addresses.insert(addr);
                }
                Err(e) => {
                    for name in users(&addr) {
                        failures.entry(name).or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        phases.mark("VIPs up");
        // 2. Virtual services and real servers up.
        self.run_ipvs(&t.ipvs_first, &mut failures);
        phases.mark("IPVS up");
        // 3. ipset elements and versions.
        self.run_ipset(t, &mut failures);
        phases.mark("ipset");
        // 4. Drains and deletions.
        self.run_ipvs(&t.ipvs_last, &mut failures);
        phases.mark("IPVS down");
        // 5. VIPs nobody uses.
        for (addr, result) in self.links.change_vips(dummy, &[], &t.del_addresses) {
            match result {
                Ok(()) => {
                    self.mirror.addresses.remove(&addr);
                }
                Err(e) => {
                    for name in users(&addr) {
                        failures.entry(name).or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        phases.mark("VIPs down");
        failures
    }

    fn run_ipvs(&mut self, ops: &[(String, IpvsOp)], failures: &mut BTreeMap<String, String>) {
        if ops.is_empty() {
            return;
        }
        let wire: Vec<Op> = ops.iter().map(|(_, op)| netlink_op(op)).collect();
        let results = self.ipvs.execute(&wire);
        let now = Instant::now();
        for ((name, op), result) in ops.iter().zip(results) {
            match result {
                Ok(()) => {
                    self.mirror.record(op);
                    match op {
                        IpvsOp::SetReal(key, real, 0) => {
                            self.draining_since.insert((*key, *real), now);
                        }
                        IpvsOp::SetReal(key, real, _) | IpvsOp::DeleteReal(key, real) => {
                            self.draining_since.remove(&(*key, *real));
                        }
                        IpvsOp::DeleteService(key) => {
                            self.draining_since.retain(|(k, _), _| k != key);
                        }
                        _ => {}
                    }
                }
                Err(e) => {
                    let message = match (op, e.errno()) {
                        (IpvsOp::AddService(_, vs), Some(libc::ENOENT)) => format!(
                            "{e}: is the IPVS scheduler {:?} available (modprobe ip_vs_{})?",
                            vs.scheduler, vs.scheduler
                        ),
                        _ => e.to_string(),
                    };
                    failures.entry(name.clone()).or_insert(message);
                }
            }
        }
    }

    /// The ipset part of `t`: adds, version records, then deletes, in process; a
    /// refused element fails its Service.
    fn run_ipset(&mut self, t: &Transition, failures: &mut BTreeMap<String, String>) {
        let mut changes =
            Vec::with_capacity(t.element_adds.len() + t.versions.len() + t.element_dels.len());
        let mut owners = Vec::with_capacity(changes.capacity());
        for (element, name) in &t.element_adds {
            changes.push(ElementChange::Add(element, name));
            owners.push(name.as_str());
        }
        for (name, version) in &t.versions {
            changes.push(ElementChange::Version(name, *version));
            owners.push(name.as_str());
        }
        for (element, name) in &t.element_dels {
            changes.push(ElementChange::Del(element));
            owners.push(name.as_str());
        }
        if changes.is_empty() {
            return;
        }
        let results = self.ipsets.change(&changes);
        for ((change, owner), result) in changes.iter().zip(owners).zip(results) {
            match (change, result) {
                (ElementChange::Add(element, _), Ok(())) if element.kind == SetKind::LoopBack => {
                    self.mirror.loop_backs.insert((*element).clone());
                }
                (ElementChange::Del(element), Ok(())) if element.kind == SetKind::LoopBack => {
                    self.mirror.loop_backs.remove(*element);
                }
                (_, Ok(())) => {}
                (_, Err(error)) => {
                    failures
                        .entry(owner.to_string())
                        .or_insert_with(|| error.to_string());
                }
            }
        }
    }

    /// Removes what no Service claims (after a full sync's read-back).
    fn remove_orphans(&mut self) {
        let excluded = |addr: &IpAddr| self.config.exclude_cidrs.iter().any(|c| c.contains(addr));
        let ops: Vec<Op> = self
            .orphans
            .orphan_virtual_services
            .iter()
            .filter(|k| !excluded(&k.addr))
            .map(|k| Op::DelService(service_id(k)))
            .collect();
        for result in self.ipvs.execute(&ops) {
            if let Err(e) = result {
                tracing::warn!(%e, "removing an orphaned virtual service failed");
            }
        }
        let strays: Vec<SetElement> = self
            .orphans
            .stray_versions
            .iter()
            .map(|key| SetElement {
                kind: SetKind::Versions,
                family: Family::V6,
                element: key.clone(),
            })
            .collect();
        let changes: Vec<ElementChange<'_>> = self
            .orphans
            .orphan_elements
            .iter()
            .chain(&strays)
            .map(ElementChange::Del)
            .collect();
        for result in self.ipsets.change(&changes) {
            if let Err(e) = result {
                tracing::warn!(%e, "removing an orphaned ipset element failed");
            }
        }
        if let Some(dummy) = self.dummy {
            let orphans = self.orphans.orphan_addresses.clone();
            for (addr, result) in self.links.change_vips(dummy, &[], &orphans) {
                if let Err(e) = result {
                    tracing::warn!(%addr, %e, "removing an orphaned VIP failed");
                }
            }
        }
        self.orphans = KernelView::default();
    }

    /// Every Service's kernel objects as a full sync of `desired` would program them,
    /// with the fixed rules and set definitions, without touching the kernel.
    pub fn dry_run(&self, desired: &Desired) -> String {
        let cfg = self.render_config();
        let mut text = String::new();
        for family in self.families() {
            text.push_str(&format!(
                "# {} rules ({family})\n",
                self.backend.iptables(family)
            ));
            text.push_str(&rules::restore_input(family, &self.config.rules, ""));
        }
        text.push_str("# ipsets\n");
        text.push_str(&ipset::create_lines(&self.families()));
        text.push_str(&format!(
            "# node addresses for node ports: {:?}\n",
            self.node_addresses
        ));
        for (name, service) in desired {
            text.push_str(&format!("# {name}\n"));
            for object in self.render(service, &cfg).objects() {
                text.push_str(&object);
                text.push('\n');
            }
        }
        text
    }
}

/// Whether node ports answer on `ip`: not loopback or link-local, and inside
/// `--nodeport-addresses` when that is set.
fn node_port_address(ip: IpAddr, allowed: &[IpNet]) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !ip.is_loopback()
        && !link_local
        && (allowed.is_empty() || allowed.iter().any(|net| net.contains(&ip)))
}

fn service_id(key: &VsKey) -> ServiceId {
    ServiceId::new(
        match key.protocol {
            Protocol::Tcp => netlink::Protocol::Tcp,
            Protocol::Udp => netlink::Protocol::Udp,
            Protocol::Sctp => netlink::Protocol::Sctp,
        },
        key.addr,
        key.port,
    )
}

fn netlink_op(op: &IpvsOp) -> Op {
    let service = |key: &VsKey, vs: &crate::render::VirtualService| {
        let service = netlink::Service::new(service_id(key), vs.scheduler.clone());
        match vs.persistence {
            Some(timeout) => service.persistent(timeout),
            None => service,
        }
    };
    match op {
        IpvsOp::AddService(key, vs) => Op::NewService(service(key, vs)),
        IpvsOp::UpdateService(key, vs) => Op::SetService(service(key, vs)),
        IpvsOp::DeleteService(key) => Op::DelService(service_id(key)),
        IpvsOp::AddReal(key, real) => {
            Op::NewDest(service_id(key), Destination::new(real.ip(), real.port(), 1))
        }
        IpvsOp::SetReal(key, real, weight) => Op::SetDest(
            service_id(key),
            Destination::new(real.ip(), real.port(), *weight),
        ),
        IpvsOp::DeleteReal(key, real) => Op::DelDest(
            service_id(key),
            DestId {
                addr: real.ip(),
                port: real.port(),
            },
        ),
    }
}

/// A dumped virtual service in read-back terms; `None` for fwmark services and
/// protocols switchyard never programs.
fn kernel_vs(service: netlink::Service, dests: Vec<Destination>) -> Option<KernelVs> {
    let protocol = match service.id.protocol {
        netlink::Protocol::Tcp => Protocol::Tcp,
        netlink::Protocol::Udp => Protocol::Udp,
        netlink::Protocol::Sctp => Protocol::Sctp,
    };
    Some(KernelVs {
        key: VsKey {
            protocol,
            addr: service.id.addr,
            port: service.id.port,
        },
        scheduler: service.scheduler,
        persistence: (service.flags & netlink::flags::PERSISTENT != 0).then_some(service.timeout),
        reals: dests
            .into_iter()
            .map(|d| KernelReal {
                addr: SocketAddr::new(d.addr, d.port),
                server: RealServer {
                    weight: d.weight,
                    masquerade: d.fwd == netlink::ForwardMethod::Masquerade,
                },
                active_connections: d.active_conns,
                inactive_connections: d.inactive_conns,
            })
            .collect(),
    })
}

impl Dataplane for IpvsDataplane {
    fn kind(&self) -> v1::Dataplane {
        v1::Dataplane::Ipvs
    }

    fn apply(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        let mut phases = Phases::start();
        if change.full || !self.set_up {
            self.set_up()?;
            phases.mark("set up");
        }
        if change.full {
            self.refresh()?;
            phases.mark("read back");
        }
        let connections = self.draining_connections();
        self.sweep_draining(&connections);
        phases.mark("drain");

        let cfg = self.render_config();
        let names: BTreeSet<String> = if change.full {
            desired
                .keys()
                .chain(self.programmed.keys())
                .cloned()
                .collect()
        } else {
            change
                .upserted
                .iter()
                .chain(&change.removed)
                .cloned()
                .collect()
        };
        // (name, what the kernel holds, what it must hold)
        let plans: Vec<(String, Option<ServicePlan>, Option<ServicePlan>)> = names
            .into_iter()
            .map(|name| {
                let new = if change.removed.contains(&name) {
                    None
                } else {
                    desired.get(&name).map(|s| self.render(s, &cfg))
                };
                let old = self.programmed.get(&name).cloned();
                (name, old, new)
            })
            .collect();
        let moves: Vec<Move<'_>> = plans
            .iter()
            .map(|(name, old, new)| Move {
                name,
                old: old.as_ref(),
                new: new.as_ref(),
            })
            .collect();
        let mut refs = self.refs.clone();
        let transition = plan_transition(&moves, &self.mirror, &mut refs);
        phases.mark("render and plan");
        let failed = self.execute(&transition, &moves, &mut phases);
        drop(moves);
        tracing::debug!(
            vips = transition.add_addresses.len() + transition.del_addresses.len(),
            ipvs = transition.ipvs_first.len() + transition.ipvs_last.len(),
            elements = transition.element_adds.len() + transition.element_dels.len(),
            failed = failed.len(),
            "IPVS apply"
        );
        self.last_transition = transition;

        if change.full {
            self.remove_orphans();
        }
        if failed.is_empty() {
            self.refs = refs;
        } else {
            // Part of the change is in the kernel: read back what it holds.
            for (name, error) in &failed {
                tracing::warn!(service = %name, %error, "IPVS apply failed");
            }
        }
        for (name, _, new) in plans {
            if failed.contains_key(&name) {
                continue;
            }
            let state = desired
                .get(&name)
                .filter(|_| new.is_some())
                .map(|s| &s.state);
            if !self.config.disable_conntrack {
                conntrack::flush(
                    &self.runner,
                    &name,
                    self.states.get(&name).map(Arc::as_ref),
                    state.map(Arc::as_ref),
                );
            }
            match state {
                Some(state) => self.states.insert(name.clone(), state.clone()),
                None => self.states.remove(&name),
            };
            if failed.is_empty() {
                match new {
                    Some(plan) => self.programmed.insert(name, plan),
                    None => self.programmed.remove(&name),
                };
            }
        }
        phases.mark("conntrack and bookkeeping");
        if !failed.is_empty() {
            self.refresh()?;
        }
        tracing::debug!(%phases, "IPVS apply phases");
        self.last_phases = phases;
        Ok(ApplyOutcome { failed })
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        self.refresh()?;
        let connections: BTreeMap<(VsKey, SocketAddr), u32> = self
            .orphans
            .draining
            .iter()
            .map(|d| ((d.key, d.real), d.active_connections))
            .collect();
        self.sweep_draining(&connections);
        Ok(self
            .programmed
            .iter()
            .map(|(name, plan)| {
                (
                    name.clone(),
                    ProgrammedService {
                        version: plan.version,
                        kernel_objects: plan.objects(),
                    },
                )
            })
            .collect())
    }

    fn expected(&self, _name: &str, service: &DesiredService) -> Vec<String> {
        self.render(service, &self.render_config()).objects()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.refresh()?;
        for family in self.families() {
            let save = self.save(family)?;
            let input = rules::cleanup_input(&save);
            if !input.is_empty() {
                self.runner.run(
                    &self.backend.restore(family),
                    &["--noflush", "-w", "5"],
                    Some(&input),
                )?;
            }
        }
        let ops: Vec<Op> = self
            .mirror
            .virtual_services
            .keys()
            .map(|k| Op::DelService(service_id(k)))
            .collect();
        for result in self.ipvs.execute(&ops) {
            if let Err(e) = result
                && e.errno() != Some(libc::ESRCH)
            {
                return Err(failed("deleting a virtual service", e));
            }
        }
        let sets = self
            .ipsets
            .list()
            .map_err(|e| DataplaneError::ReadBack(e.to_string()))?;
        for set in sets.sets {
            self.runner.run("ipset", &["destroy", &set], None)?;
        }
        if let Some(index) = self
            .links
            .link_index(DUMMY_DEVICE)
            .map_err(|e| failed("cleanup", e))?
        {
            self.links
                .delete_link(index, DUMMY_DEVICE)
                .map_err(|e| failed("cleanup", e))?;
        }
        self.programmed.clear();
        self.mirror = Mirror::default();
        self.refs = Refs::default();
        self.set_up = false;
        Ok(())
    }

    fn tracks_connections(&self) -> bool {
        true
    }

    fn hold_connection_tracking(&mut self, hold: bool) -> Result<(), DataplaneError> {
        self.runner
            .set_conntrack_hold(self.backend, &self.families(), hold)
    }
}
