//! Property tests with a fixed budget for the `iptables-save` read-back, which reads
//! text the kernel holds (and anyone with root on the node may have edited): any text is
//! parsed or refused without panic, and what the agent rendered for Services with any
//! valid names reads back to exactly those Services, no two mapping to one name.
//!
//! 256 cases per property by default; `PROPTEST_CASES` sets another budget. Failures
//! are not persisted to files: what a long run finds is fixed and kept as a named test.

use proptest::{collection::vec, prelude::*, test_runner::Config};
use switchyard_agent_core::fixtures::{desired, ep, port, service};
use switchyard_agent_iptables::{
    RenderConfig,
    readback::{Saved, parse_save},
    render::{Family, Rule, Table, render_service},
};
use switchyard_proto::state::Protocol;

fn config(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

/// Lines an `iptables-save` dump is made of, and near misses of them.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*nat".to_string()),
        Just("*filter".to_string()),
        Just("*mangle".to_string()),
        Just("COMMIT".to_string()),
        Just("# comment".to_string()),
        "[A-Z-]{0,20}".prop_map(|c| format!(":SWY-{c} - [0:0]")),
        "[A-Z-]{0,20}".prop_map(|c| format!(":{c} ACCEPT [0:0]")),
        ("[A-Z-]{0,12}", "\\PC{0,40}")
            .prop_map(|(c, s)| format!("-A SWY-{c} -m comment --comment \"{s}\" -j ACCEPT")),
        ("[A-Z-]{0,12}", "[a-z0-9/: =\"-]{0,40}")
            .prop_map(|(c, s)| format!("-A SWY-VER-{c} -m comment --comment {s}")),
        "\\PC{0,40}".prop_map(|s| format!("-A OUTPUT {s} -j SWY-SERVICES")),
        "\\PC{0,60}",
        Just("-A".to_string()),
        Just("-A ".to_string()),
        Just("--comment ".to_string()),
        Just("-A SWY-X --comment \"".to_string()),
    ]
}

/// A valid namespace or name (an RFC 1035 label, so good for both).
fn label() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,10}[a-z0-9])?"
}

/// The `iptables-save` text of `rules`, one table after another.
fn save_text(rules: &[Rule]) -> String {
    let mut text = String::new();
    for table in [Table::Filter, Table::Nat] {
        text.push_str(&format!("*{table}\n"));
        let mut chains: Vec<&str> = rules
            .iter()
            .filter(|r| r.table == table)
            .map(|r| r.chain.as_str())
            .collect();
        chains.sort();
        chains.dedup();
        for chain in chains {
            text.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in rules.iter().filter(|r| r.table == table) {
            text.push_str(&rule.line());
            text.push('\n');
        }
        text.push_str("COMMIT\n");
    }
    text
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_dump_is_read_or_refused_without_panic(lines in vec(line(), 0..40)) {
        let text = lines.join("\n");
        let mut saved = Saved::default();
        let _ = parse_save(Family::V4, &text, &mut saved);
        let _ = parse_save(Family::V6, &text, &mut saved);
    }

    #[test]
    fn any_text_is_read_or_refused_without_panic(text in "\\PC{0,400}") {
        let mut saved = Saved::default();
        let _ = parse_save(Family::V4, &text, &mut saved);
    }

    #[test]
    fn rendered_services_read_back_as_themselves_whatever_their_names(
        names in vec((label(), label()), 1..4),
        ports in vec((1u16.., label(), 0..3u8, prop::option::of(30000u16..32768)), 1..3),
        endpoints in 0usize..3,
        affinity in prop::option::of(1u32..86_400),
    ) {
        let cfg = RenderConfig::default();
        let mut rendered = std::collections::BTreeMap::new();
        let mut rules = Vec::new();
        for (i, (ns, name)) in names.iter().enumerate() {
            let key = format!("{ns}/{name}");
            if rendered.contains_key(&key) {
                continue;
            }
            // Port numbers and names are unique within a Service (the controller checks).
            let mut numbers = std::collections::BTreeSet::new();
            let mut port_names = std::collections::BTreeSet::new();
            let service_ports = ports
                .iter()
                .filter(|(number, name, _, _)| numbers.insert(*number) & port_names.insert(name.clone()))
                .map(|(number, port_name, protocol, node_port)| {
                    let eps = (0..endpoints)
                        .map(|e| ep(&format!("10.244.{i}.{}", e + 1), 8080, e == 0))
                        .collect();
                    let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][*protocol as usize];
                    let mut port = port(port_name, protocol, *number, eps);
                    port.node_port = *node_port;
                    port
                })
                .collect();
            let mut state = service(&key, &[&format!("10.96.{i}.10")], service_ports);
            state.session_affinity_timeout = affinity;
            let service_rules = render_service(&key, &desired(state.clone()), &cfg);
            rules.extend(service_rules.rules.iter().cloned());
            rendered.insert(key, (service_rules, desired(state).version));
        }
        let mut saved = Saved::default();
        parse_save(Family::V4, &save_text(&rules), &mut saved).unwrap();
        let read: Vec<&String> = saved.services.keys().collect();
        let expected: Vec<&String> = rendered.keys().collect();
        prop_assert_eq!(read, expected);
        for (key, (service_rules, version)) in &rendered {
            let back = &saved.services[key];
            prop_assert_eq!(back.objects(), service_rules.objects(), "{}", key);
            prop_assert_eq!(back.version, Some(*version));
        }
    }
}
