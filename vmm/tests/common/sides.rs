//! Sides of a pair run by hand (`colo primary`, `colo secondary`) on loopback: a scratch
//! directory with two free ports, each side's disk and a drained network socket, and the
//! sides' output lines on a channel.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Reaper, wait_timeout};

/// A scratch directory with two free consecutive loopback ports (control, disk).
pub struct Scratch {
    /// The directory.
    pub dir: PathBuf,
    /// The secondary's control port (the disk's is the next one).
    pub port: u16,
}

impl Scratch {
    /// A fresh directory named after `name` and two free ports.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("colo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = super::two_free_ports();
        Self { dir, port }
    }

    /// A new pair key in the directory.
    pub fn keygen(&self, name: &str) -> PathBuf {
        let key = self.dir.join(name);
        let out = super::colo()
            .args(["keygen", &format!("--out={}", key.display())])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        key
    }

    /// A side's command with its disk and a drained network socket in the scratch dir.
    pub fn side(&self, side: &str, tag: &str, key: Option<&Path>) -> Command {
        let sock = self.dir.join(format!("{tag}.sock"));
        if !sock.exists() {
            let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            std::thread::spawn(move || {
                while let Ok((mut c, _)) = l.accept() {
                    let _ = std::io::copy(&mut c, &mut std::io::sink());
                }
            });
        }
        let mut c = super::colo();
        c.arg(side)
            .arg(format!(
                "--disk={}",
                self.dir.join(format!("{tag}.img")).display()
            ))
            .arg(format!("--net-socket={}", sock.display()))
            .arg("--heartbeat-timeout=800ms");
        match side {
            "secondary" => c.arg(format!("--listen=127.0.0.1:{}", self.port)),
            _ => c.arg(format!("--peer=127.0.0.1:{}", self.port)),
        };
        if let Some(k) = key {
            c.arg(format!("--pair-key={}", k.display()));
        }
        c
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `c` to its end (at most 60 s) and returns its exit success and stderr.
pub fn run(mut c: Command) -> (bool, String) {
    let mut child = Reaper(
        c.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = wait_timeout(&mut child.0, Duration::from_secs(60)).expect("it ends");
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.success(), err)
}

/// Starts `c` with its stderr lines on a channel.
pub fn start(mut c: Command) -> (Reaper, crossbeam_channel::Receiver<String>) {
    let mut child = Reaper(
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = crossbeam_channel::unbounded();
    for pipe in [
        Box::new(child.0.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stdout.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// Waits (at most `limit`) for a line containing `what`; returns every line seen.
pub fn says(rx: &crossbeam_channel::Receiver<String>, what: &str, limit: Duration) -> Vec<String> {
    says_any(rx, &[what], limit)
}

/// Waits (at most `limit`) for a line containing any of `what`; returns every line seen
/// (the last is the one that matched).
pub fn says_any(
    rx: &crossbeam_channel::Receiver<String>,
    what: &[&str],
    limit: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if what.iter().any(|w| l.contains(w)) => {
                seen.push(l);
                return seen;
            }
            Ok(l) => seen.push(l),
            Err(e) => panic!("never said {what:?} ({e}); said:\n{}", seen.join("\n")),
        }
    }
}
