//! `colo bench vm`: the VM's own costs. Pause+resume latency of the running guest, the
//! save and restore time of its device and vCPU state, and its service's request rate
//! through a tap device against a host-native server of the same protocol measured in the
//! same run.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use colo_machine::devices::console::ConsoleSink;
use colo_machine::runner::VmHandle;

use super::error::{Error, Result};
use super::timing::fmt_dur;
use crate::args::VmArgs;

/// `colo bench vm`.
#[derive(Debug, Args)]
#[command(
    after_help = "Needs /dev/kvm; the service part needs root (a tap device). Its \
                        tap and disk are created for the run and removed after."
)]
pub struct VmBenchArgs {
    /// Pause+resume cycles.
    #[arg(long, default_value_t = 1000)]
    cycles: u32,
    /// Snapshot save+restore repetitions.
    #[arg(long, default_value_t = 200)]
    snapshots: u32,
    /// Seconds of each service measurement.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Skip the service part (no tap needed).
    #[arg(long)]
    no_service: bool,
    /// The tap device of the service part.
    #[arg(long, default_value = "colobench0")]
    tap: String,
}

fn vm_err(e: colo_machine::Error) -> Error {
    Error::Guest(format!("VM: {e}"))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// Runs `colo bench vm`.
///
/// # Errors
/// A VM that cannot be built or crashes, or a service that does not answer.
pub fn run(args: &VmBenchArgs) -> Result<()> {
    if args.cycles == 0 || args.snapshots == 0 || args.secs.is_nan() || args.secs <= 0.0 {
        return Err(Error::InvalidArgs(
            "counts and --secs must be positive".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!("colo-bench-vm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(Error::io("create a scratch directory"))?;
    let result = run_in(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn vm_args(dir: &std::path::Path, tap: &str, with_net: bool) -> VmArgs {
    VmArgs {
        ram: Some(64 << 20),
        vcpus: 1,
        disk: dir.join(format!("disk-{tap}-{with_net}.img")),
        disk_size: Some(16 << 20),
        tap: Some(tap.into()),
        host_ip: "10.0.3.1/24".into(),
        guest_ip: "10.0.3.2/24".into(),
        port: 7000,
        net_socket: None,
        nondeterministic: false,
        dirty_rate: 0,
        dirty_pattern: colo_machine::DirtyPattern::Sweep,
        image: None,
        kernel: crate::args::KernelArgs::default(),
    }
}

fn run_in(args: &VmBenchArgs, dir: &std::path::Path) -> Result<()> {
    // Pause/resume and snapshots: the built-in guest, without a network (a channel
    // backend nobody feeds), running its idle loop.
    let mut a = vm_args(dir, "none", false);
    a.net_socket = None;
    let machine = colo_machine::Machine::new(colo_machine::VmConfig {
        name: "bench".into(),
        ram: a.ram_for(false),
        vcpus: a.vcpus,
        guest: colo_machine::Guest::BuiltIn(colo_machine::BuiltInGuest {
            image: colo_machine::guest_image::GUEST_ELF.to_vec(),
            ip: ([10, 0, 3, 2], 24),
            port: 7000,
            nondeterministic: false,
            dirty_pages_per_sec: 1000,
            dirty_pattern: colo_machine::DirtyPattern::Sweep,
        }),
        disk: {
            crate::args::prepare_disk(&a.disk, a.disk_size).map_err(vm_err)?;
            a.disk.clone()
        },
        disk_backend: None,
        net: colo_machine::devices::backend::NetBackend::channel().0,
        mac: [0x52, 0x54, 10, 0, 3, 2],
        console: ConsoleSink::Discard,
    })
    .map_err(vm_err)?;
    let vm = VmHandle::start(machine, false).map_err(vm_err)?;
    std::thread::sleep(Duration::from_millis(100));
    let (mut pause, mut cycle) = (Vec::new(), Vec::new());
    for _ in 0..args.cycles {
        let t = Instant::now();
        vm.pause().map_err(vm_err)?;
        let p = t.elapsed();
        vm.resume();
        cycle.push(t.elapsed());
        pause.push(p);
        // Let the guest run between cycles, as between checkpoints.
        std::thread::sleep(Duration::from_micros(500));
    }
    pause.sort();
    cycle.sort();
    println!("Pause+resume of the running guest, {} cycles:", args.cycles);
    println!(
        "  pause (until parked):  p50 {:>9}  p99 {:>9}  max {:>9}",
        fmt_dur(pct(&pause, 0.5)),
        fmt_dur(pct(&pause, 0.99)),
        fmt_dur(pct(&pause, 1.0))
    );
    println!(
        "  pause+resume:          p50 {:>9}  p99 {:>9}  max {:>9}",
        fmt_dur(pct(&cycle, 0.5)),
        fmt_dur(pct(&cycle, 0.99)),
        fmt_dur(pct(&cycle, 1.0))
    );
    let p99 = pct(&cycle, 0.99);
    println!(
        "  target: pause+resume p99 < 200 us: {} -> {}",
        fmt_dur(p99),
        if p99 < Duration::from_micros(200) {
            "MET"
        } else {
            "NOT MET"
        }
    );

    vm.pause().map_err(vm_err)?;
    let (mut save, mut restore) = (Vec::new(), Vec::new());
    let mut size = 0;
    {
        let mut m = vm.machine().map_err(vm_err)?;
        for _ in 0..args.snapshots {
            let t = Instant::now();
            let s = m.save_state().map_err(vm_err)?;
            save.push(t.elapsed());
            let t = Instant::now();
            m.restore_state(&s).map_err(vm_err)?;
            restore.push(t.elapsed());
            size = s.len();
        }
    }
    save.sort();
    restore.sort();
    println!(
        "\nVM state (vCPU, irqchip, clock, devices; not RAM): {size} bytes, {} reps",
        args.snapshots
    );
    println!(
        "  save:    p50 {:>9}  p99 {:>9}\n  restore: p50 {:>9}  p99 {:>9}",
        fmt_dur(pct(&save, 0.5)),
        fmt_dur(pct(&save, 0.99)),
        fmt_dur(pct(&restore, 0.5)),
        fmt_dur(pct(&restore, 0.99))
    );
    vm.resume();
    std::thread::sleep(Duration::from_millis(20));
    if vm.finished() {
        return Err(Error::Guest("the guest stopped after a restore".into()));
    }
    vm.stop().map_err(vm_err)?;

    if args.no_service {
        println!("\nService: skipped (--no-service)");
        return Ok(());
    }
    service(args, dir)
}

/// Sequential PING round trips and pipelined batches against `addr` for `secs`.
fn load(addr: SocketAddr, secs: f64) -> Result<(f64, f64)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(Error::io("connect to the service"))?;
    s.set_nodelay(true).map_err(Error::io("set TCP_NODELAY"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(Error::io("set a read timeout"))?;
    let mut w = s.try_clone().map_err(Error::io("clone the socket"))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut round_trip = |batch: usize| -> Result<()> {
        w.write_all(&b"PING\n".repeat(batch))
            .map_err(Error::io("send"))?;
        for _ in 0..batch {
            line.clear();
            r.read_line(&mut line).map_err(Error::io("receive"))?;
            if line.trim_end() != "PONG" && !line.starts_with("PONG ") {
                return Err(Error::Guest(format!("unexpected reply {line:?}")));
            }
        }
        Ok(())
    };
    let mut rates = [0.0; 2];
    for (i, batch) in [1usize, 64].into_iter().enumerate() {
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed().as_secs_f64() < secs {
            round_trip(batch)?;
            n += batch;
        }
        rates[i] = n as f64 / t.elapsed().as_secs_f64();
    }
    Ok((rates[0], rates[1]))
}

/// A host-native server of the same line protocol (PING only), the baseline.
fn native_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(Error::io("bind the native server"))?;
    let addr = l.local_addr().map_err(Error::io("local address"))?;
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            let _ = s.set_nodelay(true);
            let Ok(mut w) = s.try_clone() else { return };
            let mut r = BufReader::new(s);
            let mut line = String::new();
            let mut out = Vec::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => out.extend_from_slice(b"PONG\n"),
                }
                if r.buffer().is_empty() {
                    if w.write_all(&out).is_err() {
                        return;
                    }
                    out.clear();
                }
            }
        }
    });
    Ok(addr)
}

fn service(args: &VmBenchArgs, dir: &std::path::Path) -> Result<()> {
    let a = vm_args(dir, &args.tap, true);
    let machine = match a.build("bench", ConsoleSink::Discard) {
        Ok(m) => m,
        Err(e) => {
            println!("\nService: skipped ({e}; needs root for the tap device)");
            return Ok(());
        }
    };
    let vm = VmHandle::start(machine, false).map_err(vm_err)?;
    let guest: SocketAddr = "10.0.3.2:7000".parse().expect("a valid address");
    // The guest needs a moment to boot and answer ARP.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&guest, Duration::from_millis(500)).is_err() {
        if Instant::now() > deadline {
            return Err(Error::Guest(
                "the guest service did not come up in 10 s".into(),
            ));
        }
    }
    let (g1, g64) = load(guest, args.secs)?;
    let (n1, n64) = load(native_server()?, args.secs)?;
    vm.stop().map_err(vm_err)?;
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &args.tap])
        .status();
    println!(
        "\nService requests/s (PING), {} s each, same client:",
        args.secs
    );
    println!(
        "{:>26} {:>12} {:>12} {:>7}",
        "", "guest (tap)", "host native", "ratio"
    );
    println!(
        "{:>26} {g1:>12.0} {n1:>12.0} {:>6.2}x",
        "sequential round trips",
        g1 / n1
    );
    println!(
        "{:>26} {g64:>12.0} {n64:>12.0} {:>6.2}x",
        "pipelined, 64 per batch",
        g64 / n64
    );
    Ok(())
}
