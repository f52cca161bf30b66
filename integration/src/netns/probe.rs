//! Real requests from inside a namespace, classified the way dataplane tests assert on them:
//! answered, refused at once, timed out, unreachable.
//!
//! Sockets are opened on a thread that has entered the namespace (no process per request),
//! so a [`ConnectionLoop`] can run hundreds of connections a second.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Netns, NetnsError, enter};

/// Limits of one probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// TCP connect timeout; past it the probe is a [`ProbeError::Timeout`]. Default 1 s.
    pub connect_timeout: Duration,
    /// Timeout for each read and write after connecting (and for the UDP reply). Default 2 s.
    pub io_timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(2),
        }
    }
}

/// Why a probe got no answer. `after` is the time from the first packet to the verdict, so
/// tests can assert "rejected at once" (`Refused` well under the connect timeout).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A TCP RST or ICMP port-unreachable came back (e.g. an iptables `REJECT`).
    #[error("{addr}: refused after {after:?}")]
    Refused {
        /// Target.
        addr: SocketAddr,
        /// Time to the verdict.
        after: Duration,
    },
    /// Nothing came back in time (e.g. dropped, or no route beyond the node).
    #[error("{addr}: no answer within {after:?}")]
    Timeout {
        /// Target.
        addr: SocketAddr,
        /// Time to the verdict.
        after: Duration,
    },
    /// The network or host was reported unreachable (no route, ICMP host-unreachable).
    #[error("{addr}: unreachable after {after:?}: {source}")]
    Unreachable {
        /// Target.
        addr: SocketAddr,
        /// Time to the verdict.
        after: Duration,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The connection was reset after it was established.
    #[error("{addr}: connection reset after {after:?}")]
    Reset {
        /// Target.
        addr: SocketAddr,
        /// Time to the verdict.
        after: Duration,
    },
    /// An answer came that is not a `swy-backend` reply.
    #[error("{addr}: unexpected answer {response:?}")]
    BadResponse {
        /// Target.
        addr: SocketAddr,
        /// What came back.
        response: String,
    },
    /// Any other socket error.
    #[error("{addr}: {op}: {source}")]
    Io {
        /// Target.
        addr: SocketAddr,
        /// The socket operation.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Entering the namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

impl ProbeError {
    /// True for [`ProbeError::Refused`].
    pub fn is_refused(&self) -> bool {
        matches!(self, ProbeError::Refused { .. })
    }

    /// True for [`ProbeError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProbeError::Timeout { .. })
    }

    /// Time from the first packet to the verdict, when the probe got that far.
    pub fn after(&self) -> Option<Duration> {
        match self {
            ProbeError::Refused { after, .. }
            | ProbeError::Timeout { after, .. }
            | ProbeError::Unreachable { after, .. }
            | ProbeError::Reset { after, .. } => Some(*after),
            _ => None,
        }
    }
}

fn classify(e: io::Error, op: &'static str, addr: SocketAddr, started: Instant) -> ProbeError {
    let after = started.elapsed();
    match e.kind() {
        ErrorKind::ConnectionRefused => ProbeError::Refused { addr, after },
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ProbeError::Timeout { addr, after },
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => ProbeError::Unreachable {
            addr,
            after,
            source: e,
        },
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            ProbeError::Reset { addr, after }
        }
        _ => ProbeError::Io {
            addr,
            op,
            source: e,
        },
    }
}

/// One HTTP/1.0 request from `ns` to `addr:port`; returns the response body (for
/// `swy-backend`: `backend-1 from 10.201.0.2:53422\n`).
pub fn tcp_request(ns: &Netns, addr: impl Into<IpAddr>, port: u16) -> Result<String, ProbeError> {
    tcp_request_with(
        ns,
        SocketAddr::new(addr.into(), port),
        &ProbeOptions::default(),
    )
}

/// [`tcp_request`] with explicit limits.
pub fn tcp_request_with(
    ns: &Netns,
    addr: SocketAddr,
    options: &ProbeOptions,
) -> Result<String, ProbeError> {
    ns.run(|| tcp_request_here(addr, options))?
}

/// One UDP datagram from `ns` to `addr:port`; returns the reply.
pub fn udp_request(ns: &Netns, addr: impl Into<IpAddr>, port: u16) -> Result<String, ProbeError> {
    udp_request_with(
        ns,
        SocketAddr::new(addr.into(), port),
        &ProbeOptions::default(),
    )
}

/// [`udp_request`] with explicit limits (`io_timeout` bounds the wait for the reply).
pub fn udp_request_with(
    ns: &Netns,
    addr: SocketAddr,
    options: &ProbeOptions,
) -> Result<String, ProbeError> {
    ns.run(|| udp_request_here(addr, options))?
}

/// [`tcp_request_with`] from a chosen local port: what a client reusing its port does
/// (the kernel never reuses one this soon on its own).
pub fn tcp_request_from_port(
    ns: &Netns,
    local_port: u16,
    addr: SocketAddr,
    options: &ProbeOptions,
) -> Result<String, ProbeError> {
    ns.run(|| {
        let started = Instant::now();
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(|e| classify(e, "socket", addr, started))?;
        socket
            .set_reuse_address(true)
            .map_err(|e| classify(e, "reuse", addr, started))?;
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, local_port)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, local_port)),
        };
        socket
            .bind(&local.into())
            .map_err(|e| classify(e, "bind", addr, started))?;
        socket
            .connect_timeout(&addr.into(), options.connect_timeout)
            .map_err(|e| classify(e, "connect", addr, started))?;
        exchange(socket.into(), addr, options, started)
    })?
}

/// [`tcp_request_with`] on the calling thread's namespace (for a probe process, see
/// `swy-probe`).
pub fn tcp_request_here(addr: SocketAddr, options: &ProbeOptions) -> Result<String, ProbeError> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, options.connect_timeout)
        .map_err(|e| classify(e, "connect", addr, started))?;
    exchange(stream, addr, options, started)
}

/// The HTTP/1.0 request and its answer on a connected stream.
fn exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    options: &ProbeOptions,
    started: Instant,
) -> Result<String, ProbeError> {
    let io = |e, op| classify(e, op, addr, started);
    stream
        .set_read_timeout(Some(options.io_timeout))
        .map_err(|e| io(e, "set timeout"))?;
    stream
        .set_write_timeout(Some(options.io_timeout))
        .map_err(|e| io(e, "set timeout"))?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: switchyard-probe\r\n\r\n")
        .map_err(|e| io(e, "write"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| io(e, "read"))?;
    let response = String::from_utf8_lossy(&response).into_owned();
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_owned()),
        _ => Err(ProbeError::BadResponse { addr, response }),
    }
}

/// [`udp_request_with`] on the calling thread's namespace.
pub fn udp_request_here(addr: SocketAddr, options: &ProbeOptions) -> Result<String, ProbeError> {
    let started = Instant::now();
    let io = |e, op| classify(e, op, addr, started);
    let socket = udp_socket_for(addr, options).map_err(|(e, op)| io(e, op))?;
    // Connected, so an ICMP port-unreachable surfaces as ECONNREFUSED.
    socket.connect(addr).map_err(|e| io(e, "connect"))?;
    socket.send(b"ping\n").map_err(|e| io(e, "send"))?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).map_err(|e| io(e, "recv"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A UDP socket on an ephemeral port of `addr`'s family, reads bounded by the I/O
/// timeout; the failing operation with its error.
fn udp_socket_for(
    addr: SocketAddr,
    options: &ProbeOptions,
) -> Result<UdpSocket, (io::Error, &'static str)> {
    let local: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((local, 0)).map_err(|e| (e, "bind"))?;
    socket
        .set_read_timeout(Some(options.io_timeout))
        .map_err(|e| (e, "set timeout"))?;
    Ok(socket)
}

/// One datagram from an unconnected socket (`sendto`/`recvfrom`) on the calling
/// thread's namespace: the reply and the address `recvfrom` says it came from.
pub fn udp_unconnected_here(
    addr: SocketAddr,
    options: &ProbeOptions,
) -> Result<(String, SocketAddr), ProbeError> {
    let started = Instant::now();
    let io = |e, op| classify(e, op, addr, started);
    let socket = udp_socket_for(addr, options).map_err(|(e, op)| io(e, op))?;
    socket.send_to(b"ping\n", addr).map_err(|e| io(e, "send"))?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).map_err(|e| io(e, "recv"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// Connects over TCP on the calling thread's namespace and returns the peer address
/// `getpeername` reports.
pub fn tcp_peer_here(addr: SocketAddr, options: &ProbeOptions) -> Result<SocketAddr, ProbeError> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&addr, options.connect_timeout)
        .map_err(|e| classify(e, "connect", addr, started))?;
    stream
        .peer_addr()
        .map_err(|e| classify(e, "getpeername", addr, started))
}

/// New TCP connections per second to `addr` over `window` on the calling thread's
/// namespace, each closed with an RST (no TIME_WAIT piles up); a connect waits up to 5 s
/// (a dropped SYN is retransmitted after 1 s and counts as slow). A failed connect ends
/// the measurement with its error.
pub fn connect_rate_here(addr: SocketAddr, window: Duration) -> Result<f64, ProbeError> {
    let start = Instant::now();
    let mut connections = 0u64;
    while start.elapsed() < window {
        let began = Instant::now();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| classify(e, "connect", addr, began))?;
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .map_err(|e| classify(e, "linger", addr, began))?;
        drop(stream);
        connections += 1;
    }
    Ok(connections as f64 / start.elapsed().as_secs_f64())
}

/// The line a probe process prints for one result: `ok <text>` or
/// `err <kind> <after µs> <target> <detail>`, newlines and backslashes escaped.
pub fn encode_result(result: &Result<String, ProbeError>) -> String {
    fn escape(text: &str) -> String {
        text.replace('\\', "\\\\").replace('\n', "\\n")
    }
    match result {
        Ok(text) => format!("ok {}", escape(text)),
        Err(e) => {
            let after = e.after().map_or(0, |d| d.as_micros());
            let (kind, addr, detail) = match e {
                ProbeError::Refused { addr, .. } => ("refused", Some(*addr), String::new()),
                ProbeError::Timeout { addr, .. } => ("timeout", Some(*addr), String::new()),
                ProbeError::Unreachable { addr, source, .. } => {
                    ("unreachable", Some(*addr), source.to_string())
                }
                ProbeError::Reset { addr, .. } => ("reset", Some(*addr), String::new()),
                ProbeError::BadResponse { addr, response } => {
                    ("bad", Some(*addr), response.clone())
                }
                ProbeError::Io { addr, op, source } => {
                    ("io", Some(*addr), format!("{op}: {source}"))
                }
                ProbeError::Netns(e) => ("netns", None, e.to_string()),
            };
            let addr = addr.map_or_else(|| "-".to_string(), |a| a.to_string());
            format!("err {kind} {after} {addr} {}", escape(&detail))
        }
    }
}

/// Reads a line of [`encode_result`] back; `None` for a line it cannot have printed.
pub fn decode_result(line: &str) -> Option<Result<String, ProbeError>> {
    fn unescape(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        out
    }
    if let Some(text) = line.strip_prefix("ok ").or((line == "ok").then_some("")) {
        return Some(Ok(unescape(text)));
    }
    let rest = line.strip_prefix("err ")?;
    let mut parts = rest.splitn(4, ' ');
    let kind = parts.next()?;
    let after = Duration::from_micros(parts.next()?.parse().ok()?);
    let addr: Option<SocketAddr> = parts.next()?.parse().ok();
    let detail = unescape(parts.next().unwrap_or(""));
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    Some(Err(match kind {
        "refused" => ProbeError::Refused { addr, after },
        "timeout" => ProbeError::Timeout { addr, after },
        "unreachable" => ProbeError::Unreachable {
            addr,
            after,
            source: io::Error::other(detail),
        },
        "reset" => ProbeError::Reset { addr, after },
        "bad" => ProbeError::BadResponse {
            addr,
            response: detail,
        },
        _ => ProbeError::Io {
            addr,
            op: "probe process",
            source: io::Error::other(detail),
        },
    }))
}

/// What a [`ConnectionLoop`] has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Connections attempted.
    pub attempts: u64,
    /// Requests answered.
    pub succeeded: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Answers per backend name (first word of the reply).
    pub by_backend: BTreeMap<String, u64>,
    /// The first [`LoopStats::MAX_FAILURES_KEPT`] failures, as
    /// `+<ms since start> (<UTC time of day the request began>): <error>`; the time of day
    /// lines a failure up with the agent's log.
    pub failures: Vec<String>,
    /// When the first request was answered.
    pub first_success: Option<Instant>,
}

impl LoopStats {
    /// How many failure descriptions are kept.
    pub const MAX_FAILURES_KEPT: usize = 50;
}

/// Opens TCP connections from a namespace to one target at a fixed rate on a background
/// thread, counting answers and failures — for "restart the agent under load: zero failed
/// connections" tests. Requests are sequential: one slow request delays the next rather
/// than piling up. Stops on [`ConnectionLoop::stop`] or drop.
#[derive(Debug)]
pub struct ConnectionLoop {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoopStats>>,
    thread: Option<JoinHandle<()>>,
    /// The probe process doing the requests, when they run in one (see
    /// [`ConnectionLoop::from_process`]).
    process: Option<super::NsChild>,
}

impl ConnectionLoop {
    /// Starts a request to `target` every `interval` from `ns`, with default limits.
    pub fn start(ns: &Netns, target: SocketAddr, interval: Duration) -> Result<Self, NetnsError> {
        Self::start_with(ns, target, interval, ProbeOptions::default())
    }

    /// [`ConnectionLoop::start`] with explicit limits.
    pub fn start_with(
        ns: &Netns,
        target: SocketAddr,
        interval: Duration,
        options: ProbeOptions,
    ) -> Result<Self, NetnsError> {
        let file = ns.open()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoopStats::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let stats = stats.clone();
            let name = ns.name().to_owned();
            std::thread::Builder::new()
                .name(format!("connection-loop-{name}"))
                .spawn(move || {
                    let entered = enter(&file);
                    let failed_to_enter = entered.is_err();
                    let _ = ready_tx
                        .send(entered.map_err(|e| NetnsError::io(format!("setns {name}"), e)));
                    if failed_to_enter {
                        return;
                    }
                    run_loop(target, interval, &options, &stop, &stats);
                })
                .map_err(|e| NetnsError::io("spawn connection loop thread", e))?
        };
        ready_rx
            .recv()
            .map_err(|_| NetnsError::io("connection loop", io::Error::other("thread died")))??;
        Ok(ConnectionLoop {
            stop,
            stats,
            thread: Some(thread),
            process: None,
        })
    }

    /// Counts the results a probe process prints, one [`encode_result`] line per
    /// request (`swy-probe loop`), so the requests come from wherever the process runs
    /// (e.g. inside a cgroup). Stopping kills the process.
    pub fn from_process(mut process: super::NsChild) -> Result<Self, NetnsError> {
        use std::io::BufRead;
        let stdout = process.child_mut().stdout.take().ok_or_else(|| {
            NetnsError::io(
                "connection loop",
                io::Error::other("probe stdout not piped"),
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoopStats::default()));
        let thread = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("connection-loop-process".into())
                .spawn(move || {
                    let started = Instant::now();
                    for line in std::io::BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        let Some(result) = decode_result(&line) else {
                            continue;
                        };
                        record(&stats, started, result);
                    }
                })
                .map_err(|e| NetnsError::io("spawn connection loop reader", e))?
        };
        Ok(ConnectionLoop {
            stop,
            stats,
            thread: Some(thread),
            process: Some(process),
        })
    }

    /// A snapshot of the counts so far.
    pub fn stats(&self) -> LoopStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `n` requests have been answered; false if `timeout` passes first.
    pub fn wait_for_successes(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stats().succeeded >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops after the request in flight and returns the final counts.
    pub fn stop(mut self) -> LoopStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut process) = self.process.take() {
            let _ = process.terminate(Duration::from_secs(2));
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ConnectionLoop {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run_loop(
    target: SocketAddr,
    interval: Duration,
    options: &ProbeOptions,
    stop: &AtomicBool,
    stats: &Mutex<LoopStats>,
) {
    let started = Instant::now();
    request_loop(target, interval, options, stop, |result| {
        record(stats, started, result)
    });
}

/// Sends a TCP request to `target` every `interval` from the calling thread's namespace
/// until `stop`, handing each result to `each` (the body of a [`ConnectionLoop`], also
/// run by `swy-probe loop`).
pub fn request_loop(
    target: SocketAddr,
    interval: Duration,
    options: &ProbeOptions,
    stop: &AtomicBool,
    mut each: impl FnMut(Result<String, ProbeError>),
) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // Behind schedule (a slow request): carry on from now instead of bursting.
        next = (next + interval).max(Instant::now());
        each(tcp_request_here(target, options));
    }
}

/// `HH:MM:SS.mmm` (UTC) of `at`, the form of the agent's log timestamps.
fn utc_time_of_day(at: SystemTime) -> String {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let (seconds, millis) = (millis / 1000, millis % 1000);
    let (h, m, s) = (seconds / 3600 % 24, seconds / 60 % 60, seconds % 60);
    format!("{h:02}:{m:02}:{s:02}.{millis:03} UTC")
}

fn record(stats: &Mutex<LoopStats>, started: Instant, result: Result<String, ProbeError>) {
    let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
    stats.attempts += 1;
    match result {
        Ok(body) => {
            stats.succeeded += 1;
            stats.first_success.get_or_insert_with(Instant::now);
            let backend = body.split_whitespace().next().unwrap_or("").to_owned();
            *stats.by_backend.entry(backend).or_default() += 1;
        }
        Err(e) => {
            stats.failed += 1;
            if stats.failures.len() < LoopStats::MAX_FAILURES_KEPT {
                let at = started.elapsed().as_millis();
                let began = SystemTime::now() - e.after().unwrap_or_default();
                stats
                    .failures
                    .push(format!("+{at}ms ({}): {e}", utc_time_of_day(began)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_of_day_is_utc_with_milliseconds() {
        let day = Duration::from_secs(86_400);
        let at = UNIX_EPOCH + day * 3 + Duration::from_millis(3_723_045);
        assert_eq!(utc_time_of_day(at), "01:02:03.045 UTC");
        assert_eq!(utc_time_of_day(UNIX_EPOCH + day), "00:00:00.000 UTC");
    }
}
