//! `colo pair`: a whole COLO pair on this machine, the embedded default.
//!
//! The supervisor (this process) runs the proxy and a client load, and starts the two
//! sides as child processes (`colo secondary`, `colo primary`) on loopback:
//!
//! ```text
//!  client load ─frames─▶ proxy ─┬─ unix socket ─▶ PVM  (colo primary)  ══ push/control ══▶
//!   (smoltcp)  ◀─released─      └─ unix socket ─▶ SVM  (colo secondary) ◀════════════════
//! ```
//!
//! The primary marks every commit in its own network output (`--commit-marker`), so the
//! proxy releases the held output in order with the PVM's frames, and reports every
//! checkpoint on an event socket; the supervisor forwards the proxy's checkpoint requests
//! (mismatches) to the primary and shows a status line. `--kill-primary-after` kills the
//! primary process outright; the secondary notices (heartbeat or closed connection), takes
//! over, and the proxy switches the client to it.

pub mod client;
mod disklog;

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use colo_netcmp::proxy::{Ports, Proxy};

use crate::args::{parse_ms_or_zero, parse_secs, parse_size};
use crate::colo::ColoError;
use crate::colo::cli::ColoArgs;
use crate::colo::metrics::{EpochRecord, Summary, Trigger};
use crate::interrupt::{catch_interrupts, interrupted};
use client::{ClientNet, ClientStats};

/// `colo pair`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  colo pair --duration 30s\n  \
                        colo pair --duration 20s --kill-primary-after 10s\n\n\
                        Needs /dev/kvm; no root and no tap device (the client is a user-space \
                        TCP stack). Scratch files go to a temporary directory that is removed \
                        at the end.")]
pub struct PairArgs {
    #[command(flatten)]
    pub colo: ColoArgs,
    /// Kill the primary process (SIGKILL) this long after the start, to show failover.
    #[arg(long, value_parser = parse_secs)]
    pub kill_primary_after: Option<Duration>,
    /// Kill the secondary process this long after the start: the primary carries on alone.
    #[arg(long, value_parser = parse_secs)]
    pub kill_secondary_after: Option<Duration>,
    /// After --kill-secondary-after, start a new secondary 1 s later: the primary brings
    /// it in sync while serving and COLO goes on (re-protection).
    #[arg(long)]
    pub reprotect: bool,
    /// Nice value of the SVM's vCPU thread until it takes over (the secondary's
    /// --vcpu-nice). Both VMs share this machine's cores here, which two hosts would not:
    /// the SVM only has to keep up for the comparison, so by default it takes what the PVM
    /// and the checkpoint threads leave. 0 gives both VMs the same share.
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub svm_nice: i32,
    /// COLO mode: how far the SVM may run ahead of the PVM before the proxy holds it
    /// (netcmp's secondary_lead, measured by the SVM's oldest output still waiting for
    /// the PVM's). What the SVM does past the PVM is thrown away at the next checkpoint,
    /// and on one machine it takes CPU from the PVM. 0 turns pacing off.
    #[arg(long, default_value = "10ms", value_parser = parse_ms_or_zero)]
    pub svm_lead: Duration,
    /// Guest RAM of each VM.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub ram: u64,
    /// Pages per second each guest dirties.
    #[arg(long, default_value_t = 0)]
    pub dirty_rate: u64,
    /// Put the TSC into every reply, so PVM and SVM answer differently (mismatches).
    #[arg(long)]
    pub nondeterministic: bool,
    /// Requests the client keeps in flight on its connection (pipelining). Periodic mode
    /// releases output only at checkpoints, so its throughput depends on this.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Show the guests' consoles and the children's logs.
    #[arg(long)]
    pub verbose: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Baseline: run the primary alone, unprotected (no secondary, no checkpoints), behind
    /// the same proxy and client load.
    #[arg(long)]
    pub unprotected: bool,
    /// Append every checkpoint's record (epoch, trigger, pause_us, push_us, barrier_us,
    /// pages, bytes) as one JSON line to this file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
}

const GUEST: ([u8; 4], u16) = ([10, 0, 2, 15], 7000);
const CLIENT_IP: ([u8; 4], u8) = ([10, 0, 2, 100], 24);

fn setup(msg: impl Into<String>) -> ColoError {
    ColoError::Setup(msg.into())
}

/// A child process that is killed when dropped.
struct Kid {
    name: &'static str,
    child: Child,
}

impl Kid {
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// SIGTERM, then wait up to `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < grace {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(child = self.name, "did not stop in time; killing");
        self.kill();
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if self.alive() {
            self.kill();
        }
    }
}

#[derive(Default)]
struct Shared {
    summary: Mutex<Summary>,
    last: Mutex<Option<EpochRecord>>,
    /// The record of the longest pause (after the initial sync), to explain it.
    longest: Mutex<Option<EpochRecord>>,
    failover_at: Mutex<Option<Instant>>,
    fenced: AtomicBool,
    aborted_pause_us: AtomicU64,
    reprotected: AtomicU64,
    /// Whether the primary has lost its secondary (its `EXIT` event) and no new one has
    /// joined since (`PROTECTED`). Held while the proxy's mode is changed on its account,
    /// so that the supervisor's "secondary gone: primary only" and the event thread's
    /// "protected again: compare" cannot interleave. (They once did: the supervisor read
    /// "lost", the event thread switched to compare, then the supervisor switched to
    /// primary-only for good; the proxy released the PVM's output unchecked while COLO ran,
    /// and the next failover lost the acknowledged writes of the last epoch.)
    secondary_lost: Mutex<bool>,
    commits: AtomicU64,
    log: Mutex<Vec<String>>,
    metrics: Mutex<Option<std::fs::File>>,
}

fn spawn(
    name: &'static str,
    args: &[String],
    shared: &Arc<Shared>,
    verbose: bool,
) -> Result<Kid, ColoError> {
    let exe = std::env::current_exe().map_err(|e| setup(format!("own executable: {e}")))?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| setup(format!("start the {name}: {e}")))?;
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let s = Arc::clone(shared);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.contains("FENCED") {
                    s.fenced.store(true, Ordering::SeqCst);
                }
                if line.contains("FAILOVER") {
                    let mut f = s.failover_at.lock().unwrap_or_else(|p| p.into_inner());
                    f.get_or_insert_with(Instant::now);
                }
                if verbose {
                    eprintln!("{name}| {line}");
                }
                let mut log = s.log.lock().unwrap_or_else(|p| p.into_inner());
                log.push(format!("{name}| {line}"));
                let n = log.len();
                if n > 400 {
                    log.drain(..n - 200);
                }
            }
        });
    }
    Ok(Kid { name, child })
}

fn colo_flags(c: &ColoArgs) -> Vec<String> {
    vec![
        format!("--checkpoint-delay={}us", c.checkpoint_delay.as_micros()),
        format!("--push-interval={}us", c.push_interval.as_micros()),
        format!("--disk-send-delay={}us", c.disk_send_delay.as_micros()),
        format!(
            "--heartbeat-interval={}us",
            c.heartbeat_interval.as_micros()
        ),
        format!("--heartbeat-timeout={}us", c.heartbeat_timeout.as_micros()),
        format!(
            "--mode={}",
            clap::ValueEnum::to_possible_value(&c.mode)
                .map_or("colo".into(), |v| v.get_name().to_string())
        ),
        format!("--dirty-threshold={}", c.dirty_threshold),
        format!("--pair-id={}", c.pair_id),
        "--transport=tcp".into(),
        format!("--streams={}", c.streams),
    ]
}

fn vm_flags(a: &PairArgs, dir: &Path, side: &str) -> Vec<String> {
    let mut v = vec![
        format!("--ram={}", a.ram),
        format!("--disk={}", dir.join(format!("{side}.img")).display()),
        // The guest's disk log only grows: room for long, fast runs (a sparse file).
        "--disk-size=268435456".into(),
        format!(
            "--net-socket={}",
            dir.join(format!("{side}.sock")).display()
        ),
        format!(
            "--guest-ip={}.{}.{}.{}/24",
            GUEST.0[0], GUEST.0[1], GUEST.0[2], GUEST.0[3]
        ),
        format!("--port={}", GUEST.1),
        format!("--dirty-rate={}", a.dirty_rate),
    ];
    if a.nondeterministic {
        v.push("--nondeterministic".into());
    }
    v
}

/// Handles the primary's event lines: commits (counted; the proxy learns of them from the
/// primary's own commit markers), metrics, its exit, and re-protection.
fn serve_events(s: UnixStream, proxy: colo_netcmp::proxy::ProxyControl, shared: &Shared) {
    for line in BufReader::new(s).lines().map_while(std::result::Result::ok) {
        if line.starts_with("COMMIT ") {
            // The primary marked the commit in its network output (--commit-marker): the
            // proxy acts on it in order with the PVM's frames. Only counted here.
            shared.commits.fetch_add(1, Ordering::Relaxed);
        } else if let Some(j) = line.strip_prefix("METRIC ") {
            let mut file = shared.metrics.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = file.as_mut() {
                if writeln!(f, "{j}").is_err() {
                    tracing::warn!("cannot write the metrics file; stopping it");
                    *file = None;
                }
            }
            drop(file);
            if let Ok(r) = serde_json::from_str::<EpochRecord>(j) {
                shared
                    .summary
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add(&r);
                if !matches!(r.trigger, Trigger::InitialSync | Trigger::Resync) {
                    let mut l = shared.longest.lock().unwrap_or_else(|p| p.into_inner());
                    if l.as_ref().is_none_or(|l| r.pause_us > l.pause_us) {
                        *l = Some(r.clone());
                    }
                }
                *shared.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
        } else if let Some(us) = line.strip_prefix("ABORTED_PAUSE_US ") {
            if let Ok(us) = us.trim().parse() {
                shared.aborted_pause_us.fetch_max(us, Ordering::SeqCst);
            }
        } else if line.starts_with("EXIT ") {
            *shared
                .secondary_lost
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = true;
        } else if line == "PROTECTED" {
            // A new secondary joined: compare again from its first checkpoint on.
            let mut lost = shared
                .secondary_lost
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Err(e) = proxy.set_mode(colo_netcmp::Mode::Compare) {
                tracing::warn!(error = %e, "proxy did not switch back to compare");
            }
            *lost = false;
            drop(lost);
            shared.reprotected.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Runs `colo pair`.
///
/// # Errors
/// A side that cannot start, or a client that saw lost or contradicted data.
pub fn run(a: &PairArgs) -> Result<(), ColoError> {
    catch_interrupts();
    let dir = std::env::temp_dir().join(format!("colo-pair-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| setup(format!("{}: {e}", dir.display())))?;
    let r = if a.unprotected {
        run_unprotected(a, &dir)
    } else {
        run_in(a, &dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// CPU seconds (user + system) a child used so far, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (t(11) + t(12)) / hz
}

/// Starts the client load on the proxy's client port.
fn start_client(
    window: usize,
    client_end: colo_netcmp::io::channel::VmEnd,
    stats: &Arc<ClientStats>,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<std::collections::HashMap<u64, u64>> {
    let (stats, stop) = (Arc::clone(stats), Arc::clone(stop));
    let rx = client_end.receiver().clone();
    let net = ClientNet {
        ip: CLIENT_IP,
        server: GUEST,
        window,
    };
    std::thread::spawn(move || {
        let out: client::FrameOut = Box::new(move |f| {
            let _ = client_end.send(f);
        });
        client::run(net, out, rx, &stats, &stop)
    })
}

/// The unprotected baseline: the primary's VM alone (`colo run` on a socket backend) behind
/// the proxy in primary-only mode, with the same client.
fn run_unprotected(a: &PairArgs, dir: &Path) -> Result<(), ColoError> {
    let shared = Arc::new(Shared::default());
    let net = |e: colo_netcmp::Error| setup(format!("proxy: {e}"));
    let (client_port, client_end) = colo_netcmp::io::channel::port("client", 4096);
    let ports = Ports {
        client: client_port,
        primary: colo_netcmp::io::stream::listen_unix(&dir.join("primary.sock")).map_err(net)?,
        secondary: colo_netcmp::io::stream::listen_unix(&dir.join("secondary.sock"))
            .map_err(net)?,
    };
    let proxy = Proxy::start(colo_netcmp::Config::default(), ports).map_err(net)?;
    proxy
        .control()
        .set_mode(colo_netcmp::Mode::PrimaryOnly)
        .map_err(net)?;
    let mut args = vec!["run".to_string()];
    args.extend(vm_flags(a, dir, "primary"));
    eprintln!("colo pair --unprotected: the primary's VM alone, no checkpoints");
    let mut vm = spawn("vm", &args, &shared, a.verbose)?;
    let stats = Arc::new(ClientStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = start_client(a.pipeline, client_end, &stats, &stop);
    let start = Instant::now();
    let limit = a.colo.duration.unwrap_or(Duration::from_secs(3600));
    while start.elapsed() < limit && !interrupted() && vm.alive() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = cpu_secs(vm.child.id());
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let _ = client.join();
    vm.stop(Duration::from_secs(5));
    let _ = proxy.shutdown();
    let replies = stats.replies.load(Ordering::Relaxed);
    println!(
        "\ncolo pair --unprotected summary ({secs:.1} s): client {replies} replies ({:.0}/s); VM CPU {cpu:.2} s",
        replies as f64 / secs
    );
    if a.json {
        let j = serde_json::json!({
            "secs": secs,
            "replies": replies,
            "client_rps": replies as f64 / secs,
            "cpu_primary_s": cpu,
            "lost_acked": stats.lost_acked.load(Ordering::Relaxed),
            "contradictions": stats.contradictions.load(Ordering::Relaxed),
        });
        println!("{j}");
    }
    if replies == 0 {
        let log = shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n");
        return Err(ColoError::Protocol(format!(
            "the client got no reply at all:\n{log}"
        )));
    }
    Ok(())
}

/// A loopback port P with P+1 free too (the secondary's control and disk replication).
fn free_port() -> Result<u16, ColoError> {
    for _ in 0..64 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| setup(e.to_string()))?;
        let p = l.local_addr().map_err(|e| setup(e.to_string()))?.port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(setup("no two adjacent free loopback ports"))
}

#[allow(clippy::too_many_lines)]
fn run_in(a: &PairArgs, dir: &Path) -> Result<(), ColoError> {
    let shared = Arc::new(Shared::default());
    if let Some(path) = &a.metrics {
        let f = crate::colo::metrics::open_stream(path)?;
        *shared.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }
    let net = |e: colo_netcmp::Error| setup(format!("proxy: {e}"));
    let (client_port, client_end) = colo_netcmp::io::channel::port("client", 4096);
    let pvm_sock = dir.join("primary.sock");
    let svm_sock = dir.join("secondary.sock");
    let ports = Ports {
        client: client_port,
        primary: colo_netcmp::io::stream::listen_unix(&pvm_sock).map_err(net)?,
        secondary: colo_netcmp::io::stream::listen_unix(&svm_sock).map_err(net)?,
    };
    // The primary marks each commit in its own output stream (--commit-marker): the proxy
    // releases the epoch's output in order with the PVM's frames, without a round trip.
    let config = colo_netcmp::Config {
        commit_marker: true,
        secondary_lead: (!a.svm_lead.is_zero()).then_some(a.svm_lead),
        ..colo_netcmp::Config::default()
    };
    let proxy = Proxy::start(config, ports).map_err(net)?;
    if a.colo.mode == crate::colo::Mode::Periodic {
        // The SVM does not run: output is held until the checkpoint that covers it.
        proxy
            .control()
            .set_mode(colo_netcmp::Mode::Periodic)
            .map_err(net)?;
    }
    let events_path: PathBuf = dir.join("events.sock");
    let events =
        UnixListener::bind(&events_path).map_err(|e| setup(format!("event socket: {e}")))?;
    let port = free_port()?;
    let mut sec_args = vec![
        "secondary".to_string(),
        format!("--listen=127.0.0.1:{port}"),
    ];
    // Split-brain prevention: the secondary takes over only once the supervisor has seen
    // the primary process gone (this file is removed then).
    let alive = dir.join("primary.alive");
    std::fs::write(&alive, b"").map_err(|e| setup(format!("{}: {e}", alive.display())))?;
    sec_args.push(format!("--takeover-check=test ! -e {}", alive.display()));
    sec_args.push(format!("--vcpu-nice={}", a.svm_nice));
    sec_args.extend(vm_flags(a, dir, "secondary"));
    sec_args.extend(colo_flags(&a.colo));
    let mut pri_args = vec![
        "primary".to_string(),
        format!("--peer=127.0.0.1:{port}"),
        format!("--events={}", events_path.display()),
        "--commit-marker".to_string(),
    ];
    pri_args.extend(vm_flags(a, dir, "primary"));
    if a.reprotect {
        pri_args.push("--reprotect".into());
    }
    pri_args.extend(colo_flags(&a.colo));
    eprintln!(
        "colo pair: starting the secondary and the primary (scratch in {})",
        dir.display()
    );
    let mut secondary = spawn("secondary", &sec_args, &shared, a.verbose)?;
    let mut primary = spawn("primary", &pri_args, &shared, a.verbose)?;
    events
        .set_nonblocking(true)
        .map_err(|e| setup(e.to_string()))?;
    let t0 = Instant::now();
    let ev = loop {
        match events.accept() {
            Ok((s, _)) => break s,
            Err(_)
                if t0.elapsed() < Duration::from_secs(60)
                    && primary.alive()
                    && secondary.alive() =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => {
                let log = shared
                    .log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .join("\n");
                return Err(setup(format!(
                    "the primary did not connect its event socket:\n{log}"
                )));
            }
        }
    };
    ev.set_nonblocking(false)
        .map_err(|e| setup(e.to_string()))?;
    let req_w = Arc::new(Mutex::new(
        ev.try_clone().map_err(|e| setup(e.to_string()))?,
    ));
    {
        let (ctl, s) = (proxy.control(), Arc::clone(&shared));
        std::thread::spawn(move || serve_events(ev, ctl, &s));
    }
    {
        let (reqs, w) = (proxy.checkpoint_requests().clone(), Arc::clone(&req_w));
        std::thread::spawn(move || {
            while let Ok(r) = reqs.recv() {
                tracing::debug!(%r, "proxy asks for a checkpoint");
                if w.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write_all(b"CHECKPOINT\n")
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    // Wait for the initial sync before the load starts.
    let t1 = Instant::now();
    while shared.commits.load(Ordering::Relaxed) == 0 {
        // A primary that lost the secondary during the sync serves unprotected: nothing
        // to show here.
        let lost = *shared
            .secondary_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if lost || !primary.alive() || t1.elapsed() > Duration::from_secs(60) {
            let log = shared
                .log
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .join("\n");
            return Err(setup(format!("no initial sync:\n{log}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "colo pair: initial sync done in {} ms; client load starts",
        t1.elapsed().as_millis()
    );
    let stats = Arc::new(ClientStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = start_client(a.pipeline, client_end, &stats, &stop);
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut killed_primary: Option<Instant> = None;
    let mut replies_at_kill = 0;
    let mut replies_at_failover = None;
    let mut killed_secondary: Option<Instant> = None;
    let mut respawned = false;
    let mut failover_done = false;
    let mut last_status = Instant::now();
    let mut last_replies = 0;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let el = start.elapsed();
        if interrupted() || a.colo.duration.is_some_and(|d| el >= d) {
            break;
        }
        if killed_primary.is_none() && a.kill_primary_after.is_some_and(|k| el >= k) {
            eprintln!(
                "\ncolo pair: killing the primary (SIGKILL) at {:.1} s",
                el.as_secs_f64()
            );
            primary.kill();
            killed_primary = Some(Instant::now());
            replies_at_kill = stats.replies.load(Ordering::Relaxed);
        }
        if a.kill_secondary_after.is_some_and(|k| el >= k)
            && secondary.alive()
            && killed_secondary.is_none()
        {
            eprintln!(
                "\ncolo pair: killing the secondary (SIGKILL) at {:.1} s",
                el.as_secs_f64()
            );
            secondary.kill();
            killed_secondary = Some(Instant::now());
        }
        if a.reprotect
            && !respawned
            && killed_secondary.is_some_and(|k| k.elapsed() >= Duration::from_secs(1))
        {
            eprintln!("\ncolo pair: starting a new secondary (re-protection)");
            secondary = spawn("secondary", &sec_args, &shared, a.verbose)?;
            respawned = true;
        }
        if !primary.alive() && alive.exists() {
            let _ = std::fs::remove_file(&alive);
        }
        let failover = *shared.failover_at.lock().unwrap_or_else(|p| p.into_inner());
        if !failover_done && failover.is_some() {
            failover_done = true;
            replies_at_failover = Some(stats.replies.load(Ordering::Relaxed));
            proxy
                .control()
                .set_mode(colo_netcmp::Mode::SecondaryOnly)
                .map_err(net)?;
            eprintln!("\ncolo pair: failover: the secondary took over; the client now talks to it");
        }
        if failover.is_none() && primary.alive() {
            // Decided and applied under the lock: see `Shared::secondary_lost`.
            let lost = shared
                .secondary_lost
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *lost || !secondary.alive() {
                let _ = proxy.control().set_mode(colo_netcmp::Mode::PrimaryOnly);
            }
        }
        if !primary.alive() && !secondary.alive() {
            eprintln!("\ncolo pair: both sides are gone");
            let log = shared.log.lock().unwrap_or_else(|p| p.into_inner());
            let tail: Vec<&String> = log
                .iter()
                .filter(|l| !l.contains("] ") || l.contains("ERROR") || l.contains("WARN"))
                .rev()
                .take(25)
                .collect();
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
            break;
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            let replies = stats.replies.load(Ordering::Relaxed);
            let rate = (replies - last_replies) as f64 / last_status.elapsed().as_secs_f64();
            last_replies = replies;
            last_status = Instant::now();
            let s = shared
                .summary
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let last = shared
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let m = proxy.metrics();
            let line = format!(
                "{:>5.1}s | epochs {} | {:.1} ckpt/s | pause p50 {:.2} ms p99 {:.2} ms | {} pages {:.2} MiB last epoch | mismatches {} | client {:.0} req/s, {} lost, {} contradicted{}",
                el.as_secs_f64(),
                s.epochs,
                s.epochs as f64 / el.as_secs_f64().max(0.1),
                s.pause(0.5).as_secs_f64() * 1e3,
                s.pause(0.99).as_secs_f64() * 1e3,
                last.as_ref()
                    .map_or(0, |r| r.pause_pages + r.background_pages),
                last.as_ref()
                    .map_or(0.0, |r| r.bytes as f64 / f64::from(1 << 20)),
                m.checkpoint_requests,
                rate,
                stats.lost_acked.load(Ordering::Relaxed),
                stats.contradictions.load(Ordering::Relaxed),
                if failover_done { " | FAILED OVER" } else { "" },
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = (cpu_secs(primary.child.id()), cpu_secs(secondary.child.id()));
    let active = match (primary.alive(), failover_done) {
        (_, true) => "secondary",
        (true, false) => "primary",
        (false, false) => "none",
    };
    stop.store(true, Ordering::SeqCst);
    let acked = client.join().unwrap_or_default();
    primary.stop(Duration::from_secs(5));
    secondary.stop(Duration::from_secs(5));
    // Every acknowledged write must be on the disk of the side that is active now.
    let failed_over = shared.failover_at.lock().is_ok_and(|f| f.is_some());
    let disk = dir.join(if failed_over {
        "secondary.img"
    } else {
        "primary.img"
    });
    let (disk_keys, disk_missing) = match std::fs::read(&disk) {
        Ok(bytes) => {
            let log = disklog::replay(&bytes);
            // Values grow with every request, so a key's last value on disk must be the
            // acknowledged one or a later write (sent but not yet answered at the stop);
            // an older value or none means an acknowledged write was lost.
            let missing: Vec<String> = acked
                .iter()
                .filter(|(k, v)| {
                    log.get(&format!("k{k}"))
                        .and_then(|d| d.parse::<u64>().ok())
                        .is_none_or(|d| d < **v)
                })
                .map(|(k, v)| format!("k{k}={v}"))
                .collect();
            if !missing.is_empty() {
                stats
                    .anomalies
                    .lock()
                    .map(|mut a| {
                        a.push(format!(
                            "{} acknowledged SETs missing from {}: {:?}",
                            missing.len(),
                            disk.display(),
                            &missing[..missing.len().min(5)]
                        ))
                    })
                    .ok();
            }
            (log.len(), missing.len())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the disk image for the check");
            (0, 0)
        }
    };
    let pm = proxy.metrics();
    let _ = proxy.shutdown();
    let s = shared
        .summary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let failover = *shared.failover_at.lock().unwrap_or_else(|p| p.into_inner());
    let replies = stats.replies.load(Ordering::Relaxed);
    let lost = stats.lost_acked.load(Ordering::Relaxed) + disk_missing as u64;
    let contradicted = stats.contradictions.load(Ordering::Relaxed);
    println!("\ncolo pair summary ({secs:.1} s):");
    println!("  COLO: {}", s.text(secs));
    println!(
        "  client: {replies} replies ({:.0}/s), {} acknowledged SETs, {lost} acknowledged writes lost, {contradicted} replies contradicted, longest wait {:.1} ms, {} connection(s)",
        replies as f64 / secs,
        stats.acked_sets.load(Ordering::Relaxed),
        stats.max_wait_us.load(Ordering::Relaxed) as f64 / 1e3,
        stats.connects.load(Ordering::Relaxed),
    );
    if pm.secondary_holds > 0 {
        println!(
            "  pacing: the proxy held the SVM {} times, when it ran more than {} ms ahead of the PVM",
            pm.secondary_holds,
            a.svm_lead.as_secs_f64() * 1e3
        );
    }
    if let Some(k) = killed_primary {
        let after = replies.saturating_sub(replies_at_kill);
        match failover {
            Some(f) => println!(
                "  failover: the secondary took over {:.0} ms after the primary was killed; the client got {after} replies after the kill on {} connection(s)",
                f.saturating_duration_since(k).as_secs_f64() * 1e3,
                stats.connects.load(Ordering::Relaxed)
            ),
            None => println!("  failover: the secondary did NOT take over"),
        }
    }
    if a.json {
        let j = serde_json::json!({
            "secs": secs,
            "svm_holds": pm.secondary_holds,
            "epochs": s.epochs,
            "pause_p50_ms": s.pause(0.5).as_secs_f64() * 1e3,
            "pause_p99_ms": s.pause(0.99).as_secs_f64() * 1e3,
            "pause_max_ms": s.pause(1.0).as_secs_f64() * 1e3,
            "longest_pause": shared.longest.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "pauses_us": s.pauses_us,
            "pages": s.pages,
            "bytes": s.bytes,
            "client_rps": replies as f64 / secs,
            "cpu_primary_s": cpu.0,
            "cpu_secondary_s": cpu.1,
            "replies": replies,
            "acked_sets": stats.acked_sets.load(Ordering::Relaxed),
            "lost_acked": lost,
            "contradictions": contradicted,
            "connects": stats.connects.load(Ordering::Relaxed),
            "failover": failover.is_some(),
            "replies_after_kill": killed_primary.map(|_| replies.saturating_sub(replies_at_kill)),
            "replies_after_failover": replies_at_failover.map(|r| replies.saturating_sub(r)),
            "fenced": shared.fenced.load(Ordering::SeqCst),
            "disk_keys": disk_keys,
            "reprotected": shared.reprotected.load(Ordering::SeqCst),
            "disk_missing": disk_missing,
            "aborted_pause_ms": shared.aborted_pause_us.load(Ordering::SeqCst) as f64 / 1e3,
            "max_wait_ms": stats.max_wait_us.load(Ordering::Relaxed) as f64 / 1e3,
            "anomalies": stats.anomalies.lock().map(|a| a.clone()).unwrap_or_default(),
            "child_warnings": shared
                .log
                .lock()
                .map(|l| {
                    l.iter()
                        .filter(|x| x.contains(" WARN ") || x.contains(" ERROR ") || x.contains("error"))
                        .rev()
                        .take(12)
                        .cloned()
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
            "active": active,
        });
        println!("{j}");
    }
    if lost > 0 || contradicted > 0 {
        return Err(ColoError::Protocol(format!(
            "the client saw {lost} lost acknowledged writes and {contradicted} contradicted replies"
        )));
    }
    if replies == 0 {
        let log = shared
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n");
        return Err(ColoError::Protocol(format!(
            "the client got no reply at all:\n{log}"
        )));
    }
    Ok(())
}
