//! What every dataplane's benchmarks measure the same way: the rate of new TCP
//! connections from a namespace (first-packet cost), a listener that accepts and drops
//! them, and medians over rounds. Benchmarks report figures and ratios, never assert.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::netns::{Netns, NetnsError};

/// Median of `samples` (the upper one of an even count).
pub fn median<T: PartialOrd + Copy>(mut samples: Vec<T>) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    samples[samples.len() / 2]
}

/// Median of `rounds` runs of `f`.
pub fn median_of(rounds: usize, mut f: impl FnMut() -> f64) -> f64 {
    median((0..rounds).map(|_| f()).collect())
}

/// Starts a listener on `addr` inside `ns` that accepts and drops every connection on a
/// thread of its own, until the process ends. The accept queue is deep: a full one drops
/// SYNs, and a retransmitted SYN (1 s later) would measure the accept thread instead of
/// the dataplane.
pub fn accept_and_drop(ns: &Netns, addr: SocketAddr) -> Result<(), NetnsError> {
    let listener = ns
        .run(|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(4096)?;
            std::io::Result::Ok(TcpListener::from(socket))
        })?
        .map_err(|e| NetnsError::io(format!("listen on {addr}"), e))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    Ok(())
}

/// New TCP connections per second from `client` (from `source` when given, an address
/// of `client`) to `target` over `window`, each closed with an RST (no TIME_WAIT, so
/// ephemeral ports never run out). Conntrack tables of `flush` namespaces are emptied
/// first, so a reused port never meets its predecessor's entry. A connect that fails
/// aborts the benchmark: the dataplane or the topology is wrong, not slow.
///
/// IPVS keeps its own connection table, which no conntrack flush empties: a direct
/// connection to a real server from a port that just reached it through a VIP has its
/// SYN-ACK rewritten as a reply of that older connection. Measure direct connections
/// from a `source` of their own.
pub fn connect_rate(
    client: &Netns,
    flush: &[&Netns],
    source: Option<IpAddr>,
    target: SocketAddr,
    window: Duration,
) -> f64 {
    for ns in flush {
        let _ = ns.exec(["conntrack", "-F"]);
    }
    client
        .run(move || {
            let start = Instant::now();
            let mut connections = 0u64;
            while start.elapsed() < window {
                let stream = connect(source, target)
                    .unwrap_or_else(|e| panic!("connect {target} after {connections}: {e}"));
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("SO_LINGER");
                drop(stream);
                connections += 1;
            }
            connections as f64 / start.elapsed().as_secs_f64()
        })
        .expect("enter the client namespace")
}

fn connect(source: Option<IpAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&target, Duration::from_secs(1));
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(1))?;
    Ok(socket.into())
}
