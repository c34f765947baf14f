//! The colo guest: a freestanding program the colo VMM runs in its VMs.
//!
//! It serves a small key-value line protocol over TCP (smoltcp on a virtio-net driver),
//! keeps its data in an append-only log on a virtio-blk disk (replayed at boot), and can
//! dirty its memory at a set rate. Everything it knows about its machine comes from
//! its PVH start and its command line, as [`colo_guest_abi::boot`] (the contract it shares
//! with the VMM) describes: it boots like a Linux kernel ([`entry`]: its own page tables,
//! GDT, TSS and IDT, the other vCPUs started with INIT/SIPI), then runs at CPL3 on every
//! vCPU with polled virtio-mmio devices and ports for the console, idling and exiting.
//! vCPU 0 runs the service; every other vCPU runs a worker ([`worker`]) that dirties its
//! own pages and counts.
//!
//! Exit statuses: 2 bad start info or command line, 3 device initialization failed, 4 out
//! of memory, 5 the disk log could not be read, 6 stack overflow, 101 panic, 0x100 + vector
//! a CPU exception.

#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod blk;
mod console;
mod dirty;
mod entry;
mod net;
mod pvh;
mod rt;
mod service;
mod store;
mod virtio;
mod worker;

use colo_guest_abi::boot::{
    BOOT_VERSION, FLAG_NONDETERMINISTIC, FLAG_SELFTEST_IO, FLAG_SELFTEST_UD, VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET, dirty_share,
};
use colo_guest_abi::cmdline::Params;
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use arch::Clock;
use blk::VirtioBlk;
use dirty::DirtyLoad;
use net::VirtioNet;
use pvh::Boot;
use rt::{EXIT_BAD_BOOT, EXIT_DEVICE, EXIT_DISK, EXIT_NO_MEMORY};
use service::{Backend, Service};
use store::{RecoverError, Store};

/// Longest wait handed to the VMM when idle.
const MAX_IDLE_US: u64 = 50_000;

/// vCPU `index`'s share of the dirty-page load the command line asks for, after checking
/// that the scratch area is RAM above the image. `Err` if it is not.
fn dirty_load(b: &Boot, index: u32, clock: Clock) -> Result<Option<DirtyLoad>, ()> {
    let p = &b.params;
    if p.dirty_pages_per_sec == 0 {
        return Ok(None);
    }
    let (gpa, len) = b.scratch;
    if gpa % 4096 != 0 || gpa < rt::image_end() || len == 0 {
        return Err(());
    }
    let share = dirty_share(p.dirty_pages_per_sec, gpa, len, p.vcpus, index);
    Ok(DirtyLoad::new(
        share.gpa,
        share.len,
        share.pages_per_sec,
        p.dirty_pattern,
        u64::from(index) + 1,
        clock,
    ))
}

/// The base of the first `virtio_mmio.device=` of the command line whose device id is
/// `id`.
fn find_device(p: &Params, id: u32) -> Option<u64> {
    p.devices()
        .iter()
        .map(|d| d.base)
        .find(|&base| virtio::mmio::device_id(base) == id)
}

/// The faults `colo.selftest=` asks for: each must end in the CPU exception handler of
/// entry.rs, which stops the VM with its status.
fn selftest(flags: u32) {
    if flags & FLAG_SELFTEST_UD != 0 {
        // SAFETY: ud2 raises #UD and never returns here: the handler stops the VM.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
    if flags & FLAG_SELFTEST_IO != 0 {
        // COM1: a port the TSS's I/O bitmap denies at CPL3, so this is a #GP.
        arch::out32(0x3f8, 0);
    }
}

/// Entered at CPL3 on vCPU 0 (entry.rs) with the PVH start info's address.
extern "C" fn guest_main(start_info: u64, _index: u64) -> ! {
    rt::init_stack_canary();
    rt::init_heap();
    let b = pvh::read_boot(start_info).unwrap_or_else(|e| fatal!(EXIT_BAD_BOOT, "boot: {e}"));
    let p = b.params;
    selftest(p.flags);
    let clock = Clock::new(p.tsc_khz);
    let ip = Ipv4Address::from(p.ip);
    println!(
        "colo-guest {} (contract v{BOOT_VERSION}): {ip}/{} port {}, RAM {} MiB, TSC {} kHz, flags {:#x}{}, dirty {} pages/s ({}) over {} vCPUs, image end {:#x}",
        env!("CARGO_PKG_VERSION"),
        p.prefix_len,
        p.port,
        b.ram >> 20,
        p.tsc_khz,
        p.flags,
        if p.flags & FLAG_NONDETERMINISTIC != 0 {
            " (nondeterministic)"
        } else {
            ""
        },
        p.dirty_pages_per_sec,
        p.dirty_pattern.name(),
        p.vcpus,
        rt::image_end(),
    );
    println!("command line: {}", b.cmdline);
    let mut dirty = dirty_load(&b, 0, clock).unwrap_or_else(|()| {
        fatal!(
            EXIT_BAD_BOOT,
            "scratch area {:#x}+{:#x} is not page-aligned RAM above the image (ends {:#x})",
            b.scratch.0,
            b.scratch.1,
            rt::image_end()
        )
    });
    let net_base = find_device(&p, VIRTIO_ID_NET).unwrap_or_else(|| {
        fatal!(
            EXIT_DEVICE,
            "no virtio-net among the command line's devices"
        )
    });
    let blk_base = find_device(&p, VIRTIO_ID_BLOCK).unwrap_or_else(|| {
        fatal!(
            EXIT_DEVICE,
            "no virtio-blk among the command line's devices"
        )
    });

    let mut net =
        VirtioNet::new(net_base).unwrap_or_else(|e| fatal!(EXIT_DEVICE, "virtio-net: {e}"));
    let mac = net.mac();
    let (rxq, txq) = net.queue_sizes();
    println!(
        "virtio-net: MAC {}, queues rx {rxq} tx {txq}",
        EthernetAddress(mac)
    );
    let mut blk =
        VirtioBlk::new(blk_base).unwrap_or_else(|e| fatal!(EXIT_DEVICE, "virtio-blk: {e}"));
    println!(
        "virtio-blk: {} sectors ({} MiB){}",
        blk.sectors(),
        blk.sectors() >> 11,
        if blk.has_flush() { ", flush" } else { "" }
    );
    let (mut store, rec) = Store::recover(&mut blk).unwrap_or_else(|e| match e {
        RecoverError::Disk(_) => fatal!(EXIT_DISK, "{e}"),
        RecoverError::Memory { .. } => fatal!(EXIT_NO_MEMORY, "{e}"),
    });
    println!(
        "log: replayed {} records ({} bytes), {} keys",
        rec.records,
        rec.bytes,
        store.keys()
    );
    if let Some(why) = rec.damaged {
        println!(
            "log: ends at byte {} because {why}; new records go from there",
            rec.bytes
        );
    }

    let mut config = Config::new(EthernetAddress(mac).into());
    config.random_seed =
        arch::rdtsc() ^ u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]);
    let mut iface = Interface::new(config, &mut net, clock.now());
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::Ipv4(ip), p.prefix_len))
            .expect("room for one address");
    });
    let mut sockets = SocketSet::new(alloc::vec::Vec::new());
    let mut service = Service::new(&mut sockets, p.port, p.flags);
    println!(
        "serving on {ip}:{} ({} connections at a time), {} KiB heap free",
        p.port,
        service::SOCKETS,
        rt::heap_free() >> 10
    );

    loop {
        rt::check_stack();
        let now = clock.now();
        let mut busy = false;
        iface.poll_maintenance(now);
        while iface.poll_ingress_single(now, &mut net, &mut sockets)
            != PollIngressSingleResult::None
        {
            busy = true;
        }
        let mut be = Backend {
            store: &mut store,
            blk: &mut blk,
            dirty: dirty.as_mut(),
            vcpus: p.vcpus,
        };
        // Answer before egress, so that replies carry the ACKs of their requests.
        busy |= service.serve(&mut sockets, &mut be);
        while iface.poll_egress(now, &mut net, &mut sockets) == PollResult::SocketStateChanged {
            busy = true;
        }
        net.flush();
        let dirty_wait = match dirty.as_mut().map(DirtyLoad::run) {
            None => MAX_IDLE_US,
            Some(Ok(wait)) => wait,
            Some(Err(lost)) => dirty::memory_lost(lost),
        };
        if !busy {
            let wait = iface
                .poll_delay(clock.now(), &sockets)
                .map_or(MAX_IDLE_US, |d| d.total_micros())
                .min(MAX_IDLE_US)
                .min(dirty_wait);
            arch::idle(wait as u32);
        }
    }
}
