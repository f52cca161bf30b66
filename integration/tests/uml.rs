//! The user-mode Linux harness itself: a command's output and exit status come back,
//! IPVS, namespaces and veth work in a guest, and the rerun pattern runs a test body in
//! a guest and fails the host test when the body fails or the name matches nothing.
//!
//! Needs root, `linux.uml` (Debian `user-mode-linux`), `modprobe` (`kmod`), `ipvsadm`,
//! `ip` (`iproute2`) and `socat`; a missing prerequisite fails the test with what to
//! install.

use std::time::Duration;

use switchyard_integration::uml::{self, Guest, UmlError};

/// When set, the body of `a_body_runs_inside_the_guest` fails on purpose: only the
/// test that checks failures propagate sets it, and only in its guest.
const FAIL_ON_PURPOSE: &str = "SWY_UML_TEST_FAIL_ON_PURPOSE";

fn sh(script: &str) -> uml::GuestOutput {
    Guest::new()
        .timeout(Duration::from_secs(120))
        .run("sh", ["-c", script])
        .unwrap_or_else(|e| panic!("guest running {script:?}: {e}"))
}

#[test]
fn prerequisites_are_installed() {
    uml::require_prerequisites().expect("user-mode Linux prerequisites");
}

#[test]
fn a_command_s_output_and_exit_status_come_back() {
    let out = sh("echo to-stdout; echo to-stderr >&2; uname -r; exit 3");
    assert_eq!(out.status, 3, "{out:#?}");
    assert!(!out.success());
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("to-stdout"), "{out:#?}");
    // The guest kernel, not the host's.
    assert!(
        lines.next().is_some_and(|v| v.starts_with("6.1.")),
        "{out:#?}"
    );
    assert_eq!(out.stderr, "to-stderr\n");
    // The console holds the kernel's messages, the command's output does not.
    assert!(out.console.contains("Linux version"), "{}", out.console);
    assert!(!out.console.contains("to-stdout"));
    let ready = out
        .ready_after
        .expect("guest reports when the command started");
    println!(
        "boot to command: {ready:?}, start to halt: {:?}",
        out.elapsed
    );
}

#[test]
fn the_guest_has_its_own_mounts_and_environment() {
    let out = Guest::new()
        .env("SWY_GREETING", "it's a guest")
        .current_dir("/usr")
        .run(
            "sh",
            [
                "-c",
                "echo \"$SWY_GREETING\"; echo \"$SWITCHYARD_UML_GUEST\"; pwd; \
                 grep -E ' (/run|/proc|/sys|/sys/fs/cgroup|/sys/fs/bpf) ' /proc/mounts | cut -d' ' -f2,3; \
                 ip route show default",
            ],
        )
        .expect("guest");
    assert_eq!(out.status, 0, "{out:#?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..3], ["it's a guest", "1", "/usr"], "{out:#?}");
    for mount in [
        "/proc proc",
        "/sys sysfs",
        "/run tmpfs",
        "/sys/fs/cgroup cgroup2",
        "/sys/fs/bpf bpf",
    ] {
        assert!(lines.contains(&mount), "{mount} missing: {out:#?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("default dev swy-uplink")),
        "{out:#?}"
    );
}

#[test]
fn ipvs_works_in_the_guest() {
    let out = sh(
        "ipvsadm -A -t 10.0.0.1:80 -s rr && ipvsadm -a -t 10.0.0.1:80 -r 10.0.1.1:8080 -m \
         && ipvsadm -A -u [fd00::1]:53 -s sh && ipvsadm -Ln",
    );
    assert_eq!(out.status, 0, "{out:#?}");
    assert!(out.stdout.contains("TCP  10.0.0.1:80 rr"), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["->", "10.0.1.1:8080", "Masq", "1", "0", "0"]),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("UDP  [fd00::1]:53 sh"),
        "{}",
        out.stdout
    );
}

#[test]
fn namespaces_and_veth_work_in_the_guest() {
    let out = sh("ip netns add a && ip netns add b \
         && ip -n a link add va type veth peer name vb netns b \
         && ip -n a addr add 10.9.0.1/24 dev va && ip -n b addr add 10.9.0.2/24 dev vb \
         && ip -n a link set va up && ip -n b link set vb up \
         && { ip netns exec b socat -T5 TCP-LISTEN:7,bind=10.9.0.2 SYSTEM:'echo reached' & } \
         && ip netns exec a socat -T5 - TCP:10.9.0.2:7,retry=20,interval=0.1 </dev/null \
         && ip link add swy-test type dummy && echo dummy");
    assert_eq!(out.status, 0, "{out:#?}");
    assert_eq!(out.stdout, "reached\ndummy\n");
}

#[test]
fn kube_proxy_style_iptables_legacy_and_ipset_rules_load_in_the_guest() {
    // The matches and targets kube-proxy's iptables and IPVS modes use, through the
    // legacy backend (the guest kernel has no nf_tables for IPv4/IPv6).
    let out = sh("ipset create KUBE-CLUSTER-IP hash:ip,port \
         && ipset add KUBE-CLUSTER-IP 10.96.0.10,tcp:80 \
         && ipset create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 \
         && printf '%s\n' \
           '*nat' ':KUBE-SERVICES - [0:0]' ':KUBE-POSTROUTING - [0:0]' ':KUBE-SEP-A - [0:0]' \
           '-A OUTPUT -m comment --comment kube-services -j KUBE-SERVICES' \
           '-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT' \
           '-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp --dport 80 -m statistic --mode random --probability 0.5 -j KUBE-SEP-A' \
           '-A KUBE-SERVICES -m addrtype --dst-type LOCAL -p tcp -m multiport --dports 30000:32767 -j ACCEPT' \
           '-A KUBE-SEP-A -p tcp -j DNAT --to-destination 10.244.1.2:8080' \
           '-A POSTROUTING -j KUBE-POSTROUTING' \
           '-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN' \
           '-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000' \
           '-A KUBE-POSTROUTING -j MASQUERADE --random-fully' \
           'COMMIT' \
           '*filter' ':KUBE-FORWARD - [0:0]' \
           '-A FORWARD -j KUBE-FORWARD' \
           '-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP' \
           '-A KUBE-FORWARD -d 10.96.0.12/32 -p tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable' \
           'COMMIT' | iptables-legacy-restore \
         && ip6tables-legacy -t nat -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE \
         && ip6tables-legacy -A FORWARD -p tcp -j REJECT --reject-with tcp-reset \
         && iptables-legacy-save -t nat | grep -c '^-A' \
         && conntrack -L 2>/dev/null | wc -l");
    assert_eq!(out.status, 0, "{out:#?}");
    let counts: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(counts, ["9", "0"], "{out:#?}");
}

#[test]
fn a_command_past_its_timeout_is_killed() {
    let err = Guest::new()
        .timeout(Duration::from_secs(8))
        .run("sh", ["-c", "echo started; sleep 600"])
        .expect_err("the guest outlives its timeout");
    match err {
        UmlError::Timeout { stdout, after, .. } => {
            assert_eq!(stdout, "started\n");
            assert_eq!(after, Duration::from_secs(8));
        }
        other => panic!("expected a timeout, got {other}"),
    }
}

#[test]
fn a_missing_required_module_fails_before_boot() {
    let err = Guest::new()
        .module("swy_no_such_module")
        .run("true", [] as [&str; 0])
        .expect_err("a missing required module is an error");
    assert!(
        matches!(&err, UmlError::MissingModule { module, .. } if module == "swy_no_such_module"),
        "{err}"
    );
}

#[test]
fn a_body_runs_inside_the_guest() {
    uml::in_ipvs_kernel(|| {
        assert!(
            std::path::Path::new("/proc/net/ip_vs").exists(),
            "IPVS is loaded"
        );
        println!("body ran with IPVS");
        if std::env::var_os(FAIL_ON_PURPOSE).is_some() {
            panic!("failing on purpose");
        }
    });
}

#[test]
fn a_failing_body_fails_the_host_test() {
    let err = uml::rerun_in_guest(
        "a_body_runs_inside_the_guest",
        Guest::new().envs_from_host().env(FAIL_ON_PURPOSE, "1"),
    )
    .expect_err("the body panics");
    match &err {
        UmlError::TestFailed {
            status,
            stdout,
            stderr,
            ..
        } => {
            assert_eq!(*status, 101, "libtest's exit status for a failed test");
            assert!(stdout.contains("body ran with IPVS"), "{err}");
            assert!(stderr.contains("failing on purpose"), "{err}");
        }
        other => panic!("expected TestFailed, got {other}"),
    }
}

#[test]
fn a_name_that_matches_no_test_fails() {
    let err = uml::rerun_in_guest("no_such_test", Guest::new().envs_from_host())
        .expect_err("nothing ran");
    assert!(matches!(err, UmlError::TestNotRun { .. }), "{err}");
}
