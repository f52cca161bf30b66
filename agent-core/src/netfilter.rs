//! What the dataplanes that program netfilter (iptables, and IPVS for what IPVS cannot
//! do) share: the address family of a ruleset, the choice between the nft and legacy
//! iptables backends, and a runner for their commands through an optional prefix (e.g.
//! `ip netns exec NS`).

use std::{
    io::Write,
    process::{ChildStdin, Command, Stdio},
};

use crate::dataplane::DataplaneError;
/// The address family of a ruleset (`iptables` / `ip6tables`).
pub use crate::policy::Family;

/// Which iptables implementation programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: iptables syntax on nf_tables.
    Nft,
    /// `iptables-legacy`: the x_tables kernel interface.
    Legacy,
}

impl Backend {
    /// `nft` or `legacy`, as in the tools' names.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    fn tool(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        if tool.is_empty() {
            format!("{base}-{}", self.name())
        } else {
            format!("{base}-{}-{tool}", self.name())
        }
    }

    /// `iptables-nft`, `ip6tables-legacy`, …
    pub fn iptables(self, family: Family) -> String {
        self.tool(family, "")
    }

    pub fn save(self, family: Family) -> String {
        self.tool(family, "save")
    }

    pub fn restore(self, family: Family) -> String {
        self.tool(family, "restore")
    }
}

/// Chains whose presence tells which backend the node's components use: kubelet's and
/// kube-proxy's hints, and switchyard's own chains (also the conntrack hold, so a node
/// on eBPF that switches back finds, and removes, the hold where it is).
const HINTS: [&str; 4] = [
    ":KUBE-IPTABLES-HINT ",
    ":KUBE-KUBELET-CANARY ",
    ":SWY-",
    ":SWYCT-",
];

fn has_hint(save: &str) -> bool {
    save.lines().any(|l| HINTS.iter().any(|h| l.starts_with(h)))
}

fn rule_count(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with('-')).count()
}

/// Picks the backend the node already uses, as kube-proxy's iptables wrapper does:
/// a hint chain decides (nft first); otherwise legacy if it holds 10 rules or more, or
/// more rules than nft; otherwise nft. Inputs are the concatenated outputs of the
/// `-save` tools of both families.
pub fn choose_backend(legacy_save: &str, nft_save: &str) -> Backend {
    if has_hint(nft_save) {
        return Backend::Nft;
    }
    if has_hint(legacy_save) {
        return Backend::Legacy;
    }
    let legacy = rule_count(legacy_save);
    if legacy >= 10 || legacy > rule_count(nft_save) {
        Backend::Legacy
    } else {
        Backend::Nft
    }
}

/// A rule in iptables-save form: `-A <chain> <spec>` in `table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRule {
    pub table: &'static str,
    pub chain: String,
    pub spec: String,
}

/// kube-proxy's masquerading and forwarding rules, which every netfilter dataplane
/// needs as they are, in chains named with the dataplane's `prefix` (each dataplane
/// owns its chains, so two can be in force at once during a switch): nat
/// `<prefix>POSTROUTING` masquerades what carries the mark bit `masquerade_bit`
/// (clearing it), `<prefix>MARK-MASQ` sets it, filter `<prefix>FORWARD` drops invalid and
/// accepts marked or established forwarded traffic.
pub fn masquerade_rules(prefix: &str, masquerade_bit: u8, random_fully: bool) -> Vec<SharedRule> {
    let mark = format!("{:#x}", 1u32 << masquerade_bit.min(31));
    let postrouting = format!("{prefix}POSTROUTING");
    let mark_masq = format!("{prefix}MARK-MASQ");
    let forward = format!("{prefix}FORWARD");
    let rule = |table, chain: &String, spec: String| SharedRule {
        table,
        chain: chain.clone(),
        spec,
    };
    vec![
        rule(
            "nat",
            &postrouting,
            format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
        ),
        rule(
            "nat",
            &postrouting,
            format!("-j MARK --set-xmark {mark}/0x0"),
        ),
        rule(
            "nat",
            &postrouting,
            format!(
                "-m comment --comment \"swy service traffic requiring SNAT\" -j MASQUERADE{}",
                if random_fully { " --random-fully" } else { "" }
            ),
        ),
        rule(
            "nat",
            &mark_masq,
            format!("-j MARK --set-xmark {mark}/{mark}"),
        ),
        rule(
            "filter",
            &forward,
            "-m conntrack --ctstate INVALID -j DROP".to_string(),
        ),
        rule(
            "filter",
            &forward,
            format!(
                "-m comment --comment \"swy forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
            ),
        ),
        rule(
            "filter",
            &forward,
            "-m comment --comment \"swy forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_string(),
        ),
    ]
}

/// The filter-table chain that keeps the kernel's connection tracking on after a
/// netfilter dataplane hands the node to one that needs none (eBPF). Nothing jumps to
/// it; its one rule has a conntrack match, and a rule that loads one keeps conntrack
/// registered in the namespace. Without it, the connections iptables or IPVS translated
/// before the switch lose their NAT the moment the old rules go, unless something else
/// on the node (a CNI's masquerade rules, kubelet's) uses conntrack.
pub const CONNTRACK_HOLD_CHAIN: &str = "SWYCT-HOLD";

/// `iptables-restore --noflush` input that puts the hold in place (`hold`) or removes it,
/// given what `iptables-save -t filter` printed; `None` when it already is as asked.
pub fn conntrack_hold_input(filter_save: &str, hold: bool) -> Option<String> {
    let chain = CONNTRACK_HOLD_CHAIN;
    let present = filter_save
        .lines()
        .any(|l| l.starts_with(&format!(":{chain} ")));
    match (hold, present) {
        (true, false) => Some(format!(
            "*filter\n:{chain} - [0:0]\n-A {chain} -m conntrack --ctstate SNAT,DNAT -m comment --comment \"switchyard: keeps connection tracking on for connections translated before a switch\" -j RETURN\nCOMMIT\n"
        )),
        // Declaring the chain flushes it, so it can go whatever it holds.
        (false, true) => Some(format!("*filter\n:{chain} - [0:0]\n-X {chain}\nCOMMIT\n")),
        _ => None,
    }
}

/// The type of an absent stdin writer, for `run_inner(…, None)`.
type NoFeed = fn(ChildStdin) -> std::io::Result<()>;

/// Runs external commands, each behind the configured prefix.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    pub prefix: Vec<String>,
}

impl Runner {
    fn command(&self, program: &str, args: &[&str]) -> (Command, String) {
        let mut argv: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        argv.push(program);
        argv.extend_from_slice(args);
        let mut command = Command::new(argv[0]);
        command.args(&argv[1..]);
        (command, argv.join(" "))
    }

    /// Runs `program args…` with `stdin`; returns stdout, or an error with stderr.
    pub fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, DataplaneError> {
        match stdin {
            Some(input) => {
                self.run_streaming(program, args, |pipe| pipe.write_all(input.as_bytes()))
            }
            None => self.run_inner(program, args, None::<NoFeed>),
        }
    }

    /// Runs `program args…` with what `produce` writes to its stdin. `produce` runs on its
    /// own thread while the program reads, so producing and consuming overlap, and a
    /// program that writes much to stdout before it has read all its input cannot
    /// deadlock on full pipes.
    pub fn run_streaming(
        &self,
        program: &str,
        args: &[&str],
        produce: impl FnOnce(&mut dyn Write) -> std::io::Result<()> + Send,
    ) -> Result<String, DataplaneError> {
        let feed = |pipe: ChildStdin| {
            let mut pipe = std::io::BufWriter::with_capacity(1 << 16, pipe);
            produce(&mut pipe).and_then(|()| pipe.flush())
        };
        self.run_inner(program, args, Some(feed))
    }

    fn run_inner(
        &self,
        program: &str,
        args: &[&str],
        feed: Option<impl FnOnce(ChildStdin) -> std::io::Result<()> + Send>,
    ) -> Result<String, DataplaneError> {
        let (mut command, shown) = self.command(program, args);
        command
            .stdin(if feed.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let io = |source| DataplaneError::Io {
            operation: shown.clone(),
            source,
        };
        let mut child = command.spawn().map_err(io)?;
        let pipe = child.stdin.take();
        let (fed, output) = std::thread::scope(|scope| {
            let writer = feed
                .zip(pipe)
                .map(|(feed, pipe)| scope.spawn(move || feed(pipe)));
            let output = child.wait_with_output();
            let fed = writer.map_or(Ok(()), |w| w.join().expect("stdin writer panicked"));
            (fed, output)
        });
        let output = output.map_err(io)?;
        // A program that fails early closes its stdin: its own error says more than the
        // broken pipe does.
        if output.status.success() {
            fed.map_err(io)?;
        }
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(DataplaneError::Command {
                command: shown,
                message: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            })
        }
    }

    /// Puts the [connection-tracking hold](CONNTRACK_HOLD_CHAIN) in place (`hold`) or
    /// removes it, in each of `families`, with `backend`'s tools.
    pub fn set_conntrack_hold(
        &self,
        backend: Backend,
        families: &[Family],
        hold: bool,
    ) -> Result<(), DataplaneError> {
        for &family in families {
            let save = self.run(&backend.save(family), &["-t", "filter"], None)?;
            if let Some(input) = conntrack_hold_input(&save, hold) {
                self.run(
                    &backend.restore(family),
                    &["--noflush", "-w", "5"],
                    Some(&input),
                )?;
            }
        }
        Ok(())
    }

    /// Whether `program args…` exits successfully (for `iptables -C`).
    pub fn succeeds(&self, program: &str, args: &[&str]) -> Result<bool, DataplaneError> {
        let (mut command, shown) = self.command(program, args);
        let status = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|source| DataplaneError::Io {
                operation: shown,
                source,
            })?;
        Ok(status.success())
    }

    /// Detects the backend by running both families' `-save` tools of both backends;
    /// a tool that is missing or fails counts as empty. A kernel without nf_tables for
    /// IPv4 (user-mode Linux's, for one) still lets `iptables-nft-save` print empty
    /// tables but refuses every write: when the choice would be nft, one no-op
    /// transaction (a probe chain created and deleted) decides, and legacy is used if
    /// it fails.
    pub fn detect_backend(&self) -> Backend {
        let dump = |backend: Backend| {
            Family::ALL
                .iter()
                .filter_map(|f| self.run(&backend.save(*f), &[], None).ok())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let chosen = choose_backend(&dump(Backend::Legacy), &dump(Backend::Nft));
        if chosen == Backend::Nft
            && let Err(error) = self.run(
                &Backend::Nft.restore(Family::V4),
                &["--noflush", "-w", "5"],
                Some("*filter\n:SWY-NFT-PROBE - [0:0]\n-X SWY-NFT-PROBE\nCOMMIT\n"),
            )
        {
            tracing::info!(%error, "iptables-nft cannot write to this kernel: using iptables-legacy");
            return Backend::Legacy;
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_chains_decide_before_rule_counts() {
        let many = "-A INPUT -j ACCEPT\n".repeat(20);
        let hinted = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        assert_eq!(choose_backend(&many, hinted), Backend::Nft);
        assert_eq!(choose_backend(hinted, &many), Backend::Legacy);
        assert_eq!(
            choose_backend("", "*nat\n:SWY-SERVICES - [0:0]\n"),
            Backend::Nft
        );
        assert_eq!(
            choose_backend("*nat\n:SWY-SERVICES - [0:0]\n", ""),
            Backend::Legacy
        );
        // A node on eBPF after a switch holds only the conntrack hold.
        let hold = "*filter\n:SWYCT-HOLD - [0:0]\n";
        assert_eq!(choose_backend(hold, &many), Backend::Legacy);
    }

    #[test]
    fn legacy_wins_with_ten_rules_or_more_rules_than_nft() {
        let rules = |n| "-A INPUT -j ACCEPT\n".repeat(n);
        assert_eq!(choose_backend(&rules(10), &rules(50)), Backend::Legacy);
        assert_eq!(choose_backend(&rules(3), &rules(2)), Backend::Legacy);
        assert_eq!(choose_backend(&rules(2), &rules(2)), Backend::Nft);
        assert_eq!(choose_backend("", ""), Backend::Nft);
    }

    /// A runner whose PATH holds `tools` (name → shell script body) and the basic
    /// commands, but no real iptables.
    fn fake_tools(dir: &std::path::Path, tools: &[(&str, &str)]) -> Runner {
        use std::os::unix::fs::PermissionsExt;
        for (name, body) in tools {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Runner {
            // The real iptables tools live in /usr/sbin, which is left out.
            prefix: vec![
                "env".into(),
                format!("PATH={}:/usr/bin:/bin", dir.display()),
            ],
        }
    }

    #[test]
    fn a_kernel_without_nf_tables_gets_legacy_even_with_empty_tables() {
        let dir = tempfile::tempdir().unwrap();
        // As in user-mode Linux: reading prints empty tables, writing fails.
        let runner = fake_tools(
            dir.path(),
            &[
                ("iptables-nft-save", "echo '*filter'; echo COMMIT"),
                (
                    "iptables-nft-restore",
                    "cat >/dev/null; echo 'TABLE_ADD failed (Operation not supported)' >&2; exit 4",
                ),
                ("iptables-legacy-save", "exit 0"),
            ],
        );
        assert_eq!(runner.detect_backend(), Backend::Legacy);
        let dir = tempfile::tempdir().unwrap();
        let runner = fake_tools(dir.path(), &[("iptables-nft-restore", "cat >/dev/null")]);
        assert_eq!(
            runner.detect_backend(),
            Backend::Nft,
            "both usable and empty"
        );
    }

    #[test]
    fn the_conntrack_hold_is_added_or_removed_only_when_it_is_not_as_asked() {
        let without = "*filter\n:INPUT ACCEPT [0:0]\n:SWY-FORWARD - [0:0]\nCOMMIT\n";
        let with = "*filter\n:INPUT ACCEPT [0:0]\n:SWYCT-HOLD - [0:0]\n-A SWYCT-HOLD -m conntrack --ctstate SNAT,DNAT -j RETURN\nCOMMIT\n";
        let add = conntrack_hold_input(without, true).expect("added when absent");
        assert!(add.starts_with("*filter\n:SWYCT-HOLD - [0:0]\n-A SWYCT-HOLD -m conntrack "));
        assert!(add.ends_with("-j RETURN\nCOMMIT\n"));
        assert_eq!(conntrack_hold_input(with, true), None, "already held");
        assert_eq!(
            conntrack_hold_input(with, false).as_deref(),
            Some("*filter\n:SWYCT-HOLD - [0:0]\n-X SWYCT-HOLD\nCOMMIT\n")
        );
        assert_eq!(
            conntrack_hold_input(without, false),
            None,
            "nothing to remove"
        );
        // A chain whose name only starts the same is someone else's.
        let other = "*filter\n:SWYCT-HOLDER - [0:0]\nCOMMIT\n";
        assert!(conntrack_hold_input(other, true).is_some());
        assert_eq!(conntrack_hold_input(other, false), None);
    }

    #[test]
    fn tools_are_named_per_family_and_backend() {
        assert_eq!(Backend::Nft.restore(Family::V4), "iptables-nft-restore");
        assert_eq!(Backend::Legacy.save(Family::V6), "ip6tables-legacy-save");
        assert_eq!(Backend::Legacy.iptables(Family::V6), "ip6tables-legacy");
    }
}
