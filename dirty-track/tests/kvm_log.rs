//! Dirty tracking against a real KVM guest. The guest runs in real mode, so there are no
//! page tables: the collected set must be exactly the pages its code writes, plus the pages
//! the VMM writes through guest memory (which mark themselves).

use colo_dirty_track::{Collection, DirtyTracker, HotPolicy, enable_manual_protect};
use colo_memory::{GuestMemory, PageBitmap};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;

/// Real-mode code at 0x1000. Phase 1 writes pages 0x10, 0x20, 0x21, 0x7f (slot 0) and
/// 0x100, 0x101 (slot 1), then halts; phase 2 writes 0x10 again and 0x30, then halts.
const CODE: &[u8] = &[
    0xB8, 0x00, 0x10, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x01, // ds=0x1000; [0x10000]=1
    0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x01, // ds=0x2000; [0x20000]=1
    0xC6, 0x06, 0x00, 0x10, 0x01, // [0x21000]=1
    0xB8, 0x00, 0x70, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0xF0, 0x01, // ds=0x7000; [0x7f000]=1
    0xB8, 0xFF, 0xFF, 0x8E, 0xD8, 0xC6, 0x06, 0x10, 0x00, 0x01, // ds=0xffff; [0x100000]=1
    0xC6, 0x06, 0x10, 0x10, 0x01, // [0x101000]=1
    0xF4, // hlt
    0xB8, 0x00, 0x10, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x02, // [0x10000]=2
    0xB8, 0x00, 0x30, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x02, // [0x30000]=2
    0xF4, // hlt
];

struct Guest {
    mem: GuestMemory,
    vm: VmFd,
    vcpu: VcpuFd,
    tracker: DirtyTracker,
}

fn guest(manual: bool) -> Option<Guest> {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("skipped: /dev/kvm is not available on this machine");
        return None;
    };
    let vm = kvm.create_vm().unwrap();
    let manual = manual && enable_manual_protect(&vm).unwrap();
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), MIB as usize),
        (GuestAddress(MIB), MIB as usize),
    ])
    .unwrap();
    mem.write_slice(CODE, GuestAddress(0x1000)).unwrap();
    let tracker = DirtyTracker::new(mem.clone(), manual).unwrap();
    for (r, m) in tracker.layout().regions().iter().zip(mem.iter()) {
        let region = kvm_userspace_memory_region {
            slot: r.slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: r.gpa,
            memory_size: r.len,
            userspace_addr: m.as_ptr() as u64,
        };
        // SAFETY: the host range is one region of `mem`, which the Guest keeps mapped for
        // as long as the VM exists.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    vm.set_tss_address(0xfffb_d000).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    Some(Guest {
        mem,
        vm,
        vcpu,
        tracker,
    })
}

fn run_to_halt(vcpu: &mut VcpuFd) {
    // The guest code only writes memory and halts, so the first exit must be the halt.
    match vcpu.run().unwrap() {
        VcpuExit::Hlt => {}
        other => panic!("unexpected exit {other:?}"),
    }
}

fn collect(g: &Guest) -> Vec<u64> {
    collect_for(g, Collection::Checkpoint)
}

fn collect_for(g: &Guest, kind: Collection) -> Vec<u64> {
    let mut b = PageBitmap::new(g.tracker.layout().pages());
    g.tracker.collect_for(&g.vm, &mut b, kind).unwrap();
    (0..b.pages()).filter(|&p| b.test(p)).collect()
}

/// Where phase 2 of [`CODE`] starts (after the first `hlt`).
const PHASE_2: u64 = 0x1000 + 51;

/// Runs phase 2 of [`CODE`] again (it writes pages 0x10 and 0x30).
fn rerun_phase_2(g: &mut Guest) {
    let mut regs = g.vcpu.get_regs().unwrap();
    regs.rip = PHASE_2;
    g.vcpu.set_regs(&regs).unwrap();
    run_to_halt(&mut g.vcpu);
}

fn exact_pages(manual: bool) {
    let Some(mut g) = guest(manual) else { return };
    assert_eq!(
        g.tracker.manual_protect(),
        manual,
        "manual protection is expected on these hosts"
    );
    assert!(collect(&g).is_empty(), "a fresh slot has a clean log");
    run_to_halt(&mut g.vcpu);
    // Flat pages: slot 1 starts at flat page 256.
    assert_eq!(collect(&g), vec![0x10, 0x20, 0x21, 0x7f, 256, 257]);
    assert!(collect(&g).is_empty(), "collection resets the log");
    // Device writes by the VMM at gpa 0x50ffc (crossing into flat page 0x51) and in slot 1
    // join the set by themselves: guest memory marks what is written through it.
    g.mem.write_slice(&[7; 8], GuestAddress(0x50ffc)).unwrap();
    g.mem.write_obj(9u32, GuestAddress(MIB + 0x3000)).unwrap();
    assert_eq!(collect(&g), vec![0x50, 0x51, 256 + 3]);
    // Pages are protected again after a collection: a second write is logged again.
    run_to_halt(&mut g.vcpu);
    assert_eq!(collect(&g), vec![0x10, 0x30]);
}

#[test]
fn exact_pages_with_manual_protect_and_clear() {
    exact_pages(true);
}

#[test]
fn exact_pages_with_the_classic_log() {
    exact_pages(false);
}

/// KVM's behaviour the hot-page policy builds on, on this host: a page whose bit is not
/// cleared keeps being reported dirty (so it cannot be missed). The policy keeps a page
/// dirty in two epochs in a row, leaves it out of background rounds and puts it in every
/// checkpoint, until it is turned off.
#[test]
fn a_kept_hot_page_is_in_every_checkpoint_until_released() {
    let Some(mut g) = guest(true) else { return };
    assert!(g.tracker.set_hot_policy(Some(HotPolicy {
        after: 2,
        budget_pages: 100,
        lease: 100,
    })));
    run_to_halt(&mut g.vcpu);
    assert_eq!(collect(&g), vec![0x10, 0x20, 0x21, 0x7f, 256, 257]);
    // Page 0x10 is dirty in a second epoch in a row: kept (its bit left set).
    run_to_halt(&mut g.vcpu);
    assert_eq!(collect(&g), vec![0x10, 0x30]);
    assert_eq!(g.tracker.kept_pages(), 1);
    // A background round leaves it out; with no write since, every checkpoint still has
    // it: its bit was never cleared.
    assert!(collect_for(&g, Collection::Background).is_empty());
    assert_eq!(collect(&g), vec![0x10]);
    assert_eq!(collect(&g), vec![0x10]);
    // Written again with 0x30 (cleared at each collection, so not kept).
    rerun_phase_2(&mut g);
    assert_eq!(collect_for(&g, Collection::Background), vec![0x30]);
    assert_eq!(collect(&g), vec![0x10]);
    let mut b = PageBitmap::new(g.tracker.layout().pages());
    b.set(0x10);
    b.set(0x11);
    g.tracker.remove_kept(&mut b);
    assert_eq!((b.test(0x10), b.test(0x11)), (false, true));
    // Off: the next collection reports and clears it, the one after has nothing.
    assert!(!g.tracker.set_hot_policy(None));
    assert_eq!(collect(&g), vec![0x10]);
    assert!(collect(&g).is_empty());
}

#[test]
fn a_flush_clears_a_hot_page_and_the_checkpoint_has_it_only_if_written_again() {
    let Some(mut g) = guest(true) else { return };
    assert!(g.tracker.set_hot_policy(Some(HotPolicy {
        after: 2,
        budget_pages: 100,
        lease: 100,
    })));
    run_to_halt(&mut g.vcpu);
    collect(&g);
    run_to_halt(&mut g.vcpu);
    collect(&g);
    assert_eq!(g.tracker.kept_pages(), 1);
    // The flush reports the kept page and clears it in KVM: with no write since, the
    // checkpoint has nothing (it is write-protected again), but it stays hot.
    assert_eq!(collect_for(&g, Collection::Flush), vec![0x10]);
    assert!(collect(&g).is_empty());
    assert_eq!(g.tracker.kept_pages(), 1);
    // Written again: the checkpoint has it, and keeps it (its bit left set) without a
    // new qualifying epoch, so the next checkpoint has it with no write.
    rerun_phase_2(&mut g);
    assert_eq!(collect_for(&g, Collection::Flush), vec![0x10, 0x30]);
    rerun_phase_2(&mut g);
    assert_eq!(collect(&g), vec![0x10, 0x30]);
    assert_eq!(collect(&g), vec![0x10]);
}

#[test]
fn without_manual_protection_no_page_is_kept() {
    let Some(g) = guest(false) else { return };
    assert!(!g.tracker.set_hot_policy(Some(HotPolicy {
        after: 2,
        budget_pages: 100,
        lease: 100,
    })));
}
