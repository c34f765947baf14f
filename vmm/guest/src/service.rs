//! The key-value service: a line protocol on a few TCP sockets listening on one port.
//!
//! One reply line per request line:
//!
//! | request             | reply                                   |
//! |---------------------|-----------------------------------------|
//! | `PING`              | `PONG`                                  |
//! | `SET <key> <value>` | `OK` (or `ERR disk full`, `ERR memory full`, `ERR disk error`) |
//! | `GET <key>`         | `VALUE <value>` or `NONE`               |
//! | `COUNT`             | `COUNT <n>`: SETs since boot            |
//! | `VCPUS`             | `VCPUS <n> <t1> ... <t(n-1)>`: the vCPU count, then each worker's turns (vCPUs 1 to n-1) |
//! | `POWEROFF`          | none: the guest powers the machine off (ACPI S5), as Linux's `poweroff` does |
//! | anything else       | `ERR unknown command`                   |
//!
//! A key is one word (no spaces); a value is the rest of the line after the single space
//! that follows the key, and may hold spaces. Lines end in `\n` (a `\r` before it is
//! dropped). A line longer than [`MAX_LINE`] gets `ERR line too long` and the connection
//! is closed. With [`FLAG_NONDETERMINISTIC`] every reply line ends in ` t=<tsc>`.

use alloc::vec::Vec;
use core::fmt::Write as _;

use colo_guest_abi::boot::FLAG_NONDETERMINISTIC;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use crate::blk::VirtioBlk;
use crate::store::{SetError, Store};

/// Connections served at once.
pub const SOCKETS: usize = 8;
/// Receive buffer of each socket.
const RX_BUFFER: usize = 64 << 10;
/// Transmit buffer of each socket.
const TX_BUFFER: usize = 64 << 10;
/// Longest request line, without its newline.
pub const MAX_LINE: usize = 4096;
/// Reply bytes a connection may have waiting for room in its socket before the service
/// stops reading its requests.
const MAX_PENDING_OUT: usize = 16 << 10;

/// One socket and what its connection has in flight.
struct Conn {
    handle: SocketHandle,
    /// The start of a request line that has no newline yet.
    line: Vec<u8>,
    /// Replies not yet taken by the socket.
    out: Vec<u8>,
    /// No more requests are answered (line too long): close once `out` is sent, and
    /// drop whatever else arrives.
    closing: bool,
    /// Our FIN is queued.
    closed: bool,
}

/// Most dirty-load pages written before each request (a fault each under dirty logging,
/// several microseconds): enough for about 80k pages/s at this service's request rates,
/// without letting the load starve the requests.
const PAGES_PER_REQUEST: u64 = 32;

/// What the service needs to answer requests.
pub struct Backend<'a> {
    /// The map and its log.
    pub store: &'a mut Store,
    /// The disk of the log.
    pub blk: &'a mut VirtioBlk,
    /// The dirty-page load, run between requests too: a batch of requests with their
    /// disk flushes can take many milliseconds, which would starve it.
    pub dirty: Option<&'a mut crate::dirty::DirtyLoad>,
    /// The VM's vCPU count (`VCPUS`).
    pub vcpus: u32,
}

/// The service.
pub struct Service {
    port: u16,
    stamp: bool,
    conns: Vec<Conn>,
}

impl Service {
    /// Adds [`SOCKETS`] TCP sockets to `sockets`, listening on `port`; `flags` are the
    /// boot flags.
    pub fn new(sockets: &mut SocketSet<'_>, port: u16, flags: u32) -> Self {
        let conns = (0..SOCKETS)
            .map(|_| {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(alloc::vec![0; RX_BUFFER]),
                    tcp::SocketBuffer::new(alloc::vec![0; TX_BUFFER]),
                );
                // A delayed ACK throttles bulk transfers to a few MB/s here, and Nagle
                // would hold back small replies.
                s.set_ack_delay(None);
                s.set_nagle_enabled(false);
                Conn {
                    handle: sockets.add(s),
                    line: Vec::new(),
                    out: Vec::new(),
                    closing: false,
                    closed: false,
                }
            })
            .collect();
        Self {
            port,
            stamp: flags & FLAG_NONDETERMINISTIC != 0,
            conns,
        }
    }

    /// Serves every connection: answers complete request lines, moves replies into the
    /// sockets, closes finished connections and listens again on closed sockets. Returns
    /// whether anything happened.
    pub fn serve(&mut self, sockets: &mut SocketSet<'_>, be: &mut Backend<'_>) -> bool {
        let mut busy = false;
        let stamp = self.stamp;
        for c in &mut self.conns {
            let s = sockets.get_mut::<tcp::Socket<'_>>(c.handle);
            if !s.is_open() {
                c.line.clear();
                c.out.clear();
                c.closing = false;
                c.closed = false;
                if let Err(e) = s.listen(self.port) {
                    crate::fatal!(
                        crate::rt::EXIT_BAD_BOOT,
                        "listen on port {}: {e}",
                        self.port
                    );
                }
                busy = true;
                continue;
            }
            busy |= send_pending(s, c);
            if !c.closing {
                while c.out.len() < MAX_PENDING_OUT && s.can_recv() {
                    let got = s.recv(|data| {
                        let n = take_lines(c, data, be, stamp);
                        (n, n)
                    });
                    match got {
                        Ok(0) | Err(_) => break,
                        Ok(_) => busy = true,
                    }
                    if c.closing {
                        break;
                    }
                }
                busy |= send_pending(s, c);
            } else if s.can_recv() {
                // Drop input that will never be answered.
                busy |= s.recv(|d| (d.len(), d.len())).is_ok_and(|n| n > 0);
            }
            let peer_done = s.state() == tcp::State::CloseWait && !s.can_recv();
            if !c.closed && c.out.is_empty() && (c.closing || peer_done) {
                // We are done, or the peer is and has had every answer: send our FIN. A
                // line without its newline is dropped.
                s.close();
                c.closed = true;
                c.line.clear();
                busy = true;
            }
        }
        busy
    }
}

/// Moves waiting replies into the socket; whether any went.
fn send_pending(s: &mut tcp::Socket<'_>, c: &mut Conn) -> bool {
    if c.out.is_empty() || !s.can_send() {
        return false;
    }
    match s.send_slice(&c.out) {
        Ok(n) if n > 0 => {
            c.out.drain(..n);
            true
        }
        _ => false,
    }
}

/// Answers the complete lines at the start of `data` (prefixed by what `c.line` already
/// holds); keeps a trailing partial line in `c.line`. Returns how many bytes of `data`
/// it used: all of them, unless the replies reached [`MAX_PENDING_OUT`] or the connection
/// is closing.
fn take_lines(c: &mut Conn, data: &[u8], be: &mut Backend<'_>, stamp: bool) -> usize {
    let mut used = 0;
    while used < data.len() {
        if c.out.len() >= MAX_PENDING_OUT || c.closing {
            break;
        }
        let rest = &data[used..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            if c.line.len() + rest.len() > MAX_LINE {
                too_long(c, stamp);
            } else {
                c.line.extend_from_slice(rest);
            }
            return data.len();
        };
        used += nl + 1;
        if c.line.len() + nl > MAX_LINE {
            too_long(c, stamp);
            break;
        }
        if c.line.is_empty() {
            answer(&rest[..nl], &mut c.out, be, stamp);
        } else {
            c.line.extend_from_slice(&rest[..nl]);
            answer(&c.line, &mut c.out, be, stamp);
            c.line.clear();
        }
    }
    used
}

fn too_long(c: &mut Conn, stamp: bool) {
    c.line.clear();
    c.out.extend_from_slice(b"ERR line too long");
    end_reply(&mut c.out, stamp);
    c.closing = true;
}

/// Ends a reply line: the TSC if asked for, then the newline.
fn end_reply(out: &mut Vec<u8>, stamp: bool) {
    if stamp {
        let mut w = VecWriter(out);
        // VecWriter cannot fail.
        let _ = write!(w, " t={}", crate::arch::rdtsc());
    }
    out.push(b'\n');
}

/// Appends the reply to one request line (without its newline) to `out`.
fn answer(line: &[u8], out: &mut Vec<u8>, be: &mut Backend<'_>, stamp: bool) {
    if let Some(d) = be.dirty.as_deref_mut() {
        if let Err(lost) = d.run_at_most(PAGES_PER_REQUEST) {
            crate::dirty::memory_lost(lost);
        }
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match Request::parse(line) {
        Some(Request::Ping) => out.extend_from_slice(b"PONG"),
        Some(Request::Set { key, value }) => match be.store.set(be.blk, key, value) {
            Ok(()) => out.extend_from_slice(b"OK"),
            Err(SetError::DiskFull) => out.extend_from_slice(b"ERR disk full"),
            Err(SetError::MemoryFull) => out.extend_from_slice(b"ERR memory full"),
            Err(e @ SetError::Disk(_)) => {
                crate::println!("SET failed: {e}");
                out.extend_from_slice(b"ERR disk error");
            }
        },
        Some(Request::Get { key }) => match be.store.get(key) {
            Some(v) => {
                out.extend_from_slice(b"VALUE ");
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(b"NONE"),
        },
        Some(Request::Count) => {
            let _ = write!(VecWriter(out), "COUNT {}", be.store.sets());
        }
        Some(Request::Vcpus) => {
            let mut w = VecWriter(out);
            let _ = write!(w, "VCPUS {}", be.vcpus);
            for t in crate::worker::turns(be.vcpus) {
                let _ = write!(w, " {t}");
            }
        }
        Some(Request::PowerOff) => {
            // Every SET before this one is on the disk already (a SET is answered once
            // its write completed).
            crate::println!("POWEROFF: powering the machine off");
            crate::arch::power_off()
        }
        None => out.extend_from_slice(b"ERR unknown command"),
    }
    end_reply(out, stamp);
}

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
enum Request<'a> {
    Ping,
    PowerOff,
    Set { key: &'a [u8], value: &'a [u8] },
    Get { key: &'a [u8] },
    Count,
    Vcpus,
}

impl<'a> Request<'a> {
    /// Parses one line (no newline); `None` for anything that is not a valid request.
    fn parse(line: &'a [u8]) -> Option<Self> {
        let (cmd, args) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        let is_key = |k: &[u8]| !k.is_empty() && !k.contains(&b' ');
        match (cmd, args) {
            (b"PING", None) => Some(Self::Ping),
            (b"COUNT", None) => Some(Self::Count),
            (b"VCPUS", None) => Some(Self::Vcpus),
            (b"POWEROFF", None) => Some(Self::PowerOff),
            (b"GET", Some(key)) if is_key(key) => Some(Self::Get { key }),
            (b"SET", Some(args)) => {
                let i = args.iter().position(|&b| b == b' ')?;
                let (key, value) = (&args[..i], &args[i + 1..]);
                (is_key(key) && !value.is_empty()).then_some(Self::Set { key, value })
            }
            _ => None,
        }
    }
}

/// `fmt::Write` into a byte vector.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl core::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
