//! A test backend: answers every TCP request and UDP datagram with its name and the peer
//! address it saw, so end-to-end tests can tell which endpoint a Service picked and
//! whether the client's source address survived the dataplane.
//!
//! Run inside a backend network namespace by `switchyard_integration::netns::Backend`:
//! `swy-backend --name backend-1 --tcp 8080 --udp 8080`. It prints `ready` on stdout once
//! every socket is bound and listening, then serves until killed.
//!
//! TCP speaks just enough HTTP/1.0 for `curl`: it reads the request line (and headers, when
//! the line names an HTTP version), answers `200 OK` with the body
//! `<name> from <peer ip>:<peer port>\n`, and closes. UDP replies to each datagram with the
//! same body.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};

/// Longest a client may take to send its request before the backend answers anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request the backend reads before answering.
const MAX_REQUEST: usize = 16 * 1024;

#[derive(Parser, Debug)]
#[command(about = "Test backend: replies with its name and the peer address it saw")]
struct Args {
    /// Name put at the start of every reply.
    #[arg(long)]
    name: String,
    /// TCP ports to serve (IPv4 and, where available, IPv6).
    #[arg(long, num_args = 1..)]
    tcp: Vec<u16>,
    /// UDP ports to serve (IPv4 and, where available, IPv6).
    #[arg(long, num_args = 1..)]
    udp: Vec<u16>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.tcp.is_empty() || !args.udp.is_empty(),
        "nothing to serve: give --tcp and/or --udp ports"
    );
    let name: Arc<str> = Arc::from(args.name.as_str());

    let mut tcp = Vec::new();
    for &port in &args.tcp {
        for addr in wildcard_addrs(port) {
            match bind(addr, Type::STREAM) {
                Ok(socket) => {
                    socket
                        .listen(1024)
                        .with_context(|| format!("listen on tcp {addr}"))?;
                    tcp.push(TcpListener::from(socket));
                }
                Err(e) if addr.is_ipv6() => eprintln!("swy-backend: no IPv6 tcp {addr}: {e:#}"),
                Err(e) => return Err(e),
            }
        }
    }
    let mut udp = Vec::new();
    for &port in &args.udp {
        for addr in wildcard_addrs(port) {
            match bind(addr, Type::DGRAM) {
                Ok(socket) => udp.push(UdpSocket::from(socket)),
                Err(e) if addr.is_ipv6() => eprintln!("swy-backend: no IPv6 udp {addr}: {e:#}"),
                Err(e) => return Err(e),
            }
        }
    }

    let mut threads = Vec::new();
    for listener in tcp {
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_tcp(&name, &listener)));
    }
    for socket in udp {
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp(&name, &socket)));
    }

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").context("write ready line")?;
    stdout.flush().context("flush ready line")?;
    drop(stdout);

    for thread in threads {
        if let Ok(Err(e)) = thread.join() {
            return Err(e);
        }
    }
    Ok(())
}

/// `0.0.0.0:port` and `[::]:port`; the IPv6 socket is v6-only so both can bind.
fn wildcard_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
    ]
}

fn bind(addr: SocketAddr, ty: Type) -> Result<Socket> {
    let protocol = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))
        .with_context(|| format!("socket for {addr}"))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .with_context(|| format!("IPV6_V6ONLY on {addr}"))?;
    }
    socket
        .set_reuse_address(true)
        .with_context(|| format!("SO_REUSEADDR on {addr}"))?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    Ok(socket)
}

fn reply(name: &str, peer: SocketAddr) -> String {
    format!("{name} from {peer}\n")
}

fn serve_tcp(name: &Arc<str>, listener: &TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // A connection reset before accept is the client's business, not ours.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e).context("accept"),
        };
        let name = name.clone();
        std::thread::spawn(move || {
            if let Err(e) = answer_tcp(&name, stream, peer) {
                eprintln!("swy-backend: tcp {peer}: {e:#}");
            }
        });
    }
}

fn answer_tcp(name: &str, stream: TcpStream, peer: SocketAddr) -> Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    read_request(&mut reader);
    let body = reply(name, peer);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut writer = &stream;
    writer.write_all(response.as_bytes()).context("write")?;
    writer.flush()?;
    // Half-close, then drain what the client still sends, so closing never resets the
    // connection before the client has read the reply.
    stream.shutdown(Shutdown::Write).ok();
    let mut sink = [0u8; 1024];
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    while matches!(reader.get_mut().read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}

/// Reads the request line, then headers up to the blank line if the line names an HTTP
/// version. Gives up quietly on EOF, timeout or an oversized request: the reply goes out
/// regardless.
fn read_request(reader: &mut impl BufRead) {
    let mut read = 0usize;
    let mut line = String::new();
    let Ok(n) = reader.read_line(&mut line) else {
        return;
    };
    read += n;
    if !line.contains(" HTTP/") {
        return;
    }
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
        if line.trim_end_matches(['\r', '\n']).is_empty() || read > MAX_REQUEST {
            return;
        }
    }
}

fn serve_udp(name: &Arc<str>, socket: &UdpSocket) -> Result<()> {
    let mut buf = [0u8; 65536];
    loop {
        // Unconnected UDP sockets get no ICMP errors, so any error here is real.
        let (_, peer) = socket.recv_from(&mut buf).context("recv_from")?;
        if let Err(e) = socket.send_to(reply(name, peer).as_bytes(), peer) {
            eprintln!("swy-backend: udp reply to {peer}: {e}");
        }
    }
}
