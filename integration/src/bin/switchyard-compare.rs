//! `switchyard-compare`: the three dataplanes side by side on the same cluster state and
//! workload — on the host kernel (iptables and eBPF, JIT-compiled; IPVS too where the
//! host has it) and in one user-mode Linux guest (all three on one kernel, eBPF
//! interpreted) — and a report (`report.md`, SVG charts, `results.json`) of what each
//! did. `scripts/compare.sh` builds and runs it.
//!
//! Rounds are interleaved: every round runs every dataplane once at every size, so the
//! machine's drift hits all of them alike; the report shows medians. The conformance
//! matrix runs first on each kernel; a disagreement (or a figure that could not be
//! taken) makes the exit status 1, after the report is written. Timings are reported,
//! never asserted.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use futures::FutureExt;
use switchyard_integration::{
    compare::{
        Comparison, ConformanceRun, KernelRun, Machine,
        measure::{self, Effort},
        report,
    },
    conformance::{self, Matrix},
    netns, uml,
};

/// Measures iptables, IPVS and eBPF side by side and writes a report.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Small sizes and one short round (a few minutes, `dev` build): the conformance
    /// matrix must hold; the timings are indicative only.
    #[arg(long)]
    quick: bool,
    /// Where report.md, the charts and results.json go.
    #[arg(long, default_value = "compare-report")]
    out: PathBuf,
    /// The agent binary (default: `switchyard-agent` next to this program).
    #[arg(long, env = "SWITCHYARD_AGENT_BIN")]
    agent: Option<PathBuf>,
    /// Cluster sizes: Services besides the example cluster's [default: 0,1000,10000;
    /// --quick: 0,1000].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Rounds per size and dataplane [default: 3; --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Where to measure.
    #[arg(long, value_enum, default_value_t = Kernels::Both)]
    kernels: Kernels,
    /// Memory of the user-mode Linux guest, MiB.
    #[arg(long, default_value_t = 4096)]
    guest_mib: u32,
    /// Inside the guest: measure this kernel and write its results to this file.
    #[arg(long, hide = true)]
    guest_part: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Kernels {
    Both,
    Host,
    Uml,
}

impl Args {
    fn sizes(&self) -> Vec<usize> {
        self.sizes.clone().unwrap_or_else(|| {
            if self.quick {
                vec![0, 1000]
            } else {
                vec![0, 1000, 10000]
            }
        })
    }

    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 1 } else { 3 })
    }

    fn effort(&self) -> Effort {
        if self.quick {
            Effort::quick()
        } else {
            Effort::full()
        }
    }
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: the first statement of main, before any thread exists. The agents this
        // starts inherit it: their info lines would bury the progress lines.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchyard-compare: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the comparison; `Ok(false)` when the dataplanes disagree or a figure could not
/// be taken.
fn run(args: Args) -> anyhow::Result<bool> {
    let agent = match &args.agent {
        Some(path) => path.clone(),
        None => measure::agent_binary()?,
    };
    if let Some(file) = &args.guest_part {
        let run = measure_kernel("user-mode Linux", &agent, &args);
        let json = serde_json::to_string(&run)?;
        std::fs::write(file, json).with_context(|| format!("writing {}", file.display()))?;
        return Ok(true);
    }
    netns::require_prerequisites()?;
    let started = Instant::now();
    let mut comparison = Comparison {
        machine: machine(),
        quick: args.quick,
        profile: if cfg!(debug_assertions) {
            "dev".into()
        } else {
            "release".into()
        },
        kernels: Vec::new(),
    };
    if args.kernels != Kernels::Uml {
        eprintln!("== host kernel");
        comparison
            .kernels
            .push(measure_kernel("host", &agent, &args));
    }
    if args.kernels != Kernels::Host {
        eprintln!("== user-mode Linux (output comes when the guest halts)");
        comparison.kernels.push(in_guest(&agent, &args)?);
    }
    let report = report::write(&comparison, &args.out)?;
    let mut ok = true;
    for kernel in &comparison.kernels {
        if let Some(conformance) = &kernel.conformance {
            println!("{}: {}", kernel.name, conformance.summary);
            ok &= conformance.differences.is_empty();
        }
        for error in &kernel.errors {
            println!("{}: not measured: {error}", kernel.name);
            ok = false;
        }
    }
    println!(
        "report: {} (charts and results.json beside it), {:.0?}",
        report.display(),
        started.elapsed()
    );
    Ok(ok)
}

/// Reruns this program in a user-mode Linux guest to measure that kernel.
fn in_guest(agent: &Path, args: &Args) -> anyhow::Result<KernelRun> {
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let part = out.join("uml-results.json");
    let _ = std::fs::remove_file(&part);
    let mut guest_args: Vec<String> = vec![
        "--guest-part".into(),
        part.display().to_string(),
        "--agent".into(),
        std::fs::canonicalize(agent)?.display().to_string(),
        "--rounds".into(),
        args.rounds().to_string(),
        "--sizes".into(),
        args.sizes()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    ];
    if args.quick {
        guest_args.push("--quick".into());
    }
    let timeout = if args.quick {
        Duration::from_secs(20 * 60)
    } else {
        Duration::from_secs(4 * 3600)
    };
    let exe = std::env::current_exe()?;
    let output = uml::Guest::new()
        .mem_mib(args.guest_mib)
        .timeout(timeout)
        .envs_from_host()
        .run(&exe, &guest_args)?;
    eprint!("{}", output.stderr);
    print!("{}", output.stdout);
    let json = std::fs::read_to_string(&part).with_context(|| {
        format!(
            "the guest wrote no results (exit status {}): {}",
            output.status,
            part.display()
        )
    })?;
    let _ = std::fs::remove_file(&part);
    Ok(serde_json::from_str(&json)?)
}

/// The dataplanes this kernel can run: iptables and eBPF everywhere, IPVS where the
/// kernel has it.
fn dataplanes() -> Vec<String> {
    let mut all = vec!["iptables".to_string()];
    if uml::in_guest() || uml::running_kernel_has_ipvs() {
        all.push("ipvs".into());
    }
    all.push("ebpf".into());
    all
}

/// Conformance, then every round at every size through every dataplane.
fn measure_kernel(name: &str, agent: &Path, args: &Args) -> KernelRun {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut run = KernelRun {
        name: name.into(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        ebpf_jit: read_trimmed("/proc/sys/net/core/bpf_jit_enable") == "1",
        dataplanes: dataplanes(),
        sizes: args.sizes(),
        rounds: args.rounds(),
        ..KernelRun::default()
    };
    runtime.block_on(async {
        eprintln!("conformance: {}", run.dataplanes.join(", "));
        run.conformance = Some(conformance_run(agent, &run.dataplanes, &mut run.errors).await);
        let effort = args.effort();
        for round in 0..run.rounds {
            for &services in &run.sizes {
                for dataplane in &run.dataplanes {
                    let started = Instant::now();
                    let measured = std::panic::AssertUnwindSafe(measure::measure(
                        agent, dataplane, services, round, &effort,
                    ))
                    .catch_unwind()
                    .await;
                    match measured {
                        Ok(measured) => {
                            run.samples.extend(measured.samples);
                            run.errors.extend(measured.errors);
                        }
                        Err(panic) => run.errors.push(format!(
                            "{dataplane} at {services} Services, round {}: {}",
                            round + 1,
                            panic_message(&panic)
                        )),
                    }
                    eprintln!(
                        "round {}/{}: {dataplane} at {services} Services measured in {:.1?}",
                        round + 1,
                        run.rounds,
                        started.elapsed()
                    );
                }
            }
        }
    });
    run
}

async fn conformance_run(
    agent: &Path,
    dataplanes: &[String],
    errors: &mut Vec<String>,
) -> ConformanceRun {
    let scenarios = conformance::scenarios();
    let mut matrix = Matrix::default();
    for dataplane in dataplanes {
        let pins = tempfile::tempdir().expect("a temporary directory");
        let spec = measure::agent_spec(agent, dataplane, &pins.path().join("bpffs"));
        match std::panic::AssertUnwindSafe(conformance::run(spec, &scenarios))
            .catch_unwind()
            .await
        {
            Ok((results, expected)) => matrix.add(dataplane, results, expected),
            Err(panic) => errors.push(format!(
                "conformance through {dataplane}: {}",
                panic_message(&panic)
            )),
        }
    }
    ConformanceRun {
        summary: matrix.summary(),
        table: matrix.table(),
        differences: matrix
            .differences()
            .iter()
            .map(ToString::to_string)
            .collect(),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_default()
    };
    let mem_kib: f64 = field(&meminfo, "MemTotal")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_default();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu_model: field(&cpuinfo, "model name"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        host_kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        date,
    }
}
