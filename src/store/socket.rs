//! TCP_NODELAY on the connections to PostgreSQL.
//!
//! sqlx 0.9.0 opens its TCP sockets with Nagle's algorithm on (transact-rs/sqlx#4335; the
//! fix, #4336, is not in a release yet). Over TLS a message larger than one record (16 KiB:
//! a claim of a few hundred runs, an outcome group, a log statement) leaves in several
//! writes, and the kernel holds the last one until the server acknowledges the first,
//! which the server delays by 40 ms: every such statement waited 40 ms. libpq, and
//! PostgreSQL on its own side, turn the algorithm off; so does agentd, on every connection
//! it opens, until sqlx does it again.
//!
//! sqlx does not hand out its socket, so the pool's `after_connect` looks for it among the
//! process's file descriptors: every TCP socket whose peer port is the database's gets the
//! option (setting it again on one that has it changes nothing).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{SockaddrStorage, getpeername, getsockname, sockopt};

/// The process's open file descriptors (listed from `/dev/fd`).
fn open_descriptors() -> Vec<RawFd> {
    let Ok(entries) = std::fs::read_dir("/dev/fd") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// A descriptor of our own for the socket behind `raw`, if `raw` is still open.
fn duplicate(raw: RawFd) -> Option<OwnedFd> {
    // SAFETY: `raw` was listed in /dev/fd a moment ago and is only borrowed for the `dup`
    // call. If another task closed it since, `dup` fails (EBADF) or copies whatever file
    // now has the number, and the callers check the copy's peer before touching it. The
    // copy is ours alone and is closed when dropped; the original is never closed here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    nix::unistd::dup(borrowed).ok()
}

fn port_of(address: &SockaddrStorage) -> Option<u16> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(v4.port());
    }
    address.as_sockaddr_in6().map(|v6| v6.port())
}

/// Turns Nagle's algorithm off on every TCP socket of this process connected to
/// `peer_port`. Returns how many it set. Errors are skipped: a descriptor that is not a TCP
/// socket, or closed meanwhile, is not ours to change.
pub fn disable_nagle_towards(peer_port: u16) -> usize {
    let mut set = 0;
    for raw in open_descriptors() {
        let Some(fd) = duplicate(raw) else { continue };
        let Ok(peer) = getpeername::<SockaddrStorage>(fd.as_raw_fd()) else {
            continue;
        };
        if port_of(&peer) != Some(peer_port) {
            continue;
        }
        if nix::sys::socket::setsockopt(&fd, sockopt::TcpNoDelay, &true).is_ok() {
            set += 1;
        }
    }
    set
}

/// Whether the TCP socket of this process whose local port is `local_port` has Nagle's
/// algorithm off (`None`: no such socket). For tests and diagnostics.
pub fn nodelay_of_local_port(local_port: u16) -> Option<bool> {
    open_descriptors().into_iter().find_map(|raw| {
        let fd = duplicate(raw)?;
        let local = getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok()?;
        if port_of(&local) != Some(local_port) {
            return None;
        }
        nix::sys::socket::getsockopt(&fd, sockopt::TcpNoDelay).ok()
    })
}
