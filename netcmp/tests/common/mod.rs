//! Helpers shared by netcmp's integration tests: one end of a length-prefixed frame
//! stream, as a VMM or a QEMU chardev speaks it.

#![allow(dead_code, reason = "each test binary uses a part of the helpers")]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use colo_netcmp::framing::{Decoder, MAX_FRAME, encode};

/// How long a frame is waited for.
pub const WAIT: Duration = Duration::from_secs(5);

/// One end of a length-prefixed frame stream.
pub struct FrameSock<S: Read + Write> {
    /// The stream.
    pub s: S,
    dec: Decoder,
}

impl<S: Read + Write> FrameSock<S> {
    /// Wraps `s` (give it a short read timeout).
    pub fn new(s: S) -> Self {
        Self {
            s,
            dec: Decoder::new(MAX_FRAME),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &[u8]) {
        let mut b = Vec::new();
        encode(frame, &mut b).unwrap();
        self.s.write_all(&b).unwrap();
    }

    /// The next frame within `WAIT` (the socket has a short read timeout).
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        self.recv_within(WAIT)
    }

    /// The next frame within `limit`.
    pub fn recv_within(&mut self, limit: Duration) -> Option<Vec<u8>> {
        let start = Instant::now();
        let mut buf = [0u8; 65536];
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return Some(f);
            }
            if start.elapsed() > limit {
                return None;
            }
            match self.s.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.dec.feed(&buf[..n]),
                Err(_) => {}
            }
        }
    }
}
