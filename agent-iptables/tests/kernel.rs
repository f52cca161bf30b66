//! The iptables dataplane against the machine's kernel, each test inside a network
//! namespace it creates and deletes. Needs root, `ip` and iptables (nft and legacy).

mod common;

use common::*;
use switchyard_agent_core::dataplane::{Change, Dataplane, Desired};
use switchyard_agent_iptables::{Backend, IptablesDataplane};
use switchyard_proto::state::Protocol;

fn swy_lines(ns: &NetNs, tool: &str) -> Vec<String> {
    ns.sh(tool)
        .lines()
        .filter(|l| l.contains("SWY-"))
        .map(String::from)
        .collect()
}

fn every_rule_kind_reads_back_exactly_as_rendered(backend: Backend) {
    let ns = NetNs::new("kinds");
    let mut dp = dataplane(&ns, backend);
    let mut want = Desired::new();
    want.insert("shop/front".into(), desired(kitchen_sink()));
    let mut empty = service(
        "shop/empty",
        &["10.96.0.21"],
        vec![port("http", Protocol::Tcp, 80, vec![])],
    );
    empty.ports[0].node_port = Some(30081);
    want.insert("shop/empty".into(), desired(empty));
    dp.apply(&want, &full()).unwrap();

    let back = dp.read_back().unwrap();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        ["shop/empty", "shop/front"]
    );
    for (name, service) in &want {
        assert_eq!(back[name].version, Some(service.version), "{name}");
        let expected = dp.expected(name, service);
        assert_eq!(
            back[name].kernel_objects, expected,
            "{name}: kernel (left) differs from rendered (right)"
        );
    }
    // A second full sync changes nothing and leaves no duplicate jump.
    let save = match backend {
        Backend::Nft => "iptables-nft-save; ip6tables-nft-save",
        Backend::Legacy => "iptables-legacy-save; ip6tables-legacy-save",
    };
    let before = swy_lines(&ns, save);
    assert!(before.len() > 100, "{before:#?}");
    dp.apply(&want, &full()).unwrap();
    assert_eq!(before, swy_lines(&ns, save));
}

#[test]
fn every_rule_kind_reads_back_exactly_as_rendered_with_nft() {
    every_rule_kind_reads_back_exactly_as_rendered(Backend::Nft);
}

#[test]
fn every_rule_kind_reads_back_exactly_as_rendered_with_legacy() {
    every_rule_kind_reads_back_exactly_as_rendered(Backend::Legacy);
}

fn chains_of(lines: &[String], service_comment: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.contains(service_comment))
        .cloned()
        .collect()
}

/// The nft rules (with their handles) of the Service-owned chains `lines` mention: a
/// chain that is rewritten gets new handles.
fn nft_handles(ns: &NetNs, lines: &[String]) -> String {
    let mut chains: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter_map(|l| l.split(' ').next())
        .filter(|c| {
            c.starts_with("SWY-SVC-") || c.starts_with("SWY-SEP-") || c.starts_with("SWY-VER-")
        })
        .collect();
    chains.dedup();
    chains
        .iter()
        .map(|c| ns.sh(&format!("nft -a list chain ip nat {c}")))
        .collect()
}

#[test]
fn partial_syncs_touch_only_the_named_services_and_cleanup_removes_everything() {
    lifecycle(0);
}

#[test]
fn syncs_split_into_small_transactions_end_in_the_same_state() {
    lifecycle(2);
}

fn lifecycle(chunk_chains: usize) {
    let ns = NetNs::new("life");
    let mut dp = dataplane_with_chunks(&ns, Backend::Nft, chunk_chains);
    let a = service(
        "ns/a",
        &["10.96.0.10"],
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            vec![ep("10.244.0.5", 8080, true), ep("10.244.0.6", 8080, false)],
        )],
    );
    let b = service(
        "ns/b",
        &["10.96.0.11"],
        vec![port(
            "dns",
            Protocol::Udp,
            53,
            vec![ep("10.244.0.7", 53, true)],
        )],
    );
    let mut want = Desired::new();
    want.insert("ns/a".into(), desired(a.clone()));
    want.insert("ns/b".into(), desired(b.clone()));
    dp.apply(&want, &full()).unwrap();
    assert_in_sync(&mut dp, &want);
    // A full sync over rules in force (split make-before-break when chunked).
    dp.apply(&want, &full()).unwrap();
    assert_in_sync(&mut dp, &want);
    let save = ns.sh("iptables-save");
    assert!(
        save.contains("-A SWY-SERVICES -d 10.96.0.10/32 -p tcp"),
        "{save}"
    );
    for jump in [
        "-A PREROUTING -m comment --comment \"swy service portals\" -j SWY-SERVICES",
        "-A OUTPUT -m comment --comment \"swy service portals\" -j SWY-SERVICES",
        "-A POSTROUTING -m comment --comment \"swy postrouting rules\" -j SWY-POSTROUTING",
    ] {
        assert!(save.contains(jump), "missing {jump}:\n{save}");
    }

    // A jump deleted behind our back is noticed by read-back and restored by the next
    // apply.
    ns.sh("iptables -t nat -D OUTPUT -m comment --comment 'swy service portals' -j SWY-SERVICES");
    dp.read_back().unwrap();

    // Change a: one endpoint goes away. b's rules must not move.
    let lines = swy_lines(&ns, "iptables-save");
    let b_before = chains_of(&lines, "ns/b");
    let b_handles = nft_handles(&ns, &b_before);
    assert!(b_handles.contains("# handle"), "{b_handles}");
    let mut a2 = a.clone();
    a2.ports[0].cluster_endpoints.pop();
    want.insert("ns/a".into(), desired(a2));
    dp.apply(&want, &upsert(&["ns/a"])).unwrap();
    let lines = swy_lines(&ns, "iptables-save");
    let output_jump =
        "-A OUTPUT -m comment --comment \"swy service portals\" -j SWY-SERVICES".to_string();
    assert_eq!(
        lines.iter().filter(|l| **l == output_jump).count(),
        1,
        "the deleted jump is back, once: {lines:#?}"
    );
    assert_eq!(chains_of(&lines, "ns/b"), b_before);
    assert_eq!(
        nft_handles(&ns, &b_before),
        b_handles,
        "b's own chains were rewritten"
    );
    let back = dp.read_back().unwrap();
    assert_eq!(
        back["ns/a"].kernel_objects,
        dp.expected("ns/a", &want["ns/a"])
    );
    assert_eq!(back["ns/a"].version, Some(want["ns/a"].version));
    assert!(
        !lines.iter().any(|l| l.contains("10.244.0.6")),
        "stale endpoint left"
    );
    let sep_chains = |lines: &[String]| lines.iter().filter(|l| l.starts_with(":SWY-SEP-")).count();
    assert_eq!(
        sep_chains(&lines),
        2,
        "the removed endpoint's chain is deleted"
    );

    // A fresh dataplane (agent restart) recovers versions and syncs partially.
    let mut restarted = dataplane_with_chunks(&ns, Backend::Nft, chunk_chains);
    let back = restarted.read_back().unwrap();
    assert_eq!(back["ns/b"].version, Some(want["ns/b"].version));
    want.remove("ns/b");
    restarted
        .apply(
            &want,
            &Change {
                removed: vec!["ns/b".into()],
                ..Change::default()
            },
        )
        .unwrap();
    let lines = swy_lines(&ns, "iptables-save");
    assert!(chains_of(&lines, "ns/b").is_empty(), "{lines:#?}");
    assert_eq!(sep_chains(&lines), 1);
    assert_eq!(
        restarted.read_back().unwrap().keys().collect::<Vec<_>>(),
        ["ns/a"]
    );

    restarted.cleanup().unwrap();
    for tool in ["iptables-save", "ip6tables-save"] {
        let left = swy_lines(&ns, tool);
        assert!(left.is_empty(), "{tool} after cleanup: {left:#?}");
    }
}

/// Every Service reads back exactly as rendered, with its version.
fn assert_in_sync(dp: &mut IptablesDataplane, want: &Desired) {
    let back = dp.read_back().unwrap();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, service) in want {
        assert_eq!(
            back[name].kernel_objects,
            dp.expected(name, service),
            "{name}"
        );
        assert_eq!(back[name].version, Some(service.version), "{name}");
    }
}

#[test]
fn incremental_syncs_keep_shared_lines_of_other_services_and_recover_from_hand_edits() {
    let ns = NetNs::new("incr");
    let mut dp = dataplane(&ns, Backend::Nft);
    let web = |vip: &str, endpoints: &[&str]| {
        let eps = endpoints.iter().map(|ip| ep(ip, 8080, false)).collect();
        desired(service(
            "ns/web",
            &[vip],
            vec![port("http", Protocol::Tcp, 80, eps)],
        ))
    };
    let dns = desired(service(
        "ns/dns",
        &["10.96.0.11"],
        vec![port(
            "dns",
            Protocol::Udp,
            53,
            vec![ep("10.244.0.7", 53, true)],
        )],
    ));
    let mut want = Desired::new();
    want.insert(
        "ns/web".into(),
        web("10.96.0.10", &["10.244.0.5", "10.244.0.6"]),
    );
    want.insert("ns/dns".into(), dns);
    dp.apply(&want, &full()).unwrap();
    let dns_before = chains_of(&swy_lines(&ns, "iptables-save"), "ns/dns");
    let dns_handles = nft_handles(&ns, &dns_before);

    // An endpoint goes, then the VIP moves (a shared line changes), then a new Service.
    for (vip, endpoints) in [
        ("10.96.0.10", &["10.244.0.5"][..]),
        ("10.96.0.20", &["10.244.0.5"][..]),
    ] {
        want.insert("ns/web".into(), web(vip, endpoints));
        dp.apply(&want, &upsert(&["ns/web"])).unwrap();
        assert_in_sync(&mut dp, &want);
    }
    let mut api = web("10.96.0.30", &["10.244.0.9"]);
    std::sync::Arc::make_mut(&mut api.state).key =
        switchyard_proto::state::ServiceKey::new("ns", "api");
    api.version = version_of(&api.state);
    want.insert("ns/api".into(), api);
    dp.apply(&want, &upsert(&["ns/api"])).unwrap();
    assert_in_sync(&mut dp, &want);
    let lines = swy_lines(&ns, "iptables-save");
    assert!(
        !lines.iter().any(|l| l.contains("10.96.0.10/32")),
        "the old VIP's line is gone"
    );
    assert_eq!(chains_of(&lines, "ns/dns"), dns_before);
    assert_eq!(
        nft_handles(&ns, &dns_before),
        dns_handles,
        "dns's lines were rewritten"
    );

    // Someone deletes web's dispatch line: the next change to web cannot delete it
    // either, so it falls back to a rewrite.
    let delete = |lines: &[String], prefix: &str| {
        let line = lines.iter().find(|l| l.starts_with(prefix)).expect(prefix);
        ns.sh(&format!(
            "iptables -t nat {}",
            line.replacen("-A ", "-D ", 1)
        ));
    };
    delete(&lines, "-A SWY-SERVICES -d 10.96.0.20/32");
    want.insert(
        "ns/web".into(),
        web("10.96.0.21", &["10.244.0.5", "10.244.0.8"]),
    );
    dp.apply(&want, &upsert(&["ns/web"])).unwrap();
    assert_in_sync(&mut dp, &want);

    // Someone deletes dns's dispatch line: drift repair re-applies dns unchanged, which
    // rewrites the shared lines.
    delete(
        &swy_lines(&ns, "iptables-save"),
        "-A SWY-SERVICES -d 10.96.0.11/32",
    );
    dp.apply(&want, &upsert(&["ns/dns"])).unwrap();
    assert_in_sync(&mut dp, &want);
}

/// A kernel that refuses one Service: the real iptables in `ns`, behind a wrapper that
/// fails any restore whose input names `shop/poison` (nothing in a valid `ServiceState`
/// makes the real kernel refuse rules, so the refusal is injected; everything else is
/// real).
fn refusing_poison(ns: &NetNs) -> IptablesDataplane {
    let script = r#"
case "$1" in
  *-restore)
    input=$(mktemp); cat > "$input"; exec 3< "$input"; rm -f "$input"
    if grep -q 'shop/poison' <&3; then echo "poisoned input refused" >&2; exit 1; fi
    exec 3< /proc/self/fd/3; exec ip netns exec "$NS" "$@" <&3 ;;
  *) exec ip netns exec "$NS" "$@" ;;
esac"#;
    let mut config = config(Backend::Nft, 0);
    config.command_prefix = vec![
        "env".into(),
        format!("NS={}", ns.name),
        "sh".into(),
        "-c".into(),
        script.into(),
        "wrapper".into(),
    ];
    IptablesDataplane::new(config)
}

#[test]
fn a_service_the_kernel_refuses_fails_alone_and_the_rest_of_the_change_lands() {
    let ns = NetNs::new("poison");
    let mut dp = refusing_poison(&ns);
    let web = |ip: &str, backend: &str| {
        service(
            &format!("shop/{ip}"),
            &[ip],
            vec![port(
                "http",
                Protocol::Tcp,
                80,
                vec![ep(backend, 8080, false)],
            )],
        )
    };
    let mut want = Desired::new();
    want.insert("shop/a".into(), desired(web("10.96.0.1", "10.244.0.1")));
    dp.apply(&want, &full()).unwrap();

    // One change: a modified, b and poison new. Only poison fails.
    want.insert("shop/a".into(), desired(web("10.96.0.1", "10.244.0.2")));
    want.insert("shop/b".into(), desired(web("10.96.0.2", "10.244.0.3")));
    want.insert(
        "shop/poison".into(),
        desired(web("10.96.0.3", "10.244.0.4")),
    );
    let outcome = dp
        .apply(&want, &upsert(&["shop/a", "shop/poison", "shop/b"]))
        .unwrap();
    assert_eq!(
        outcome.failed.keys().collect::<Vec<_>>(),
        ["shop/poison"],
        "{outcome:?}"
    );
    assert!(outcome.failed["shop/poison"].contains("poisoned input refused"));
    let back = dp.read_back().unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>(), ["shop/a", "shop/b"]);
    for name in ["shop/a", "shop/b"] {
        assert_eq!(back[name].version, Some(want[name].version), "{name}");
    }

    // When every Service of a change fails, the dataplane itself is at fault: an error
    // for the runtime to retry, not a NACK per Service.
    want.insert(
        "shop/poison".into(),
        desired(web("10.96.0.4", "10.244.0.5")),
    );
    want.insert(
        "shop/poison2".into(),
        desired(web("10.96.0.5", "10.244.0.6")),
    );
    assert!(
        dp.apply(&want, &upsert(&["shop/poison", "shop/poison2"]))
            .is_err()
    );
    assert_eq!(dp.read_back().unwrap().len(), 2, "a and b stay in force");
}
