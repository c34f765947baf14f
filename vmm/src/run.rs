//! `colo run`: one VM with the built-in guest, its console on stdout, its service on a tap
//! device (the single-VM building block of `colo pair`); or, with `--kernel`, a Linux
//! kernel with its serial console on stdout.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use clap::Args;
use colo_machine::devices::console::ConsoleSink;
use colo_machine::runner::VmHandle;
use colo_machine::{Error, GuestExit, Result};

use crate::args::{VmArgs, parse_cidr};
use crate::interrupt::{catch_interrupts, interrupted};

/// `colo run`.
#[derive(Debug, Args)]
#[command(after_help = "Example (as root):\n  colo run --tap colo0\n  \
                        printf 'SET a 1\\nGET a\\n' | nc -q1 10.0.2.15 7000\n\n\
                        The guest serves a line protocol: PING, SET <key> <value>, GET <key>, \
                        COUNT, VCPUS (each worker vCPU's count). Every SET is appended to the disk image and replayed at boot.\n\n\
                        A Linux kernel instead (its serial console on stdout):\n  \
                        colo run --kernel vmlinux --initrd initrd.img")]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Stop after this many seconds (default: run until Ctrl-C or the guest exits).
    #[arg(long)]
    pub duration: Option<f64>,
}

/// Runs `colo run` and says how the guest ended: stopped (Ctrl-C, `--duration`), exited,
/// powered off, or reset (colo does not reboot a VM; `main` exits with 3 then).
///
/// # Errors
/// A VM that cannot be built, or a guest that crashes.
pub fn run(args: &RunArgs) -> Result<GuestExit> {
    let machine = if args.vm.kernel.kernel.is_some() {
        args.vm
            .build("linux", ConsoleSink::Stdout("linux".into()))?
    } else {
        args.vm.build("vm", ConsoleSink::Stdout("guest".into()))?
    };
    catch_interrupts();
    let linux = machine.linux_boot().is_some();
    let vm = VmHandle::start(machine, false)?;
    if linux {
        tracing::info!("Linux kernel started (Ctrl-C stops)");
    } else {
        let (gip, _) = parse_cidr(&args.vm.guest_ip)?;
        tracing::info!(
            "guest service at {}:{} (Ctrl-C stops)",
            Ipv4Addr::from(gip),
            args.vm.port
        );
    }
    let started = Instant::now();
    let limit = args.duration.map(Duration::from_secs_f64);
    while !vm.finished() && !interrupted() && limit.is_none_or(|l| started.elapsed() < l) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = {
        if !vm.finished() {
            vm.pause()?;
        }
        let m = vm.machine()?;
        (m.net_stats(), m.blk_stats(), m.assists())
    };
    let exit = if vm.finished() {
        vm.wait()?
    } else {
        vm.stop()?
    };
    tracing::info!(
        ?exit,
        secs = started.elapsed().as_secs_f64(),
        tx_frames = stats.0.tx_frames,
        rx_frames = stats.0.rx_frames,
        dropped = stats.0.dropped,
        disk_reads = stats.1.reads,
        disk_writes = stats.1.writes,
        disk_flushes = stats.1.flushes,
        disk_errors = stats.1.errors,
        assisted_int3 = stats.2.int3,
        assisted_fwait = stats.2.fwait,
        assisted_mxcsr = stats.2.mxcsr,
        "VM stopped"
    );
    match exit {
        GuestExit::PowerOff => tracing::info!("the guest powered off"),
        GuestExit::Reset => tracing::warn!(
            "the guest reset the machine (a reboot, or a panic with panic=-1): colo does not \
             reboot a VM, it stops it"
        ),
        _ => {}
    }
    if exit.is_clean() || exit == GuestExit::Reset {
        Ok(exit)
    } else {
        Err(Error::GuestCrash {
            reason: format!("{exit:?}"),
            regs: String::new(),
        })
    }
}
