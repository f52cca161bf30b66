//! Parses `iptables-save` output back into switchyard's rules per Service. Pure: no I/O.
//!
//! Only `SWY-` chains and jumps into them are looked at; everything else in the tables
//! (kube-proxy's chains, the host's firewall) is left alone.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_proto::state::parse_version;

use crate::render::{CHAIN_PREFIX, Family, Rule, ServiceRules, Table, is_global_chain};

/// What switchyard finds in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// Every `SWY-` chain, empty or not.
    pub chains: BTreeSet<(Family, Table, String)>,
    /// Rules attributed to a Service, by resource name (`namespace/name`).
    pub services: BTreeMap<String, ServiceRules>,
    /// Rules of `SWY-` chains that belong to no Service (shared rules, orphans).
    pub unattributed: Vec<Rule>,
    /// Rules of built-in (or foreign) chains that jump into a `SWY-` chain.
    pub jumps: Vec<Rule>,
}

impl Saved {
    /// The `SWY-` chains of one family and table.
    pub fn chains_in(&self, family: Family, table: Table) -> BTreeSet<String> {
        self.chains
            .iter()
            .filter(|(f, t, _)| *f == family && *t == table)
            .map(|(_, _, c)| c.clone())
            .collect()
    }
}

/// The text of a rule's first `--comment`, unquoted.
pub fn comment_of(spec: &str) -> Option<&str> {
    let rest = &spec[spec.find("--comment ")? + "--comment ".len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.find('"').map(|end| &quoted[..end])
    } else {
        Some(rest.split(' ').next().unwrap_or_default())
    }
}

/// The Service a comment names: its first word containing `/`, without `:port`.
pub fn service_of_comment(comment: &str) -> Option<&str> {
    let word = comment.split(' ').find(|w| w.contains('/'))?;
    Some(word.split_once(':').map_or(word, |(service, _)| service))
}

/// Reads one family's `iptables-save` output (any tables) into `saved`.
pub fn parse_save(family: Family, text: &str, saved: &mut Saved) -> Result<(), String> {
    let mut table = None;
    let mut rules = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            table = match name {
                "filter" => Some(Table::Filter),
                "nat" => Some(Table::Nat),
                _ => None,
            };
            continue;
        }
        let Some(table) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split(' ').next().unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                saved.chains.insert((family, table, chain.to_string()));
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            let rule = Rule {
                family,
                table,
                chain: chain.to_string(),
                spec: spec.to_string(),
            };
            if chain.starts_with(CHAIN_PREFIX) {
                rules.push(rule);
            } else if spec.contains(&format!("-j {CHAIN_PREFIX}")) {
                saved.jumps.push(rule);
            }
        } else {
            return Err(format!(
                "{family} {table} line {}: unexpected {line:?}",
                number + 1
            ));
        }
    }

    // A Service's own chain belongs to the Service named by any of its rules.
    let mut owners: BTreeMap<(Table, String), String> = BTreeMap::new();
    for rule in &rules {
        if is_global_chain(rule.table, &rule.chain) {
            continue;
        }
        if let Some(service) = comment_of(&rule.spec).and_then(service_of_comment) {
            owners
                .entry((rule.table, rule.chain.clone()))
                .or_insert_with(|| service.to_string());
        }
    }
    for rule in rules {
        let owner = if is_global_chain(rule.table, &rule.chain) {
            comment_of(&rule.spec)
                .and_then(service_of_comment)
                .map(str::to_string)
        } else {
            owners.get(&(rule.table, rule.chain.clone())).cloned()
        };
        let Some(owner) = owner else {
            saved.unattributed.push(rule);
            continue;
        };
        let entry = saved.services.entry(owner.clone()).or_default();
        if rule.chain.starts_with("SWY-VER-")
            && let Some(comment) = comment_of(&rule.spec)
            && let Some(version) = comment
                .strip_prefix(&owner)
                .and_then(|rest| rest.strip_prefix(" version="))
        {
            entry.version = parse_version(version);
        }
        entry.rules.push(rule);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 05:30:00 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:SWY-SERVICES - [0:0]
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "swy service portals" -j SWY-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A SWY-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment "ns/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
# Completed on Sun Nov 22 05:30:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:SWY-MARK-MASQ - [0:0]
:SWY-SEP-AAAAAAAAAAAAAAAA - [0:0]
:SWY-SERVICES - [0:0]
:SWY-SVC-BBBBBBBBBBBBBBBB - [0:0]
:SWY-VER-CCCCCCCCCCCCCCCC - [0:0]
:SWY-ORPHAN - [0:0]
-A PREROUTING -m comment --comment "swy service portals" -j SWY-SERVICES
-A SWY-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A SWY-SEP-AAAAAAAAAAAAAAAA -s 10.244.0.5/32 -m comment --comment "ns/web:http" -j SWY-MARK-MASQ
-A SWY-SEP-AAAAAAAAAAAAAAAA -p tcp -m comment --comment "ns/web:http" -m tcp -j DNAT --to-destination 10.244.0.5:8080
-A SWY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "ns/web:http cluster IP" -m tcp --dport 80 -j SWY-SVC-BBBBBBBBBBBBBBBB
-A SWY-SERVICES -m comment --comment "swy service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j SWY-NODEPORTS
-A SWY-SVC-BBBBBBBBBBBBBBBB -m comment --comment "ns/web:http -> 10.244.0.5:8080" -j SWY-SEP-AAAAAAAAAAAAAAAA
-A SWY-VER-CCCCCCCCCCCCCCCC -m comment --comment "ns/web version=00000000000000ff"
-A SWY-ORPHAN -j RETURN
COMMIT
"#;

    #[test]
    fn rules_are_grouped_by_the_service_their_comment_or_chain_names() {
        let mut saved = Saved::default();
        parse_save(Family::V4, SAMPLE, &mut saved).unwrap();
        assert_eq!(
            saved.services.keys().collect::<Vec<_>>(),
            ["ns/empty", "ns/web"]
        );
        let web = &saved.services["ns/web"];
        assert_eq!(web.version, Some(0xff));
        assert_eq!(
            web.objects(),
            [
                "ipv4 nat -A SWY-SEP-AAAAAAAAAAAAAAAA -s 10.244.0.5/32 -m comment --comment \"ns/web:http\" -j SWY-MARK-MASQ",
                "ipv4 nat -A SWY-SEP-AAAAAAAAAAAAAAAA -p tcp -m comment --comment \"ns/web:http\" -m tcp -j DNAT --to-destination 10.244.0.5:8080",
                "ipv4 nat -A SWY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j SWY-SVC-BBBBBBBBBBBBBBBB",
                "ipv4 nat -A SWY-SVC-BBBBBBBBBBBBBBBB -m comment --comment \"ns/web:http -> 10.244.0.5:8080\" -j SWY-SEP-AAAAAAAAAAAAAAAA",
                "ipv4 nat -A SWY-VER-CCCCCCCCCCCCCCCC -m comment --comment \"ns/web version=00000000000000ff\"",
            ]
        );
        let empty = &saved.services["ns/empty"];
        assert_eq!(empty.version, None);
        assert_eq!(empty.rules.len(), 1);
        assert_eq!(empty.rules[0].table, Table::Filter);
    }

    #[test]
    fn shared_rules_orphans_and_jumps_are_kept_apart() {
        let mut saved = Saved::default();
        parse_save(Family::V4, SAMPLE, &mut saved).unwrap();
        let unattributed: Vec<_> = saved
            .unattributed
            .iter()
            .map(|r| r.chain.as_str())
            .collect();
        assert_eq!(
            unattributed,
            ["SWY-MARK-MASQ", "SWY-SERVICES", "SWY-ORPHAN"]
        );
        assert_eq!(saved.jumps.len(), 2, "{:?}", saved.jumps);
        assert!(
            saved
                .chains
                .contains(&(Family::V4, Table::Nat, "SWY-ORPHAN".into()))
        );
        assert!(!saved.chains.iter().any(|(_, _, c)| c == "KUBE-SERVICES"));
        assert_eq!(saved.chains_in(Family::V4, Table::Filter).len(), 1);
    }

    #[test]
    fn comments_name_services_by_their_first_word_with_a_slash() {
        assert_eq!(
            service_of_comment("masquerade traffic for ns/web:http external destinations"),
            Some("ns/web")
        );
        assert_eq!(
            service_of_comment("ns/web health check node port"),
            Some("ns/web")
        );
        assert_eq!(service_of_comment("ns/web"), Some("ns/web"));
        assert_eq!(service_of_comment("swy service portals"), None);
        assert_eq!(comment_of("-m comment --comment plain -j X"), Some("plain"));
        assert_eq!(comment_of("-j X"), None);
    }

    #[test]
    fn an_unexpected_line_is_an_error() {
        let mut saved = Saved::default();
        let err = parse_save(Family::V6, "*nat\n-I FOO\n", &mut saved).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }
}
