//! A sealed connection presented as a plain loopback socket, for a protocol that needs a
//! `TcpStream` of its own (colo-blk's disk link, with its vectored sends, polls and socket
//! timeouts): two threads move bytes between the plain end and the sealed one. Every chunk
//! the protocol writes becomes a record at once (no added delay); bytes from the peer
//! reach the protocol only once their record's tag checked.
//!
//! The loopback end is connected through a listener on 127.0.0.1 that accepts exactly one
//! connection, the one from the socket made for it (checked by address), and closes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use super::{OpenReader, SealWriter, Sealed, SessionKeys};
use crate::Peer;

/// Bytes moved per step.
const CHUNK: usize = 64 * 1024;

/// Seals `remote` (authenticated as `peer`) and returns a plain socket whose bytes cross
/// it; the bridge ends when either end closes, and then closes the other.
///
/// # Errors
/// A socket or thread that cannot be made.
pub fn bridge(remote: TcpStream, peer: &Peer) -> io::Result<TcpStream> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let plain = TcpStream::connect(l.local_addr()?)?;
    let mine = plain.local_addr()?;
    let local = loop {
        let (s, from) = l.accept()?;
        if from == mine {
            break s;
        }
        // Someone else on this host raced for the port: not ours.
        tracing::warn!(%from, "dropped a stray connection to a disk link's loopback bridge");
    };
    drop(l);
    // Each chunk goes out as it comes: Nagle's delay on any of the three sockets would
    // hold a small write (a disk acknowledgement) for a delayed ACK, about 40 ms.
    for s in [&local, &plain, &remote] {
        s.set_nodelay(true)?;
    }
    let writer = remote.try_clone()?;
    let (reader, writer) = Sealed::new(remote, SessionKeys::from_peer(peer)).into_split(writer)?;
    let (up_local, down_local) = (local.try_clone()?, local);
    std::thread::Builder::new()
        .name("seal-up".into())
        .spawn(move || up(up_local, writer))?;
    std::thread::Builder::new()
        .name("seal-down".into())
        .spawn(move || down(reader, down_local))?;
    Ok(plain)
}

/// Plain bytes from the protocol, sealed to the peer.
fn up(mut from: TcpStream, mut to: SealWriter<TcpStream>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_gather(&[&buf[..n]]).is_err() {
            break;
        }
    }
    let _ = to.close();
    let _ = to.get_ref().shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// The peer's records, opened, to the protocol.
fn down(mut from: OpenReader<TcpStream>, mut to: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                if super::SealError::from_io(&e).is_some() {
                    tracing::warn!(error = %e, "a sealed disk link record failed: link closed");
                }
                break;
            }
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.get_ref().shutdown(Shutdown::Both);
}
