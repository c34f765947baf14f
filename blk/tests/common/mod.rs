//! Helpers shared by the integration tests: disk images in temporary files, connecting a
//! primary to a secondary on loopback, deterministic data, and child processes.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use colo_blk::{BufferOptions, Disk, PrimaryDisk, PrimaryOptions, SecondaryDisk, SyncMode};

/// The bound on every wait in the tests.
pub const T: Duration = Duration::from_secs(20);

/// A deterministic byte pattern.
pub fn pattern(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xBF58_476D_1CE4_E5B9;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// `len` bytes of pattern `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern(seed, &mut v);
    v
}

/// A temporary file holding `content`, and a second handle on it for checking.
pub fn image(content: &[u8]) -> (Disk, File) {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(content).expect("fill image");
    let check = f.try_clone().expect("dup");
    (Disk::from_file(f).expect("disk"), check)
}

/// The whole content of a file.
pub fn contents(f: &File) -> Vec<u8> {
    let n = f.metadata().expect("stat").len() as usize;
    let mut v = vec![0u8; n];
    f.read_exact_at(&mut v, 0).expect("read image");
    v
}

/// A primary and a secondary over two zeroed disks of `len` bytes (default options),
/// connected in sync.
pub fn in_sync_pair(len: usize) -> (PrimaryDisk, SecondaryDisk) {
    let (pd, _) = image(&vec![0; len]);
    let (sd, _) = image(&vec![0; len]);
    let primary = PrimaryDisk::new(pd, PrimaryOptions::default());
    let secondary = SecondaryDisk::new(sd, BufferOptions::default());
    connect(&primary, &secondary, SyncMode::InSync);
    (primary, secondary)
}

/// Connects `primary` to `secondary` over loopback TCP with `mode`.
pub fn connect(primary: &PrimaryDisk, secondary: &SecondaryDisk, mode: SyncMode) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let (c, _) = l.accept().expect("accept");
            secondary.serve(c, T).expect("serve")
        });
        primary
            .attach(TcpStream::connect(addr).expect("connect"), mode, T)
            .expect("attach");
        assert_eq!(h.join().expect("serve thread"), mode);
    });
}

/// Waits for `cond` at most `limit`, polling.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
