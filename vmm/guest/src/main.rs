//! The colo guest: a freestanding program the colo VMM runs in its VMs.
//!
//! It serves a small key-value line protocol over TCP (smoltcp on a virtio-net driver),
//! keeps its data in an append-only log on a virtio-blk disk (replayed at boot), and can
//! dirty its memory at a set rate. Everything it knows about its machine comes from
//! [`colo_guest_abi::boot`], the contract it shares with the VMM: one or more vCPUs at CPL3
//! in long mode, identity-mapped memory, polled virtio-mmio devices, and ports for the
//! console, idling and exiting. vCPU 0 runs the service; every other vCPU runs a worker
//! ([`worker`]) that dirties its own pages and counts.
//!
//! Exit statuses: 2 bad boot parameters, 3 device initialization failed, 4 out of
//! memory, 5 the disk log could not be read, 6 stack overflow, 101 panic.

#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod blk;
mod console;
mod dirty;
mod net;
mod rt;
mod service;
mod store;
mod virtio;
mod worker;

use colo_guest_abi::boot::{
    BOOT_MAGIC, BOOT_PARAMS_GPA, BOOT_VERSION, BootParams, FLAG_NONDETERMINISTIC, MAX_VCPUS,
};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use arch::Clock;
use blk::VirtioBlk;
use dirty::DirtyLoad;
use net::VirtioNet;
use rt::{EXIT_BAD_BOOT, EXIT_DEVICE, EXIT_DISK, EXIT_NO_MEMORY};
use service::{Backend, Service};
use store::{RecoverError, Store};

/// Longest wait handed to the VMM when idle.
const MAX_IDLE_US: u64 = 10_000;

/// Checks and copies the boot parameters at `p`; stops the VM with status 2 if they are
/// not there.
fn boot_params(p: *const BootParams) -> BootParams {
    if p as u64 != BOOT_PARAMS_GPA {
        fatal!(
            EXIT_BAD_BOOT,
            "boot parameters at {p:p}, expected {BOOT_PARAMS_GPA:#x}"
        );
    }
    // SAFETY: BOOT_PARAMS_GPA is identity-mapped RAM where the VMM wrote the parameters
    // (colo_guest_abi::boot); BootParams is plain integers, valid for any bytes, and the
    // address is aligned.
    let b = unsafe { p.read_volatile() };
    if b.magic != BOOT_MAGIC || b.version != BOOT_VERSION {
        fatal!(
            EXIT_BAD_BOOT,
            "boot parameters: magic {:#x} version {}, expected {BOOT_MAGIC:#x} version {BOOT_VERSION}",
            b.magic,
            b.version
        );
    }
    if b.tsc_khz == 0 || b.prefix_len > 32 || b.port == 0 || !(1..=MAX_VCPUS).contains(&b.vcpus) {
        fatal!(
            EXIT_BAD_BOOT,
            "boot parameters: tsc {} kHz, prefix /{}, port {}, {} vCPUs",
            b.tsc_khz,
            b.prefix_len,
            b.port,
            b.vcpus
        );
    }
    b
}

/// vCPU 0's share of the dirty-page load the boot parameters ask for, after checking that
/// the scratch area is page-aligned RAM above the image.
fn dirty_load(b: &BootParams, clock: Clock) -> Option<DirtyLoad> {
    if b.dirty_pages_per_sec == 0 {
        return None;
    }
    let end = b.scratch_gpa.checked_add(b.scratch_len);
    if b.scratch_gpa % 4096 != 0
        || b.scratch_gpa < rt::image_end()
        || end.is_none_or(|e| e > b.ram_size)
    {
        fatal!(
            EXIT_BAD_BOOT,
            "scratch area {:#x}+{:#x} is not page-aligned RAM above the image (ends {:#x}, RAM {:#x})",
            b.scratch_gpa,
            b.scratch_len,
            rt::image_end(),
            b.ram_size
        );
    }
    let share = b.dirty_share(0);
    DirtyLoad::new(share.gpa, share.len, share.pages_per_sec, clock)
}

/// Called by `_start` on vCPU 0 with the boot parameters' address (rdi).
extern "C" fn guest_main(params: *const BootParams) -> ! {
    rt::init_stack_canary();
    rt::init_heap();
    let b = boot_params(params);
    let clock = Clock::new(b.tsc_khz);
    let ip = Ipv4Address::from(b.ip);
    println!(
        "colo-guest {} (contract v{BOOT_VERSION}): {ip}/{} port {}, RAM {} MiB, TSC {} kHz, flags {:#x}{}, dirty {} pages/s over {} vCPUs, image end {:#x}",
        env!("CARGO_PKG_VERSION"),
        b.prefix_len,
        b.port,
        b.ram_size >> 20,
        b.tsc_khz,
        b.flags,
        if b.flags & FLAG_NONDETERMINISTIC != 0 {
            " (nondeterministic)"
        } else {
            ""
        },
        b.dirty_pages_per_sec,
        b.vcpus,
        rt::image_end(),
    );
    let mut dirty = dirty_load(&b, clock);

    let mut net = VirtioNet::new().unwrap_or_else(|e| fatal!(EXIT_DEVICE, "virtio-net: {e}"));
    let mac = net.mac();
    let (rxq, txq) = net.queue_sizes();
    println!(
        "virtio-net: MAC {}, queues rx {rxq} tx {txq}",
        EthernetAddress(mac)
    );
    let mut blk = VirtioBlk::new().unwrap_or_else(|e| fatal!(EXIT_DEVICE, "virtio-blk: {e}"));
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
            .push(IpCidr::new(IpAddress::Ipv4(ip), b.prefix_len))
            .expect("room for one address");
    });
    let gw = Ipv4Address::from(b.gateway);
    if !gw.is_unspecified() {
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .expect("room for one route");
    }
    let mut sockets = SocketSet::new(alloc::vec::Vec::new());
    let mut service = Service::new(&mut sockets, b.port, b.flags);
    println!(
        "serving on {ip}:{} ({} connections at a time), {} KiB heap free",
        b.port,
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
            vcpus: b.vcpus,
        };
        // Answer before egress, so that replies carry the ACKs of their requests.
        busy |= service.serve(&mut sockets, &mut be);
        while iface.poll_egress(now, &mut net, &mut sockets) == PollResult::SocketStateChanged {
            busy = true;
        }
        net.flush();
        let dirty_wait = dirty.as_mut().map_or(MAX_IDLE_US, DirtyLoad::run);
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
