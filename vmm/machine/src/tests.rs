//! Machine tests with tiny hand-assembled PVH guests (32-bit code at CPL0, loaded and
//! entered like any kernel): the console and exit ports, a crash report, pause/resume, and
//! a snapshot round trip; and the built-in guest's service across a snapshot.

use std::path::PathBuf;
use std::time::Duration;

use super::abi::{IMAGE_GPA, TRAMPOLINE_GPA};
use super::devices::backend::{ChannelPeer, NetBackend};
use super::devices::console::ConsoleSink;
use super::peer::FrameOut;
use super::runner::VmHandle;
use super::{BuiltInGuest, Error, Guest, GuestExit, Machine, VmConfig};

/// A minimal PVH kernel: `code` (32-bit, entered at CPL0 with paging off) at IMAGE_GPA in
/// an RWX segment of 64 KiB, and, for the other vCPUs, `ap` (16-bit real mode) at the
/// trampoline page that [`start_aps`] sends them to. The entry is in the PVH note.
pub fn tiny_pvh(code: &[u8], ap: Option<&[u8]>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let segs: Vec<(u64, &[u8], u64)> = std::iter::once((IMAGE_GPA, code, 0x10000))
        .chain(ap.map(|a| (TRAMPOLINE_GPA, a, a.len() as u64)))
        .collect();
    let phnum = segs.len() + 1;
    let note_at = EHDR + PHDR * phnum;
    let mut note = Vec::new();
    for w in [4u32, 4, 18] {
        note.extend_from_slice(&w.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(IMAGE_GPA as u32).to_le_bytes());
    let mut f = vec![0u8; note_at];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&IMAGE_GPA.to_le_bytes());
    f[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes());
    f[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    f[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    let phdr = |f: &mut Vec<u8>,
                i: usize,
                kind: u32,
                flags: u32,
                off: usize,
                addr: u64,
                filesz: usize,
                memsz: u64| {
        let p = &mut f[EHDR + PHDR * i..EHDR + PHDR * (i + 1)];
        p[..4].copy_from_slice(&kind.to_le_bytes());
        p[4..8].copy_from_slice(&flags.to_le_bytes());
        p[8..16].copy_from_slice(&(off as u64).to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&(filesz as u64).to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p[48..56].copy_from_slice(&4u64.to_le_bytes());
    };
    phdr(&mut f, 0, 4, 4, note_at, 0, note.len(), note.len() as u64);
    f.extend_from_slice(&note);
    for (i, (addr, bytes, memsz)) in segs.into_iter().enumerate() {
        let off = f.len();
        phdr(&mut f, i + 1, 1, 7, off, addr, bytes.len(), memsz);
        f.extend_from_slice(bytes);
    }
    f
}

/// 32-bit code that starts the other vCPUs at the trampoline the way the built-in guest
/// does: the local APIC enabled, INIT and two SIPIs to all but itself.
pub(crate) fn start_aps() -> Vec<u8> {
    let mut c = vec![0xa1, 0xf0, 0x00, 0xe0, 0xfe]; // mov eax, [0xfee000f0]
    c.extend([0x0d, 0x00, 0x01, 0x00, 0x00]); // or eax, 0x100
    c.extend([0xa3, 0xf0, 0x00, 0xe0, 0xfe]); // mov [0xfee000f0], eax
    let sipi = 0x000c_4600 | (TRAMPOLINE_GPA >> 12) as u32;
    for icr in [0x000c_4500u32, sipi, sipi] {
        // mov dword [0xfee00300], icr
        c.extend([0xc7, 0x05, 0x00, 0x03, 0xe0, 0xfe]);
        c.extend(icr.to_le_bytes());
    }
    c
}

/// `out dx, eax` with dx = port, eax = value.
pub(crate) fn out(port: u16, value: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&value.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&port.to_le_bytes());
    c.push(0xef);
    c
}

/// `out dx, al` with dx = port, al = value.
fn out8(port: u16, value: u8) -> Vec<u8> {
    let mut c = vec![0xb0, value, 0x66, 0xba];
    c.extend_from_slice(&port.to_le_bytes());
    c.push(0xee);
    c
}

/// Writes `text` to the console buffer (one byte at a time) and flushes it.
fn print(text: &[u8]) -> Vec<u8> {
    let mut c = vec![];
    for (i, &b) in text.iter().enumerate() {
        // mov byte [0x8000 + i], b  (absolute address through a SIB with no base)
        c.extend_from_slice(&[0xc6, 0x04, 0x25]);
        c.extend_from_slice(&(0x8000u32 + i as u32).to_le_bytes());
        c.push(b);
    }
    c.extend(out(super::abi::PORT_CONSOLE, text.len() as u32));
    c
}

pub fn machine(code: &[u8], console: ConsoleSink) -> Option<Machine> {
    machine_with_net(code, console, NetBackend::none())
}

fn machine_with_net(code: &[u8], console: ConsoleSink, net: NetBackend) -> Option<Machine> {
    machine_on(&tiny_pvh(code, None), console, net, 1)
}

/// A machine of `vcpus` vCPUs running the PVH `image`, or None (with a line saying why)
/// without KVM.
pub fn machine_on(
    image: &[u8],
    console: ConsoleSink,
    net: NetBackend,
    vcpus: u32,
) -> Option<Machine> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return None;
    }
    let disk = std::env::temp_dir().join(format!(
        "colo-vm-test-{}-{}.img",
        std::process::id(),
        rand_tag()
    ));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let m = Machine::new(VmConfig {
        name: "test".into(),
        ram: 32 << 20,
        vcpus,
        guest: Guest::BuiltIn(BuiltInGuest {
            image: image.to_vec(),
            ip: ([10, 0, 0, 2], 24),
            port: 7000,
            nondeterministic: false,
            dirty_pages_per_sec: 0,
            dirty_pattern: crate::DirtyPattern::Sweep,
        }),
        disk: disk.clone(),
        disk_backend: None,
        net,
        mac: [2, 0, 0, 0, 0, 1],
        console,
    });
    let _ = std::fs::remove_file(&disk);
    Some(m.unwrap())
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn a_tiny_pvh_guest_prints_and_exits() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut code = print(b"hello from a PVH entry\n");
    code.extend(out(super::abi::PORT_EXIT, 0));
    let Some(m) = machine(&code, ConsoleSink::Channel(tx)) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    assert_eq!(vm.wait().unwrap(), GuestExit::Status(0));
    assert_eq!(rx.try_recv().unwrap(), "hello from a PVH entry");
}

/// A poweroff (ACPI S5 through the FADT's sleep control register) and a reset (the FADT's
/// reset register, the i8042's reset command) end the VM and say which; a sleep control
/// write without SLP_EN does nothing.
#[test]
fn the_guest_powers_off_and_resets_through_the_acpi_and_i8042_ports() {
    use super::acpi;
    let s5 = acpi::S5_SLEEP_TYPE << 2 | 1 << 5;
    let mut not_enabled = out8(acpi::PORT_SLEEP_CONTROL, acpi::S5_SLEEP_TYPE << 2);
    not_enabled.extend(out(super::abi::PORT_EXIT, 0));
    let cases = [
        (out8(acpi::PORT_SLEEP_CONTROL, s5), GuestExit::PowerOff),
        (out8(acpi::PORT_RESET, acpi::RESET_VALUE), GuestExit::Reset),
        (out8(0x64, 0xfe), GuestExit::Reset),
        (not_enabled, GuestExit::Status(0)),
    ];
    for (code, want) in cases {
        let Some(m) = machine(&code, ConsoleSink::Discard) else {
            return;
        };
        let vm = VmHandle::start(m, false).unwrap();
        assert_eq!(vm.wait().unwrap(), want);
        assert_eq!(want.is_clean(), want != GuestExit::Reset);
    }
}

/// With exits held (a secondary in COLO mode), a guest that powers off does not end the
/// VM: its vCPU waits, parks at a pause, and the VM ends only when stopped.
#[test]
fn a_held_poweroff_waits_for_the_controller() {
    let s5 = super::acpi::S5_SLEEP_TYPE << 2 | 1 << 5;
    let Some(m) = machine(
        &out8(super::acpi::PORT_SLEEP_CONTROL, s5),
        ConsoleSink::Discard,
    ) else {
        return;
    };
    let vm = VmHandle::start(m, true).unwrap();
    vm.set_hold_exits(true);
    vm.resume();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!vm.finished(), "a held poweroff ends nothing");
    vm.pause().unwrap();
    vm.resume();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!vm.finished());
    assert_eq!(vm.stop().unwrap(), GuestExit::Stopped);
}

#[test]
fn a_triple_fault_is_reported_with_registers() {
    // ud2 with no IDT: #UD cannot be delivered, so the CPU shuts down.
    let Some(m) = machine(&[0x0f, 0x0b], ConsoleSink::Discard) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    match vm.wait() {
        Err(Error::GuestCrash { reason, regs }) => {
            assert!(reason.contains("triple fault"), "{reason}");
            assert!(regs.contains("rip="), "{regs}");
        }
        other => panic!("expected a crash report, got {other:?}"),
    }
}

#[test]
fn a_non_zero_exit_status_is_an_error() {
    let Some(m) = machine(&out(super::abi::PORT_EXIT, 3), ConsoleSink::Discard) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    let e = vm.wait().unwrap_err().to_string();
    assert!(e.contains("status 3"), "{e}");
}

/// The built-in guest's own CPU exception handling (its IDT, the CPL0 stack its TSS gives
/// exceptions from CPL3, the I/O bitmap of that TSS): booted as a plain PVH kernel with
/// `colo.selftest=`, it takes #UD, or #GP at a port its TSS denies, at CPL3, and its
/// handler stops the VM with status 0x100 + the vector.
#[test]
fn the_built_in_guests_exception_handlers_report_the_vector() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let (dir, disk, _) = scratch_disks("colo-selftest");
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, crate::guest_image::GUEST_ELF).unwrap();
    for (test, vector) in [("ud", 6), ("io", 13)] {
        let m = Machine::new(VmConfig {
            name: "selftest".into(),
            ram: 64 << 20,
            vcpus: 1,
            guest: Guest::Linux(crate::LinuxGuest {
                kernel: kernel.clone(),
                initrd: None,
                cmdline: Some(format!(
                    "colo.ip=10.0.0.2/24 colo.port=7000 colo.tsc_khz=1000000 \
                     colo.selftest={test}"
                )),
            }),
            disk: disk.clone(),
            disk_backend: None,
            net: NetBackend::none(),
            mac: [2, 0, 0, 0, 0, 1],
            console: ConsoleSink::Discard,
        })
        .unwrap();
        let vm = VmHandle::start(m, false).unwrap();
        match vm.wait() {
            Err(Error::GuestCrash { reason, regs }) => {
                let want = format!("CPU exception {vector} (status {:#x}", 0x100 + vector);
                assert!(reason.contains(&want), "{test}: {reason}");
                // The handler runs at CPL0 (cs 0x8) and names the vector in rbx.
                assert!(regs.contains("cs=0x8 "), "{test}: {regs}");
                assert!(
                    regs.contains(&format!("rbx={vector:#018x}")),
                    "{test}: {regs}"
                );
            }
            other => panic!("{test}: expected the exception to stop the VM, got {other:?}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A counting loop (32-bit): rbx counts up forever; `jmp` back.
pub(crate) fn counter() -> Vec<u8> {
    // xor ebx, ebx; loop: inc ebx; jmp loop
    vec![0x31, 0xdb, 0x43, 0xeb, 0xfd]
}

#[test]
fn pause_resume_and_snapshot_round_trip() {
    let Some(m) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    // Bounded waits rather than fixed sleeps: on a busy machine the vCPU thread may not
    // run for a while.
    assert!(counts_past(&vm, 0, 0), "the guest ran");
    vm.pause().unwrap();
    let (snap, rbx1) = {
        let m = vm.machine().unwrap();
        (
            m.save_state().unwrap(),
            m.vcpus.lock(0).get_regs().unwrap().rbx,
        )
    };
    // Paused means paused: the counter does not move.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        vm.machine().unwrap().vcpus.lock(0).get_regs().unwrap().rbx,
        rbx1
    );
    vm.resume();
    assert!(counts_past(&vm, rbx1, 0), "resumed");
    vm.stop().unwrap();

    // Restore into a second VM: it continues from the saved counter.
    let Some(mut m2) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    m2.restore_state(&snap).unwrap();
    assert_eq!(m2.vcpus.lock(0).get_regs().unwrap().rbx, rbx1);
    assert_eq!(m2.save_state().unwrap().len(), snap.len());
    let vm2 = VmHandle::start(m2, false).unwrap();
    assert!(counts_past(&vm2, rbx1, 0), "the restored VM counts on");
    vm2.stop().unwrap();
}

/// The snapshot carries every MSR the host lists that the vCPU can read and write (the TSC
/// and the kvm-clock MSRs among them) and the PIT; a VM restored from it holds the same
/// values, and its own snapshot is the same (the TSC aside, which runs on).
#[test]
fn the_snapshot_carries_every_msr_and_the_pit() {
    let Some(m) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    assert!(m.saved_msrs.contains(&0x10), "IA32_TSC");
    assert!(m.saved_msrs.contains(&0x277), "IA32_PAT");
    assert!(
        m.saved_msrs.contains(&0x4b56_4d01),
        "MSR_KVM_SYSTEM_TIME_NEW (kvm-clock): {:x?}",
        m.saved_msrs
    );
    assert!(
        !m.saved_msrs.contains(&0x6e0),
        "TSC_DEADLINE is left to the LAPIC"
    );
    assert!(m.saved_msrs.len() > 12, "more than the old fixed list");
    eprintln!("the snapshot carries {} MSRs", m.saved_msrs.len());
    // Guest-visible changes a restore must carry: a PAT and a kvm-clock page the guest set,
    // a PIT channel it programmed.
    let pat = 0x0007_0406_0007_0406u64;
    let kvmclock = (2u64 << 20) | 1;
    let msrs = kvm_bindings::Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: 0x277,
            data: pat,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: 0x4b56_4d01,
            data: kvmclock,
            ..Default::default()
        },
    ])
    .unwrap();
    assert_eq!(m.vcpus.lock(0).set_msrs(&msrs).unwrap(), 2);
    let mut pit = m.vm.get_pit2().unwrap();
    pit.channels[0].count = 0x1234;
    pit.channels[0].mode = 2;
    m.vm.set_pit2(&pit).unwrap();
    let snap = m.save_state().unwrap();
    let decoded = crate::snapshot::VmState::decode(&snap).unwrap();
    assert_eq!(decoded.vcpus[0].msrs.len(), m.saved_msrs.len());
    drop(m);

    let Some(mut m2) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    m2.restore_state(&snap).unwrap();
    let mut back = kvm_bindings::Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: 0x277,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: 0x4b56_4d01,
            ..Default::default()
        },
    ])
    .unwrap();
    assert_eq!(m2.vcpus.lock(0).get_msrs(&mut back).unwrap(), 2);
    assert_eq!(
        (back.as_slice()[0].data, back.as_slice()[1].data),
        (pat, kvmclock)
    );
    let pit2 = m2.vm.get_pit2().unwrap();
    assert_eq!((pit2.channels[0].count, pit2.channels[0].mode), (0x1234, 2));
    let again = crate::snapshot::VmState::decode(&m2.save_state().unwrap()).unwrap();
    for (a, b) in decoded.vcpus[0].msrs.iter().zip(&again.vcpus[0].msrs) {
        assert_eq!(a.index, b.index);
        if a.index != 0x10 && a.index != 0x3b {
            // Everything but the running TSC (and its adjust) comes back as it was.
            assert_eq!(a.data, b.data, "MSR {:#x}", a.index);
        }
    }
}

/// The guest's rbx, read while paused; the VM is resumed after.
fn rbx(vm: &VmHandle) -> u64 {
    vm.pause().unwrap();
    let r = vm.machine().unwrap().vcpus.lock(0).get_regs().unwrap().rbx;
    vm.resume();
    r
}

/// Whether the guest's rbx passes `from + n` within 5 s.
fn counts_past(vm: &VmHandle, from: u64, n: u64) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if rbx(vm) > from + n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_vm_held_by_the_proxy_does_not_run_until_it_is_let_go() {
    use std::io::Write;
    // xor ebx, ebx; loop: inc rbx; out 0x80, eax; jmp loop (an exit per turn)
    let mut code = vec![0x31, 0xdb, 0x48, 0xff, 0xc3];
    code.extend(out(0x80, 0));
    code.extend([0xeb, (-(3 + 10 + 2i8)) as u8]);
    let (ours, mut proxy) = std::os::unix::net::UnixStream::pair().unwrap();
    let net = NetBackend::socket(ours).unwrap();
    let Some(m) = machine_with_net(&code, ConsoleSink::Discard, net) else {
        return;
    };
    let pace = std::sync::Arc::clone(m.devices.net.device.pace());
    let vm = VmHandle::start(m, false).unwrap();
    let word = |w: [u8; 1]| [0, 0, 0, 1, w[0]];
    // Pacing off (the default): a hold is ignored.
    proxy
        .write_all(&word(colo_netcmp::framing::PACE_HOLD))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let a = rbx(&vm);
    assert!(counts_past(&vm, a, 100), "runs while pacing is off");
    // On: held (a pause and resume meanwhile do not let it go).
    vm.set_net_pacing(true);
    proxy
        .write_all(&word(colo_netcmp::framing::PACE_HOLD))
        .unwrap();
    let t = std::time::Instant::now();
    while !pace.held() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let a = rbx(&vm);
    std::thread::sleep(Duration::from_millis(30));
    let b = rbx(&vm);
    // Free, it turns thousands of times in 30 ms; held, once per 100 ms wait at most.
    assert!(b < a + 20, "held: rbx moved from {a} to {b}");
    // Let go.
    proxy
        .write_all(&word(colo_netcmp::framing::PACE_GO))
        .unwrap();
    assert!(counts_past(&vm, b, 100), "runs again");
    // Held again, then pacing turned off (failover): it runs again (within one 100 ms
    // wait even without the wake-up that turning it off sends).
    proxy
        .write_all(&word(colo_netcmp::framing::PACE_HOLD))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let c = rbx(&vm);
    vm.set_net_pacing(false);
    assert!(counts_past(&vm, c, 100), "let go when pacing is turned off");
    vm.pause().unwrap();
    let holds = vm.machine().unwrap().devices.net.device.stats.holds;
    assert!(holds >= 2, "{holds} holds counted");
    vm.stop().unwrap();
}

#[test]
fn corrupt_snapshots_are_refused_before_anything_is_applied() {
    let Some(m) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    let good = m.save_state().unwrap();
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..10].to_vec(), "shorter than"),
        (good[..good.len() - 1].to_vec(), "does not match"),
    ];
    let mut v = good.clone();
    v[0] ^= 1;
    cases.push((v, "bad magic"));
    let mut v = good.clone();
    v[8] = 9;
    cases.push((v, "version 9"));
    let mut v = good.clone();
    let last = v.len() - 1;
    v[last] ^= 0x55;
    cases.push((v, "checksum"));
    let mut m = m;
    let regs = m.vcpus.lock(0).get_regs().unwrap();
    for (bytes, want) in cases {
        let e = m.restore_state(&bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should say {want:?}");
    }
    assert_eq!(m.vcpus.lock(0).get_regs().unwrap(), regs);
}

#[test]
fn bad_disk_images_are_refused_before_the_vm_starts() {
    let cfg = |disk: std::path::PathBuf| VmConfig {
        name: "t".into(),
        ram: 32 << 20,
        vcpus: 1,
        guest: Guest::BuiltIn(BuiltInGuest {
            image: tiny_pvh(&counter(), None),
            ip: ([10, 0, 0, 2], 24),
            port: 7000,
            nondeterministic: false,
            dirty_pages_per_sec: 0,
            dirty_pattern: crate::DirtyPattern::Sweep,
        }),
        disk,
        disk_backend: None,
        net: NetBackend::none(),
        mac: [2, 0, 0, 0, 0, 1],
        console: ConsoleSink::Discard,
    };
    let missing = std::env::temp_dir().join("colo-no-such-disk.img");
    let e = Machine::new(cfg(missing)).unwrap_err().to_string();
    assert!(e.contains("cannot open"), "{e}");
    let odd = std::env::temp_dir().join(format!("colo-odd-{}.img", std::process::id()));
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    let e = Machine::new(cfg(odd.clone())).unwrap_err().to_string();
    std::fs::remove_file(&odd).unwrap();
    assert!(e.contains("not a non-zero multiple of 512"), "{e}");
    let mut c = cfg(std::env::temp_dir());
    if let Guest::BuiltIn(g) = &mut c.guest {
        g.image = b"not an elf at all, not at all........................................".to_vec();
    }
    assert!(matches!(
        Machine::new(c),
        Err(Error::Disk { .. } | Error::GuestImage(_))
    ));
}

/// A tiny smoltcp client for tests: one connection, line requests.
pub(crate) mod tcp_client {
    use std::time::{Duration, Instant};

    use crossbeam_channel::Receiver;
    use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
    use smoltcp::socket::tcp;
    use smoltcp::time::Instant as SInstant;
    use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

    use crate::peer::{FrameOut, PeerDevice};

    pub struct Client {
        dev: PeerDevice,
        iface: Interface,
        sockets: SocketSet<'static>,
        h: SocketHandle,
        start: Instant,
        buf: Vec<u8>,
    }

    impl Client {
        pub fn new(tx: FrameOut, rx: Receiver<Vec<u8>>) -> Self {
            let mut dev = PeerDevice::new(tx, rx);
            let start = Instant::now();
            let mac = EthernetAddress([0x52, 0x54, 0, 0, 0, 0x99]);
            let mut iface =
                Interface::new(Config::new(mac.into()), &mut dev, SInstant::from_millis(0));
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(
                    IpAddress::Ipv4(Ipv4Address::new(10, 0, 0, 9)),
                    24,
                ));
            });
            let mut sockets = SocketSet::new(vec![]);
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 8192]),
                tcp::SocketBuffer::new(vec![0; 8192]),
            );
            s.set_ack_delay(None);
            let h = sockets.add(s);
            let mut c = Self {
                dev,
                iface,
                sockets,
                h,
                start,
                buf: Vec::new(),
            };
            let remote = (IpAddress::Ipv4(Ipv4Address::new(10, 0, 0, 2)), 7000);
            c.sockets
                .get_mut::<tcp::Socket<'_>>(h)
                .connect(c.iface.context(), remote, 50000)
                .unwrap();
            c
        }

        fn poll(&mut self) {
            let now = SInstant::from_micros(self.start.elapsed().as_micros() as i64);
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            self.dev.wait(Duration::from_millis(1));
        }

        /// The same connection over other frame channels.
        pub fn rebind(mut self, tx: FrameOut, rx: Receiver<Vec<u8>>) -> Self {
            self.dev.rebind(tx, rx);
            self
        }

        /// Sends one line and returns the reply line.
        pub fn request(&mut self, line: &str) -> String {
            self.send(line);
            self.reply(line)
        }

        /// Sends one line (once the connection is up; the frames leave with later polls).
        pub fn send(&mut self, line: &str) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "cannot send {line:?}");
                self.poll();
                let s = self.sockets.get_mut::<tcp::Socket<'_>>(self.h);
                if s.may_send() {
                    s.send_slice(format!("{line}\n").as_bytes()).unwrap();
                    self.poll();
                    return;
                }
            }
        }

        /// Waits for the next reply line (to `what`).
        pub fn reply(&mut self, what: &str) -> String {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "no reply to {what:?}");
                self.poll();
                let s = self.sockets.get_mut::<tcp::Socket<'_>>(self.h);
                while s.can_recv() {
                    let buf = &mut self.buf;
                    s.recv(|b| {
                        buf.extend_from_slice(b);
                        (b.len(), ())
                    })
                    .unwrap();
                }
                if let Some(p) = self.buf.iter().position(|&b| b == b'\n') {
                    let l: Vec<u8> = self.buf.drain(..=p).collect();
                    return String::from_utf8_lossy(&l).trim().to_string();
                }
            }
        }
    }
}

fn guest_machine(name: &str, net: NetBackend, disk: &std::path::Path) -> Option<Machine> {
    guest_machine_on(name, net, disk, None)
}

fn guest_machine_on(
    name: &str,
    net: NetBackend,
    disk: &std::path::Path,
    disk_backend: Option<std::sync::Arc<dyn colo_blk::BlockBackend>>,
) -> Option<Machine> {
    guest_machine_with(name, net, disk, disk_backend, 1)
}

/// The built-in guest on `vcpus` vCPUs, or None (with a line saying why) without KVM.
pub(crate) fn guest_machine_with(
    name: &str,
    net: NetBackend,
    disk: &std::path::Path,
    disk_backend: Option<std::sync::Arc<dyn colo_blk::BlockBackend>>,
    vcpus: u32,
) -> Option<Machine> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return None;
    }
    Some(
        Machine::new(VmConfig {
            name: name.into(),
            ram: 64 << 20,
            vcpus,
            guest: Guest::BuiltIn(BuiltInGuest {
                image: crate::guest_image::GUEST_ELF.to_vec(),
                ip: ([10, 0, 0, 2], 24),
                port: 7000,
                nondeterministic: false,
                dirty_pages_per_sec: 0,
                dirty_pattern: crate::DirtyPattern::Sweep,
            }),
            disk: disk.to_path_buf(),
            disk_backend,
            net,
            mac: [0x52, 0x54, 10, 0, 0, 2],
            console: ConsoleSink::Discard,
        })
        .unwrap(),
    )
}

/// A new scratch directory named after `tag` with an empty 1 MiB disk image `1.img`, and
/// the path `2.img` beside it for a copy.
pub(crate) fn scratch_disks(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (d1, d2) = (dir.join("1.img"), dir.join("2.img"));
    std::fs::write(&d1, vec![0u8; 1 << 20]).unwrap();
    (dir, d1, d2)
}

/// Pauses `vm` (the built-in guest on the disk `disk`, 64 MiB of RAM) and restores it into
/// a new VM of `vcpus` vCPUs on a copy of the disk at `copy`: its RAM, its state and its
/// disk, the three parts of a checkpoint. The new VM is not started; `vm` stays paused.
pub(crate) fn checkpoint_into_new_vm(
    vm: &VmHandle,
    disk: &std::path::Path,
    copy: &std::path::Path,
    vcpus: u32,
) -> (Machine, ChannelPeer) {
    vm.pause().unwrap();
    let (state, ram) = {
        let m = vm.machine().unwrap();
        let mut ram = vec![0u8; 64 << 20];
        m.read_ram(0, &mut ram).unwrap();
        (m.save_state().unwrap(), ram)
    };
    std::fs::copy(disk, copy).unwrap();
    let (net, peer) = NetBackend::channel();
    let mut m = guest_machine_with("two", net, copy, None, vcpus).unwrap();
    m.write_ram(0, &ram).unwrap();
    m.restore_state(&state).unwrap();
    (m, peer)
}

/// A client's frame output into a channel-backed VM.
pub(crate) fn frames_to(peer: &ChannelPeer) -> FrameOut {
    let to = peer.to_guest.clone();
    Box::new(move |f| {
        let _ = to.send(f);
    })
}

/// TCP payload bytes of a frame from the guest, if it carries any.
/// The TCP byte stream the frames carry (one connection), by sequence number: what
/// retransmissions repeat counts once; the contiguous part from the lowest sequence
/// number seen.
fn tcp_stream(frames: &[Vec<u8>]) -> Vec<u8> {
    let segs: Vec<(u32, Vec<u8>)> = frames
        .iter()
        .filter_map(|f| match etherparse::SlicedPacket::from_ethernet(f) {
            Ok(etherparse::SlicedPacket {
                transport: Some(etherparse::TransportSlice::Tcp(t)),
                ..
            }) if !t.payload().is_empty() => Some((t.sequence_number(), t.payload().to_vec())),
            _ => None,
        })
        .collect();
    let Some(first) = segs.first().map(|s| s.0) else {
        return Vec::new();
    };
    let base = segs
        .iter()
        .map(|(q, _)| q.wrapping_sub(first) as i32)
        .min()
        .map_or(first, |d| first.wrapping_add(d as u32));
    let mut out: Vec<Option<u8>> = Vec::new();
    for (q, p) in &segs {
        let at = q.wrapping_sub(base) as usize;
        if out.len() < at + p.len() {
            out.resize(at + p.len(), None);
        }
        for (i, b) in p.iter().enumerate() {
            out[at + i] = Some(*b);
        }
    }
    out.iter().map_while(|b| *b).collect()
}

fn tcp_payload(frame: &[u8]) -> Vec<u8> {
    match etherparse::SlicedPacket::from_ethernet(frame) {
        Ok(p) => match p.transport {
            Some(etherparse::TransportSlice::Tcp(t)) => t.payload().to_vec(),
            _ => Vec::new(),
        },
        Err(_) => Vec::new(),
    }
}

/// The built-in guest, snapshotted while a client is connected, restored into a fresh
/// VM: both answer the next requests on that connection with the same bytes.
#[test]
fn a_snapshot_taken_mid_service_restores_into_a_vm_that_answers_identically() {
    let (dir, d1, d2) = scratch_disks("colo-snap-test");
    let (net1, peer1) = NetBackend::channel();
    let Some(m1) = guest_machine("one", net1, &d1) else {
        return;
    };
    let vm1 = VmHandle::start(m1, false).unwrap();
    let mut c = tcp_client::Client::new(frames_to(&peer1), peer1.from_guest.clone());
    assert_eq!(c.request("SET a 1"), "OK");
    assert_eq!(c.request("GET a"), "VALUE 1");

    let (m2, peer2) = checkpoint_into_new_vm(&vm1, &d1, &d2, 1);
    let vm2 = VmHandle::start(m2, false).unwrap();
    vm1.resume();

    // From now on every client frame goes to both VMs; the client hears VM one.
    let (rx1_tap_tx, rx1_tap) = crossbeam_channel::unbounded::<Vec<u8>>();
    let (to1, to2) = (peer1.to_guest.clone(), peer2.to_guest.clone());
    let from1 = peer1.from_guest.clone();
    std::thread::spawn(move || {
        while let Ok(f) = from1.recv_timeout(Duration::from_secs(30)) {
            if rx1_tap_tx.send(f).is_err() {
                return;
            }
        }
    });
    let (seen1_tx, seen1) = crossbeam_channel::unbounded::<Vec<u8>>();
    let (client_rx_tx, client_rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    std::thread::spawn(move || {
        while let Ok(f) = rx1_tap.recv_timeout(Duration::from_secs(30)) {
            let _ = seen1_tx.send(f.clone());
            if client_rx_tx.send(f).is_err() {
                return;
            }
        }
    });
    let out: FrameOut = Box::new(move |f| {
        let _ = to2.send(f.clone());
        let _ = to1.send(f);
    });
    let mut c = c.rebind(out, client_rx);
    let replies: Vec<String> = ["GET a", "SET b 2", "GET b", "COUNT", "PING"]
        .iter()
        .map(|r| c.request(r))
        .collect();
    assert_eq!(replies, ["VALUE 1", "OK", "VALUE 2", "COUNT 2", "PONG"]);
    std::thread::sleep(Duration::from_millis(200));
    let one = tcp_stream(&seen1.try_iter().collect::<Vec<_>>());
    // VM two runs behind VM one (on a busy machine its disk flushes alone can take
    // hundreds of milliseconds): wait, bounded, until its byte stream is as long. This
    // plain mirror has no proxy: when the client's ACK of VM one's reply reaches VM two
    // before VM two sent those bytes, VM two drops that segment (an ACK of unsent data)
    // and with it the request it carries, so on a loaded machine it may stop short (seen
    // under load, 1 run in 3). What it does say must be VM one's bytes, from the first
    // reply after the restore on.
    let mut frames2 = Vec::new();
    let t = std::time::Instant::now();
    while tcp_stream(&frames2).len() < one.len() && t.elapsed() < Duration::from_secs(10) {
        if let Ok(f) = peer2.from_guest.recv_timeout(Duration::from_millis(100)) {
            frames2.push(f);
        }
    }
    let two = tcp_stream(&frames2);
    assert!(
        one.starts_with(b"VALUE 1\n"),
        "{:?}",
        String::from_utf8_lossy(&one)
    );
    assert!(
        two.starts_with(b"VALUE 1\n") && one.starts_with(&two),
        "the restored VM answers with VM one's bytes: {:?} against {:?}",
        String::from_utf8_lossy(&two),
        String::from_utf8_lossy(&one)
    );
    vm1.stop().unwrap();
    vm2.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A disk whose flushes wait while the gate is closed, and say when one started.
struct GatedDisk {
    disk: colo_blk::PlainDisk,
    closed: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
    flushing: crossbeam_channel::Sender<()>,
}

impl GatedDisk {
    fn set_closed(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.cv.notify_all();
    }
}

impl colo_blk::BlockBackend for GatedDisk {
    fn len(&self) -> u64 {
        self.disk.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> colo_blk::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> colo_blk::Result<()> {
        self.disk.write_at(offset, data)
    }
    fn flush(&self) -> colo_blk::Result<()> {
        let _ = self.flushing.try_send(());
        let closed = self.closed.lock().unwrap();
        let _unused = self
            .cv
            .wait_timeout_while(closed, Duration::from_secs(20), |c| *c)
            .unwrap();
        self.disk.flush()
    }
}

/// A checkpoint does not wait for a guest disk flush in progress: the VM pauses while the
/// flush is stuck, its snapshot holds the request as not yet taken, a VM restored from it
/// runs the request again and answers the SET it belongs to, and the first VM completes
/// its own once the flush ends.
#[test]
fn a_pause_does_not_wait_for_a_disk_flush_and_the_snapshot_runs_it_again() {
    let (dir, d1, d2) = scratch_disks("colo-inflight-test");
    let (flushing, flush_started) = crossbeam_channel::bounded(1);
    let gated = std::sync::Arc::new(GatedDisk {
        disk: colo_blk::PlainDisk::new(colo_blk::Disk::open(&d1).unwrap()),
        closed: std::sync::Mutex::new(false),
        cv: std::sync::Condvar::new(),
        flushing,
    });
    let (net1, peer1) = NetBackend::channel();
    let Some(m1) = guest_machine_on("one", net1, &d1, Some(gated.clone())) else {
        return;
    };
    let vm1 = VmHandle::start(m1, false).unwrap();
    let mut c = tcp_client::Client::new(frames_to(&peer1), peer1.from_guest.clone());
    assert_eq!(c.request("SET a 1"), "OK");

    // The next SET's flush sticks.
    while flush_started.try_recv().is_ok() {}
    gated.set_closed(true);
    c.send("SET b 2");
    flush_started
        .recv_timeout(Duration::from_secs(10))
        .expect("the guest flushes for its SET");
    let t = std::time::Instant::now();
    vm1.pause().unwrap();
    let paused_in = t.elapsed();
    let (state, ram) = {
        let m = vm1.machine().unwrap();
        assert_eq!(
            m.devices.blk.device.in_flight(),
            1,
            "the flush is in flight"
        );
        let mut ram = vec![0u8; 64 << 20];
        m.read_ram(0, &mut ram).unwrap();
        (m.save_state().unwrap(), ram)
    };
    assert!(
        paused_in < Duration::from_secs(2),
        "the pause took {paused_in:?}: it waited for the flush"
    );
    std::fs::copy(&d1, &d2).unwrap();

    // The restored VM runs the flush again and answers the SET; the client moves to it.
    let (net2, peer2) = NetBackend::channel();
    let mut m2 = guest_machine("two", net2, &d2).unwrap();
    m2.write_ram(0, &ram).unwrap();
    m2.restore_state(&state).unwrap();
    let vm2 = VmHandle::start(m2, false).unwrap();
    let mut c = c.rebind(frames_to(&peer2), peer2.from_guest.clone());
    assert_eq!(c.reply("SET b 2, from the restored VM"), "OK");
    assert_eq!(c.request("GET b"), "VALUE 2");
    assert_eq!(c.request("COUNT"), "COUNT 2");

    // The first VM, resumed, completes its flush once it ends and answers too.
    vm1.resume();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!vm1.finished());
    gated.set_closed(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut heard = Vec::new();
    while !String::from_utf8_lossy(&heard).contains("OK\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "the first VM never answered the SET: {:?}",
            String::from_utf8_lossy(&heard)
        );
        if let Ok(f) = peer1.from_guest.recv_timeout(Duration::from_millis(100)) {
            heard.extend(tcp_payload(&f));
        }
    }
    vm1.stop().unwrap();
    vm2.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
