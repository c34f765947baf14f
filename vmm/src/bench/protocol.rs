//! How the benchmark and its receiver process talk.
//!
//! ```text
//!  colo bench transport (parent)                      transport-receiver (child)
//!     │ listens on 127.0.0.1:0, spawns the child          │ maps + pre-faults its region
//!     │◀──────── control: connect, Hello both ways ───────▶│ (Role::Primary / Secondary)
//!     │── stdin: "push" ──────────────────────────────────▶│ scribbles its region, binds
//!     │◀── control: Region(desc) ──────────────────────────│ a TcpPushListener
//!     │── push streams connect; per epoch: push_epoch ────▶│ next_commit, checksum of the
//!     │◀── stdout: "checksum <epoch> <sum> <pages> <bytes> │ committed pages, scribble,
//!     │        <user us> <sys us>"                         │ release
//!     │        ... more epochs ...                         │
//!     │── push Goodbye ───────────────────────────────────▶│
//!     │◀── stdout: "push-done <epochs>" ───────────────────│
//!     │── stdin: "raw-open" ──────────────────────────────▶│ binds a plain listener
//!     │◀── stdout: "raw-port <port>" ──────────────────────│
//!     │── connects one stream, kept for every raw rep ────▶│
//!     │── stdin: "raw <bytes>" ───────────────────────────▶│
//!     │◀── stdout: "raw-ready <bytes>" ────────────────────│ about to read
//!     │── <bytes> in 1 MiB writes ────────────────────────▶│ 1 MiB reads into its region
//!     │◀── 1 byte ─────────────────────────────────────────│
//!     │◀── stdout: "raw-done <bytes> <user us> <sys us>" ──│
//!     │── control: Goodbye; stdin closed ─────────────────▶│ exits
//! ```
//!
//! The CPU the receiver reports (`<user us> <sys us>`, the microseconds of user and system
//! time of the whole process) is what it used to take in the epoch or the raw transfer:
//! for an epoch, from its previous release (or the session's start) until the commit, so
//! that neither the checksum nor the scribbling counts; for a raw transfer, its reads and
//! the acknowledgement.
//!
//! The child exits as soon as the control channel or its stdin closes, so it never
//! outlives the parent.

use colo_transport::control::{Hello, MemRegion, Role};

use super::cpu::Cpu;
use super::error::{Error, Result};
use super::pages::PAGE_SIZE;

/// The handshake announcement of either side: one guest memory region of `size` bytes.
///
/// # Errors
/// [`Error::Transport`] if the layout is not valid (a size that is not whole pages).
pub fn hello(role: Role, pair_id: u64, size: u64) -> Result<Hello> {
    Hello::new(
        role,
        pair_id,
        PAGE_SIZE,
        vec![MemRegion { gpa: 0, len: size }],
    )
    .map_err(Error::transport("building the handshake"))
}

/// What the parent asks of the receiver, one line on its stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Open a push session: bind a push listener and announce it over the control channel.
    Push,
    /// The same, with every push stream sealed (`--encrypt`).
    PushSealed,
    /// A push session over libfabric (the receiver's `--ofi-provider`).
    PushOfi,
    /// Open the plain TCP stream of the raw baseline (one for every raw transfer, as a
    /// push session keeps its streams).
    RawOpen,
    /// Receive this many bytes on the raw stream.
    Raw(u64),
    /// Exit.
    Quit,
}

impl Request {
    /// The line (without newline).
    pub fn to_line(self) -> String {
        match self {
            Self::Push => "push".into(),
            Self::PushSealed => "push-sealed".into(),
            Self::PushOfi => "push-ofi".into(),
            Self::RawOpen => "raw-open".into(),
            Self::Raw(n) => format!("raw {n}"),
            Self::Quit => "quit".into(),
        }
    }

    /// Parses a line.
    pub fn parse(line: &str) -> Option<Self> {
        let mut w = line.split_whitespace();
        let r = match (w.next()?, w.next()) {
            ("push", None) => Self::Push,
            ("push-sealed", None) => Self::PushSealed,
            ("push-ofi", None) => Self::PushOfi,
            ("raw-open", None) => Self::RawOpen,
            ("raw", Some(n)) => Self::Raw(n.parse().ok()?),
            ("quit", None) => Self::Quit,
            _ => return None,
        };
        w.next().is_none().then_some(r)
    }
}

/// What the receiver tells the parent, one line on its stdout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reply {
    /// An epoch was committed, checked, scribbled over and released.
    Checksum {
        /// The committed epoch.
        epoch: u64,
        /// Checksum of the committed pages.
        sum: u64,
        /// Pages set in the commit's bitmap.
        pages: u64,
        /// Payload bytes the commit says landed.
        bytes: u64,
        /// The receiver's CPU from the previous release until the commit.
        cpu: Cpu,
    },
    /// The push session ended after this many epochs.
    PushDone(u64),
    /// The raw listener's port; the receiver accepts one connection on it.
    RawPort(u16),
    /// The receiver is about to read this many bytes from the raw stream (the timer
    /// starts after this, so it does not count the receiver's reaction to the request).
    RawReady(u64),
    /// The raw stream delivered this many bytes, using this much of the receiver's CPU.
    RawDone(u64, Cpu),
}

impl Reply {
    /// The line (without newline).
    pub fn to_line(self) -> String {
        match self {
            Self::Checksum {
                epoch,
                sum,
                pages,
                bytes,
                cpu,
            } => {
                let (u, s) = cpu.to_micros();
                format!("checksum {epoch} {sum:016x} {pages} {bytes} {u} {s}")
            }
            Self::PushDone(n) => format!("push-done {n}"),
            Self::RawPort(p) => format!("raw-port {p}"),
            Self::RawReady(n) => format!("raw-ready {n}"),
            Self::RawDone(n, cpu) => {
                let (u, s) = cpu.to_micros();
                format!("raw-done {n} {u} {s}")
            }
        }
    }

    /// Parses a line.
    pub fn parse(line: &str) -> Option<Self> {
        let w: Vec<&str> = line.split_whitespace().collect();
        Some(match w.as_slice() {
            ["checksum", e, s, p, b, u, k] => Self::Checksum {
                epoch: e.parse().ok()?,
                sum: u64::from_str_radix(s, 16).ok()?,
                pages: p.parse().ok()?,
                bytes: b.parse().ok()?,
                cpu: Cpu::from_micros(u.parse().ok()?, k.parse().ok()?),
            },
            ["push-done", n] => Self::PushDone(n.parse().ok()?),
            ["raw-port", p] => Self::RawPort(p.parse().ok()?),
            ["raw-ready", n] => Self::RawReady(n.parse().ok()?),
            ["raw-done", n, u, k] => Self::RawDone(
                n.parse().ok()?,
                Cpu::from_micros(u.parse().ok()?, k.parse().ok()?),
            ),
            _ => return None,
        })
    }
}

/// What the push streams of `colo bench transport` authenticate with: a fixed key, as the
/// receiver is this machine's own child on loopback (checked at its start) and the
/// benchmark measures the authenticated path, not key handling.
pub fn bench_credentials() -> colo_auth::Credentials {
    colo_auth::Credentials::key(colo_auth::PairKey::from_bytes(
        *b"colo bench transport, loopback!!",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for r in [
            Request::Push,
            Request::PushSealed,
            Request::PushOfi,
            Request::RawOpen,
            Request::Raw(1 << 31),
            Request::Quit,
        ] {
            assert_eq!(Request::parse(&r.to_line()), Some(r));
        }
        for r in [
            Reply::Checksum {
                epoch: 3,
                sum: u64::MAX - 5,
                pages: 65536,
                bytes: 1 << 28,
                cpu: Cpu::from_micros(81_234, 1_234_567),
            },
            Reply::PushDone(9),
            Reply::RawPort(40000),
            Reply::RawReady(4096),
            Reply::RawDone(4096, Cpu::from_micros(0, 17)),
        ] {
            assert_eq!(Reply::parse(&r.to_line()), Some(r));
        }
        assert_eq!(Request::parse("push now"), None);
        assert_eq!(Request::parse("raw x"), None);
        assert_eq!(Reply::parse("checksum 1 zz 1 1 0 0"), None);
        assert_eq!(Reply::parse("checksum 1 ff 1 1"), None);
    }
}
