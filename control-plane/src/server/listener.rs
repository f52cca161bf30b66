//! Accepts connections for the gRPC server: TCP options, the TLS handshake (off the
//! accept loop, bounded in time and number), and who each peer is ([`PeerInfo`], which
//! every request carries in its extensions).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::{identity::PeerIdentity, tls::ServerTls};

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once; accepting waits beyond it.
const MAX_HANDSHAKES: usize = 256;
/// TCP keepalive: a peer that vanished (power loss, partition) frees its stream.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub address: Option<SocketAddr>,
    /// The verified client certificate's identity; `None` without client certificates.
    pub identity: Option<Arc<PeerIdentity>>,
}

impl PeerInfo {
    /// The peer of a request served by [`incoming`]; unknown for requests that came any
    /// other way (in-memory tests).
    pub fn of<T>(request: &tonic::Request<T>) -> PeerInfo {
        request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or(PeerInfo {
                address: request.remote_addr(),
                identity: None,
            })
    }

    /// What limits count streams by: the certificate's identity when there is one, the
    /// address otherwise.
    pub fn key(&self) -> String {
        match (&self.identity, self.address) {
            (Some(identity), _) => identity.describe(),
            (None, Some(address)) => address.ip().to_string(),
            (None, None) => "unknown".into(),
        }
    }

    /// For messages and logs: the address and, if any, the certificate.
    pub fn describe(&self) -> String {
        let address = self
            .address
            .map_or_else(|| "unknown address".into(), |a| a.to_string());
        match &self.identity {
            Some(identity) => format!("{address} ({})", identity.describe()),
            None => address,
        }
    }
}

/// One accepted connection, plain or TLS.
pub struct Conn {
    io: Io,
    peer: PeerInfo,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The connections of `listener`, TLS-wrapped with `tls`' configuration in force when
/// each arrives. A failed handshake closes only that connection (logged at debug: a
/// port scanner is not news). Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
) -> ReceiverStream<Result<Conn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, address) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or a connection reset before accept: the
                    // listener itself is fine; let the condition pass.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(TCP_KEEPALIVE)
                    .with_interval(TCP_KEEPALIVE / 3),
            );
            let Some(tls) = &tls else {
                let conn = Conn {
                    io: Io::Plain(stream),
                    peer: PeerInfo {
                        address: Some(address),
                        identity: None,
                    },
                };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let acceptor = TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(acceptor, stream, address))
                    .await
                {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%address, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(%address, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    address: SocketAddr,
) -> io::Result<Conn> {
    let stream = acceptor.accept(stream).await?;
    let identity = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => Some(Arc::new(
            PeerIdentity::from_der(leaf).map_err(io::Error::other)?,
        )),
        _ => None,
    };
    Ok(Conn {
        io: Io::Tls(Box::new(stream)),
        peer: PeerInfo {
            address: Some(address),
            identity,
        },
    })
}
