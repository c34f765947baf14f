//! Running a [`Machine`]: one thread per vCPU, their exits, and pausing them all from
//! another thread.
//!
//! Pausing uses the pattern measured in the shared ENVIRONMENT.md (beside the repository):
//! the controller sets a flag and kicks every vCPU thread (`kick`), so `KVM_RUN` returns
//! at once. Each vCPU thread then parks holding neither the machine nor its vCPU, and once
//! all are parked the controller may read or change the machine (every vCPU's state among
//! it) until it resumes them.
//!
//! A vCPU thread holds its own vCPU while it runs and locks the machine (devices, RAM)
//! only for the exits that need it, so the vCPUs run at once. A guest exit or crash on
//! any vCPU stops them all.
//!
//! The virtio devices run on a device thread of their own: it waits on the ioeventfds of
//! the queues' QueueNotify registers (KVM completes the guest's notify write without an
//! exit) and on the network backend's received-frame eventfd, serves every queue under
//! the machine lock, and raises the devices' interrupts (irqfds). It parks at a pause like
//! a vCPU, so a paused VM's devices write neither guest memory nor device state; the
//! controller's dirty-page collection and snapshot at a checkpoint rely on that. After
//! it used buffers it also ends vCPU 0's idle wait (the built-in guest polls instead of
//! taking interrupts).
//!
//! Disk requests run on the device thread without the machine (see `devices::blk`):
//! while they run the thread counts as parked, so a pause does not wait for a disk flush;
//! it writes their outcomes into the guest only once the VM runs again.

mod kick;
mod park;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::unix::thread::JoinHandleExt;

use super::abi::{CONSOLE_GPA, CONSOLE_LEN, PORT_CONSOLE, PORT_EXIT, PORT_IDLE};
use super::devices::DeviceEvents;
use super::devices::backend::Pace;
use super::devices::blk::BlkIo;
use super::devices::serial::SerialPort;
use super::error::{Error, Result};
use super::vcpus::SharedVcpu;
use super::{GuestExit, Machine, acpi, assist, vcpu};
use park::Ctl;
pub use park::PauseReport;
use vmm_sys_util::eventfd::EventFd;

/// The longest the guest may idle in one exit.
const MAX_IDLE: Duration = Duration::from_millis(50);
/// The longest the vCPU waits at once for the proxy to let a held VM go on. Should the
/// proxy's word never come, the VM runs one exit per wait until the secondary's next
/// checkpoint lets it go.
const MAX_HOLD: Duration = Duration::from_millis(100);
/// The i8042 command (write) and status (read) port, and its command that pulses the CPU
/// reset line (Linux's `reboot=k`). The status reads 0 (buffers empty), so the guest
/// does not wait before it writes the command; nothing else of an i8042 is there (the
/// FADT says so).
const PORT_I8042: u16 = 0x64;
const I8042_RESET: u32 = 0xfe;
/// How long pause() waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The vCPU whose idle wait a device's used buffers end (the built-in guest's service
/// runs there), and which the proxy's hold stops.
const DEVICE_VCPU: usize = 0;

/// Wakes one vCPU thread from an idle or held wait (the signal wakes it from `KVM_RUN`).
struct Wake {
    tx: Sender<()>,
    rx: Receiver<()>,
}

struct Shared {
    machine: Mutex<Machine>,
    pause: AtomicBool,
    stop: AtomicBool,
    /// A guest's own end (exit, poweroff, reset) waits for the controller instead of
    /// ending the VM ([`VmHandle::set_hold_exits`]).
    hold_exits: AtomicBool,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// By vCPU index.
    wakes: Vec<Wake>,
    /// The vCPU threads, by index (set once all are spawned, before any runs).
    threads: OnceLock<Vec<libc::pthread_t>>,
    /// Wakes the device thread (for a pause or stop).
    dev_wake: EventFd,
    /// The proxy's pacing of this VM (a secondary in COLO mode).
    pace: Arc<Pace>,
    /// The vCPU threads' kernel thread ids (0 until each runs).
    tids: Vec<AtomicI32>,
    /// Each vCPU's counts of page faults and exits (empty without KVM statistics).
    counters: Vec<crate::kvm_stats::VcpuCounters>,
}

impl Shared {
    fn machine(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kicks every vCPU thread out of `KVM_RUN` and any wait. Only while no vCPU thread
    /// has been joined: the owner joins them only once all have ended, and a thread kicks
    /// only before it ends.
    fn kick_all(&self) {
        for w in &self.wakes {
            let _ = w.tx.try_send(());
        }
        // A full counter is a wake-up already pending.
        let _ = self.dev_wake.write(1);
        for &t in self.threads.get().into_iter().flatten() {
            // SAFETY: a thread of this process, not joined yet (see above).
            unsafe { kick::kick(t) };
        }
    }

    /// vCPU `i`'s thread ends: a guest exit or crash there stops the other vCPUs.
    fn ended(&self, i: usize) {
        let mut c = self.ctl();
        if !self.stop.swap(true, Ordering::SeqCst) {
            c.first_end = Some(i);
            self.kick_all();
        }
        c.vcpus[i].finished = true;
        c.vcpus[i].parks();
        self.cv.notify_all();
    }

    /// The device thread ends (only once the VM stops).
    fn device_ended(&self) {
        let mut c = self.ctl();
        c.device.finished = true;
        c.device.parks();
        self.cv.notify_all();
    }
}

/// A running VM.
pub struct VmHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<GuestExit>>>,
    /// The device thread (joined after the vCPU threads).
    devices: Option<JoinHandle<()>>,
    name: String,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    /// Starts a thread per vCPU. With `paused`, the VM starts paused (for a restore).
    ///
    /// # Errors
    /// [`Error::Io`] if a thread cannot be spawned (none runs then).
    pub fn start(mut machine: Machine, paused: bool) -> Result<Self> {
        kick::install_handler();
        let name = machine.name.clone();
        let n = machine.vcpus.len();
        let vcpus: Vec<SharedVcpu> = (0..n).map(|i| machine.vcpus.shared(i)).collect();
        let pace = Arc::clone(machine.devices.net.device.pace());
        let counters = std::mem::take(&mut machine.exit_counters);
        let events = machine
            .devices
            .take_events()
            .ok_or_else(|| Error::Config("the machine's devices already ran".into()))?;
        let dev_wake = events
            .wake
            .try_clone()
            .map_err(Error::io("duplicate an eventfd"))?;
        let shared = Arc::new(Shared {
            machine: Mutex::new(machine),
            pause: AtomicBool::new(paused),
            hold_exits: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ctl: Mutex::new(Ctl::new(n)),
            cv: Condvar::new(),
            wakes: (0..n)
                .map(|_| {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    Wake { tx, rx }
                })
                .collect(),
            threads: OnceLock::new(),
            dev_wake,
            pace,
            tids: (0..n).map(|_| AtomicI32::new(0)).collect(),
            counters,
        });
        let mut h = Self {
            shared: Arc::clone(&shared),
            threads: Vec::with_capacity(n),
            devices: None,
            name: name.clone(),
        };
        let s = Arc::clone(&shared);
        match std::thread::Builder::new()
            .name(format!("dev-{name}"))
            .spawn(move || {
                device_thread(&s, &events);
                s.device_ended();
            }) {
            Ok(t) => h.devices = Some(t),
            Err(e) => {
                shared.stop.store(true, Ordering::SeqCst);
                for c in &mut shared.ctl().vcpus {
                    c.finished = true;
                }
                shared.ctl().device.finished = true;
                return Err(Error::io("spawn the device thread")(e));
            }
        }
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{i}-{name}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    s.tids[i].store(unsafe { libc::gettid() }, Ordering::SeqCst);
                    // The guest's own work takes the default slice (and the configured
                    // nice); colo's threads preempt it.
                    crate::sched::enter_vcpu_thread();
                    let r = vcpu_thread(&s, i, &vcpu);
                    s.ended(i);
                    r
                });
            match spawned {
                Ok(t) => h.threads.push(t),
                Err(e) => {
                    // The spawned threads see the stop as soon as they may start; the
                    // others never will, so nothing waits for them.
                    shared.stop.store(true, Ordering::SeqCst);
                    let _ = shared.dev_wake.write(1);
                    for c in &mut shared.ctl().vcpus[i..] {
                        c.finished = true;
                    }
                    h.release_threads();
                    return Err(Error::io("spawn a vCPU thread")(e));
                }
            }
        }
        h.release_threads();
        if paused {
            h.wait_parked()?;
        }
        Ok(h)
    }

    /// Lets the spawned threads run, once they are known for kicks.
    fn release_threads(&self) {
        let _ = self
            .shared
            .threads
            .set(self.threads.iter().map(|t| t.as_pthread_t()).collect());
        self.shared.ctl().started = true;
        self.shared.cv.notify_all();
    }

    fn wait_parked(&self) -> Result<()> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut c = self.shared.ctl();
        while !c.all_parked() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout("pause"));
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// The number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.shared.wakes.len()
    }

    /// The page faults KVM took for the VM's vCPUs so far and their exits (KVM's binary
    /// statistics `pf_taken` and `exits`; under dirty logging the faults are mostly the
    /// write-protect faults of first writes after each collection), read without stopping
    /// them; `None` where the kernel keeps no such statistics.
    pub fn vcpu_exit_counts(&self) -> Option<crate::kvm_stats::ExitCounts> {
        if self.shared.counters.is_empty() {
            return None;
        }
        self.shared
            .counters
            .iter()
            .map(crate::kvm_stats::VcpuCounters::read)
            .sum()
    }

    /// Sets every vCPU thread's nice value (e.g. back to 0 when an SVM that ran at a low
    /// priority takes over). Raising the priority needs CAP_SYS_NICE or a permissive
    /// RLIMIT_NICE.
    ///
    /// # Errors
    /// The first `setpriority` error, or `NotFound` before the vCPU threads run.
    pub fn set_vcpu_nice(&self, nice: i32) -> std::io::Result<()> {
        for t in &self.shared.tids {
            let tid = t.load(Ordering::SeqCst);
            if tid == 0 {
                return Err(std::io::ErrorKind::NotFound.into());
            }
            crate::sched::set_nice(tid, nice)?;
        }
        Ok(())
    }

    /// Lets the proxy hold this VM while it runs too far ahead of the primary (netcmp's
    /// `secondary_lead`), or (`false`) stops that; either way a held VM goes on at once.
    /// Off by default; a secondary turns it on at each checkpoint in COLO mode and off at
    /// failover. The hold stops vCPU 0, which serves the network.
    pub fn set_net_pacing(&self, on: bool) {
        self.shared.pace.set_enabled(on);
    }

    /// With `true`, a vCPU whose guest ends the machine (an exit status, a poweroff, a
    /// reset) does not end the VM: it waits there until the controller pauses or stops
    /// the VM. A secondary in COLO mode holds exits until it takes over: its guest runs
    /// the same requests as the primary's and may end first; the primary's own end then
    /// ends the pair, and a checkpoint in between puts the SVM back where the PVM was.
    /// A crash still ends the VM.
    pub fn set_hold_exits(&self, on: bool) {
        self.shared.hold_exits.store(on, Ordering::SeqCst);
    }

    /// Pauses every vCPU and returns once all are parked (or ended, or run disk requests
    /// without the machine), with how long each took.
    ///
    /// # Errors
    /// [`Error::Timeout`] if a vCPU does not park within 2 s.
    pub fn pause(&self) -> Result<PauseReport> {
        let asked = Instant::now();
        self.shared.pause.store(true, Ordering::SeqCst);
        self.shared.kick_all();
        self.wait_parked()?;
        Ok(self.shared.ctl().report(asked))
    }

    /// Resumes the paused vCPUs.
    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
        let _c = self.shared.ctl();
        self.shared.cv.notify_all();
    }

    /// Waits until no disk request of the guest is running (a paused VM's requests keep
    /// running until done; their outcomes wait for the resume). The secondary calls it
    /// before it commits an epoch's disk, so that none of the SVM's requests lands after.
    ///
    /// # Errors
    /// [`Error::Timeout`] if they run longer than `timeout`.
    pub fn wait_disk_idle(&self, timeout: Duration) -> Result<()> {
        let c = self.shared.ctl();
        let (c, _) = self
            .shared
            .cv
            .wait_timeout_while(c, timeout, |c| c.disk_io())
            .unwrap_or_else(|e| e.into_inner());
        if c.disk_io() {
            return Err(Error::Timeout("the guest's disk requests"));
        }
        Ok(())
    }

    /// Whether the VM has ended: every vCPU thread has (a guest exit or crash on one
    /// stops the others at once).
    pub fn finished(&self) -> bool {
        self.shared
            .ctl
            .lock()
            .map(|c| c.all_finished())
            .unwrap_or(true)
    }

    /// The machine, for a paused VM (or one whose vCPU threads have ended).
    ///
    /// # Errors
    /// [`Error::Config`] if the VM is running.
    pub fn machine(&self) -> Result<MutexGuard<'_, Machine>> {
        let c = self.shared.ctl();
        let asked = self.shared.pause.load(Ordering::SeqCst);
        if !c.machine_free(asked) {
            return Err(Error::Config("the VM must be paused first".into()));
        }
        drop(c);
        Ok(self.shared.machine())
    }

    /// Stops the vCPUs and returns how the guest ended.
    ///
    /// # Errors
    /// The error that ended a vCPU thread (a guest crash, a KVM failure).
    pub fn stop(mut self) -> Result<GuestExit> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.shared.kick_all();
        self.join()
    }

    /// Waits until the guest ends by itself.
    ///
    /// # Errors
    /// As [`VmHandle::stop`].
    pub fn wait(mut self) -> Result<GuestExit> {
        self.join()
    }

    /// Joins every vCPU thread once all have ended (no thread kicks another after that),
    /// and returns the result of the one whose end stopped the others, else the first
    /// error, else [`GuestExit::Stopped`].
    fn join(&mut self) -> Result<GuestExit> {
        let first = {
            let mut c = self.shared.ctl();
            while !c.all_finished() {
                c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
            }
            c.first_end
        };
        // Every vCPU ended, so the stop is set and the device thread was kicked.
        if let Some(d) = self.devices.take() {
            let _ = self.shared.dev_wake.write(1);
            if d.join().is_err() {
                tracing::error!("the device thread panicked");
            }
        }
        let mut results: Vec<Result<GuestExit>> = self
            .threads
            .drain(..)
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(Error::GuestCrash {
                        reason: "a vCPU thread panicked".into(),
                        regs: String::new(),
                    })
                })
            })
            .collect();
        if let Some(i) = first.filter(|&i| i < results.len()) {
            return results.swap_remove(i);
        }
        match results.into_iter().find(Result::is_err) {
            Some(e) => e,
            None => Ok(GuestExit::Stopped),
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.devices.is_some() {
            self.shared.stop.store(true, Ordering::SeqCst);
            self.resume();
            self.shared.kick_all();
            let _ = self.join();
        }
    }
}

enum Step {
    Continue,
    /// The guest waits for at most this long (or until a device has work).
    Idle(Duration),
    Exit(GuestExit),
}

fn lock_vcpu(v: &SharedVcpu) -> MutexGuard<'_, VcpuFd> {
    v.lock().unwrap_or_else(|e| e.into_inner())
}

fn vcpu_thread(s: &Shared, i: usize, vcpu: &SharedVcpu) -> Result<GuestExit> {
    {
        let c = s.ctl();
        let c =
            s.cv.wait_while(c, |c| !c.started)
                .unwrap_or_else(|e| e.into_inner());
        drop(c);
    }
    // The thread holds `vcpu` (an Arc) until it returns, so the mapping stays valid.
    kick::arm(&mut lock_vcpu(vcpu));
    let r = run_loop(s, i, vcpu);
    kick::disarm();
    r
}

fn run_loop(s: &Shared, i: usize, vcpu: &SharedVcpu) -> Result<GuestExit> {
    let mut v = lock_vcpu(vcpu);
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return Ok(GuestExit::Stopped);
        }
        if s.pause.load(Ordering::SeqCst) {
            // The controller may use the vCPU while it is parked.
            drop(v);
            park(s, i);
            v = lock_vcpu(vcpu);
            continue;
        }
        if i == DEVICE_VCPU && s.pace.held() {
            hold(s);
        }
        match step(&mut v, s, i)? {
            Step::Continue => {}
            Step::Idle(max) => idle(s, i, max),
            Step::Exit(e) if s.hold_exits.load(Ordering::SeqCst) => hold_exit(s, i, e),
            Step::Exit(e) => return Ok(e),
        }
    }
}

/// The longest one wait of a held exit (it re-checks for a pause or stop after each).
const HELD_EXIT_WAIT: Duration = Duration::from_millis(50);

/// vCPU `i`'s guest ended the machine with `e` while exits are held: waits (without
/// running the vCPU again) until the controller pauses or stops the VM. After a pause
/// the vCPU runs whatever state the controller loaded.
fn hold_exit(s: &Shared, i: usize, e: GuestExit) {
    tracing::info!(
        vcpu = i,
        exit = ?e,
        "the guest ended the machine; held until the next checkpoint or the primary's end"
    );
    while !s.pause.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
        let _ = s.wakes[i].rx.recv_timeout(HELD_EXIT_WAIT);
    }
}

/// Parks vCPU `i` until the controller resumes or stops the VM.
fn park(s: &Shared, i: usize) {
    let mut c = s.ctl();
    c.vcpus[i].paused = true;
    c.vcpus[i].parks();
    s.cv.notify_all();
    let mut c = wait_while_paused(s, c);
    c.vcpus[i].paused = false;
    drop(c);
    while s.wakes[i].rx.try_recv().is_ok() {}
}

/// Waits (with `c` held) until the controller resumes or stops the VM.
fn wait_while_paused<'a>(s: &'a Shared, mut c: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
    while s.pause.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
        c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
    }
    c
}

fn crash(v: &VcpuFd, i: usize, reason: String) -> Error {
    Error::GuestCrash {
        reason: format!("{reason} (vCPU {i})"),
        regs: vcpu::dump(v),
    }
}

/// Runs vCPU `i` to its next exit and handles it, with the machine locked only for the
/// exits that need it.
fn step(v: &mut VcpuFd, s: &Shared, i: usize) -> Result<Step> {
    let mut data = [0u8; 8];
    let exit = match v.run() {
        Ok(VcpuExit::IoOut(port, d)) => {
            let n = d.len().min(8);
            data[..n].copy_from_slice(&d[..n]);
            Exit::Out(
                port,
                u32::from_le_bytes(data[..4].try_into().expect("4 bytes")),
            )
        }
        Ok(VcpuExit::IoIn(port, d)) => {
            if SerialPort::owns(port) {
                s.machine().devices.serial.read(port, d);
            } else if port == PORT_I8042 || port == acpi::PORT_SLEEP_STATUS {
                d.fill(0);
            } else {
                // No device answers: the bus reads as all ones (Linux probes like this).
                d.fill(0xff);
            }
            Exit::None
        }
        Ok(VcpuExit::MmioRead(addr, d)) => {
            if !s.machine().devices.mmio_read(addr, d) {
                tracing::debug!(addr = format_args!("{addr:#x}"), "MMIO read of nothing");
            }
            Exit::None
        }
        Ok(VcpuExit::MmioWrite(addr, d)) => {
            let n = d.len().min(8);
            data[..n].copy_from_slice(&d[..n]);
            Exit::MmioWrite(addr, n)
        }
        Ok(VcpuExit::Hlt) => Exit::Crash("the guest executed HLT".into()),
        Ok(VcpuExit::Shutdown) => Exit::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        Ok(VcpuExit::FailEntry(reason, cpu)) => {
            Exit::Crash(format!("VM entry failed: reason {reason:#x} on cpu {cpu}"))
        }
        Ok(VcpuExit::InternalError) => {
            let mut m = s.machine();
            match assist::complete(v, m.ram.mem())? {
                Some(done) => {
                    m.assists.note(done);
                    Exit::None
                }
                None => Exit::Crash(vcpu::internal_error(v, m.ram.mem())),
            }
        }
        Ok(other) => Exit::Crash(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR => {
            v.set_kvm_immediate_exit(0);
            Exit::None
        }
        // A vCPU waiting for its INIT/SIPI (KVM_MP_STATE_UNINITIALIZED or INIT_RECEIVED)
        // blocks in KVM_RUN and returns EAGAIN when an event woke it: run it again.
        Err(e) if e.errno() == libc::EAGAIN => Exit::None,
        Err(e) => {
            return Err(Error::Kvm {
                what: "KVM_RUN",
                source: e,
            });
        }
    };
    match exit {
        Exit::None => {}
        Exit::Crash(reason) => return Err(crash(v, i, reason)),
        Exit::MmioWrite(addr, n) => {
            if !s.machine().devices.mmio_write(addr, &data[..n]) {
                tracing::debug!(addr = format_args!("{addr:#x}"), "MMIO write to nothing");
            }
        }
        Exit::Out(port, value) => match port {
            PORT_CONSOLE => {
                let n = u64::from(value).min(CONSOLE_LEN) as usize;
                let mut buf = vec![0u8; n];
                let mut m = s.machine();
                m.read_ram(CONSOLE_GPA, &mut buf)?;
                m.devices.serial.console().put(&buf);
            }
            PORT_IDLE => {
                return Ok(Step::Idle(
                    Duration::from_micros(u64::from(value)).min(MAX_IDLE),
                ));
            }
            PORT_EXIT => {
                return match value {
                    0 => Ok(Step::Exit(GuestExit::Status(0))),
                    v2 => Err(crash(v, i, exit_reason(v2))),
                };
            }
            p if SerialPort::owns(p) => s.machine().devices.serial.write(p, data[0]),
            PORT_I8042 if value & 0xff == I8042_RESET => {
                tracing::info!(vcpu = i, "the guest reset the machine through the i8042");
                return Ok(Step::Exit(GuestExit::Reset));
            }
            acpi::PORT_RESET if value & 0xff == u32::from(acpi::RESET_VALUE) => {
                tracing::info!(
                    vcpu = i,
                    "the guest reset the machine (ACPI reset register)"
                );
                return Ok(Step::Exit(GuestExit::Reset));
            }
            acpi::PORT_SLEEP_CONTROL => match acpi::sleep_request(data[0]) {
                Some(acpi::SleepRequest::PowerOff) => {
                    tracing::info!(vcpu = i, "the guest powered the machine off (ACPI S5)");
                    return Ok(Step::Exit(GuestExit::PowerOff));
                }
                Some(acpi::SleepRequest::Unsupported(kind)) => tracing::warn!(
                    vcpu = i,
                    kind,
                    "the guest asked for a sleep state this machine does not have; it runs on"
                ),
                None => {}
            },
            _ => tracing::trace!(port, value, "write to an unused port"),
        },
    }
    Ok(Step::Continue)
}

/// Why a guest that exited with non-zero `status` stopped.
fn exit_reason(status: u32) -> String {
    match super::abi::exception_of(status) {
        Some(vector) => format!(
            "the guest took CPU exception {vector} (status {status:#x}; rdi = where, rsi = \
             the error code)"
        ),
        None => format!("the guest exited with status {status}"),
    }
}

enum Exit {
    None,
    Out(u16, u32),
    MmioWrite(u64, usize),
    Crash(String),
}

/// The proxy holds the VM (it ran too far ahead of the primary): wait until it lets go,
/// the controller kicks, or [`MAX_HOLD`] passes. The device thread goes on delivering
/// frames meanwhile (its used buffers end this wait early, which only re-checks).
fn hold(s: &Shared) {
    let t0 = Instant::now();
    let deadline = t0 + MAX_HOLD;
    let kick = &s.wakes[DEVICE_VCPU].rx;
    while s.pace.held() && !s.pause.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut sel = Select::new();
        sel.recv(s.pace.wake());
        sel.recv(kick);
        if let Ok(op) = sel.ready_timeout(left) {
            // Consume what woke us, so the next wait blocks.
            let _ = match op {
                0 => s.pace.wake().try_recv(),
                _ => kick.try_recv(),
            };
        }
    }
    s.machine().devices.net.device.stats.holds += 1;
}

/// vCPU `i` has nothing to do: wait until the controller kicks or the time passes, and on
/// vCPU 0 until a device used buffers. The machine is not locked meanwhile.
fn idle(s: &Shared, i: usize, max: Duration) {
    if max.is_zero() || s.pause.load(Ordering::SeqCst) || s.stop.load(Ordering::SeqCst) {
        return;
    }
    let _ = s.wakes[i].rx.recv_timeout(max);
}

/// The device thread: serves the queues whenever an eventfd says there may be work,
/// parks at a pause, and runs disk requests without the machine.
fn device_thread(s: &Shared, ev: &DeviceEvents) {
    {
        let c = s.ctl();
        let c =
            s.cv.wait_while(c, |c| !c.started)
                .unwrap_or_else(|e| e.into_inner());
        drop(c);
    }
    let mut pfds: Vec<libc::pollfd> = ev
        .all()
        .map(|fd| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        if s.pause.load(Ordering::SeqCst) {
            park_device(s);
            // Serve at once after a resume: a restored VM's requests in flight, and
            // whatever the guest queued while its wake-up was drained.
            continue;
        }
        let (io, used) = {
            let mut m = s.machine();
            // A pause asked for while the lock was taken: park first (the controller
            // uses the machine once this thread is parked).
            if s.pause.load(Ordering::SeqCst) || s.stop.load(Ordering::SeqCst) {
                continue;
            }
            let Machine { devices, ram, .. } = &mut *m;
            devices.serve(ram.mem())
        };
        if used {
            let _ = s.wakes[DEVICE_VCPU].tx.try_send(());
        }
        if let Some(io) = io {
            if !run_disk_io(s, io) {
                return;
            }
            continue;
        }
        wait_events(&mut pfds);
    }
}

/// Waits until one of the device thread's eventfds is written, and reads every one that
/// was (so that the next wait blocks until new work).
fn wait_events(pfds: &mut [libc::pollfd]) {
    for p in pfds.iter_mut() {
        p.revents = 0;
    }
    // SAFETY: `pfds` is a valid array of pollfds for the call; the descriptors are the
    // device thread's eventfds, which its caller owns for the thread's life.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
    if n <= 0 {
        // EINTR (the vCPU kick signal is process-wide): the caller looks at its flags.
        return;
    }
    for p in pfds.iter().filter(|p| p.revents & libc::POLLIN != 0) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from an eventfd (non-blocking) that stays open.
        let _ = unsafe { libc::read(p.fd, (&raw mut v).cast(), 8) };
    }
}

/// Parks the device thread until the controller resumes or stops the VM.
fn park_device(s: &Shared) {
    let mut c = s.ctl();
    c.device.paused = true;
    c.device.parks();
    s.cv.notify_all();
    let mut c = wait_while_paused(s, c);
    c.device.paused = false;
}

/// Runs disk requests on the device thread without the machine, then writes their
/// outcomes once the VM is not paused. False if the VM was stopped meanwhile.
fn run_disk_io(s: &Shared, io: BlkIo) -> bool {
    {
        let mut c = s.ctl();
        c.device.off_machine = true;
        c.device.disk_io = true;
        c.device.parks();
        s.cv.notify_all();
    }
    let done = io.run();
    {
        let mut c = s.ctl();
        c.device.disk_io = false;
        s.cv.notify_all();
        let mut c = wait_while_paused(s, c);
        c.device.off_machine = false;
    }
    if s.stop.load(Ordering::SeqCst) {
        return false;
    }
    let mut m = s.machine();
    let Machine { devices, ram, .. } = &mut *m;
    devices.finish_blk(done, ram.mem());
    drop(m);
    let _ = s.wakes[DEVICE_VCPU].tx.try_send(());
    true
}
