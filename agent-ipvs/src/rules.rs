//! The fixed iptables rules of the IPVS dataplane: what IPVS cannot do, keyed on
//! switchyard's ipsets, so their count never grows with the Services. Pure.
//!
//! Its chains are `SWYV-…`, apart from the iptables dataplane's `SWY-…`, so both can be
//! in force at once while a node switches between them. Per family (sets `…6` in
//! `ip6tables`):
//! - nat `SWYV-SERVICES` (from PREROUTING and OUTPUT, before IPVS on LOCAL_OUT): marks
//!   for masquerading traffic to cluster IPs from outside `--cluster-cidr` (or all with
//!   `--masquerade-all`), external traffic under the Cluster policy, and traffic the node
//!   itself sends to an external destination under the Local policy.
//! - nat `SWYV-POSTROUTING`: masquerades hairpin traffic (`SWY-LOOP-BACK`) and what was
//!   marked; `SWYV-MARK-MASQ` sets the mark.
//! - filter `SWYV-SERVICES` (from INPUT and OUTPUT for new connections, before IPVS on
//!   LOCAL_IN): rejects destinations without any usable endpoint (`SWY-REJECT`; kube-proxy's
//!   IPVS mode drops them silently), drops those whose policy selects no endpoint here
//!   (`SWY-DROP`) and load-balancer traffic from outside the source ranges.
//! - filter `SWYV-FORWARD`: accepts marked and established forwarded traffic.

use ipnet::IpNet;
use switchyard_agent_core::netfilter::{Family, masquerade_rules};

use crate::render::SetKind;

/// The prefix of the IPVS dataplane's chains.
pub const CHAIN_PREFIX: &str = "SWYV-";
/// The chains of each table, in the order they are written.
pub const NAT_CHAINS: [&str; 3] = ["SWYV-SERVICES", "SWYV-POSTROUTING", "SWYV-MARK-MASQ"];
pub const FILTER_CHAINS: [&str; 2] = ["SWYV-SERVICES", "SWYV-FORWARD"];

/// Settings, in kube-proxy's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesConfig {
    /// `--cluster-cidr`: pod CIDRs (the first of each family is used).
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// Bit of the packet mark that asks for masquerading (14: 0x4000).
    pub masquerade_bit: u8,
    /// Add `--random-fully` to MASQUERADE.
    pub random_fully: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            masquerade_bit: 14,
            random_fully: true,
        }
    }
}

/// One rule in iptables-save form: `(table, chain, spec)`.
pub type RuleLine = (&'static str, String, String);

fn set(kind: SetKind, family: Family, directions: &str) -> String {
    format!("-m set --match-set {} {directions}", kind.name(family))
}

fn comment(text: &str) -> String {
    format!("-m comment --comment \"{text}\"")
}

/// Every rule of `family`, in iptables-save's canonical form, in chain order.
pub fn rules(family: Family, cfg: &RulesConfig) -> Vec<RuleLine> {
    let masq = "SWYV-MARK-MASQ";
    let shared = masquerade_rules(CHAIN_PREFIX, cfg.masquerade_bit, cfg.random_fully);
    let mut rules = Vec::new();
    let cluster_cidr = cfg
        .cluster_cidrs
        .iter()
        .find(|c| Family::of(c.addr()) == family)
        .map(IpNet::trunc);
    let cluster_ip = set(SetKind::ClusterIp, family, "dst,dst");
    if cfg.masquerade_all {
        rules.push((
            "nat",
            "SWYV-SERVICES".to_string(),
            format!(
                "{} {cluster_ip} -j {masq}",
                comment("swy cluster IP traffic to masquerade")
            ),
        ));
    } else if let Some(cidr) = cluster_cidr {
        rules.push((
            "nat",
            "SWYV-SERVICES".to_string(),
            format!(
                "! -s {cidr} {} {cluster_ip} -j {masq}",
                comment("swy cluster IP traffic from outside the cluster CIDR")
            ),
        ));
    }
    rules.push((
        "nat",
        "SWYV-SERVICES".to_string(),
        format!(
            "{} {} -j {masq}",
            comment("swy external traffic under the Cluster policy"),
            set(SetKind::External, family, "dst,dst")
        ),
    ));
    rules.push((
        "nat",
        "SWYV-SERVICES".to_string(),
        format!(
            "{} {} -m addrtype --src-type LOCAL -j {masq}",
            comment("swy local traffic to external destinations under the Local policy"),
            set(SetKind::ExternalLocal, family, "dst,dst")
        ),
    ));
    rules.push((
        "nat",
        "SWYV-POSTROUTING".to_string(),
        format!(
            "{} {} -j MASQUERADE",
            comment("swy hairpin traffic"),
            set(SetKind::LoopBack, family, "dst,dst,src")
        ),
    ));
    rules.extend(
        shared
            .iter()
            .filter(|r| r.table == "nat")
            .map(|r| ("nat", r.chain.clone(), r.spec.clone())),
    );
    let reject = match family {
        Family::V4 => "REJECT --reject-with icmp-port-unreachable",
        Family::V6 => "REJECT --reject-with icmp6-port-unreachable",
    };
    rules.push((
        "filter",
        "SWYV-SERVICES".to_string(),
        format!(
            "{} {} -j {reject}",
            comment("swy services without usable endpoints"),
            set(SetKind::Reject, family, "dst,dst")
        ),
    ));
    rules.push((
        "filter",
        "SWYV-SERVICES".to_string(),
        format!(
            "{} {} -j DROP",
            comment("swy services without endpoints for this traffic policy"),
            set(SetKind::Drop, family, "dst,dst")
        ),
    ));
    rules.push((
        "filter",
        "SWYV-SERVICES".to_string(),
        format!(
            "{} {} -m set ! --match-set {} dst,dst,src -j DROP",
            comment("swy load balancer source ranges"),
            set(SetKind::LbFirewall, family, "dst,dst"),
            SetKind::LbSource.name(family)
        ),
    ));
    rules.extend(
        shared
            .into_iter()
            .filter(|r| r.table == "filter")
            .map(|r| ("filter", r.chain, r.spec)),
    );
    rules
}

/// A jump from a built-in chain into a switchyard chain, as iptables-save prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub builtin: &'static str,
    pub spec: &'static str,
}

impl Jump {
    pub fn line(&self) -> String {
        format!("-A {} {}", self.builtin, self.spec)
    }
}

/// The jumps from built-in chains.
pub fn jumps() -> Vec<Jump> {
    let services = "-m comment --comment \"swy ipvs service portals\" -j SWYV-SERVICES";
    let new_services = "-m conntrack --ctstate NEW -m comment --comment \"swy ipvs service portals\" -j SWYV-SERVICES";
    vec![
        Jump {
            table: "nat",
            builtin: "PREROUTING",
            spec: services,
        },
        Jump {
            table: "nat",
            builtin: "OUTPUT",
            spec: services,
        },
        Jump {
            table: "nat",
            builtin: "POSTROUTING",
            spec: "-m comment --comment \"swy ipvs postrouting rules\" -j SWYV-POSTROUTING",
        },
        Jump {
            table: "filter",
            builtin: "INPUT",
            spec: new_services,
        },
        Jump {
            table: "filter",
            builtin: "OUTPUT",
            spec: new_services,
        },
        Jump {
            table: "filter",
            builtin: "FORWARD",
            spec: "-m comment --comment \"swy ipvs forwarding rules\" -j SWYV-FORWARD",
        },
    ]
}

/// `iptables-restore --noflush` input that rewrites switchyard's chains whole (declaring
/// a chain flushes it) and inserts the jumps that `save` (both tables' iptables-save
/// output) lacks, at the top of their built-in chains.
pub fn restore_input(family: Family, cfg: &RulesConfig, save: &str) -> String {
    let all = rules(family, cfg);
    let mut text = String::new();
    for (table, chains) in [("nat", &NAT_CHAINS[..]), ("filter", &FILTER_CHAINS[..])] {
        text.push_str(&format!("*{table}\n"));
        for chain in chains {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for (_, chain, spec) in all.iter().filter(|(t, _, _)| *t == table) {
            text.push_str(&format!("-A {chain} {spec}\n"));
        }
        for jump in missing_jumps(save).iter().filter(|j| j.table == table) {
            text.push_str(&format!("-I {} 1 {}\n", jump.builtin, jump.spec));
        }
        text.push_str("COMMIT\n");
    }
    text
}

/// The jumps `save` lacks.
pub fn missing_jumps(save: &str) -> Vec<Jump> {
    jumps()
        .into_iter()
        .filter(|jump| {
            let line = jump.line();
            !save.lines().any(|l| l == line)
        })
        .collect()
}

/// Whether `save` holds exactly switchyard's rules in its chains and every jump.
pub fn in_force(family: Family, cfg: &RulesConfig, save: &str) -> bool {
    let want: Vec<String> = rules(family, cfg)
        .into_iter()
        .map(|(_, chain, spec)| format!("-A {chain} {spec}"))
        .collect();
    let mut have = Vec::new();
    let mut table = "";
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = if name == "nat" { "nat" } else { "filter" };
        }
        let ours = match table {
            "nat" => NAT_CHAINS
                .iter()
                .any(|c| line.starts_with(&format!("-A {c} "))),
            _ => FILTER_CHAINS
                .iter()
                .any(|c| line.starts_with(&format!("-A {c} "))),
        };
        if ours {
            have.push(line.to_string());
        }
    }
    have == want && missing_jumps(save).is_empty()
}

/// `iptables-restore --noflush` input removing everything switchyard's rules put in:
/// the jumps `save` holds, then the chains.
pub fn cleanup_input(save: &str) -> String {
    let mut text = String::new();
    for (table, chains) in [("nat", &NAT_CHAINS[..]), ("filter", &FILTER_CHAINS[..])] {
        let mut section = String::new();
        for jump in jumps().iter().filter(|j| j.table == table) {
            if save.lines().any(|l| l == jump.line()) {
                section.push_str(&format!("-D {} {}\n", jump.builtin, jump.spec));
            }
        }
        let present: Vec<&&str> = chains
            .iter()
            .filter(|c| save.lines().any(|l| l.starts_with(&format!(":{c} "))))
            .collect();
        for chain in &present {
            section.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &present {
            section.push_str(&format!("-X {chain}\n"));
        }
        if !section.is_empty() {
            text.push_str(&format!("*{table}\n{section}COMMIT\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save_of(family: Family, cfg: &RulesConfig) -> String {
        let mut text = String::new();
        for table in ["nat", "filter"] {
            text.push_str(&format!("*{table}\n"));
            for jump in jumps().iter().filter(|j| j.table == table) {
                text.push_str(&format!("{}\n", jump.line()));
            }
            for (t, chain, spec) in rules(family, cfg) {
                if t == table {
                    text.push_str(&format!("-A {chain} {spec}\n"));
                }
            }
            text.push_str("COMMIT\n");
        }
        text
    }

    #[test]
    fn the_rule_count_is_fixed_and_masquerading_follows_the_flags() {
        let plain = rules(Family::V4, &RulesConfig::default());
        assert!(plain.iter().all(|(_, _, s)| !s.contains("SWY-CLUSTER-IP")));
        let cidr = RulesConfig {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap(),
            ],
            ..RulesConfig::default()
        };
        let v4 = rules(Family::V4, &cidr);
        assert_eq!(v4.len(), plain.len() + 1);
        assert!(v4[0].2.starts_with("! -s 10.244.0.0/16 -m comment"));
        let v6 = rules(Family::V6, &cidr);
        assert!(v6[0].2.contains("! -s fd00:244::/48"));
        assert!(v6.iter().any(|(_, _, s)| s.contains(
            "--match-set SWY-REJECT6 dst,dst -j REJECT --reject-with icmp6-port-unreachable"
        )));
        let all = RulesConfig {
            masquerade_all: true,
            ..cidr
        };
        assert!(!rules(Family::V4, &all)[0].2.contains("! -s"));
    }

    #[test]
    fn restore_input_inserts_only_missing_jumps_and_in_force_sees_every_difference() {
        let cfg = RulesConfig::default();
        let save = save_of(Family::V4, &cfg);
        assert!(in_force(Family::V4, &cfg, &save));
        let input = restore_input(Family::V4, &cfg, &save);
        assert!(!input.contains("-I "), "{input}");
        assert!(input.starts_with("*nat\n:SWYV-SERVICES - [0:0]\n"));

        let without_jump = save.replace(&format!("{}\n", jumps()[3].line()), "");
        assert!(!in_force(Family::V4, &cfg, &without_jump));
        let input = restore_input(Family::V4, &cfg, &without_jump);
        assert_eq!(input.matches("-I ").count(), 1);
        assert!(input.contains("-I INPUT 1 -m conntrack --ctstate NEW"));

        let edited = save.replace("-j DROP\n", "-j ACCEPT\n");
        assert!(!in_force(Family::V4, &cfg, &edited));
        let other = RulesConfig {
            masquerade_all: true,
            ..RulesConfig::default()
        };
        assert!(!in_force(Family::V4, &other, &save));
    }

    #[test]
    fn cleanup_removes_present_jumps_then_chains() {
        let save = save_of(Family::V4, &RulesConfig::default()).replace(
            "*nat\n",
            "*nat\n:SWYV-SERVICES - [0:0]\n:SWYV-POSTROUTING - [0:0]\n:SWYV-MARK-MASQ - [0:0]\n",
        );
        let text = cleanup_input(&save);
        assert!(text.contains(
            "-D PREROUTING -m comment --comment \"swy ipvs service portals\" -j SWYV-SERVICES\n"
        ));
        assert!(text.contains("-X SWYV-MARK-MASQ\n"));
        assert!(
            !text.contains("-X SWYV-FORWARD"),
            "not declared in this save: {text}"
        );
        assert_eq!(cleanup_input(""), "");
    }
}
