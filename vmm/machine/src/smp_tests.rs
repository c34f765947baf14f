//! Machine tests with several vCPUs: the other vCPUs start only at the guest's INIT/SIPI,
//! a pause stops every vCPU, a snapshot holds every vCPU's state and restores each into a
//! VM of the same vCPU count (and is refused by another), a guest exit on any vCPU stops
//! the VM, and the built-in guest's workers count on across a snapshot.

use std::time::{Duration, Instant};

use super::devices::backend::NetBackend;
use super::devices::console::ConsoleSink;
use super::runner::VmHandle;
use super::tests::{
    checkpoint_into_new_vm, counter, frames_to, guest_machine_with, machine_on, scratch_disks,
    start_aps, tcp_client, tiny_pvh,
};
use super::{Error, Machine};

/// Real-mode code for the other vCPUs: rsi = 1 (the index of the only other vCPU these
/// tests have), then count in rbx.
fn ap_counter() -> Vec<u8> {
    // mov esi, 1; xor ebx, ebx; loop: inc ebx; jmp loop
    vec![
        0x66, 0xbe, 0x01, 0x00, 0x00, 0x00, 0x66, 0x31, 0xdb, 0x66, 0x43, 0xeb, 0xfc,
    ]
}

/// A tiny guest with `vcpus` vCPUs (1 or 2), each counting in its rbx with its index in
/// rsi: vCPU 0 starts the other.
fn counting(vcpus: u32) -> Option<Machine> {
    let mut code = start_aps();
    code.extend(counter());
    let image = tiny_pvh(&code, Some(&ap_counter()));
    machine_on(&image, ConsoleSink::Discard, NetBackend::none(), vcpus)
}

/// Every vCPU's (rbx, rsi), read while paused; the VM is resumed after.
fn regs(vm: &VmHandle) -> Vec<(u64, u64)> {
    vm.pause().unwrap();
    let r = read_regs(&vm.machine().unwrap());
    vm.resume();
    r
}

fn read_regs(m: &Machine) -> Vec<(u64, u64)> {
    (0..m.vcpu_count())
        .map(|i| {
            let r = m.vcpus.lock(i).get_regs().unwrap();
            (r.rbx, r.rsi)
        })
        .collect()
}

/// Whether every vCPU's rbx passes its value in `from` within 5 s.
fn all_count_past(vm: &VmHandle, from: &[(u64, u64)]) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if regs(vm).iter().zip(from).all(|(now, then)| now.0 > then.0) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_pause_stops_every_vcpu_and_reports_each_stop() {
    let Some(m) = counting(2) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    assert_eq!(vm.vcpu_count(), 2);
    assert!(all_count_past(&vm, &[(0, 0), (0, 0)]), "both vCPUs run");
    for _ in 0..20 {
        let report = vm.pause().unwrap();
        assert_eq!(report.stops().len(), 2);
        assert!(report.stops().iter().all(|&s| s <= report.slowest()));
        let before = read_regs(&vm.machine().unwrap());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            read_regs(&vm.machine().unwrap()),
            before,
            "no vCPU moves while paused"
        );
        assert_eq!(before.iter().map(|r| r.1).collect::<Vec<_>>(), [0, 1]);
        vm.resume();
    }
    vm.stop().unwrap();
}

#[test]
fn a_two_vcpu_snapshot_restores_every_vcpu_where_it_stopped() {
    let Some(m) = counting(2) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    assert!(all_count_past(&vm, &[(0, 0), (0, 0)]), "both vCPUs run");
    vm.pause().unwrap();
    let (snap, saved) = {
        let m = vm.machine().unwrap();
        (m.save_state().unwrap(), read_regs(&m))
    };
    vm.resume();
    assert!(all_count_past(&vm, &saved), "resumed");
    vm.stop().unwrap();

    let Some(mut m2) = counting(2) else {
        return;
    };
    m2.restore_state(&snap).unwrap();
    assert_eq!(read_regs(&m2), saved, "each vCPU holds its own saved state");
    let vm2 = VmHandle::start(m2, false).unwrap();
    assert!(
        all_count_past(&vm2, &saved),
        "every vCPU of the restored VM counts on from its own state"
    );
    vm2.stop().unwrap();
}

#[test]
fn a_snapshot_is_refused_by_a_vm_with_another_vcpu_count() {
    let (Some(two), Some(mut one)) = (counting(2), counting(1)) else {
        return;
    };
    let before = read_regs(&one);
    match one.restore_state(&two.save_state().unwrap()) {
        Err(Error::Snapshot(why)) => assert!(why.contains("holds 2 vCPUs"), "{why}"),
        other => panic!("expected a snapshot error, got {other:?}"),
    }
    assert_eq!(read_regs(&one), before, "nothing was applied");
    let mut two = two;
    match two.restore_state(&one.save_state().unwrap()) {
        Err(Error::Snapshot(why)) => assert!(why.contains("this VM has 2"), "{why}"),
        other => panic!("expected a snapshot error, got {other:?}"),
    }
}

#[test]
fn a_vcpu_count_out_of_range_is_refused() {
    for n in [0, 9] {
        let e = super::check_vcpus(n).unwrap_err().to_string();
        assert!(e.contains(&format!("{n} vCPUs: a VM has 1 to 8")), "{e}");
    }
    for n in [1, 8] {
        super::check_vcpus(n).unwrap();
    }
}

#[test]
fn an_exit_on_any_vcpu_stops_the_vm() {
    // vCPU 0 starts vCPU 1 and spins; vCPU 1 exits with status 3: in real mode,
    // mov eax, 3; mov dx, PORT_EXIT; out dx, eax.
    let mut code = start_aps();
    code.extend([0xeb, 0xfe]);
    let mut ap = vec![0x66, 0xb8, 0x03, 0x00, 0x00, 0x00, 0xba];
    ap.extend(super::abi::PORT_EXIT.to_le_bytes());
    ap.extend([0x66, 0xef]);
    let image = tiny_pvh(&code, Some(&ap));
    let Some(m) = machine_on(&image, ConsoleSink::Discard, NetBackend::none(), 2) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    let t = Instant::now();
    while !vm.finished() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "vCPU 0 spins on after vCPU 1 exited"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = vm.wait().unwrap_err().to_string();
    assert!(e.contains("status 3") && e.contains("vCPU 1"), "{e}");
}

/// The built-in guest on two vCPUs: its worker counts (`VCPUS`), and a VM restored from a
/// snapshot counts on from the saved counter.
#[test]
fn the_built_in_guest_worker_counts_on_from_a_snapshot() {
    let (dir, d1, d2) = scratch_disks("colo-smp-test");
    let (net1, peer1) = NetBackend::channel();
    let Some(m1) = guest_machine_with("one", net1, &d1, None, 2) else {
        return;
    };
    let vm1 = VmHandle::start(m1, false).unwrap();
    let mut c = tcp_client::Client::new(frames_to(&peer1), peer1.from_guest.clone());
    let turns = |c: &mut tcp_client::Client| -> u64 {
        let r = c.request("VCPUS");
        let f: Vec<&str> = r.split(' ').collect();
        assert_eq!(f[..2], ["VCPUS", "2"], "{r}");
        assert_eq!(f.len(), 3, "{r}");
        f[2].parse().unwrap()
    };
    let first = turns(&mut c);
    let t = Instant::now();
    let mut seen = first;
    while seen <= first {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the worker never counted"
        );
        std::thread::sleep(Duration::from_millis(20));
        seen = turns(&mut c);
    }

    let (m2, peer2) = checkpoint_into_new_vm(&vm1, &d1, &d2, 2);
    vm1.stop().unwrap();
    let vm2 = VmHandle::start(m2, false).unwrap();
    let mut c = c.rebind(frames_to(&peer2), peer2.from_guest.clone());
    let after = turns(&mut c);
    assert!(after >= seen, "the counter went back: {seen} then {after}");
    let t = Instant::now();
    while turns(&mut c) <= after {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the restored worker never counted on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    vm2.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// vCPU 1 stays uninitialized (KVM holds it in KVM_RUN) until the guest sends INIT/SIPI:
/// a guest that never does runs on vCPU 0 alone, and its trampoline code never runs.
#[test]
fn the_other_vcpus_wait_for_the_guests_init_and_sipi() {
    // vCPU 0 counts and never starts vCPU 1, whose code would stop the VM at once.
    let mut ap = vec![0x66, 0xb8, 0x03, 0x00, 0x00, 0x00, 0xba];
    ap.extend(super::abi::PORT_EXIT.to_le_bytes());
    ap.extend([0x66, 0xef]);
    let image = tiny_pvh(&counter(), Some(&ap));
    let Some(m) = machine_on(&image, ConsoleSink::Discard, NetBackend::none(), 2) else {
        return;
    };
    let vm = VmHandle::start(m, false).unwrap();
    assert!(all_count_past(&vm, &[(0, 0)]), "vCPU 0 runs");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!vm.finished(), "vCPU 1 ran without a SIPI");
    vm.pause().unwrap();
    let state = vm.machine().unwrap().vcpus.lock(1).get_mp_state().unwrap();
    assert_eq!(state.mp_state, kvm_bindings::KVM_MP_STATE_UNINITIALIZED);
    vm.resume();
    vm.stop().unwrap();
}
