//! Renders Services into iptables rules with kube-proxy's iptables-mode layout, under
//! switchyard's own `SWY-` chain names. Pure: no I/O.
//!
//! Rules are produced in the canonical form `iptables-save` prints (`-s`/`-d`/`-p` first,
//! then matches in order, then the target; addresses with their prefix length), so that
//! what [`render_service`] expects compares line by line with what the kernel returns.
//!
//! # Layout (per family: IPv4 into `iptables`, IPv6 into `ip6tables`)
//! - nat `SWY-SERVICES` (from PREROUTING and OUTPUT): one rule per VIP and port jumping to
//!   the port's internal chain (cluster IP) or external chain (external and load-balancer
//!   IPs), ending with the jump to nat `SWY-NODEPORTS` for local destinations.
//! - `SWY-SVC-<h>` / `SWY-SVL-<h>`: endpoint choice for the cluster / local endpoint set
//!   (`statistic` probabilities, `recent` for ClientIP affinity).
//! - `SWY-EXT-<h>`: external traffic; masquerades for the Cluster policy, short-circuits
//!   pod and host traffic to the cluster chain for the Local policy.
//! - `SWY-FW-<h>`: load-balancer source ranges; what falls through is dropped by filter
//!   `SWY-FIREWALL`.
//! - `SWY-SEP-<h>`: one per endpoint: hairpin masquerade mark, then DNAT.
//! - filter `SWY-SERVICES` / `SWY-EXTERNAL-SERVICES`: REJECT (no usable endpoint) or
//!   DROP (policy selects none here); filter `SWY-NODEPORTS` accepts health-check ports.
//! - `SWY-VER-<h>` (IPv4 nat, never jumped to): one comment rule recording the Service's
//!   version, so a restarted agent recovers it.
//!
//! Every rule of a Service carries a comment whose first word containing `/` is
//! `ns/name` or `ns/name:port`, which is how read-back attributes rules to Services;
//! comments of shared rules contain no `/`.

use std::{
    collections::BTreeSet,
    fmt,
    io::{self, Write},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use switchyard_agent_core::dataplane::DesiredService;
pub use switchyard_agent_core::netfilter::Family;
use switchyard_agent_core::netfilter::masquerade_rules;
use switchyard_agent_core::policy::{PortPolicy, nets_of_family, of_family};
use switchyard_proto::state::{PortState, Protocol, ServiceState, TrafficPolicy, format_version};

/// The iptables tables switchyard writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];

    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Prefix of every chain switchyard owns.
pub const CHAIN_PREFIX: &str = "SWY-";
pub const SERVICES: &str = "SWY-SERVICES";
pub const NODEPORTS: &str = "SWY-NODEPORTS";
pub const POSTROUTING: &str = "SWY-POSTROUTING";
pub const MARK_MASQ: &str = "SWY-MARK-MASQ";
pub const EXTERNAL_SERVICES: &str = "SWY-EXTERNAL-SERVICES";
pub const FORWARD: &str = "SWY-FORWARD";
pub const FIREWALL: &str = "SWY-FIREWALL";

/// The shared chains of a table, in the order they are written. Every Service may add
/// rules to them; they are rewritten whole on every sync.
pub fn global_chains(table: Table) -> &'static [&'static str] {
    match table {
        Table::Nat => &[SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ],
        Table::Filter => &[SERVICES, EXTERNAL_SERVICES, NODEPORTS, FORWARD, FIREWALL],
    }
}

pub fn is_global_chain(table: Table, chain: &str) -> bool {
    global_chains(table).contains(&chain)
}

/// Renderer settings, in kube-proxy's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderConfig {
    /// `--cluster-cidr`: pod CIDRs (the first of each family is used). Traffic to a
    /// cluster IP from outside them is masqueraded; pod traffic to an external VIP of an
    /// `externalTrafficPolicy: Local` Service short-circuits to the cluster chain.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`: masquerade all traffic to cluster IPs.
    pub masquerade_all: bool,
    /// `--nodeport-addresses`: node ports answer only on local addresses inside these
    /// CIDRs; empty: on every local address (`-m addrtype --dst-type LOCAL`).
    pub nodeport_addresses: Vec<IpNet>,
    /// The node's own IPs; a load-balancer source range containing one also admits
    /// traffic sourced from the load-balancer IPs (VIP-like load balancers looping back).
    pub node_ips: Vec<IpAddr>,
    /// `--iptables-masquerade-bit`: bit of the packet mark that asks for SNAT (14 → 0x4000).
    pub masquerade_bit: u8,
    /// Add `--random-fully` to MASQUERADE.
    pub random_fully: bool,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            nodeport_addresses: Vec::new(),
            node_ips: Vec::new(),
            masquerade_bit: 14,
            random_fully: true,
        }
    }
}

impl RenderConfig {
    fn cluster_cidr(&self, family: Family) -> Option<IpNet> {
        self.cluster_cidrs
            .iter()
            .find(|c| Family::of(c.addr()) == family)
            .map(IpNet::trunc)
    }
}

/// One rule: `-A <chain> <spec>` in `table` of `family`, spec in iptables-save form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub family: Family,
    pub table: Table,
    pub chain: String,
    pub spec: String,
}

impl Rule {
    /// The rule as a kernel object line: `ipv4 nat -A SWY-SVC-… …`.
    pub fn object(&self) -> String {
        format!("{} {} {}", self.family, self.table, self.line())
    }

    /// The rule as iptables-save prints it: `-A SWY-SVC-… …`.
    pub fn line(&self) -> String {
        if self.spec.is_empty() {
            format!("-A {}", self.chain)
        } else {
            format!("-A {} {}", self.chain, self.spec)
        }
    }
}

/// Everything one Service puts into the kernel: its own chains' rules and its rules in
/// the shared chains, in order within each chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// The version recorded in the `SWY-VER-` chain, if any.
    pub version: Option<u64>,
    pub rules: Vec<Rule>,
}

impl ServiceRules {
    /// The kernel objects: rule lines ordered by family, table and chain, keeping rule
    /// order within a chain (it matters), so equal states compare equal.
    pub fn objects(&self) -> Vec<String> {
        let mut rules: Vec<&Rule> = self.rules.iter().collect();
        rules.sort_by(|a, b| (a.family, a.table, &a.chain).cmp(&(b.family, b.table, &b.chain)));
        rules.iter().map(|r| r.object()).collect()
    }

    /// The chains this Service owns (all but the shared ones), by family and table.
    pub fn owned_chains(&self) -> BTreeSet<(Family, Table, String)> {
        self.rules
            .iter()
            .filter(|r| !is_global_chain(r.table, &r.chain))
            .map(|r| (r.family, r.table, r.chain.clone()))
            .collect()
    }

    /// Rules of this Service in `family`/`table`.
    pub fn rules_in(&self, family: Family, table: Table) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(move |r| r.family == family && r.table == table)
    }
}

/// kube-proxy's chain-name hash: the first 16 characters of the base32 (RFC 4648
/// alphabet) encoding of SHA-256 of `input`.
pub fn hash16(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    // 16 characters × 5 bits = 80 bits = the first 10 bytes.
    let mut out = String::with_capacity(16);
    let mut buffer: u64 = 0;
    let mut bits = 0;
    for byte in &digest[..10] {
        buffer = (buffer << 8) | u64::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    out
}

/// kube-proxy's `ServicePortName` string: `ns/name:port`, or `ns/name` for an unnamed port.
pub fn service_port_name(service: &str, port: &PortState) -> String {
    if port.name.is_empty() {
        service.to_string()
    } else {
        format!("{service}:{}", port.name)
    }
}

fn proto(p: Protocol) -> &'static str {
    p.lowercase()
}

fn port_chain(kind: &str, spn: &str, protocol: Protocol) -> String {
    format!(
        "SWY-{kind}-{}",
        hash16(&format!("{spn}{}", proto(protocol)))
    )
}

/// The chain of one endpoint of a service port (`SWY-SEP-…`).
pub fn endpoint_chain(spn: &str, protocol: Protocol, endpoint: &SocketAddr) -> String {
    format!(
        "SWY-SEP-{}",
        hash16(&format!("{spn}{}{endpoint}", proto(protocol)))
    )
}

/// The chain recording a Service's version (`SWY-VER-…`, IPv4 nat).
pub fn version_chain(service: &str) -> String {
    format!("SWY-VER-{}", hash16(service))
}

/// The comment of the version rule.
pub fn version_comment(service: &str, version: u64) -> String {
    format!("{service} version={}", format_version(version))
}

/// Probability as xt_statistic stores and iptables-save prints it: 1/n in units of
/// 2^-31, printed with 11 decimals (1/3 → `0.33333333349`).
pub fn probability(n: usize) -> String {
    let scaled = (2_147_483_648.0 / n as f64).round();
    format!("{:.11}", scaled / 2_147_483_648.0)
}

fn host(ip: IpAddr) -> String {
    format!("{ip}/{}", Family::of(ip).host_prefix())
}

/// A `comment` match. Names are validated before they get here (the agent refuses a
/// resource whose names the API server would refuse), but rule text is parsed by
/// `iptables-restore`, so anything else is replaced here too: a quote, backslash or
/// newline in a comment would end it and let the rest be read as rules. The result is
/// also cut to the kernel's 255 bytes.
fn comment(text: &str) -> String {
    const SAFE_PUNCTUATION: &str = " ./:_-=>;,[]()";
    let safe: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || SAFE_PUNCTUATION.contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(255)
        .collect();
    format!("-m comment --comment \"{safe}\"")
}

fn reject_with(family: Family) -> &'static str {
    match family {
        Family::V4 => "REJECT --reject-with icmp-port-unreachable",
        Family::V6 => "REJECT --reject-with icmp6-port-unreachable",
    }
}

fn recent_mask(family: Family) -> &'static str {
    match family {
        Family::V4 => "255.255.255.255",
        Family::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// The rules of the shared chains that belong to no Service, per family: the node-port
/// tail of nat `SWY-SERVICES`, masquerading, forwarding acceptance.
pub fn global_rules(family: Family, cfg: &RenderConfig) -> Vec<Rule> {
    let rule = |table, chain: &str, spec: String| Rule {
        family,
        table,
        chain: chain.to_string(),
        spec,
    };
    let mut rules = Vec::new();
    let tail = comment("swy service nodeports; NOTE: this must be the last rule in this chain");
    let nodeport_cidrs: Vec<IpNet> = cfg
        .nodeport_addresses
        .iter()
        .filter(|c| Family::of(c.addr()) == family)
        .map(IpNet::trunc)
        .collect();
    if cfg.nodeport_addresses.is_empty() {
        rules.push(rule(
            Table::Nat,
            SERVICES,
            format!("{tail} -m addrtype --dst-type LOCAL -j {NODEPORTS}"),
        ));
    } else {
        for cidr in nodeport_cidrs {
            rules.push(rule(
                Table::Nat,
                SERVICES,
                format!("-d {cidr} {tail} -m addrtype --dst-type LOCAL -j {NODEPORTS}"),
            ));
        }
    }
    for shared in masquerade_rules(CHAIN_PREFIX, cfg.masquerade_bit, cfg.random_fully) {
        let table = if shared.table == "nat" {
            Table::Nat
        } else {
            Table::Filter
        };
        rules.push(rule(table, &shared.chain, shared.spec));
    }
    rules
}

/// A jump from a built-in chain into a switchyard chain, as arguments for
/// `iptables -t TABLE -C/-I/-D CHAIN ARGS…` and as the iptables-save line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltinJump {
    pub table: Table,
    pub builtin: &'static str,
    pub args: Vec<String>,
}

impl BuiltinJump {
    /// The jump as iptables-save prints it.
    pub fn line(&self) -> String {
        format!("-A {}{}", self.builtin, self.quoted_args())
    }

    /// The restore line inserting the jump at the top of its built-in chain.
    pub fn insert_line(&self) -> String {
        format!("-I {} 1{}", self.builtin, self.quoted_args())
    }

    /// The arguments as iptables-save quotes them, each after a space.
    fn quoted_args(&self) -> String {
        self.args
            .iter()
            .map(|arg| {
                if arg.contains(' ') {
                    format!(" \"{arg}\"")
                } else {
                    format!(" {arg}")
                }
            })
            .collect()
    }

    pub fn target(&self) -> &str {
        self.args.last().map(String::as_str).unwrap_or_default()
    }
}

/// The jumps from built-in chains, as kube-proxy installs its own.
pub fn builtin_jumps() -> Vec<BuiltinJump> {
    let jump = |table, builtin, new_only: bool, text: &str, target: &str| {
        let mut args = Vec::new();
        if new_only {
            args.extend(["-m", "conntrack", "--ctstate", "NEW"].map(String::from));
        }
        args.extend(["-m", "comment", "--comment", text, "-j", target].map(String::from));
        BuiltinJump {
            table,
            builtin,
            args,
        }
    };
    let ext = "swy externally-visible service portals";
    let portals = "swy service portals";
    let firewall = "swy load balancer firewall";
    vec![
        jump(Table::Filter, "INPUT", true, ext, EXTERNAL_SERVICES),
        jump(
            Table::Filter,
            "INPUT",
            false,
            "swy health check service ports",
            NODEPORTS,
        ),
        jump(Table::Filter, "INPUT", true, firewall, FIREWALL),
        jump(Table::Filter, "FORWARD", true, ext, EXTERNAL_SERVICES),
        jump(Table::Filter, "FORWARD", true, portals, SERVICES),
        jump(
            Table::Filter,
            "FORWARD",
            false,
            "swy forwarding rules",
            FORWARD,
        ),
        jump(Table::Filter, "FORWARD", true, firewall, FIREWALL),
        jump(Table::Filter, "OUTPUT", true, portals, SERVICES),
        jump(Table::Filter, "OUTPUT", true, firewall, FIREWALL),
        jump(Table::Nat, "PREROUTING", false, portals, SERVICES),
        jump(Table::Nat, "OUTPUT", false, portals, SERVICES),
        jump(
            Table::Nat,
            "POSTROUTING",
            false,
            "swy postrouting rules",
            POSTROUTING,
        ),
    ]
}

/// Renders one Service for both families.
pub fn render_service(name: &str, service: &DesiredService, cfg: &RenderConfig) -> ServiceRules {
    let mut out = Out {
        rules: Vec::new(),
        family: Family::V4,
    };
    for family in Family::ALL {
        out.family = family;
        render_family(&mut out, name, &service.state, cfg);
    }
    out.family = Family::V4;
    out.push(
        Table::Nat,
        &version_chain(name),
        comment(&version_comment(name, service.version)),
    );
    ServiceRules {
        version: Some(service.version),
        rules: out.rules,
    }
}

struct Out {
    rules: Vec<Rule>,
    family: Family,
}

impl Out {
    fn push(&mut self, table: Table, chain: &str, spec: String) {
        self.rules.push(Rule {
            family: self.family,
            table,
            chain: chain.to_string(),
            spec,
        });
    }
}

fn render_family(out: &mut Out, name: &str, svc: &ServiceState, cfg: &RenderConfig) {
    let family = out.family;
    // A family's ruleset handles a Service only if it has a cluster IP of that family.
    let cluster_ips = of_family(&svc.cluster_ips, family);
    if cluster_ips.is_empty() {
        return;
    }
    let external_ips = of_family(&svc.external_ips, family);
    let lb_ips = of_family(&svc.load_balancer_ips, family);
    let source_ranges = nets_of_family(&svc.load_balancer_source_ranges, family);
    let itp_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let etp_local = svc.external_traffic_policy == TrafficPolicy::Local;
    let mark_masq = MARK_MASQ;

    for port in &svc.ports {
        let spn = service_port_name(name, port);
        let p = proto(port.protocol);
        let svc_chain = port_chain("SVC", &spn, port.protocol);
        let svl_chain = port_chain("SVL", &spn, port.protocol);
        let ext_chain = port_chain("EXT", &spn, port.protocol);
        let fw_chain = port_chain("FW", &spn, port.protocol);
        let policy = PortPolicy::new(svc, port, family);
        let cluster_eps = &policy.cluster_endpoints;
        let local_eps = &policy.local_endpoints;
        let has_endpoints = policy.has_endpoints;
        let externally_accessible = policy.externally_accessible;
        let uses_cluster_chain = policy.uses_cluster_endpoints;
        let uses_local_chain = policy.uses_local_endpoints;
        let internal_chain = if itp_local { &svl_chain } else { &svc_chain };
        let external_policy_chain = if etp_local { &svl_chain } else { &svc_chain };
        let has_internal = policy.has_internal();
        let has_external = policy.has_external();
        let uses_ext_chain = has_endpoints && externally_accessible;
        let uses_fw = has_endpoints && !lb_ips.is_empty() && !source_ranges.is_empty();
        let lb_chain = if uses_fw { &fw_chain } else { &ext_chain };

        let (internal_filter, external_filter) = if !has_endpoints {
            let c = format!("{spn} has no endpoints");
            (
                Some((reject_with(family), c.clone())),
                Some((reject_with(family), c)),
            )
        } else {
            let c = format!("{spn} has no local endpoints");
            (
                (!has_internal).then(|| ("DROP", c.clone())),
                (!has_external).then_some(("DROP", c)),
            )
        };

        let dport = format!("-m {p} --dport {}", port.port);
        // Cluster IPs.
        for ip in &cluster_ips {
            let d = host(*ip);
            if has_internal {
                out.push(
                    Table::Nat,
                    SERVICES,
                    format!(
                        "-d {d} -p {p} {} {dport} -j {internal_chain}",
                        comment(&format!("{spn} cluster IP"))
                    ),
                );
                let masq_from = if cfg.masquerade_all {
                    Some(String::new())
                } else {
                    cfg.cluster_cidr(family).map(|c| format!("! -s {c} "))
                };
                if let Some(src) = masq_from {
                    out.push(
                        Table::Nat,
                        internal_chain,
                        format!(
                            "{src}-d {d} -p {p} {} {dport} -j {mark_masq}",
                            comment(&format!("{spn} cluster IP"))
                        ),
                    );
                }
            } else if let Some((target, text)) = &internal_filter {
                out.push(
                    Table::Filter,
                    SERVICES,
                    format!("-d {d} -p {p} {} {dport} -j {target}", comment(text)),
                );
            }
        }
        // External IPs.
        for ip in &external_ips {
            let d = host(*ip);
            if has_endpoints {
                out.push(
                    Table::Nat,
                    SERVICES,
                    format!(
                        "-d {d} -p {p} {} {dport} -j {ext_chain}",
                        comment(&format!("{spn} external IP"))
                    ),
                );
            }
            if let Some((target, text)) = &external_filter {
                out.push(
                    Table::Filter,
                    EXTERNAL_SERVICES,
                    format!("-d {d} -p {p} {} {dport} -j {target}", comment(text)),
                );
            }
        }
        // Load-balancer IPs.
        for ip in &lb_ips {
            let d = host(*ip);
            if has_endpoints {
                out.push(
                    Table::Nat,
                    SERVICES,
                    format!(
                        "-d {d} -p {p} {} {dport} -j {lb_chain}",
                        comment(&format!("{spn} loadbalancer IP"))
                    ),
                );
            }
            if uses_fw {
                out.push(
                    Table::Filter,
                    FIREWALL,
                    format!(
                        "-d {d} -p {p} {} {dport} -j DROP",
                        comment(&format!("{spn} traffic not accepted by {fw_chain}"))
                    ),
                );
            }
        }
        if let Some((target, text)) = &external_filter {
            for ip in &lb_ips {
                out.push(
                    Table::Filter,
                    EXTERNAL_SERVICES,
                    format!(
                        "-d {} -p {p} {} {dport} -j {target}",
                        host(*ip),
                        comment(text)
                    ),
                );
            }
        }
        // Node port.
        if let Some(node_port) = port.node_port {
            let np = format!("-m {p} --dport {node_port}");
            if has_endpoints {
                out.push(
                    Table::Nat,
                    NODEPORTS,
                    format!("-p {p} {} {np} -j {ext_chain}", comment(&spn)),
                );
            }
            if let Some((target, text)) = &external_filter {
                out.push(
                    Table::Filter,
                    EXTERNAL_SERVICES,
                    format!(
                        "-p {p} {} -m addrtype --dst-type LOCAL {np} -j {target}",
                        comment(text)
                    ),
                );
            }
        }

        // External chain.
        if uses_ext_chain {
            if !etp_local {
                out.push(
                    Table::Nat,
                    &ext_chain,
                    format!(
                        "{} -j {mark_masq}",
                        comment(&format!(
                            "masquerade traffic for {spn} external destinations"
                        ))
                    ),
                );
            } else {
                if let Some(cidr) = cfg.cluster_cidr(family)
                    && uses_cluster_chain
                {
                    out.push(
                        Table::Nat,
                        &ext_chain,
                        format!(
                            "-s {cidr} {} -j {svc_chain}",
                            comment(&format!("pod traffic for {spn} external destinations"))
                        ),
                    );
                }
                out.push(
                    Table::Nat,
                    &ext_chain,
                    format!(
                        "{} -m addrtype --src-type LOCAL -j {mark_masq}",
                        comment(&format!(
                            "masquerade LOCAL traffic for {spn} external destinations"
                        ))
                    ),
                );
                if uses_cluster_chain {
                    out.push(
                        Table::Nat,
                        &ext_chain,
                        format!(
                            "{} -m addrtype --src-type LOCAL -j {svc_chain}",
                            comment(&format!(
                                "route LOCAL traffic for {spn} external destinations"
                            ))
                        ),
                    );
                }
            }
            if has_external {
                out.push(
                    Table::Nat,
                    &ext_chain,
                    format!("{} -j {external_policy_chain}", comment(&spn)),
                );
            }
        }

        // Firewall chain.
        if uses_fw {
            let c = comment(&format!("{spn} loadbalancer IP"));
            for range in &source_ranges {
                out.push(
                    Table::Nat,
                    &fw_chain,
                    format!("-s {range} {c} -j {ext_chain}"),
                );
            }
            let from_node = source_ranges
                .iter()
                .any(|r| cfg.node_ips.iter().any(|ip| r.contains(ip)));
            if from_node {
                for ip in &lb_ips {
                    out.push(
                        Table::Nat,
                        &fw_chain,
                        format!("-s {} {c} -j {ext_chain}", host(*ip)),
                    );
                }
            }
            out.push(
                Table::Nat,
                &fw_chain,
                comment(&format!(
                    "other traffic to {spn} will be dropped by {FIREWALL}"
                )),
            );
        }

        // Endpoint choice.
        let affinity = svc.session_affinity_timeout;
        if uses_cluster_chain {
            endpoint_choice(out, &spn, port.protocol, &svc_chain, cluster_eps, affinity);
        }
        if uses_local_chain {
            endpoint_choice(out, &spn, port.protocol, &svl_chain, local_eps, affinity);
        }

        // Endpoint chains, once per endpoint reachable from here.
        if has_endpoints {
            let mut seen = BTreeSet::new();
            let reachable = cluster_eps
                .iter()
                .filter(|_| uses_cluster_chain)
                .chain(local_eps.iter().filter(|_| uses_local_chain));
            for ep in reachable {
                if !seen.insert(*ep) {
                    continue;
                }
                let chain = endpoint_chain(&spn, port.protocol, ep);
                let c = comment(&spn);
                out.push(
                    Table::Nat,
                    &chain,
                    format!("-s {} {c} -j {mark_masq}", host(ep.ip())),
                );
                let recent = if affinity.is_some() {
                    format!(
                        " -m recent --set --name {chain} --mask {} --rsource",
                        recent_mask(family)
                    )
                } else {
                    String::new()
                };
                out.push(
                    Table::Nat,
                    &chain,
                    format!("-p {p} {c}{recent} -m {p} -j DNAT --to-destination {ep}"),
                );
            }
        }
    }

    // The health-check node port is accepted through any firewall (once per Service).
    if let Some(hc) = svc.health_check_node_port
        && etp_local
    {
        out.push(
            Table::Filter,
            NODEPORTS,
            format!(
                "-p tcp {} -m tcp --dport {hc} -j ACCEPT",
                comment(&format!("{name} health check node port"))
            ),
        );
    }
}

fn endpoint_choice(
    out: &mut Out,
    spn: &str,
    protocol: Protocol,
    chain: &str,
    endpoints: &[SocketAddr],
    affinity: Option<u32>,
) {
    let family = out.family;
    if let Some(seconds) = affinity {
        for ep in endpoints {
            let sep = endpoint_chain(spn, protocol, ep);
            out.push(
                Table::Nat,
                chain,
                format!(
                    "{} -m recent --rcheck --seconds {seconds} --reap --name {sep} --mask {} --rsource -j {sep}",
                    comment(&format!("{spn} -> {ep}")),
                    recent_mask(family)
                ),
            );
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = endpoint_chain(spn, protocol, ep);
        let c = comment(&format!("{spn} -> {ep}"));
        let spec = if i + 1 < n {
            format!(
                "{c} -m statistic --mode random --probability {} -j {sep}",
                probability(n - i)
            )
        } else {
            format!("{c} -j {sep}")
        };
        out.push(Table::Nat, chain, spec);
    }
}

/// Which chains of a table a restore declares, fills and deletes.
#[derive(Clone, Debug, Default)]
pub struct TablePlan<'a> {
    /// Rules of every Service the kernel will hold, for the shared chains.
    pub all: Vec<&'a ServiceRules>,
    /// Services whose own chains are rewritten.
    pub touched: Vec<&'a ServiceRules>,
    /// Chains to flush and delete after the rest is in place.
    pub stale: BTreeSet<String>,
}

/// `iptables-restore --noflush` input for one table of one family: declares (creating or
/// flushing) the shared chains and the touched Services' chains, fills them, rewrites
/// the shared chains whole, then flushes and deletes stale chains. One restore is one
/// transaction, so no packet sees a half-written state.
pub fn restore_input(
    family: Family,
    table: Table,
    plan: &TablePlan<'_>,
    cfg: &RenderConfig,
) -> String {
    let mut text = Vec::new();
    write_restore_input(&mut text, family, table, plan, cfg, false, "").expect("writing to a Vec");
    String::from_utf8(text).expect("rules are UTF-8")
}

/// [`restore_input`] written to `out` as it is produced, so `iptables-restore` parses
/// while the rest is written, with `tail` (lines) before the `COMMIT`.
///
/// `whole_table_cache` puts `-L -n` first: a command naming no chain, which makes
/// iptables-nft (1.8) load the table's chains in one dump instead of keeping each chain
/// the transaction names in a sorted linked list and asking the kernel for each one
/// (quadratic: 40,000 chains in one `--noflush` transaction take minutes; with the line,
/// as long as a flushing restore). The listing goes to stdout and is discarded; it is as
/// large as the table already is, so it suits a sync into a table holding little.
pub fn write_restore_input(
    out: &mut dyn Write,
    family: Family,
    table: Table,
    plan: &TablePlan<'_>,
    cfg: &RenderConfig,
    whole_table_cache: bool,
    tail: &str,
) -> io::Result<()> {
    writeln!(out, "*{table}")?;
    if whole_table_cache {
        writeln!(out, "-L -n")?;
    }
    let mut declared = BTreeSet::new();
    let mut declare = |out: &mut dyn Write, chain: &str| {
        if declared.insert(chain.to_string()) {
            writeln!(out, ":{chain} - [0:0]")
        } else {
            Ok(())
        }
    };
    for chain in global_chains(table) {
        declare(out, chain)?;
    }
    for service in &plan.touched {
        for rule in service.rules_in(family, table) {
            if !is_global_chain(table, &rule.chain) {
                declare(out, &rule.chain)?;
            }
        }
    }
    for chain in &plan.stale {
        declare(out, chain)?;
    }
    let globals = global_rules(family, cfg);
    for chain in global_chains(table) {
        for service in &plan.all {
            for rule in service.rules_in(family, table) {
                if rule.chain == *chain {
                    writeln!(out, "{}", rule.line())?;
                }
            }
        }
        for rule in globals
            .iter()
            .filter(|r| r.table == table && r.chain == *chain)
        {
            writeln!(out, "{}", rule.line())?;
        }
    }
    for service in &plan.touched {
        for rule in service.rules_in(family, table) {
            if !is_global_chain(table, &rule.chain) {
                writeln!(out, "{}", rule.line())?;
            }
        }
    }
    for chain in &plan.stale {
        writeln!(out, "-X {chain}")?;
    }
    out.write_all(tail.as_bytes())?;
    writeln!(out, "COMMIT")
}

/// One Service moving from what the kernel holds (`old`) to what it must hold (`new`);
/// `None` on either side for a Service appearing or going away.
pub type ServiceMove<'a> = (Option<&'a ServiceRules>, Option<&'a ServiceRules>);

/// `iptables-restore --noflush` input for one table of one family that moves the given
/// Services from their old rules to their new ones without rewriting the shared chains:
/// their own chains are declared (flushed) and refilled, and in the shared chains only
/// their own lines are deleted (`-D`) and inserted at the top (`-I … 1`, in reverse, so
/// they keep their order and stay ahead of the shared rules that end a chain). A change
/// of endpoints leaves every shared line alone. Stale chains are emptied and deleted
/// last (make-before-break).
///
/// The transaction fails as a whole if a line to delete is not in the kernel (someone
/// edited the rules); the caller then falls back to [`restore_input`].
pub fn incremental_input(
    family: Family,
    table: Table,
    moves: &[ServiceMove<'_>],
    stale: &BTreeSet<String>,
) -> String {
    let rules = |side: Option<&ServiceRules>, shared: bool| -> Vec<Rule> {
        side.into_iter()
            .flat_map(|s| s.rules_in(family, table))
            .filter(|r| is_global_chain(table, &r.chain) == shared)
            .cloned()
            .collect()
    };
    let mut text = format!("*{table}\n");
    let empty_len = text.len();
    let mut declared = BTreeSet::new();
    for (_, new) in moves {
        for rule in rules(*new, false) {
            if declared.insert(rule.chain.clone()) {
                text.push_str(&format!(":{} - [0:0]\n", rule.chain));
            }
        }
    }
    for chain in stale {
        if declared.insert(chain.clone()) {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
    }
    for (old, new) in moves {
        let (old, new) = (rules(*old, true), rules(*new, true));
        if old == new {
            continue;
        }
        for rule in &old {
            text.push_str(&format!("-D {} {}\n", rule.chain, rule.spec));
        }
        for rule in new.iter().rev() {
            text.push_str(&format!("-I {} 1 {}\n", rule.chain, rule.spec));
        }
    }
    for (_, new) in moves {
        for rule in rules(*new, false) {
            text.push_str(&rule.line());
            text.push('\n');
        }
    }
    for chain in stale {
        text.push_str(&format!("-X {chain}\n"));
    }
    if text.len() == empty_len {
        return String::new();
    }
    text.push_str("COMMIT\n");
    text
}

/// `iptables-restore --noflush` input inserting `jumps` at the top of their built-in
/// chains, in order (each `-I … 1` goes above the ones before it, as `iptables -I` does
/// one at a time); `None` when there are none.
pub fn insert_jumps_input(jumps: &[BuiltinJump]) -> Option<String> {
    if jumps.is_empty() {
        return None;
    }
    let mut text = String::new();
    for table in [Table::Nat, Table::Filter] {
        let lines = jump_lines(table, jumps);
        if !lines.is_empty() {
            text.push_str(&format!("*{table}\n{lines}COMMIT\n"));
        }
    }
    Some(text)
}

/// The `-I BUILTIN 1 …` lines inserting `jumps` of `table`, in order.
pub fn jump_lines(table: Table, jumps: &[BuiltinJump]) -> String {
    jumps
        .iter()
        .filter(|j| j.table == table)
        .map(|j| j.insert_line() + "\n")
        .collect()
}

/// `iptables-restore --noflush` input that rewrites only the touched Services' own chains
/// (plus the static `SWY-MARK-MASQ` they jump to), leaving the shared chains alone: one
/// step of a sync too large for one transaction. Each Service's chains change together.
/// `None` when there is nothing to write.
pub fn own_chains_input(
    family: Family,
    table: Table,
    touched: &[&ServiceRules],
    cfg: &RenderConfig,
) -> Option<String> {
    let mut declared = BTreeSet::new();
    let mut body = String::new();
    for service in touched {
        for rule in service.rules_in(family, table) {
            if !is_global_chain(table, &rule.chain) {
                declared.insert(rule.chain.clone());
                body.push_str(&rule.line());
                body.push('\n');
            }
        }
    }
    if declared.is_empty() {
        return None;
    }
    let mut text = format!("*{table}\n");
    if table == Table::Nat {
        text.push_str(&format!(":{MARK_MASQ} - [0:0]\n"));
    }
    for chain in &declared {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    if table == Table::Nat {
        for rule in global_rules(family, cfg)
            .iter()
            .filter(|r| r.table == table && r.chain == MARK_MASQ)
        {
            text.push_str(&rule.line());
            text.push('\n');
        }
    }
    text.push_str(&body);
    text.push_str("COMMIT\n");
    Some(text)
}

/// `iptables-restore --noflush` input that flushes `chains` (`delete: false`) or deletes
/// them once they are empty and unreferenced (`delete: true`).
pub fn drop_chains_input(table: Table, chains: &[String], delete: bool) -> String {
    let mut text = format!("*{table}\n");
    for chain in chains {
        if delete {
            text.push_str(&format!("-X {chain}\n"));
        } else {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
    }
    text.push_str("COMMIT\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(table: Table, chain: &str, spec: &str) -> Rule {
        Rule {
            family: Family::V4,
            table,
            chain: chain.into(),
            spec: spec.into(),
        }
    }

    fn service(rules: Vec<Rule>) -> ServiceRules {
        ServiceRules {
            version: None,
            rules,
        }
    }

    #[test]
    fn an_endpoint_change_rewrites_own_chains_and_leaves_every_shared_line_alone() {
        let dispatch = rule(Table::Nat, SERVICES, "-d 10.96.0.1/32 -j SWY-SVC-A");
        let old = service(vec![
            dispatch.clone(),
            rule(Table::Nat, "SWY-SVC-A", "-j SWY-SEP-1"),
        ]);
        let new = service(vec![
            dispatch,
            rule(Table::Nat, "SWY-SVC-A", "-j SWY-SEP-2"),
        ]);
        let stale = BTreeSet::from(["SWY-SEP-1".to_string()]);
        let text = incremental_input(Family::V4, Table::Nat, &[(Some(&old), Some(&new))], &stale);
        assert_eq!(
            text,
            "*nat\n:SWY-SVC-A - [0:0]\n:SWY-SEP-1 - [0:0]\n-A SWY-SVC-A -j SWY-SEP-2\n-X SWY-SEP-1\nCOMMIT\n"
        );
    }

    #[test]
    fn changed_shared_lines_are_deleted_then_inserted_on_top_in_their_order() {
        let old = service(vec![rule(
            Table::Nat,
            SERVICES,
            "-d 10.96.0.1/32 -j SWY-SVC-A",
        )]);
        let new = service(vec![
            rule(Table::Nat, SERVICES, "-d 10.96.0.2/32 -j SWY-SVC-A"),
            rule(Table::Nat, SERVICES, "-d 192.0.2.1/32 -j SWY-EXT-A"),
        ]);
        let added = service(vec![rule(
            Table::Nat,
            SERVICES,
            "-d 10.96.0.9/32 -j SWY-SVC-B",
        )]);
        let moves = [
            (Some(&old), Some(&new)),
            (None, Some(&added)),
            (Some(&added), None),
        ];
        let text = incremental_input(Family::V4, Table::Nat, &moves, &BTreeSet::new());
        assert_eq!(
            text,
            "*nat\n\
             -D SWY-SERVICES -d 10.96.0.1/32 -j SWY-SVC-A\n\
             -I SWY-SERVICES 1 -d 192.0.2.1/32 -j SWY-EXT-A\n\
             -I SWY-SERVICES 1 -d 10.96.0.2/32 -j SWY-SVC-A\n\
             -I SWY-SERVICES 1 -d 10.96.0.9/32 -j SWY-SVC-B\n\
             -D SWY-SERVICES -d 10.96.0.9/32 -j SWY-SVC-B\n\
             COMMIT\n"
        );
        let filter = incremental_input(Family::V4, Table::Filter, &moves, &BTreeSet::new());
        assert_eq!(
            filter, "",
            "nothing of these Services in filter: no section"
        );
    }

    #[test]
    fn the_whole_table_cache_hint_opens_the_transaction_and_changes_nothing_else() {
        let service = service(vec![rule(Table::Nat, "SWY-SVC-A", "-j RETURN")]);
        let plan = TablePlan {
            all: vec![&service],
            touched: vec![&service],
            stale: BTreeSet::new(),
        };
        let cfg = RenderConfig::default();
        let plain = restore_input(Family::V4, Table::Nat, &plan, &cfg);
        let mut hinted = Vec::new();
        write_restore_input(&mut hinted, Family::V4, Table::Nat, &plan, &cfg, true, "").unwrap();
        assert_eq!(
            String::from_utf8(hinted).unwrap(),
            plain.replacen("*nat\n", "*nat\n-L -n\n", 1)
        );
        assert!(plain.contains("-A SWY-SVC-A "), "{plain}");
    }

    #[test]
    fn missing_jumps_are_inserted_in_order_per_table() {
        let jumps = builtin_jumps();
        assert_eq!(insert_jumps_input(&[]), None);
        let nat: Vec<BuiltinJump> = jumps
            .iter()
            .filter(|j| j.table == Table::Nat)
            .cloned()
            .collect();
        let text = insert_jumps_input(&nat).unwrap();
        assert_eq!(
            text,
            "*nat\n\
             -I PREROUTING 1 -m comment --comment \"swy service portals\" -j SWY-SERVICES\n\
             -I OUTPUT 1 -m comment --comment \"swy service portals\" -j SWY-SERVICES\n\
             -I POSTROUTING 1 -m comment --comment \"swy postrouting rules\" -j SWY-POSTROUTING\n\
             COMMIT\n"
        );
        let all = insert_jumps_input(&jumps).unwrap();
        assert!(
            all.starts_with("*nat\n") && all.contains("COMMIT\n*filter\n-I INPUT 1 -m conntrack")
        );
        assert_eq!(all.matches("-I ").count(), jumps.len());
    }

    #[test]
    fn chain_names_hash_like_kube_proxy() {
        // Values from kube-proxy's own tests for ns1/svc1:p80/TCP and 10.180.0.1:80.
        let spn = "ns1/svc1:p80";
        assert_eq!(
            port_chain("SVC", spn, Protocol::Tcp),
            "SWY-SVC-XPGD46QRK7WJZT7O"
        );
        let ep: SocketAddr = "10.180.0.1:80".parse().unwrap();
        assert_eq!(
            endpoint_chain(spn, Protocol::Tcp, &ep),
            "SWY-SEP-SXIVWICOYRO3J4NJ"
        );
        // Chain names stay within iptables' 28-character limit.
        assert!(endpoint_chain(spn, Protocol::Sctp, &"[fd00::1]:80".parse().unwrap()).len() <= 28);
    }

    #[test]
    fn probabilities_are_printed_as_xt_statistic_stores_them() {
        assert_eq!(probability(3), "0.33333333349");
        assert_eq!(probability(2), "0.50000000000");
        assert_eq!(probability(4), "0.25000000000");
        assert_eq!(probability(7), "0.14285714272");
    }

    #[test]
    fn restore_input_declares_touched_and_stale_chains_and_deletes_stale_last() {
        let rules = ServiceRules {
            version: Some(1),
            rules: vec![
                Rule {
                    family: Family::V4,
                    table: Table::Nat,
                    chain: SERVICES.into(),
                    spec: "-d 10.0.0.1/32 -j SWY-SVC-A".into(),
                },
                Rule {
                    family: Family::V4,
                    table: Table::Nat,
                    chain: "SWY-SVC-A".into(),
                    spec: "-j SWY-SEP-A".into(),
                },
            ],
        };
        let plan = TablePlan {
            all: vec![&rules],
            touched: vec![&rules],
            stale: ["SWY-SEP-OLD".to_string()].into(),
        };
        let text = restore_input(Family::V4, Table::Nat, &plan, &RenderConfig::default());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert!(lines.contains(&":SWY-SVC-A - [0:0]"));
        assert!(lines.contains(&":SWY-SEP-OLD - [0:0]"));
        let services = lines
            .iter()
            .position(|l| l.starts_with("-A SWY-SERVICES -d"))
            .unwrap();
        let tail = lines
            .iter()
            .position(|l| l.contains("NOTE: this must be the last"))
            .unwrap();
        assert!(services < tail);
        assert_eq!(lines[lines.len() - 2], "-X SWY-SEP-OLD");
        assert_eq!(lines[lines.len() - 1], "COMMIT");
        // Untouched services keep their chains: nothing declared, only shared rules.
        let plan = TablePlan {
            all: vec![&rules],
            touched: vec![],
            stale: BTreeSet::new(),
        };
        let text = restore_input(Family::V4, Table::Nat, &plan, &RenderConfig::default());
        assert!(!text.contains("SWY-SVC-A - [0:0]"));
        assert!(text.contains("-A SWY-SERVICES -d 10.0.0.1/32 -j SWY-SVC-A"));
    }
}
