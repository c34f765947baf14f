//! The virtio devices in a running VM: a QueueNotify write completes inside KVM (an
//! ioeventfd) and the device thread serves it; a used buffer sets InterruptStatus and
//! reaches the in-kernel irqchip through the irqfd; a paused VM's device thread writes no
//! guest memory; the serial port and a frame waiting for the guest travel in the snapshot.
//!
//! The guests are a few hand-assembled instructions; the test plays the driver's part of
//! the set-up (registers through the MMIO handler, queues in guest RAM), as Linux's
//! virtio-mmio driver would before it notifies.

use std::time::{Duration, Instant};

use colo_memory::{GuestMemory, PageBitmap};
use kvm_bindings::{KVM_IRQCHIP_PIC_MASTER, kvm_irqchip};
use kvm_ioctls::VcpuExit;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::backend::NetBackend;
use super::console::ConsoleSink;
use super::{BLK_GSI, NET_GSI};
use crate::Machine;
use crate::abi::{BLK_MMIO_GPA, NET_MMIO_GPA, PORT_EXIT};
use crate::runner::VmHandle;
use crate::tests::{counter, machine_on, out, tiny_pvh};

const WRITE: u16 = 2;
const NEXT: u16 = 1;
const QSIZE: u16 = 16;
/// Where the test's queues and buffers live in guest RAM (clear of the tiny guest's image
/// at 2 MiB).
const NET_RX_Q: u64 = 0x40_0000;
const NET_TX_Q: u64 = 0x41_0000;
const BLK_Q: u64 = 0x42_0000;
const TX_BUF: u64 = 0x48_0000;
const RX_BUF: u64 = 0x49_0000;
const BLK_HDR: u64 = 0x4a_0000;
const BLK_DATA: u64 = 0x4a_1000;
const BLK_STATUS: u64 = 0x4a_2000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// `mov dword [gpa], value`: a 32-bit MMIO write.
fn mmio_write32(gpa: u64, value: u32) -> Vec<u8> {
    // 32-bit code (a tiny PVH guest, paging off): mov dword [gpa], value.
    let addr = u32::try_from(gpa).expect("the MMIO window is below 4 GiB");
    let mut c = vec![0xc7, 0x05];
    c.extend_from_slice(&addr.to_le_bytes());
    c.extend_from_slice(&value.to_le_bytes());
    c
}

/// Writes a register of the window at `base` as a driver would.
fn reg(m: &mut Machine, base: u64, offset: u64, value: u32) {
    assert!(m.devices.mmio_write(base + offset, &value.to_le_bytes()));
}

/// Sets a device up as a virtio 1 driver does (VERSION_1 only), with `queues` (mock
/// split queues in guest RAM), and DRIVER_OK.
fn driver_init(m: &mut Machine, base: u64, queues: &[&MockSplitQueue<'_, GuestMemory>]) {
    reg(m, base, 0x70, 1 | 2);
    reg(m, base, 0x24, 1);
    reg(m, base, 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
    reg(m, base, 0x70, 1 | 2 | 8);
    for (i, q) in queues.iter().enumerate() {
        reg(m, base, 0x30, i as u32);
        reg(m, base, 0x38, u32::from(QSIZE));
        for (lo, a) in [
            (0x80, q.desc_table_addr()),
            (0x90, q.avail_addr()),
            (0xa0, q.used_addr()),
        ] {
            reg(m, base, lo, a.0 as u32);
            reg(m, base, lo + 4, (a.0 >> 32) as u32);
        }
        reg(m, base, 0x44, 1);
    }
    reg(m, base, 0x70, 1 | 2 | 8 | 4);
}

/// The master PIC's interrupt request register (GSIs 0-7 reach it as well as the IOAPIC).
fn pic_master_irr(m: &Machine) -> u8 {
    let mut c = kvm_irqchip {
        chip_id: KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    m.vm.get_irqchip(&mut c).unwrap();
    // SAFETY: for KVM_IRQCHIP_PIC_MASTER the kernel fills the `pic` member of the union.
    unsafe { c.chip.pic.irr }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_queue_notify_completes_in_kvm_without_a_vcpu_exit_and_other_values_still_exit() {
    // Notify net queue 1 (TX) with the matching value, then exit.
    let mut code = mmio_write32(NET_MMIO_GPA + 0x50, 1);
    code.extend(out(PORT_EXIT, 0));
    let Some(mut m) = machine_on(
        &tiny_pvh(&code, None),
        ConsoleSink::Discard,
        NetBackend::none(),
        1,
    ) else {
        return;
    };
    let ev = m.devices.take_events().unwrap();
    {
        let mut v = m.vcpus.lock(0);
        match v.run().unwrap() {
            VcpuExit::IoOut(port, _) => assert_eq!(port, PORT_EXIT, "the first exit"),
            other => panic!("the notify exited to the VMM: {other:?}"),
        }
    }
    assert_eq!(
        ev.notify[1].read().unwrap(),
        1,
        "KVM signalled the TX queue's ioeventfd"
    );
    assert!(ev.notify[0].read().is_err(), "and no other queue's");

    // A value no ioeventfd matches is an ordinary MMIO exit.
    let mut code = mmio_write32(NET_MMIO_GPA + 0x50, 7);
    code.extend(out(PORT_EXIT, 0));
    let Some(m) = machine_on(
        &tiny_pvh(&code, None),
        ConsoleSink::Discard,
        NetBackend::none(),
        1,
    ) else {
        return;
    };
    let mut v = m.vcpus.lock(0);
    match v.run().unwrap() {
        VcpuExit::MmioWrite(addr, data) => {
            assert_eq!((addr, data), (NET_MMIO_GPA + 0x50, &[7u8, 0, 0, 0][..]));
        }
        other => panic!("expected an MMIO exit, got {other:?}"),
    }
}

#[test]
fn the_device_thread_serves_a_notify_and_the_used_buffer_interrupt_reaches_the_irqchip() {
    // The guest notifies net TX and the disk, then counts forever (no more exits).
    let mut code = mmio_write32(NET_MMIO_GPA + 0x50, 1);
    code.extend(mmio_write32(BLK_MMIO_GPA + 0x50, 0));
    code.extend(counter());
    let (net, peer) = NetBackend::channel();
    let Some(mut m) = machine_on(&tiny_pvh(&code, None), ConsoleSink::Discard, net, 1) else {
        return;
    };
    let mem = m.ram.mem().clone();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(NET_RX_Q), QSIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(NET_TX_Q), QSIZE);
    let blkq = MockSplitQueue::create(&mem, GuestAddress(BLK_Q), QSIZE);
    driver_init(&mut m, NET_MMIO_GPA, &[&rxq, &txq]);
    driver_init(&mut m, BLK_MMIO_GPA, &[&blkq]);
    // One frame to send; one disk read of sector 0.
    mem.write_slice(&[0x5a; 12 + 60], GuestAddress(TX_BUF))
        .unwrap();
    txq.add_desc_chains(&[desc(TX_BUF, 12 + 60, 0, 0)], 0)
        .unwrap();
    let mut hdr = [0u8; 16]; // type 0 (IN), sector 0
    hdr[8..].copy_from_slice(&0u64.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(BLK_HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(BLK_STATUS)).unwrap();
    blkq.add_desc_chains(
        &[
            desc(BLK_HDR, 16, NEXT, 1),
            desc(BLK_DATA, 512, WRITE | NEXT, 2),
            desc(BLK_STATUS, 1, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    assert_eq!(pic_master_irr(&m) & (1 << NET_GSI | 1 << BLK_GSI), 0);

    let vm = VmHandle::start(m, false).unwrap();
    let frame = peer
        .from_guest
        .recv_timeout(Duration::from_secs(10))
        .expect("the device thread sent the frame");
    assert_eq!(frame, vec![0x5a; 60]);
    wait_for("the disk request's used entry", || {
        blkq.used().idx().load() == 1
    });
    vm.pause().unwrap();
    let mut m = vm.machine().unwrap();
    assert_eq!(txq.used().idx().load(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BLK_STATUS)).unwrap(), 0);
    assert_eq!(m.devices.net.interrupt_status(), 1, "used-buffer bit");
    assert_eq!(m.devices.blk.interrupt_status(), 1, "used-buffer bit");
    let irr = pic_master_irr(&m);
    assert_ne!(
        irr & (1 << NET_GSI),
        0,
        "net's line is latched: irr {irr:#x}"
    );
    assert_ne!(
        irr & (1 << BLK_GSI),
        0,
        "blk's line is latched: irr {irr:#x}"
    );
    // InterruptACK clears the bit; the window reads it back.
    reg(&mut m, NET_MMIO_GPA, 0x64, 1);
    let mut b = [0u8; 4];
    assert!(m.devices.mmio_read(NET_MMIO_GPA + 0x60, &mut b));
    assert_eq!(u32::from_le_bytes(b), 0);
    drop(m);
    vm.stop().unwrap();
}

#[test]
fn a_paused_vms_device_thread_writes_no_guest_memory_until_it_resumes() {
    let (net, peer) = NetBackend::channel();
    let Some(mut m) = machine_on(&tiny_pvh(&counter(), None), ConsoleSink::Discard, net, 1) else {
        return;
    };
    let mem = m.ram.mem().clone();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(NET_RX_Q), QSIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(NET_TX_Q), QSIZE);
    driver_init(&mut m, NET_MMIO_GPA, &[&rxq, &txq]);
    let bufs: Vec<RawDescriptor> = (0..4)
        .map(|i| desc(RX_BUF + i * 0x1000, 2048, WRITE, 0))
        .collect();
    rxq.add_desc_chains(&bufs, 0).unwrap();
    let dirty = m.dirty_handle();
    let pages = m.ram.layout().pages();
    let vm = VmHandle::start(m, false).unwrap();

    // Running: a frame lands at once.
    peer.to_guest.send(vec![1; 100]).unwrap();
    wait_for("the first frame", || rxq.used().idx().load() == 1);

    vm.pause().unwrap();
    let mut bm = PageBitmap::new(pages);
    dirty.collect(&mut bm).unwrap();
    // Frames arrive while paused: nothing may be written until the resume.
    for i in 0..3u8 {
        peer.to_guest.send(vec![i + 2; 100]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut bm = PageBitmap::new(pages);
    assert_eq!(
        dirty.collect(&mut bm).unwrap(),
        0,
        "no page written while paused"
    );
    assert_eq!(
        rxq.used().idx().load(),
        1,
        "no frame delivered while paused"
    );

    vm.resume();
    wait_for("the frames held over the pause", || {
        rxq.used().idx().load() == 4
    });
    let mut bm = PageBitmap::new(pages);
    assert!(dirty.collect(&mut bm).unwrap() > 0, "their pages are dirty");
    vm.stop().unwrap();
}

#[test]
fn the_serial_port_and_a_frame_waiting_for_the_guest_survive_a_snapshot_into_a_fresh_vm() {
    let (net, peer) = NetBackend::channel();
    let Some(mut m) = machine_on(&tiny_pvh(&counter(), None), ConsoleSink::Discard, net, 1) else {
        return;
    };
    let mem = m.ram.mem().clone();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(NET_RX_Q), QSIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(NET_TX_Q), QSIZE);
    driver_init(&mut m, NET_MMIO_GPA, &[&rxq, &txq]);
    // Serial: a divisor, 8N1, the scratch register, interrupts on; two received bytes.
    let s = &mut m.devices.serial;
    for (port, v) in [
        (3, 0x80),
        (0, 0x0c),
        (1, 0x00),
        (3, 0x03),
        (7, 0xa5),
        (1, 0x01),
    ] {
        s.write(super::serial::COM1_PORT + port, v);
    }
    s.receive(b"hi");
    let serial = m.devices.serial.state();
    assert_eq!(serial.in_buffer, b"hi");
    let vm = VmHandle::start(m, false).unwrap();
    // No receive buffers yet: the frame waits in the device.
    peer.to_guest.send(vec![0x77; 80]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().unwrap();
    let (state, ram, status) = {
        let m = vm.machine().unwrap();
        let mut ram = vec![0u8; 32 << 20];
        m.read_ram(0, &mut ram).unwrap();
        (
            m.save_state().unwrap(),
            ram,
            m.devices.net.interrupt_status(),
        )
    };
    vm.stop().unwrap();

    let (net2, _peer2) = NetBackend::channel();
    let mut m2 = machine_on(&tiny_pvh(&counter(), None), ConsoleSink::Discard, net2, 1).unwrap();
    m2.write_ram(0, &ram).unwrap();
    m2.restore_state(&state).unwrap();
    assert_eq!(
        m2.devices.serial.state(),
        serial,
        "the serial port round-trips"
    );
    assert_eq!(m2.devices.net.interrupt_status(), status);
    assert!(
        m2.devices.net.driver_ok(),
        "the transport's status came along"
    );
    let mem2 = m2.ram.mem().clone();
    // The same queues, now in the new VM's RAM: the driver posts a buffer and notifies.
    let rxq2 = MockSplitQueue::create(&mem2, GuestAddress(NET_RX_Q), QSIZE);
    rxq2.add_desc_chains(&[desc(RX_BUF, 2048, WRITE, 0)], 0)
        .unwrap();
    let vm2 = VmHandle::start(m2, false).unwrap();
    wait_for("the saved frame in the restored VM", || {
        rxq2.used().idx().load() == 1
    });
    let mut got = [0u8; 80];
    mem2.read_slice(&mut got, GuestAddress(RX_BUF + 12))
        .unwrap();
    assert_eq!(got, [0x77; 80]);
    vm2.stop().unwrap();
}

#[test]
fn a_linux_guest_is_told_of_each_device_at_its_window_and_line() {
    assert_eq!(
        super::linux_cmdline_entries(true),
        [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6"
        ]
    );
    assert_eq!(
        super::linux_cmdline_entries(false),
        ["virtio_mmio.device=4K@0xd0001000:6"],
        "no network backend, no network device"
    );
}

/// A network namespace the test made, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Option<Self> {
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(name.into()))
    }

    /// Runs `ip args` inside the namespace.
    fn ip(&self, args: &[&str]) {
        let st = std::process::Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args:?}", self.0);
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on a namespace file this thread opened; it changes only the
        // calling thread's network namespace.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn the_built_in_guest_serves_tcp_through_a_real_tap_in_a_network_namespace() {
    use std::io::{BufRead, BufReader, Write};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: a tap device needs root and /dev/net/tun");
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let id = std::process::id();
    let Some(ns) = Netns::new(&format!("colo-devtest-{id}")) else {
        eprintln!("skipped: `ip netns add` failed (no iproute2?)");
        return;
    };
    let tap = format!("cdt{}", id % 1_000_000);
    // The tap is made from a thread inside the namespace, so it lives there; the client
    // connects from that thread too. Nothing reaches the host's own network.
    let (dir, disk, _) = crate::tests::scratch_disks("colo-tap-test");
    let (tx, rx) = std::sync::mpsc::channel();
    let client = {
        let ns_name = ns.0.clone();
        let tap = tap.clone();
        std::thread::spawn(move || {
            // Enter by name only: the test's own Netns deletes it.
            std::mem::ManuallyDrop::new(Netns(ns_name)).enter();
            tx.send(NetBackend::tap(&tap)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let addr = "10.0.0.2:7000".parse().unwrap();
            let stream = loop {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("the guest never accepted a connection: {e}"),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            let mut replies = Vec::new();
            for line in ["PING\n", "SET k tap\n", "GET k\n"] {
                w.write_all(line.as_bytes()).unwrap();
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                replies.push(l.trim().to_string());
            }
            replies
        })
    };
    let backend = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("the tap opens in the namespace");
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", &tap]);
    ns.ip(&["link", "set", &tap, "up"]);
    let m = crate::tests::guest_machine_with("tap", backend, &disk, None, 1).unwrap();
    let vm = VmHandle::start(m, false).unwrap();
    let replies = client.join().expect("the client in the namespace");
    assert_eq!(replies, ["PONG", "OK", "VALUE tap"]);
    vm.pause().unwrap();
    let stats = vm.machine().unwrap().net_stats();
    assert!(stats.tx_frames > 0 && stats.rx_frames > 0, "{stats:?}");
    vm.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tap_that_cannot_be_attached_names_the_tap_and_the_os_error() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: a tap device needs root and /dev/net/tun");
        return;
    }
    // `lo` exists and is not a tap: TUNSETIFF refuses it.
    match NetBackend::tap("lo").unwrap_err() {
        crate::Error::Tap { name, source, .. } => {
            assert_eq!(name, "lo");
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{source}");
        }
        other => panic!("expected a tap error, got {other:?}"),
    }
}
