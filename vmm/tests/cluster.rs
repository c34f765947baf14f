//! The resource agent (ocf/colo) under the real engine: Corosync and Pacemaker from
//! Debian's packages run one cluster node in a network namespace (and a mount namespace
//! of its own, so the host's cluster files are untouched), with both instances of the
//! promotable clone on that node (globally unique, clone-node-max=2). Pacemaker starts
//! the pair and promotes one side, which boots the VM and brings the other in sync; the
//! primary is killed with SIGKILL; Pacemaker promotes the secondary (which took over) and
//! starts a new secondary, which the new primary brings in sync (re-protection). A client
//! load (`colo client`: acknowledged SETs, GETs that check them) runs throughout through
//! `colo proxy --cluster` (the network in front of the cluster: it follows the sides' role
//! words, so its output is only what a checkpoint covered), and must lose no acknowledged
//! write. The test prints the time from the kill to the promotion and to protected again,
//! and the client's longest wait, then stops the cluster it started.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{COLO, kvm};

/// How long the cluster may take to come up, start the pair or recover.
const REACH: Duration = Duration::from_secs(120);

/// A side's state as `colo status --shell` reports it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SideState {
    mode: String,
    phase: String,
}

impl SideState {
    fn serving_protected(&self) -> bool {
        self.mode == "primary" && self.phase == "colo"
    }
    fn following(&self) -> bool {
        self.mode == "secondary" && self.phase == "colo"
    }
}

/// One cluster node and everything the test started in it; all of it is stopped and
/// removed by [`Cluster::teardown`] (also on a panic, through Drop).
struct Cluster {
    ns: String,
    dir: PathBuf,
    /// The node's shell (`ip netns exec ... unshare ... node.sh`): ends with pacemakerd.
    node: Option<std::process::Child>,
    /// `colo proxy --cluster`, run from the test's own namespace.
    proxy: Option<std::process::Child>,
    down: bool,
}

impl Cluster {
    /// Starts corosync and pacemakerd in a new namespace; `None` (with one line saying
    /// why) where that cannot be done here.
    fn start() -> Option<Self> {
        for tool in [
            "corosync",
            "pacemakerd",
            "crm",
            "crm_mon",
            "unshare",
            "nsenter",
        ] {
            if !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                eprintln!(
                    "skipped: {tool} is not installed (scripts/test.sh installs Debian's pacemaker, corosync and crmsh)"
                );
                return None;
            }
        }
        let ns = format!("colo-cl-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot create a network namespace (needs root)");
            return None;
        }
        let dir = std::env::temp_dir().join(&ns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster {
            ns,
            dir,
            node: None,
            proxy: None,
            down: false,
        };
        c.ip(&["link", "set", "lo", "up"]);
        let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ocf/colo");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/node.sh");
        let node = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.ns,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .arg("sh")
            .arg(&script)
            .arg(&c.dir)
            .arg(&agent)
            .arg("n1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(c.dir.join("node.out")).unwrap())
            .spawn()
            .expect("start the cluster node");
        c.node = Some(node);
        Some(c)
    }

    fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip")
            .args(["-n", &self.ns])
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {args:?} in {}", self.ns);
    }

    /// The pids of every process in the namespace.
    fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// pacemakerd's pid (its mount namespace holds the node's files).
    fn pacemakerd(&self) -> Option<i32> {
        self.pids().into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "pacemakerd")
        })
    }

    /// Runs a cluster tool inside the node's namespaces.
    fn tool(&self, args: &[&str]) -> std::process::Output {
        let pid = self.pacemakerd().expect("pacemakerd runs");
        Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n", "-m", "--"])
            .args(args)
            .output()
            .expect("run a cluster tool")
    }

    /// crm_mon's one-shot text.
    fn crm_mon(&self) -> String {
        String::from_utf8_lossy(&self.tool(&["crm_mon", "-1"]).stdout).into_owned()
    }

    /// Which clone instance Pacemaker shows promoted, if any.
    fn promoted(&self) -> Option<String> {
        self.crm_mon()
            .lines()
            .find(|l| l.contains("vm:") && l.contains(" Promoted "))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .map(|i| i.trim_end_matches(':').to_string())
            })
    }

    /// Side `n`'s state through its QMP socket (default when it does not answer).
    fn side(&self, n: u32) -> SideState {
        let qmp = self.dir.join(format!("state/{n}/qmp.sock"));
        let Ok(out) = Command::new(COLO)
            .args(["status", "--shell", "--qmp"])
            .arg(&qmp)
            .output()
        else {
            return SideState::default();
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        SideState {
            mode: get("mode"),
            phase: get("phase"),
        }
    }

    /// The colo process of side `n` (from the agent's pid file).
    fn side_pid(&self, n: u32) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("state/{n}/colo.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid file for side {n}"))
    }

    /// Waits (at most REACH) for `cond`; returns how long it took.
    fn wait(&self, what: &str, mut cond: impl FnMut(&Self) -> bool) -> Duration {
        let t = Instant::now();
        while !cond(self) {
            assert!(
                t.elapsed() < REACH,
                "timed out waiting for {what}; crm_mon:\n{}\nnode log tail:\n{}",
                self.crm_mon(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed()
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for n in 0..2 {
            let log = std::fs::read_to_string(self.dir.join(format!("state/{n}/colo.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            s += &format!("-- side {n}:\n");
            for l in tail.into_iter().rev() {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    /// Stops everything the test started, in order: the resources, the cluster daemons
    /// and anything else left in the namespace, the namespace, the files.
    fn teardown(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        if self.pacemakerd().is_some() {
            let _ = self.tool(&["crm", "resource", "stop", "colo-vm"]);
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20)
                && (0..2).any(|n| self.dir.join(format!("state/{n}/colo.pid")).exists())
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                // SAFETY: kill(2) on a pid that `ip netns pids` lists in the namespace
                // this test created; only processes the test started live there.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for child in [self.node.take(), self.proxy.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Waits (at most 10 s) until a Unix socket exists at `path`.
fn wait_socket(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pacemaker_promotes_the_secondary_after_a_kill_and_a_new_secondary_reprotects() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: Corosync and Pacemaker in a namespace need root");
        return;
    }
    if !kvm() {
        return;
    }
    let Some(mut c) = Cluster::start() else {
        return;
    };
    let dir = c.dir.clone();
    // The network in front of the cluster: the proxy's VM ports are where each side's
    // --net-socket connects (by place: side 0, side 1), and the client reaches the guest
    // through its client port.
    let client_sock = dir.join("client.sock");
    let proxy = Command::new(COLO)
        .args(["proxy", "--cluster"])
        .arg(format!("--client=unix-listen:{}", client_sock.display()))
        .arg(format!("--vm=unix-listen:{}", dir.join("0.net").display()))
        .arg(format!("--vm=unix-listen:{}", dir.join("1.net").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .spawn()
        .expect("start colo proxy --cluster");
    c.proxy = Some(proxy);
    for n in 0..2 {
        wait_socket(&dir.join(format!("{n}.net")));
    }
    let key = dir.join("pair.key");
    let ok = Command::new(COLO)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");

    let up = c.wait("the cluster to elect its DC", |c| {
        c.pacemakerd().is_some() && c.crm_mon().contains("partition with quorum")
    });
    eprintln!("cluster up in {:.1} s", up.as_secs_f64());
    let config = format!(
        r#"primitive vm ocf:colo:colo \
  params binary={COLO} sides="0=127.0.0.1:7600 1=127.0.0.1:7700" \
    disk="{d}/%n.img" net="socket:{d}/%n.net" pair_key={key} state_dir={d}/state \
    heartbeat_timeout=800 mode=periodic extra_args="--role-words" \
  op start timeout=60s op stop timeout=30s op promote timeout=60s op demote timeout=60s \
  op monitor interval=1s role=Promoted timeout=20s \
  op monitor interval=2s role=Unpromoted timeout=20s
clone colo-vm vm \
  meta promotable=true promoted-max=1 promoted-node-max=1 clone-max=2 clone-node-max=2 \
    globally-unique=true notify=true
"#,
        d = dir.display(),
        key = key.display()
    );
    let file = dir.join("colo.crm");
    std::fs::write(&file, config).unwrap();
    let load = c.tool(&[
        "crm",
        "configure",
        "load",
        "update",
        &file.to_string_lossy(),
    ]);
    assert!(load.status.success(), "crm configure: {load:?}");

    // The pair: one side promoted (it booted the VM), the other following in COLO.
    let t = c.wait("Pacemaker to start and promote the pair", |c| {
        c.promoted().is_some()
            && (c.side(0).serving_protected() && c.side(1).following()
                || c.side(1).serving_protected() && c.side(0).following())
    });
    let first = c.promoted().unwrap();
    let (p, s) = if first == "vm:0" { (0, 1) } else { (1, 0) };
    eprintln!(
        "Pacemaker started the pair in {:.1} s: {first} promoted (side {p} serves), side {s} in COLO",
        t.as_secs_f64()
    );
    // The client load, through the proxy, for the rest of the test.
    let client = Command::new(COLO)
        .args([
            "client",
            "--json",
            "--pipeline=8",
            "--duration=14s",
            "--socket",
        ])
        .arg(&client_sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start colo client");
    let mut client = common::Reaper(client);
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.side(s).following(), "side {s} left COLO: {:?}", c.side(s));

    // The primary dies.
    let killed = Instant::now();
    // SAFETY: kill(2) on the colo process the agent started for side p (its pid file).
    unsafe { libc::kill(c.side_pid(p), libc::SIGKILL) };
    let new = format!("vm:{s}");
    c.wait("Pacemaker to promote the secondary", |c| {
        c.promoted().as_deref() == Some(new.as_str())
    });
    let promoted = killed.elapsed();
    c.wait("a new secondary to be brought in sync", |c| {
        c.side(s).serving_protected() && c.side(p).following()
    });
    let protected = killed.elapsed();
    eprintln!(
        "kill -9 of the primary (side {p}): {new} promoted after {:.2} s, protected again (a new secondary on side {p} in COLO) after {:.2} s",
        promoted.as_secs_f64(),
        protected.as_secs_f64()
    );
    // The client carries on to its end with nothing lost.
    let status =
        common::wait_timeout(&mut client.0, Duration::from_secs(60)).expect("the client ends");
    let mut out = String::new();
    std::io::Read::read_to_string(client.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(client.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("client output {out:?} ({e}); stderr: {err}"));
    eprintln!("client: {v}");
    assert!(status.success(), "client: {status}; {err}");
    assert_eq!(v["lost_acked"], 0, "{v}");
    assert_eq!(v["contradictions"], 0, "{v}");
    assert_eq!(
        v["connects"], 1,
        "the client's connection did not survive: {v}"
    );
    assert!(v["acked_sets"].as_u64().unwrap_or(0) > 0, "{v}");
    let proxy_log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
    assert!(
        proxy_log.contains("role change"),
        "the proxy never followed a role change:\n{proxy_log}"
    );
    c.teardown();
}
