//! Running a [`Machine`]: the vCPU thread, its exits, and pausing it from another thread.
//!
//! Pausing uses the pattern measured in the shared ENVIRONMENT.md (beside the repository): the controller sets a flag and
//! sends the vCPU thread a real-time signal whose handler sets `kvm_run.immediate_exit`,
//! so `KVM_RUN` returns `EINTR` at once (about 25 us here) whether the signal lands
//! before or during the ioctl. The vCPU thread then parks without holding the machine, and
//! the controller may read or change it until it resumes.
//!
//! Disk requests run on the vCPU thread without the machine (see `devices::blk`): while
//! they run the thread counts as parked, so a pause does not wait for a disk flush; it
//! writes their outcomes into the guest only once the VM runs again.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use kvm_ioctls::VcpuExit;
use std::os::unix::thread::JoinHandleExt;

use super::abi::{CONSOLE_GPA, CONSOLE_LEN, PORT_CONSOLE, PORT_EXIT, PORT_IDLE};
use super::devices::backend::Pace;
use super::devices::blk::BlkIo;
use super::devices::serial::SerialPort;
use super::error::{Error, Result};
use super::{GuestExit, Machine, assist, vcpu};

/// The longest the guest may idle in one exit.
const MAX_IDLE: Duration = Duration::from_millis(50);
/// The longest the vCPU waits at once for the proxy to let a held VM go on. Should the
/// proxy's word never come, the VM runs one exit per wait until the secondary's next
/// checkpoint lets it go.
const MAX_HOLD: Duration = Duration::from_millis(100);
/// The i8042 command port, and its command that pulses the CPU reset line (Linux's
/// `reboot=k`).
const PORT_I8042: u16 = 0x64;
const I8042_RESET: u32 = 0xfe;
/// How long pause() waits for the vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only touches a const-initialized thread-local Cell (no allocation, no lock): safe
    // in a signal handler.
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's kvm_run mapping, set by the vCPU thread
            // and valid until it clears it.
            unsafe { p.write_volatile(1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and no SA_RESTART (KVM_RUN must
        // return EINTR) is a valid argument; the handler is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

#[derive(Debug, Default)]
struct Ctl {
    paused: bool,
    finished: bool,
    /// The vCPU thread runs disk requests, or waits to write their outcomes, without the
    /// machine: a pause need not wait for it.
    off_machine: bool,
    /// The disk requests are still running.
    disk_io: bool,
}

impl Ctl {
    /// Whether a controller that asked for a pause may use the machine.
    fn parked(&self) -> bool {
        self.paused || self.finished || self.off_machine
    }
}

struct Shared {
    machine: Mutex<Machine>,
    pause: AtomicBool,
    stop: AtomicBool,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    kick_tx: Sender<()>,
    kick_rx: Receiver<()>,
    /// The proxy's pacing of this VM (a secondary in COLO mode).
    pace: Arc<Pace>,
    /// The vCPU thread's kernel thread id (0 until it runs).
    tid: std::sync::atomic::AtomicI32,
}

/// A running VM.
pub struct VmHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<GuestExit>>>,
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
    /// Starts the vCPU thread. With `paused`, the VM starts paused (for a restore).
    ///
    /// # Errors
    /// [`Error::Io`] if the thread cannot be spawned.
    pub fn start(machine: Machine, paused: bool) -> Result<Self> {
        install_handler();
        let (kick_tx, kick_rx) = crossbeam_channel::bounded(1);
        let name = machine.name.clone();
        let pace = Arc::clone(machine.devices.net.device.pace());
        let shared = Arc::new(Shared {
            machine: Mutex::new(machine),
            pause: AtomicBool::new(paused),
            stop: AtomicBool::new(false),
            ctl: Mutex::default(),
            cv: Condvar::new(),
            kick_tx,
            kick_rx,
            pace,
            tid: std::sync::atomic::AtomicI32::new(0),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu-{name}"))
            .spawn(move || {
                // The guest's own work takes the default slice (and the configured nice);
                // colo's threads preempt it.
                // SAFETY: gettid has no preconditions.
                s.tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                crate::sched::enter_vcpu_thread();
                let r = vcpu_thread(&s);
                let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
                c.finished = true;
                s.cv.notify_all();
                r
            })
            .map_err(Error::io("spawn the vCPU thread"))?;
        let h = Self {
            shared,
            thread: Some(thread),
            name,
        };
        if paused {
            h.wait_parked()?;
        }
        Ok(h)
    }

    fn kick(&self) {
        let _ = self.shared.kick_tx.try_send(());
        if let Some(t) = &self.thread {
            // SAFETY: the pthread is alive until joined (we hold its JoinHandle), and the
            // signal's handler is installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    fn wait_parked(&self) -> Result<()> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut c = self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner());
        while !c.parked() {
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

    /// Sets the vCPU thread's nice value (e.g. back to 0 when an SVM that ran at a low
    /// priority takes over). Raising the priority needs CAP_SYS_NICE or a permissive
    /// RLIMIT_NICE.
    ///
    /// # Errors
    /// The `setpriority` error, or `NotFound` before the vCPU thread runs.
    pub fn set_vcpu_nice(&self, nice: i32) -> std::io::Result<()> {
        let tid = self.shared.tid.load(Ordering::SeqCst);
        if tid == 0 {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        crate::sched::set_nice(tid, nice)
    }

    /// Lets the proxy hold this VM while it runs too far ahead of the primary (netcmp's
    /// `secondary_lead`), or (`false`) stops that; either way a held VM goes on at once.
    /// Off by default; a secondary turns it on at each checkpoint in COLO mode and off at
    /// failover.
    pub fn set_net_pacing(&self, on: bool) {
        self.shared.pace.set_enabled(on);
    }

    /// Pauses the vCPU and returns once it is parked (or the guest has ended, or it runs
    /// disk requests without the machine).
    ///
    /// # Errors
    /// [`Error::Timeout`] if the vCPU does not park within 2 s.
    pub fn pause(&self) -> Result<()> {
        self.shared.pause.store(true, Ordering::SeqCst);
        self.kick();
        self.wait_parked()
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self) {
        self.shared.pause.store(false, Ordering::SeqCst);
        let _c = self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.cv.notify_all();
    }

    /// Waits until no disk request of the guest is running (a paused VM's requests keep
    /// running until done; their outcomes wait for the resume). The secondary calls it
    /// before it commits an epoch's disk, so that none of the SVM's requests lands after.
    ///
    /// # Errors
    /// [`Error::Timeout`] if they run longer than `timeout`.
    pub fn wait_disk_idle(&self, timeout: Duration) -> Result<()> {
        let c = self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let (c, _) = self
            .shared
            .cv
            .wait_timeout_while(c, timeout, |c| c.disk_io)
            .unwrap_or_else(|e| e.into_inner());
        if c.disk_io {
            return Err(Error::Timeout("the guest's disk requests"));
        }
        Ok(())
    }

    /// Whether the vCPU thread has ended (the guest exited or crashed).
    pub fn finished(&self) -> bool {
        self.shared.ctl.lock().map(|c| c.finished).unwrap_or(true)
    }

    /// The machine, for a paused VM (or one whose vCPU thread has ended).
    ///
    /// # Errors
    /// [`Error::Config`] if the VM is running.
    pub fn machine(&self) -> Result<MutexGuard<'_, Machine>> {
        let c = self.shared.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let asked = self.shared.pause.load(Ordering::SeqCst);
        if !(c.paused || c.finished || (asked && c.off_machine)) {
            return Err(Error::Config("the VM must be paused first".into()));
        }
        drop(c);
        Ok(self
            .shared
            .machine
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops the vCPU and returns how the guest ended.
    ///
    /// # Errors
    /// The error that ended the vCPU thread (a guest crash, a KVM failure).
    pub fn stop(mut self) -> Result<GuestExit> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.kick();
        self.join()
    }

    /// Waits until the guest ends by itself.
    ///
    /// # Errors
    /// As [`VmHandle::stop`].
    pub fn wait(mut self) -> Result<GuestExit> {
        self.join()
    }

    fn join(&mut self) -> Result<GuestExit> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::GuestCrash {
                reason: "the vCPU thread panicked".into(),
                regs: String::new(),
            }),
            None => Ok(GuestExit::Stopped),
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shared.stop.store(true, Ordering::SeqCst);
            self.resume();
            self.kick();
            let _ = self.join();
        }
    }
}

enum Step {
    Continue,
    Exit(GuestExit),
}

fn vcpu_thread(s: &Shared) -> Result<GuestExit> {
    {
        let mut m = s.machine.lock().unwrap_or_else(|e| e.into_inner());
        let p: *mut u8 = &mut m.vcpu.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(p));
    }
    let r = run_loop(s);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    r
}

fn run_loop(s: &Shared) -> Result<GuestExit> {
    loop {
        if s.stop.load(Ordering::SeqCst) {
            return Ok(GuestExit::Stopped);
        }
        if s.pause.load(Ordering::SeqCst) {
            let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
            c.paused = true;
            s.cv.notify_all();
            let mut c = wait_while_paused(s, c);
            c.paused = false;
            while s.kick_rx.try_recv().is_ok() {}
            continue;
        }
        let io = {
            let mut m = s.machine.lock().unwrap_or_else(|e| e.into_inner());
            // Disk requests the guest gave (or a restore left in flight) complete before
            // it runs again.
            match take_disk_io(&mut m) {
                Ok(Some(io)) => Some(io),
                Ok(None) => match step(&mut m, s)? {
                    Step::Continue => None,
                    Step::Exit(e) => return Ok(e),
                },
                Err(e) => return Err(crash(&m, format!("device error: {e}"))),
            }
        };
        if let Some(io) = io
            && !run_disk_io(s, io)
        {
            return Ok(GuestExit::Stopped);
        }
    }
}

/// Waits (with `c` held) until the controller resumes or stops the VM.
fn wait_while_paused<'a>(s: &'a Shared, mut c: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
    while s.pause.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
        c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
    }
    c
}

fn take_disk_io(m: &mut Machine) -> Result<Option<BlkIo>> {
    let Machine { devices, ram, .. } = m;
    devices.poll_blk(ram.mem())?;
    Ok(devices.blk.device.start_io())
}

/// Runs disk requests without the machine, then writes their outcomes once the VM is not
/// paused. False if the VM was stopped meanwhile.
fn run_disk_io(s: &Shared, io: BlkIo) -> bool {
    {
        let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
        c.off_machine = true;
        c.disk_io = true;
        s.cv.notify_all();
    }
    let done = io.run();
    {
        let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
        c.disk_io = false;
        s.cv.notify_all();
        let mut c = wait_while_paused(s, c);
        c.off_machine = false;
    }
    // A kick for a pause that came and went while the requests ran.
    while s.kick_rx.try_recv().is_ok() {}
    if s.stop.load(Ordering::SeqCst) {
        return false;
    }
    let mut m = s.machine.lock().unwrap_or_else(|e| e.into_inner());
    let Machine { devices, ram, .. } = &mut *m;
    let t = &mut devices.blk;
    t.device.finish(done, &mut t.queues[0], ram.mem());
    true
}

fn crash(m: &Machine, reason: String) -> Error {
    Error::GuestCrash {
        reason,
        regs: vcpu::dump(&m.vcpu),
    }
}

/// Moves frames waiting for the guest into its receive queue.
fn deliver_rx(m: &mut Machine) {
    let Machine { devices, ram, .. } = m;
    devices.poll_rx(ram.mem());
}

/// Runs the vCPU to its next exit and handles it.
fn step(m: &mut Machine, s: &Shared) -> Result<Step> {
    deliver_rx(m);
    if s.pace.held() {
        hold(m, s);
    }
    let mut data = [0u8; 8];
    let exit = match m.vcpu.run() {
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
                m.devices.serial.read(port, d);
            } else {
                // No device answers: the bus reads as all ones (Linux probes like this).
                d.fill(0xff);
            }
            Exit::None
        }
        Ok(VcpuExit::MmioRead(addr, d)) => {
            if !m.devices.mmio_read(addr, d) {
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
        Ok(VcpuExit::InternalError) => match assist::complete(&mut m.vcpu, m.ram.mem())? {
            Some(done) => {
                m.assists.note(done);
                Exit::None
            }
            None => Exit::Crash(vcpu::internal_error(&mut m.vcpu, m.ram.mem())),
        },
        Ok(other) => Exit::Crash(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR => {
            m.vcpu.set_kvm_immediate_exit(0);
            Exit::None
        }
        Err(e) => {
            return Err(Error::Kvm {
                what: "KVM_RUN",
                source: e,
            });
        }
    };
    match exit {
        Exit::None => {}
        Exit::Crash(reason) => return Err(crash(m, reason)),
        Exit::MmioWrite(addr, n) => {
            let Machine { devices, ram, .. } = &mut *m;
            if let Err(e) = devices.mmio_write(addr, &data[..n], ram.mem()) {
                return Err(crash(m, format!("device error: {e}")));
            }
        }
        Exit::Out(port, value) => match port {
            PORT_CONSOLE => {
                let n = u64::from(value).min(CONSOLE_LEN) as usize;
                let mut buf = vec![0u8; n];
                m.read_ram(CONSOLE_GPA, &mut buf)?;
                m.devices.serial.console().put(&buf);
            }
            PORT_IDLE => idle(m, s, Duration::from_micros(u64::from(value)).min(MAX_IDLE)),
            PORT_EXIT => {
                return match value {
                    0 => Ok(Step::Exit(GuestExit::Status(0))),
                    v => Err(crash(m, format!("the guest exited with status {v}"))),
                };
            }
            p if SerialPort::owns(p) => m.devices.serial.write(p, data[0]),
            PORT_I8042 if value & 0xff == I8042_RESET => {
                tracing::info!("the guest asked for a reset through the i8042 (not emulated yet)");
            }
            _ => tracing::trace!(port, value, "write to an unused port"),
        },
    }
    Ok(Step::Continue)
}

enum Exit {
    None,
    Out(u16, u32),
    MmioWrite(u64, usize),
    Crash(String),
}

/// The proxy holds the VM (it ran too far ahead of the primary): wait until it lets go,
/// the controller kicks, or [`MAX_HOLD`] passes, delivering frames that come meanwhile.
fn hold(m: &mut Machine, s: &Shared) {
    let t0 = Instant::now();
    let deadline = t0 + MAX_HOLD;
    while s.pace.held() && !s.pause.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        deliver_rx(m);
        let net = &m.devices.net;
        let mut sel = Select::new();
        sel.recv(s.pace.wake());
        sel.recv(&s.kick_rx);
        // Frames only while the guest's driver takes them: else they stay in the channel
        // and would wake this wait at once, again and again.
        if net.driver_ok() && net.device.rx_room() {
            sel.recv(net.device.rx_channel());
        }
        let _ = sel.ready_timeout(left);
        while s.pace.wake().try_recv().is_ok() {}
    }
    m.devices.net.device.stats.holds += 1;
}

/// The guest has nothing to do: wait until a frame arrives, the controller kicks, or the
/// time passes.
fn idle(m: &Machine, s: &Shared, max: Duration) {
    if max.is_zero() || m.devices.net.device.has_rx() || s.pause.load(Ordering::SeqCst) {
        return;
    }
    let rx = m.devices.net.device.rx_channel();
    let mut sel = Select::new();
    sel.recv(rx);
    sel.recv(&s.kick_rx);
    let _ = sel.ready_timeout(max);
}
