//! Port specifications as the command line writes them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// Where a port is: `tap:NAME`, `unix:PATH` (connect), `unix-listen:PATH`,
/// `tcp:HOST:PORT` (connect) or `tcp-listen:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PortSpec {
    /// A tap device, created if it does not exist.
    Tap(String),
    /// Connect to a Unix stream socket.
    UnixConnect(PathBuf),
    /// Listen on a Unix stream socket (one peer at a time, re-accepted when it leaves).
    UnixListen(PathBuf),
    /// Connect to a TCP address.
    TcpConnect(String),
    /// Listen on a TCP address (one peer at a time, re-accepted when it leaves).
    TcpListen(String),
}

impl FromStr for PortSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Config(format!(
                "port {s:?}: expected tap:NAME, unix:PATH, unix-listen:PATH, tcp:HOST:PORT \
                 or tcp-listen:HOST:PORT"
            ))
        };
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        Ok(match kind {
            "tap" if rest.len() < 16 && !rest.contains('/') => Self::Tap(rest.into()),
            "unix" => Self::UnixConnect(rest.into()),
            "unix-listen" => Self::UnixListen(rest.into()),
            "tcp" if rest.contains(':') => Self::TcpConnect(rest.into()),
            "tcp-listen" if rest.contains(':') => Self::TcpListen(rest.into()),
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tap(n) => write!(f, "tap:{n}"),
            Self::UnixConnect(p) => write!(f, "unix:{}", p.display()),
            Self::UnixListen(p) => write!(f, "unix-listen:{}", p.display()),
            Self::TcpConnect(a) => write!(f, "tcp:{a}"),
            Self::TcpListen(a) => write!(f, "tcp-listen:{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "tap:colo0",
            "unix:/run/p.sock",
            "unix-listen:/tmp/x",
            "tcp:127.0.0.1:9000",
            "tcp-listen:[::1]:9000",
        ] {
            assert_eq!(s.parse::<PortSpec>().unwrap().to_string(), s);
        }
        for s in ["tap:", "tap:waytoolongname0123", "udp:1", "tcp:nohost", "x"] {
            assert!(s.parse::<PortSpec>().is_err(), "{s}");
        }
    }
}
