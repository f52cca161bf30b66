//! Long-lived TCP connections for tests that need a connection to outlive a change
//! (graceful termination, least-connection schedulers): an in-process [`EchoServer`]
//! bound in a backend namespace answers every line with its name, and a
//! [`HeldConnection`] opened from a client namespace (optionally from a chosen source
//! address) asks it again and again over the same connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use super::{Netns, NetnsError};

/// How long a [`HeldConnection`] waits for a connect or an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP server in a namespace, on a thread of the test process: each connection gets
/// `<name>\n` for every line it sends. Stops on drop.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, name: &str, addr: SocketAddr) -> Result<Self, NetnsError> {
        let listener = ns.tcp_listener(addr)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| NetnsError::io(format!("nonblocking listener on {addr}"), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let name: Arc<str> = Arc::from(name);
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || serve(listener, name, stop))
        };
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(listener: TcpListener, name: Arc<str>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let name = name.clone();
                let stop = stop.clone();
                std::thread::spawn(move || answer(stream, &name, &stop));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn answer(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP connection opened inside a namespace and kept open.
pub struct HeldConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl HeldConnection {
    /// Connects from `ns` to `target`, from `source` when given (an address of `ns`).
    pub fn open(
        ns: &Netns,
        source: Option<IpAddr>,
        target: SocketAddr,
    ) -> Result<Self, NetnsError> {
        let stream = ns
            .run(|| -> std::io::Result<TcpStream> {
                let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
                if let Some(source) = source {
                    socket.bind(&SocketAddr::new(source, 0).into())?;
                }
                socket.connect_timeout(&target.into(), IO_TIMEOUT)?;
                Ok(socket.into())
            })?
            .map_err(|e| NetnsError::io(format!("connect to {target} from {}", ns.name()), e))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| NetnsError::io("set a read timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| NetnsError::io("clone a stream", e))?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Asks over the same connection which backend answers.
    pub fn ask(&mut self) -> Result<String, NetnsError> {
        self.writer
            .write_all(b"?\n")
            .map_err(|e| NetnsError::io("write on a held connection", e))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(NetnsError::io(
                "read on a held connection",
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(NetnsError::io("read on a held connection", e)),
        }
    }
}
