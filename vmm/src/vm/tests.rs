//! Machine tests with tiny hand-assembled guests: long mode at CPL3, the console and exit
//! ports, a crash report, pause/resume, and a snapshot round trip.

use std::time::Duration;

use super::abi::IMAGE_GPA;
use super::devices::backend::NetBackend;
use super::devices::console::ConsoleSink;
use super::runner::VmHandle;
use super::{Error, GuestExit, Machine, VmConfig};

/// A minimal ELF executable with `code` at IMAGE_GPA (one RWX segment of 64 KiB).
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&IMAGE_GPA.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..];
    ph[..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&7u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[24..32].copy_from_slice(&IMAGE_GPA.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&0x10000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// `out dx, eax` with dx = port, eax = value.
fn out(port: u16, value: u32) -> Vec<u8> {
    let mut c = vec![0xb8];
    c.extend_from_slice(&value.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&port.to_le_bytes());
    c.push(0xef);
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
        image: tiny_elf(code),
        disk: disk.clone(),
        net: NetBackend::none(),
        mac: [2, 0, 0, 0, 0, 1],
        ip: ([10, 0, 0, 2], 24),
        port: 7000,
        nondeterministic: false,
        dirty_pages_per_sec: 0,
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
fn a_cpl3_guest_prints_and_exits() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut code = print(b"hello from CPL3\n");
    code.extend(out(super::abi::PORT_EXIT, 0));
    let Some(m) = machine(&code, ConsoleSink::Channel(tx)) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    assert_eq!(vm.wait().unwrap(), GuestExit::Status(0));
    assert_eq!(rx.try_recv().unwrap(), "hello from CPL3");
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

/// A counting loop: rbx counts up forever; `jmp` back.
fn counter() -> Vec<u8> {
    // xor ebx, ebx; loop: inc rbx; jmp loop
    vec![0x31, 0xdb, 0x48, 0xff, 0xc3, 0xeb, 0xfb]
}

#[test]
fn pause_resume_and_snapshot_round_trip() {
    let Some(m) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    let (snap, rbx1) = {
        let m = vm.machine().unwrap();
        (m.save_state().unwrap(), m.vcpu.get_regs().unwrap().rbx)
    };
    assert!(rbx1 > 0, "the guest ran");
    // Paused means paused: the counter does not move.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(vm.machine().unwrap().vcpu.get_regs().unwrap().rbx, rbx1);
    vm.resume();
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    assert!(
        vm.machine().unwrap().vcpu.get_regs().unwrap().rbx > rbx1,
        "resumed"
    );
    vm.stop().unwrap();

    // Restore into a second VM: it continues from the saved counter.
    let Some(mut m2) = machine(&counter(), ConsoleSink::Discard) else {
        return;
    };
    m2.restore_state(&snap).unwrap();
    assert_eq!(m2.vcpu.get_regs().unwrap().rbx, rbx1);
    assert_eq!(m2.save_state().unwrap().len(), snap.len());
    let vm2 = VmHandle::start(m2, false).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    vm2.pause().unwrap();
    assert!(vm2.machine().unwrap().vcpu.get_regs().unwrap().rbx > rbx1);
    vm2.stop().unwrap();
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
    let regs = m.vcpu.get_regs().unwrap();
    for (bytes, want) in cases {
        let e = m.restore_state(&bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should say {want:?}");
    }
    assert_eq!(m.vcpu.get_regs().unwrap(), regs);
}

#[test]
fn bad_disk_images_are_refused_before_the_vm_starts() {
    let cfg = |disk: std::path::PathBuf| VmConfig {
        name: "t".into(),
        ram: 32 << 20,
        image: tiny_elf(&counter()),
        disk,
        net: NetBackend::none(),
        mac: [2, 0, 0, 0, 0, 1],
        ip: ([10, 0, 0, 2], 24),
        port: 7000,
        nondeterministic: false,
        dirty_pages_per_sec: 0,
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
    c.image = b"not an elf at all, not at all........................................".to_vec();
    assert!(matches!(
        Machine::new(c),
        Err(Error::Disk { .. } | Error::Image(_))
    ));
}
