//! Writes the comparison's `report.md` (with its charts and `results.json`): conformance
//! first, then each kernel's medians per cluster size, then how it was measured.
//! [`render`] is the pure part; [`write`] puts it on disk.
//!
//! It reports what was measured and judges nothing: no timing here is a pass or a fail.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::charts::{self, Chart};
use super::{Comparison, ConformanceRun, KernelRun, Metric, Unit, size_label};

/// What a cell shows for a value nobody measured.
const MISSING: &str = "—";

/// Writes `report.md`, its charts and `results.json` into `dir` (created if need be) and
/// returns the report's path.
pub fn write(comparison: &Comparison, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut charts = Vec::new();
    let mut prefixes = BTreeSet::new();
    for run in &comparison.kernels {
        let mut prefix = prefix(&run.name);
        // Two kernels of one name must not draw over each other's files.
        if !prefixes.insert(prefix.clone()) {
            prefix = format!("{prefix}-{}", prefixes.len());
            prefixes.insert(prefix.clone());
        }
        let drawn = charts::draw(run, dir, &prefix)
            .with_context(|| format!("drawing the charts of {}", run.label()))?;
        charts.push((run.name.clone(), drawn));
    }

    let results = dir.join("results.json");
    let json = serde_json::to_string_pretty(comparison).context("serialising the results")?;
    std::fs::write(&results, json + "\n")
        .with_context(|| format!("writing {}", results.display()))?;

    let report = dir.join("report.md");
    std::fs::write(&report, render(comparison, &charts))
        .with_context(|| format!("writing {}", report.display()))?;
    Ok(report)
}

/// A kernel's chart file prefix: its name if one word (`host`), else the initials of its
/// words (`user-mode Linux` → `uml`).
fn prefix(name: &str) -> String {
    let words: Vec<String> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    match words.as_slice() {
        [] => "kernel".into(),
        [word] => word.clone(),
        words => words.iter().filter_map(|w| w.chars().next()).collect(),
    }
}

/// The report: `charts` holds each kernel's charts by kernel name (paths relative to the
/// report).
pub fn render(comparison: &Comparison, charts: &[(String, Vec<Chart>)]) -> String {
    let mut out = String::new();
    intro(&mut out, comparison);
    conformance(&mut out, &comparison.kernels);
    for run in &comparison.kernels {
        let drawn = charts
            .iter()
            .find(|(name, _)| *name == run.name)
            .map(|(_, charts)| charts.as_slice())
            .unwrap_or_default();
        kernel(&mut out, run, drawn);
    }
    method(&mut out);
    out
}

fn intro(out: &mut String, comparison: &Comparison) {
    let m = &comparison.machine;
    out.push_str("# switchyard: iptables, IPVS and eBPF side by side\n\n");
    out.push_str(
        "The same cluster state and the same workload, through each dataplane in turn: the \
         same agent binary with `--dataplane iptables`, `ipvs` or `ebpf`, the same Services \
         and endpoints, the same probes from the same pod.\n\n",
    );
    if comparison.quick {
        let _ = writeln!(
            out,
            "> **Quick run — indicative only: small sizes, one short round, `{}` build.** \
             Do not quote these numbers.\n",
            comparison.profile
        );
    } else {
        let _ = writeln!(
            out,
            "Agent built with the `{}` profile.\n",
            comparison.profile
        );
    }
    let _ = writeln!(
        out,
        "Machine: {}, {} CPUs, {:.1} GiB memory, host kernel Linux {}; run started {}.\n",
        m.cpu_model, m.cpus, m.memory_gib, m.host_kernel, m.date
    );
}

fn conformance(out: &mut String, kernels: &[KernelRun]) {
    out.push_str("## Conformance\n\n");
    out.push_str(
        "The same scenarios of kube-proxy behaviour, with real packets, through every \
         dataplane; each probe's outcome is checked against the others and against what the \
         controller computed.\n\n",
    );
    if kernels.is_empty() {
        out.push_str("No kernel was measured.\n\n");
    }
    for run in kernels {
        let _ = writeln!(out, "### {}\n", run.label());
        let Some(ConformanceRun {
            summary,
            table,
            differences,
        }) = &run.conformance
        else {
            out.push_str("Conformance: not run.\n\n");
            continue;
        };
        let _ = writeln!(out, "{}\n", summary.trim());
        if !differences.is_empty() {
            out.push_str("Where the dataplanes differ:\n\n");
            for difference in differences {
                let _ = writeln!(out, "- {}", one_line(difference));
            }
            out.push('\n');
        }
        // GitHub renders Markdown inside <details> only with blank lines around it.
        let _ = writeln!(
            out,
            "<details>\n<summary>Every probe, per dataplane</summary>\n\n{}\n\n</details>\n",
            table.trim()
        );
    }
}

fn kernel(out: &mut String, run: &KernelRun, charts: &[Chart]) {
    let _ = writeln!(out, "## {}\n", run.label());
    let measured: BTreeSet<Metric> = run.samples.iter().map(|s| s.metric).collect();
    if measured.is_empty() {
        out.push_str("Nothing was measured.\n\n");
    }
    let rounds = match run.rounds {
        1 => "one round, no median".to_string(),
        n => format!("median of {n} rounds"),
    };
    for &services in &run.sizes {
        if measured.is_empty() {
            break;
        }
        let _ = writeln!(out, "### {} Services\n", size_label(services));
        out.push_str("| |");
        for dataplane in &run.dataplanes {
            let _ = write!(out, " {dataplane} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(run.dataplanes.len()));
        out.push('\n');
        // A metric this kernel never measured gets no row; one missing here and there
        // shows as a dash.
        for metric in Metric::ALL.into_iter().filter(|m| measured.contains(m)) {
            row(out, metric.title(), &run.dataplanes, |dataplane| {
                run.median(dataplane, services, metric)
                    .map(|v| metric.unit().format(v))
            });
            if metric == Metric::DirectRate {
                row(out, "ClusterIP / direct", &run.dataplanes, |dataplane| {
                    run.rate_ratio(dataplane, services)
                        .map(|v| Unit::Share.format(v))
                });
            }
        }
        let _ = writeln!(out, "\n{rounds}\n");
    }
    for chart in charts {
        let _ = writeln!(out, "![{}]({})\n", chart.title, chart.file);
    }
    if !run.errors.is_empty() {
        out.push_str("### Not measured\n\n");
        for error in &run.errors {
            let _ = writeln!(out, "- {}", one_line(error));
        }
        out.push('\n');
    }
}

fn row(
    out: &mut String,
    title: &str,
    dataplanes: &[String],
    mut cell: impl FnMut(&str) -> Option<String>,
) {
    let _ = write!(out, "| {title} |");
    for dataplane in dataplanes {
        let _ = write!(out, " {} |", cell(dataplane).as_deref().unwrap_or(MISSING));
    }
    out.push('\n');
}

/// A list item's text: an error's lines would otherwise end the list.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn method(out: &mut String) {
    out.push_str("## How it was measured\n\n");
    out.push_str(
        "Rounds are interleaved: in every round each dataplane runs once at every cluster \
         size, in turn, so whatever drifts on the machine over the run (other load, thermal \
         state, caches) falls on all of them alike. Each table shows the median over the \
         rounds. A cluster size counts the Services besides the example cluster's.\n\n\
         Timings are reported, never asserted: nothing here passes or fails on a number. \
         What could not be measured is listed under \"Not measured\" with the reason.\n\n\
         In user-mode Linux the kernel has no BPF JIT, so eBPF programs are interpreted \
         there; its eBPF timings say more about the interpreter than about the dataplane. \
         The host kernel JIT-compiles them.\n\n\
         The charts leave out what has no value, and their log scales cannot show zero.\n\n\
         Each cluster is the real controller reading a manifests folder, `switchyard-agent \
         --dataplane <d>` in a node network namespace, and three backend namespaces; a pod \
         is a client namespace whose probes run inside the cgroup the eBPF dataplane \
         balances (the others ignore it). The Services besides the example cluster's have \
         two remote endpoints each and sit in a file no measurement touches; the \
         controller holds them all before the agent starts. The edit-to-first-packet probe \
         loop runs every 5 ms; the node's ICMP rate limit is off, since Linux would \
         otherwise answer a netfilter reject with silence after 6 in a row and the probe \
         would wait out a retransmitted SYN (1 s). Its figure includes the manifests \
         source's 50 ms debounce. The direct connection rate differs between dataplanes by \
         itself: under iptables and IPVS the node runs netfilter conntrack on all \
         traffic.\n\n",
    );
    for metric in Metric::ALL {
        let _ = writeln!(out, "- **{}**: {}", metric.title(), explanation(metric));
        if metric == Metric::DirectRate {
            let _ = writeln!(
                out,
                "- **ClusterIP / direct**: the two rates above, paired within each round \
                 (their windows are taken back to back, so drift cancels), as a percentage; \
                 the median of those ratios."
            );
        }
    }
    out.push('\n');
}

fn explanation(metric: Metric) -> &'static str {
    match metric {
        Metric::InitialSync => {
            "an agent started on an empty node, until every Service is in the kernel: the \
             kernel time of its applies, from the agent's `switchyard_sync_proxy_rules_duration_seconds` \
             (the controller held the whole cluster before the agent started)."
        }
        Metric::Change => {
            "one Service's endpoints changed with the others in place (the agent's \
             `switchyard_sync_proxy_rules_duration_seconds`)."
        }
        Metric::ReadBack => {
            "reading everything back from the kernel (an `AgentQuery/GetAgentState` with \
             kernel objects)."
        }
        Metric::ClusterIpRate => "new TCP connections per second from a pod through a ClusterIP.",
        Metric::DirectRate => {
            "new TCP connections per second from the same pod straight to the same backend."
        }
        Metric::KernelObjects => {
            "what the dataplane reads back from the kernel: rules, virtual and real servers, \
             map entries, set members."
        }
        Metric::AgentRss => "the agent's resident memory after the measurements.",
        Metric::AgentPeakRss => "the agent's peak resident memory.",
        Metric::ProgrammingLatency => {
            "network programming latency: from a manifest edit (an endpoint added to a \
             Service that had none) to the first connection a pod gets through."
        }
        Metric::SpreadBusiest => {
            "the share of requests the busiest of three backends answered (33 % is even)."
        }
        Metric::SpreadIdlest => "the share of requests the idlest of three backends answered.",
        Metric::RestartRequests => "requests a pod's connection loop sent across an agent restart.",
        Metric::RestartFailures => "of those, the ones that failed (the goal is 0).",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::{Machine, Sample};

    const SUMMARY: &str = "conformance: 12 of 13 scenarios agree across iptables, ipvs and ebpf";

    fn comparison() -> Comparison {
        let host = KernelRun {
            name: "host".into(),
            kernel: "6.18.0".into(),
            ebpf_jit: true,
            dataplanes: vec!["iptables".into(), "ebpf".into()],
            sizes: vec![0, 1000],
            rounds: 3,
            samples: vec![
                Sample::new("iptables", 1000, 0, Metric::InitialSync, 1.52),
                Sample::new("iptables", 1000, 1, Metric::InitialSync, 1.644),
                Sample::new("iptables", 1000, 2, Metric::InitialSync, 1.80),
                Sample::new("ebpf", 1000, 0, Metric::InitialSync, 0.00217),
                Sample::new("iptables", 1000, 0, Metric::ClusterIpRate, 9600.0),
                Sample::new("iptables", 1000, 0, Metric::DirectRate, 10000.0),
                Sample::new("iptables", 0, 0, Metric::KernelObjects, 12400.0),
            ],
            conformance: Some(ConformanceRun {
                summary: SUMMARY.into(),
                table: "| probe | iptables | ebpf |\n|---|---|---|\n| reject | refused | refused |"
                    .into(),
                differences: vec!["affinity: iptables sticks,\nebpf spreads".into()],
            }),
            errors: Vec::new(),
        };
        let uml = KernelRun {
            name: "user-mode Linux".into(),
            kernel: "6.12.0".into(),
            ebpf_jit: false,
            dataplanes: vec!["iptables".into(), "ipvs".into()],
            sizes: vec![0],
            rounds: 1,
            samples: vec![Sample::new("ipvs", 0, 0, Metric::AgentRss, 18.24)],
            conformance: None,
            errors: vec!["ipvs at 10k: the agent did not start".into()],
        };
        Comparison {
            machine: Machine {
                cpu_model: "Test CPU".into(),
                cpus: 2,
                memory_gib: 7.76,
                host_kernel: "6.18.0".into(),
                date: "2025-01-01T00:00:00Z".into(),
            },
            quick: true,
            profile: "dev".into(),
            kernels: vec![host, uml],
        }
    }

    fn charts() -> Vec<(String, Vec<Chart>)> {
        vec![(
            "host".into(),
            vec![Chart {
                file: "host-initial-sync.svg".into(),
                title: "initial sync: host".into(),
            }],
        )]
    }

    /// The lines of `report` from the line starting with `from` to the next `## ` heading.
    fn section<'a>(report: &'a str, from: &str) -> &'a str {
        let from = format!("\n{from}");
        let start = report.find(&from).unwrap_or_else(|| panic!("no {from}"));
        let rest = &report[start + from.len()..];
        &rest[..rest.find("\n## ").unwrap_or(rest.len())]
    }

    #[test]
    fn conformance_comes_first_with_its_summary_line_verbatim() {
        let report = render(&comparison(), &charts());
        assert!(report.starts_with("# switchyard: iptables, IPVS and eBPF side by side\n"));
        let first = report.find("\n## ").unwrap();
        assert!(report[first..].starts_with("\n## Conformance\n"));
        assert!(report.lines().any(|line| line == SUMMARY), "{report}");

        let conformance = section(&report, "## Conformance");
        assert!(conformance.contains("- affinity: iptables sticks, ebpf spreads\n"));
        assert!(conformance.contains(
            "<details>\n<summary>Every probe, per dataplane</summary>\n\n| probe | iptables"
        ));
        let uml = section(conformance, "### user-mode Linux, Linux 6.12.0");
        assert!(uml.contains("not run"), "{uml}");
    }

    #[test]
    fn tables_show_medians_in_units_and_dashes_where_nothing_was_measured() {
        let report = render(&comparison(), &charts());
        let host = section(&report, "## host, Linux 6.18.0 (eBPF JIT-compiled)");
        let at_1k = section(host, "### 1k Services");
        assert!(
            at_1k.contains("| | iptables | ebpf |\n|---|---:|---:|\n"),
            "{at_1k}"
        );
        assert!(
            at_1k.contains("| initial sync | 1.64 s | 2.17 ms |"),
            "{at_1k}"
        );
        assert!(at_1k.contains("| new connections/s through a ClusterIP | 9,600/s | — |"));
        assert!(at_1k.contains("| new connections/s direct | 10,000/s | — |"));
        assert!(at_1k.contains("| ClusterIP / direct | 96 % | — |"));
        assert!(at_1k.contains("| kernel objects | — | — |"));
        assert!(at_1k.contains("median of 3 rounds"));
        // Never measured on this kernel: no row.
        assert!(!at_1k.contains("agent memory"));
        assert!(host.contains("| kernel objects | 12,400 | — |"));
        assert!(host.contains("![initial sync: host](host-initial-sync.svg)"));
        assert!(!host.contains("Not measured"));

        let uml = section(
            &report,
            "## user-mode Linux, Linux 6.12.0 (eBPF interpreted, no JIT)",
        );
        assert!(
            uml.contains("| agent memory (RSS) | — | 18.2 MiB |"),
            "{uml}"
        );
        assert!(uml.contains("one round, no median"));
    }

    #[test]
    fn quick_runs_are_flagged_and_errors_listed() {
        let report = render(&comparison(), &charts());
        assert!(report.contains("indicative only: small sizes, one short round, `dev` build"));
        assert!(report.contains(
            "Machine: Test CPU, 2 CPUs, 7.8 GiB memory, host kernel Linux 6.18.0; run \
             started 2025-01-01T00:00:00Z."
        ));
        let uml = section(&report, "## user-mode Linux");
        assert!(uml.contains("### Not measured\n\n- ipvs at 10k: the agent did not start\n"));
        assert!(report.contains("## How it was measured"));

        let full = Comparison {
            quick: false,
            profile: "release".into(),
            ..comparison()
        };
        assert!(!render(&full, &[]).contains("indicative only"));
    }

    #[test]
    fn write_puts_the_report_its_charts_and_the_results_in_one_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("compare");
        let comparison = comparison();
        let report = write(&comparison, &out).unwrap();
        assert_eq!(report, out.join("report.md"));

        let text = std::fs::read_to_string(&report).unwrap();
        assert!(text.contains(
            "![initial sync: host, Linux 6.18.0 (eBPF JIT-compiled)](host-initial-sync.svg)"
        ));
        assert!(out.join("host-initial-sync.svg").exists());
        assert!(out.join("uml-agent-rss.svg").exists());

        let json = std::fs::read_to_string(out.join("results.json")).unwrap();
        let back: Comparison = serde_json::from_str(&json).unwrap();
        assert_eq!(back.kernels.len(), 2);
        assert_eq!(back.kernels[0].samples, comparison.kernels[0].samples);
    }

    #[test]
    fn chart_prefixes_are_short_and_file_safe() {
        assert_eq!(prefix("host"), "host");
        assert_eq!(prefix("user-mode Linux"), "uml");
        assert_eq!(prefix(""), "kernel");
    }
}
