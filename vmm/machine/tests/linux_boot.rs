//! A real Linux kernel (Debian's 6.1 cloud kernel, fetched by `scripts/test-kernel.sh`)
//! through colo's loader, serial port, e820 map and ACPI tables, on two vCPUs, up to the
//! point where it has found both.
//!
//! On this project's hosts guest kernel code is emulated (about 1.3M instructions/s), so
//! the test stops the kernel once its banner, command line, memory map, ACPI tables and
//! CPU count are out (about 10 to 20 s here); README.md ("Booting your own kernel") says
//! how far it gets beyond that. The ignored test goes on until the second vCPU runs
//! (a minute or more here).

use std::path::Path;
use std::time::{Duration, Instant};

use colo_machine::devices::backend::NetBackend;
use colo_machine::devices::console::ConsoleSink;
use colo_machine::runner::VmHandle;
use colo_machine::{Guest, GuestExit, LinuxGuest, Machine, VmConfig};

/// How long the kernel may take to say how many CPUs it found: about 10-20 s here, with
/// a wide margin for a loaded CI machine.
const BOUND: Duration = Duration::from_secs(150);
/// How long it may take to bring up its second vCPU (a minute or two here).
const SMP_BOUND: Duration = Duration::from_secs(400);

/// Where the kernel found colo's ACPI tables.
const ACPI_LINES: [&str; 2] = [
    "ACPI: RSDP 0x00000000000E0000",
    "ACPI: APIC 0x00000000000E0200",
];
/// What the MADT makes it print: both vCPUs.
const CPU_LINES: [&str; 2] = [
    "ACPI: Using ACPI (MADT) for SMP configuration information",
    "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
];

/// One kernel at a time: two at once on a 2-core host take each other's CPU.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 3.5 GiB: RAM split around the 32-bit hole, two KVM slots, two usable e820 ranges (only
/// what the guest touches is ever backed).
#[test]
fn debians_kernel_prints_its_banner_colos_command_line_e820_map_and_acpi_tables() {
    boot_until(3584 << 20, &ACPI_LINES, BOUND);
}

/// 256 MiB (the kernel gets to its CPUs sooner with less memory to set up).
#[test]
fn debians_kernel_finds_both_vcpus_in_colos_madt() {
    boot_until(256 << 20, &CPU_LINES, BOUND);
}

/// Needs a few minutes on hosts that emulate guest kernel code:
/// `cargo test -p colo-machine --test linux_boot -- --ignored`.
#[test]
#[ignore = "slow where guest kernel code is emulated (minutes)"]
fn debians_kernel_brings_up_its_second_vcpu() {
    boot_until(256 << 20, &["smp: Brought up 1 node, 2 CPUs"], SMP_BOUND);
}

/// Boots the kernel with `ram` on 2 vCPUs until the serial port showed the banner, the
/// command line, the e820 map and `more`, or `bound` passed (a failure).
fn boot_until(ram: u64, more: &[&str], bound: Duration) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dir) = colo_machine::testing::test_kernel_dir(&["vmlinux", "initrd.img"]) else {
        return;
    };
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let disk = scratch.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let t0 = Instant::now();
    let m = Machine::new(VmConfig {
        name: "linux".into(),
        ram,
        vcpus: 2,
        guest: Guest::Linux(LinuxGuest {
            kernel: dir.join("vmlinux"),
            initrd: Some(dir.join("initrd.img")),
            cmdline: None,
        }),
        disk,
        disk_backend: None,
        net: NetBackend::none(),
        mac: [2, 0, 0, 0, 0, 1],
        console: ConsoleSink::Channel(tx),
    })
    .unwrap();
    let regions = if ram > 3 << 30 { 2 } else { 1 };
    assert_eq!(m.ram.layout().regions().len(), regions, "RAM regions");
    let boot = m.linux_boot().unwrap().clone();
    // colo announces the disk (no network backend: no network device); the kernel echoes
    // the line below.
    assert!(
        boot.cmdline.contains(" virtio_mmio.device=4K@0xd0001000:6")
            && !boot.cmdline.contains("0xd0000000"),
        "{}",
        boot.cmdline
    );
    let e820: Vec<String> = boot
        .e820
        .iter()
        .map(|e| format!("BIOS-e820: {}", e.linux_line()))
        .collect();
    assert_eq!(e820.len(), 3 + regions, "{e820:?}");
    // What must appear (the banner anywhere in a line; the command line and the map as
    // the end of a line, exactly), each with when it did.
    let mut want: Vec<(String, Option<Duration>)> = [
        " Linux version ".to_string(),
        format!("] Command line: {}", boot.cmdline),
    ]
    .into_iter()
    .chain(e820.into_iter().map(|l| format!("] {l}")))
    .chain(more.iter().map(|l| (*l).to_string()))
    .map(|w| (w, None))
    .collect();
    let vm = VmHandle::start(m, false).unwrap();
    let started = Instant::now();
    let mut lines = Vec::new();
    while want.iter().any(|w| w.1.is_none()) && !vm.finished() {
        let left = bound.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        let Ok(line) = rx.recv_timeout(left.min(Duration::from_secs(1))) else {
            continue;
        };
        for w in want.iter_mut().filter(|w| w.1.is_none()) {
            let hit = if w.0.starts_with(']') {
                line.ends_with(&w.0)
            } else {
                line.contains(&w.0)
            };
            if hit {
                w.1 = Some(started.elapsed());
            }
        }
        lines.push(line);
    }
    let finished = vm.finished();
    let exit = vm.stop();
    for (w, at) in &want {
        eprintln!(
            "{:>8} {w}",
            at.map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64()))
        );
    }
    eprintln!("built in {:.2}s", (started - t0).as_secs_f64());
    assert!(
        !finished,
        "the kernel stopped early: {exit:?}\n{}",
        lines.join("\n")
    );
    assert_eq!(exit.unwrap(), GuestExit::Stopped);
    let missing: Vec<_> = want
        .iter()
        .filter(|w| w.1.is_none())
        .map(|w| &w.0)
        .collect();
    assert!(
        missing.is_empty(),
        "not on the serial port within {bound:?}: {missing:?}\nwhat came:\n{}",
        lines.join("\n")
    );
}
