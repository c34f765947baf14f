//! Block replication benchmarks (not tests). Run:
//!
//! ```sh
//! cargo bench -p colo-blk --bench replication
//! ```
//!
//! - Replicated sequential 64 KiB writes and random 4 KiB writes between two processes
//!   on loopback (this binary runs itself again as the secondary), checkpointing every
//!   `EPOCH_BYTES` (barrier, then the secondary commits and drops its buffer), against
//!   the same writes to an unreplicated file in the same run. The replicated time runs
//!   from the first write to the last commit's reply. Neither side calls fdatasync: both
//!   measure the page cache path, which is where replication overhead shows most.
//! - The sequential writes again with a guest flush every MiB (`seq64k-durable`), an
//!   extra line for comparison with durable writes; the target is the page-cache line.
//! - Checkpoint (buffer drop) time with 10k buffered extents.
//!
//! Files live in `$COLO_BLK_BENCH_DIR` (default: the temp dir). Every file and the
//! secondary's buffer arena are written once before measuring (first-touch costs ten
//! times an overwrite here). Environment: `COLO_BLK_BENCH_MIB` (disk size, default 256),
//! `COLO_BLK_BENCH_REPS` (default 5), `COLO_BLK_BENCH_ONLY` (a comma-separated subset of
//! `seq64k,rand4k,seq64k-durable,drop`; default all).

use std::fs::File;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_blk::{
    BlockBackend, BufferOptions, Disk, PlainDisk, PrimaryDisk, PrimaryOptions, SecondaryDisk,
    SyncMode,
};
use colo_transport::control::{Conn, ControlChannel, Message};

const ROLE: &str = "COLO_BLK_BENCH_ROLE";
const T: Duration = Duration::from_secs(60);
const EPOCH_BYTES: u64 = 64 << 20;
const RANDOM_WRITES: u64 = 32768;
const GIB: f64 = (1u64 << 30) as f64;

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn pattern(seed: u64, out: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

/// Writes a whole file of `len` bytes, so that its blocks and page cache exist.
fn make_image(path: &Path, len: u64) {
    let mut f = File::create(path).expect("create image");
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..len >> 20 {
        pattern(i, &mut chunk);
        f.write_all(&chunk).expect("fill image");
    }
    f.sync_all().expect("sync image");
}

/// One workload: the writes, in order, as (offset, length).
fn workload(kind: &str, disk: u64) -> Vec<(u64, usize)> {
    match kind {
        "seq64k" | "seq64k-durable" => (0..disk / 65536).map(|i| (i * 65536, 65536)).collect(),
        "rand4k" => {
            let mut x = 0x1234_5678_9ABC_DEF1u64;
            (0..RANDOM_WRITES)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x % (disk / 4096)) * 4096, 4096)
                })
                .collect()
        }
        _ => unreachable!(),
    }
}

/// Bytes written between two guest flushes in the durable variant.
const DURABLE_FLUSH_BYTES: u64 = 1 << 20;

/// How often a workload's guest flushes (0: never).
fn flush_every(kind: &str) -> u64 {
    if kind.ends_with("-durable") {
        DURABLE_FLUSH_BYTES
    } else {
        0
    }
}

/// The workload on a plain file, with a flush (fdatasync) every `flush_every` bytes.
fn plain_pass(b: &dyn BlockBackend, w: &[(u64, usize)], src: &[u8], flush_every: u64) {
    let mut since_flush = 0u64;
    for (i, &(off, len)) in w.iter().enumerate() {
        let s = (i * 4096) % (src.len() - len);
        b.write_at(off, &src[s..s + len]).expect("write");
        since_flush += len as u64;
        if flush_every > 0 && since_flush >= flush_every {
            b.flush().expect("flush");
            since_flush = 0;
        }
    }
}

/// The same workload replicated, with a checkpoint every `EPOCH_BYTES` and at the end.
/// Returns the time spent in checkpoints (waiting for the secondary to catch up, and the
/// commit round trip).
/// The guest flushes as in [`plain_pass`]: the primary syncs its disk and forwards the
/// flush, which the secondary makes durable when it commits the epoch.
fn replicated_pass(pair: &mut Pair, w: &[(u64, usize)], src: &[u8], flush_every: u64) -> Duration {
    let mut since = 0u64;
    let mut since_flush = 0u64;
    let mut in_cp = Duration::ZERO;
    for (i, &(off, len)) in w.iter().enumerate() {
        let s = (i * 4096) % (src.len() - len);
        pair.primary.write_at(off, &src[s..s + len]).expect("write");
        since_flush += len as u64;
        if flush_every > 0 && since_flush >= flush_every {
            pair.primary.flush().expect("flush");
            since_flush = 0;
        }
        since += len as u64;
        if since >= EPOCH_BYTES {
            let t = Instant::now();
            pair.checkpoint();
            in_cp += t.elapsed();
            since = 0;
        }
    }
    let t = Instant::now();
    pair.checkpoint();
    in_cp + t.elapsed()
}

struct Pair {
    primary: PrimaryDisk,
    ctl: ControlChannel<Conn>,
    child: Child,
    epoch: u64,
}

impl Pair {
    fn start(dir: &Path, disk: u64) -> Pair {
        let ppath = dir.join("colo-blk-bench-primary.img");
        let spath = dir.join("colo-blk-bench-secondary.img");
        make_image(&ppath, disk);
        make_image(&spath, disk);
        let blk_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ctl_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, "secondary")
            .env("COLO_BLK_BENCH_IMAGE", &spath)
            .env(
                "COLO_BLK_BENCH_ADDR",
                blk_l.local_addr().unwrap().to_string(),
            )
            .env(
                "COLO_BLK_BENCH_CTL",
                ctl_l.local_addr().unwrap().to_string(),
            )
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the secondary");
        let primary = PrimaryDisk::new(Disk::open(&ppath).unwrap(), PrimaryOptions::default());
        let (c, _) = blk_l.accept().unwrap();
        primary.attach(c, SyncMode::InSync, T).unwrap();
        let ctl = ControlChannel::accept(&ctl_l).unwrap();
        let _ = std::fs::remove_file(&ppath);
        let _ = std::fs::remove_file(&spath);
        Pair {
            primary,
            ctl,
            child,
            epoch: 0,
        }
    }

    /// One checkpoint: the disk barrier, then the secondary commits (drops its buffer).
    fn checkpoint(&mut self) {
        self.epoch += 1;
        let epoch = self.epoch;
        self.primary.checkpoint_barrier(epoch, T).unwrap();
        self.ctl.send(&Message::VmstateSend { epoch }).unwrap();
        assert_eq!(self.ctl.recv().unwrap(), Message::VmstateReceived { epoch });
    }

    fn stop(mut self) {
        self.ctl.send(&Message::Goodbye).unwrap();
        self.primary.stop_replication();
        assert!(self.child.wait().unwrap().success(), "the secondary failed");
    }
}

fn secondary_main() {
    let path = PathBuf::from(std::env::var("COLO_BLK_BENCH_IMAGE").unwrap());
    let s = SecondaryDisk::new(
        Disk::open(&path).unwrap(),
        BufferOptions {
            mem_limit: (EPOCH_BYTES + (16 << 20)) as usize,
            prefault: true,
            ..BufferOptions::default()
        },
    );
    let c = TcpStream::connect(std::env::var("COLO_BLK_BENCH_ADDR").unwrap()).unwrap();
    s.serve(c, T).unwrap();
    let mut ctl =
        ControlChannel::connect(&std::env::var("COLO_BLK_BENCH_CTL").unwrap(), T).unwrap();
    let mut drops = Vec::new();
    loop {
        match ctl.recv().unwrap() {
            Message::VmstateSend { epoch } => {
                let c = s.commit(epoch, T).unwrap();
                drops.push(c.drop_time);
                ctl.send(&Message::VmstateReceived { epoch }).unwrap();
            }
            Message::Goodbye => break,
            other => panic!("secondary: unexpected {other:?}"),
        }
    }
    drops.sort();
    if let Some(max) = drops.last() {
        eprintln!(
            "  (secondary: {} commits, buffer drop median {:?}, max {:?})",
            drops.len(),
            drops[drops.len() / 2],
            max
        );
    }
}

/// CPU time used so far by every live thread of process `pid` (the sum of the first
/// field of each thread's `schedstat`, in nanoseconds).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn throughput(dir: &Path, disk: u64, reps: usize, kind: &str, src: &[u8]) {
    let w = workload(kind, disk);
    let bytes: u64 = w.iter().map(|x| x.1 as u64).sum();
    let bpath = dir.join("colo-blk-bench-plain.img");
    make_image(&bpath, disk);
    let plain = PlainDisk::new(Disk::open(&bpath).unwrap());
    let _ = std::fs::remove_file(&bpath);
    let mut pair = Pair::start(dir, disk);
    // Warm-up pass of each, not measured.
    let fe = flush_every(kind);
    plain_pass(&plain, &w, src, fe);
    replicated_pass(&mut pair, &w, src, fe);
    let (mut base, mut repl, mut cp_share) = (Vec::new(), Vec::new(), Vec::new());
    // CPU time per GiB written: this process (the primary and its link threads) and the
    // secondary's. Kernel writeback threads are not counted, on either side.
    let (me, sec) = (std::process::id(), pair.child.id());
    let (mut base_cpu, mut prim_cpu, mut sec_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let per_gib = |ns: u64| ns as f64 / 1e6 / (bytes as f64 / GIB);
    for _ in 0..reps {
        let c0 = cpu_ns(me);
        let t = Instant::now();
        plain_pass(&plain, &w, src, fe);
        base.push(bytes as f64 / t.elapsed().as_secs_f64() / GIB);
        base_cpu.push(per_gib(cpu_ns(me) - c0));
        let (c0, s0) = (cpu_ns(me), cpu_ns(sec));
        let t = Instant::now();
        let cp = replicated_pass(&mut pair, &w, src, fe);
        let el = t.elapsed();
        prim_cpu.push(per_gib(cpu_ns(me) - c0));
        sec_cpu.push(per_gib(cpu_ns(sec) - s0));
        repl.push(bytes as f64 / el.as_secs_f64() / GIB);
        cp_share.push(cp.as_secs_f64() / el.as_secs_f64());
    }
    let stats = pair.primary.stats();
    pair.stop();
    let (bm, rm) = (median(&mut base), median(&mut repl));
    let bb = base.iter().copied().fold(0.0, f64::max);
    let rb = repl.iter().copied().fold(0.0, f64::max);
    println!(
        "{kind}: {} writes, {} MiB per rep, checkpoint every {} MiB, {reps} reps (median, best)",
        w.len(),
        bytes >> 20,
        EPOCH_BYTES >> 20
    );
    if fe > 0 {
        println!(
            "  (durable variant, not the target's workload: the guest flushes every {} MiB; \
             unreplicated that is an fdatasync, replicated an fdatasync on the primary and \
             one on the secondary at each commit)",
            fe >> 20
        );
    }
    println!("  unreplicated file   {bm:6.2} GiB/s  {bb:6.2} GiB/s");
    println!(
        "  replicated          {rm:6.2} GiB/s  {rb:6.2} GiB/s   ratio {:.2} (median/median){}",
        rm / bm,
        if kind == "seq64k" {
            format!(
                "  target >= 0.80: {}",
                if rm / bm >= 0.8 { "met" } else { "MISSED" }
            )
        } else {
            String::new()
        }
    );
    println!(
        "  ({} frames forwarded, {} MiB; {:.0}% of the replicated time is spent in checkpoints, \
         i.e. waiting for the secondary to catch up)",
        stats.forwarded_frames,
        stats.forwarded_bytes >> 20,
        100.0 * median(&mut cp_share)
    );
    println!(
        "  (CPU ms per GiB, median: unreplicated {:.0}; replicated {:.0} primary + {:.0} secondary)",
        median(&mut base_cpu),
        median(&mut prim_cpu),
        median(&mut sec_cpu)
    );
}

fn drop_bench(dir: &Path, reps: usize) {
    const EXTENTS: u64 = 10_000;
    for (label, mem_limit, svm) in [
        ("10k hidden extents, in memory", 256usize << 20, false),
        (
            "10k hidden + 10k active extents, in memory",
            256 << 20,
            true,
        ),
        ("10k hidden extents, spilled to file", 0, false),
    ] {
        let disk = EXTENTS * 8192;
        let (pp, sp) = (
            dir.join("colo-blk-drop-p.img"),
            dir.join("colo-blk-drop-s.img"),
        );
        make_image(&pp, disk.next_multiple_of(1 << 20));
        make_image(&sp, disk.next_multiple_of(1 << 20));
        let primary = PrimaryDisk::new(Disk::open(&pp).unwrap(), PrimaryOptions::default());
        let secondary = SecondaryDisk::new(
            Disk::open(&sp).unwrap(),
            BufferOptions {
                mem_limit,
                prefault: true,
                ..BufferOptions::default()
            },
        );
        let _ = std::fs::remove_file(&pp);
        let _ = std::fs::remove_file(&sp);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(|| secondary.serve(l.accept().unwrap().0, T).unwrap());
            primary
                .attach(TcpStream::connect(addr).unwrap(), SyncMode::InSync, T)
                .unwrap();
            h.join().unwrap();
        });
        let buf = vec![7u8; 4096];
        let (mut inner, mut call) = (Vec::new(), Vec::new());
        let mut extents = 0;
        for epoch in 1..=reps as u64 {
            // Every other 4 KiB block: extents that cannot touch.
            for i in 0..EXTENTS {
                primary.write_at(i * 8192, &buf).unwrap();
                if svm {
                    secondary.write_at(i * 8192 + 4096, &buf).unwrap();
                }
            }
            primary.checkpoint_barrier(epoch, T).unwrap();
            let st = secondary.stats().buffer;
            extents = st.hidden_extents + st.active_extents;
            let t = Instant::now();
            let c = secondary.commit(epoch, T).unwrap();
            call.push(t.elapsed().as_secs_f64() * 1e6);
            inner.push(c.drop_time.as_secs_f64() * 1e6);
        }
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (mi, xi, mc, xc) = (
            median(&mut inner.clone()),
            max(&inner),
            median(&mut call.clone()),
            max(&call),
        );
        println!(
            "buffer drop, {label} ({extents} extents): drop {mi:.0} us median, {xi:.0} us max; whole commit() call {mc:.0} us median, {xc:.0} us max; target < 1000 us: {}",
            if xc < 1000.0 { "met" } else { "MISSED" }
        );
        drop(primary);
    }
}

/// The transport alone, as a reference: 64 KiB writes from one thread to another over a
/// loopback TCP socket, the reader discarding them.
fn tcp_reference(total: u64, src: &[u8]) -> f64 {
    use std::io::Read;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let r = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = vec![0u8; 1 << 16];
        let mut n = 0u64;
        while n < total {
            n += c.read(&mut b).unwrap() as u64;
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let s = (sent as usize) % (src.len() - 65536);
        c.write_all(&src[s..s + 65536]).unwrap();
        sent += 65536;
    }
    r.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64() / GIB
}

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("secondary") {
        secondary_main();
        return;
    }
    let dir = std::env::var("COLO_BLK_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let disk = env_u64("COLO_BLK_BENCH_MIB", 256) << 20;
    let reps = env_u64("COLO_BLK_BENCH_REPS", 5) as usize;
    let mut src = vec![0u8; 8 << 20];
    pattern(42, &mut src);
    println!(
        "colo-blk replication benchmark: disk {} MiB in {}, two processes on loopback",
        disk >> 20,
        dir.display()
    );
    let mut tcp: Vec<f64> = (0..3).map(|_| tcp_reference(disk, &src)).collect();
    println!(
        "reference: loopback TCP alone, 64 KiB writes, thread to thread: {:.2} GiB/s (median of 3)",
        median(&mut tcp)
    );
    let only = std::env::var("COLO_BLK_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
    if run("seq64k") {
        throughput(&dir, disk, reps, "seq64k", &src);
    }
    if run("rand4k") {
        throughput(&dir, disk, reps, "rand4k", &src);
    }
    if run("seq64k-durable") {
        throughput(&dir, disk, reps, "seq64k-durable", &src);
    }
    if run("drop") {
        drop_bench(&dir, reps);
    }
}
