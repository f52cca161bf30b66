//! A probe process: sends test requests from inside a cgroup and a network namespace
//! and prints one line per result (`switchyard_integration::netns::encode_result`), for
//! tests whose traffic must come from a process (socket-level eBPF load balancing acts on
//! the processes of a cgroup; a test thread cannot join one alone).
//!
//! `swy-probe [--cgroup DIR] [--netns PATH] tcp 10.96.0.10:80 --count 20`; other
//! commands: `udp`, `udp-unconnected`, `peer` (getpeername after connect), `rate` (new
//! connections per second), `loop` (a request every `--interval-ms` until killed).
#![forbid(unsafe_code)]

use std::{io::Write, net::SocketAddr, path::PathBuf, sync::atomic::AtomicBool, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use switchyard_integration::netns::{
    ProbeOptions, connect_rate_here, encode_result, request_loop, tcp_peer_here, tcp_request_here,
    udp_request_here, udp_unconnected_here,
};

#[derive(Parser, Debug)]
#[command(about = "Sends test requests from inside a cgroup and a network namespace")]
struct Args {
    /// cgroup v2 directory to move into first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Network namespace file (e.g. /run/netns/NAME) to enter.
    #[arg(long)]
    netns: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    connect_timeout_ms: u64,
    #[arg(long, default_value_t = 2000)]
    io_timeout_ms: u64,
    #[command(subcommand)]
    command: Probe,
}

#[derive(Subcommand, Debug)]
enum Probe {
    /// HTTP/1.0 requests, one connection each.
    Tcp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Datagrams, each from a fresh connected socket.
    Udp {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// One datagram from an unconnected socket; prints `<from> <reply>`.
    UdpUnconnected { addr: SocketAddr },
    /// Connects over TCP and prints the peer address getpeername reports.
    Peer { addr: SocketAddr },
    /// New TCP connections per second over `--millis`.
    Rate {
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        millis: u64,
    },
    /// A TCP request every `--interval-ms` until killed.
    Loop {
        addr: SocketAddr,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Both before any thread starts: the cgroup takes the whole process, and threads
    // inherit the namespace of the thread that starts them.
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving into cgroup {}", cgroup.display()))?;
    }
    if let Some(netns) = &args.netns {
        let file =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering {}", netns.display()))?;
    }
    let options = ProbeOptions {
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        io_timeout: Duration::from_millis(args.io_timeout_ms),
    };
    let mut out = std::io::stdout().lock();
    let mut print = |line: String| -> Result<()> {
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    match args.command {
        Probe::Tcp { addr, count } => {
            for _ in 0..count {
                print(encode_result(&tcp_request_here(addr, &options)))?;
            }
        }
        Probe::Udp { addr, count } => {
            for _ in 0..count {
                print(encode_result(&udp_request_here(addr, &options)))?;
            }
        }
        Probe::UdpUnconnected { addr } => {
            let result =
                udp_unconnected_here(addr, &options).map(|(reply, from)| format!("{from} {reply}"));
            print(encode_result(&result))?;
        }
        Probe::Peer { addr } => {
            print(encode_result(
                &tcp_peer_here(addr, &options).map(|p| p.to_string()),
            ))?;
        }
        Probe::Rate { addr, millis } => {
            let rate = connect_rate_here(addr, Duration::from_millis(millis));
            print(encode_result(&rate.map(|r| format!("{r:.1}"))))?;
        }
        Probe::Loop { addr, interval_ms } => {
            let stop = AtomicBool::new(false);
            let mut failed = None;
            request_loop(
                addr,
                Duration::from_millis(interval_ms),
                &options,
                &stop,
                |r| {
                    if failed.is_none()
                        && let Err(e) = print(encode_result(&r))
                    {
                        failed = Some(e);
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                },
            );
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
    Ok(())
}
