//! Many netlink requests in few datagrams, each acknowledged on its own: what the
//! rtnetlink ([`crate::link`]) and ipset ([`crate::ipset_netlink`]) clients share. The
//! kernel handles every message of a datagram in `sendmsg`, so the acknowledgements are
//! queued when it returns; one refused request never hides the others.

use std::{io, os::fd::AsFd, time::Duration};

use netlink_sys::Socket;

/// `NLMSG_ERROR`: an acknowledgement (error 0) or a refusal.
const NLMSG_ERROR: u16 = 2;
/// Bytes per datagram.
pub const MAX_DATAGRAM: usize = 32 << 10;
/// Receive-buffer space one acknowledgement takes (its skb's truesize, measured at
/// about 730 bytes): a datagram carries no more requests than the buffer has room for
/// acknowledgements, or the kernel drops some (ENOBUFS) and their outcome is unknown.
const ACK_TRUESIZE: usize = 1024;
/// The socket buffers asked for (root may exceed `rmem_max`; others get what it allows).
const RECV_BUFFER: usize = 8 << 20;
/// How long to wait for an acknowledgement before calling its outcome unknown.
const RECV_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets the buffers, the receive timeout and `NETLINK_CAP_ACK` (acknowledgements without
/// the request's payload) on `socket`; returns how many requests one datagram may carry.
pub fn configure(socket: &mut Socket) -> io::Result<usize> {
    socket.set_cap_ack(true)?;
    let fd = socket.as_fd();
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(fd, RECV_BUFFER).is_err() {
        rustix::net::sockopt::set_socket_recv_buffer_size(fd, RECV_BUFFER)?;
    }
    rustix::net::sockopt::set_socket_timeout(
        fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(RECV_TIMEOUT),
    )?;
    let granted = rustix::net::sockopt::socket_recv_buffer_size(fd)?;
    Ok((granted / ACK_TRUESIZE).max(16))
}

/// Sends `requests` (each one encoded netlink message with `NLM_F_ACK` and the sequence
/// number given beside it) packed into datagrams of at most `per_datagram` requests (see
/// [`configure`]), and returns each one's outcome in order: `Ok` when acknowledged, the
/// kernel's errno otherwise, an error when no acknowledgement came.
pub fn exchange(
    socket: &Socket,
    recv: &mut [u8],
    requests: &[(u32, Vec<u8>)],
    per_datagram: usize,
) -> Vec<io::Result<()>> {
    let mut results: Vec<Option<io::Result<()>>> = (0..requests.len()).map(|_| None).collect();
    let mut start = 0;
    while start < requests.len() {
        let mut datagram = Vec::new();
        let mut end = start;
        while end < requests.len()
            && end - start < per_datagram
            && (datagram.is_empty() || datagram.len() + requests[end].1.len() <= MAX_DATAGRAM)
        {
            datagram.extend_from_slice(&requests[end].1);
            end += 1;
        }
        one_datagram(
            socket,
            recv,
            &datagram,
            &requests[start..end],
            &mut results[start..end],
        );
        start = end;
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(io::Error::other("no acknowledgement from the kernel"))))
        .collect()
}

fn one_datagram(
    socket: &Socket,
    recv: &mut [u8],
    datagram: &[u8],
    requests: &[(u32, Vec<u8>)],
    results: &mut [Option<io::Result<()>>],
) {
    if let Err(e) = socket.send(datagram, 0) {
        for slot in results.iter_mut() {
            *slot = Some(Err(copy(&e)));
        }
        return;
    }
    let first = requests[0].0;
    let mut missing = requests.len();
    while missing > 0 {
        let n = match socket.recv(&mut &mut recv[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Some acknowledgements were dropped: read those that were not.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            Err(e) => {
                for slot in results.iter_mut().filter(|s| s.is_none()) {
                    *slot = Some(Err(copy(&e)));
                }
                return;
            }
        };
        for (seq, errno) in acknowledgements(&recv[..n]) {
            let index = seq.wrapping_sub(first) as usize;
            if let Some(slot) = results.get_mut(index).filter(|s| s.is_none()) {
                *slot = Some(match errno {
                    0 => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                });
                missing -= 1;
            }
        }
    }
}

fn copy(e: &io::Error) -> io::Error {
    e.raw_os_error().map_or_else(
        || io::Error::new(e.kind(), e.to_string()),
        io::Error::from_raw_os_error,
    )
}

/// The `(sequence number, errno)` of every `NLMSG_ERROR` message in a datagram.
pub fn acknowledgements(datagram: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + 16 <= datagram.len() {
        let field = |at: usize| {
            u32::from_ne_bytes(
                datagram[offset + at..offset + at + 4]
                    .try_into()
                    .expect("4 bytes"),
            )
        };
        let len = field(0) as usize;
        if len < 16 || offset + len > datagram.len() {
            break;
        }
        let kind = u16::from_ne_bytes([datagram[offset + 4], datagram[offset + 5]]);
        let seq = field(8);
        if kind == NLMSG_ERROR && len >= 20 {
            let error = i32::from_ne_bytes(
                datagram[offset + 16..offset + 20]
                    .try_into()
                    .expect("4 bytes"),
            );
            out.push((seq, -error));
        }
        offset += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_message(seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&error.to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    #[test]
    fn acknowledgements_and_refusals_are_read_from_one_datagram() {
        let mut datagram = error_message(7, 0);
        datagram.extend(error_message(8, -17));
        assert_eq!(acknowledgements(&datagram), [(7, 0), (8, 17)]);
        assert_eq!(
            acknowledgements(&datagram[..20]),
            [],
            "a cut message is ignored"
        );
    }
}
