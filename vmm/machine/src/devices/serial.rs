//! The 16550 serial port at 0x3f8 / IRQ 4 that Linux finds by itself (`console=ttyS0`):
//! rust-vmm's `vm-superio` emulates the registers, its interrupt goes to the in-kernel
//! irqchip through an irqfd (so raising it never waits for the vCPU thread), and what the
//! guest transmits goes to the machine's console sink.
//!
//! Its registers are not in the VM state snapshot yet (the whole-machine state comes with
//! SMP): a restored VM starts with a reset port.

use std::io;

use kvm_ioctls::VmFd;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::console::Console;
use crate::error::{Error, Result};

/// The first I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// The legacy interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;
/// The eight ports of a 16550.
const PORTS: u16 = 8;

/// An interrupt line into the in-kernel irqchip: writing the eventfd raises the GSI it is
/// registered for.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// An eventfd registered with `vm` as an irqfd for `gsi`.
    ///
    /// # Errors
    /// [`Error::Io`] if the eventfd cannot be made, [`Error::Kvm`] if KVM refuses the
    /// irqfd (no in-kernel irqchip).
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(Error::io("create an irq eventfd"))?;
        vm.register_irqfd(&fd, gsi)
            .map_err(Error::kvm("register an irqfd"))?;
        Ok(Self(fd))
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1.
pub(crate) struct SerialPort {
    uart: Serial<IrqLine, NoEvents, Console>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl SerialPort {
    /// COM1 raising `irq`, transmitting to `console`.
    pub(crate) fn new(irq: IrqLine, console: Console) -> Self {
        Self {
            uart: Serial::new(irq, console),
        }
    }

    /// The register at `port`, if it is one of this port's.
    fn offset(port: u16) -> Option<u8> {
        port.checked_sub(COM1_PORT)
            .filter(|&o| o < PORTS)
            .map(|o| o as u8)
    }

    /// Whether `port` is one of this device's.
    pub(crate) fn owns(port: u16) -> bool {
        Self::offset(port).is_some()
    }

    /// An `in` from `port`: the register's byte (Linux reads the 16550 a byte at a time;
    /// a wider read gets the byte in every lane).
    pub(crate) fn read(&mut self, port: u16, data: &mut [u8]) {
        let v = Self::offset(port).map_or(0xff, |o| self.uart.read(o));
        data.fill(v);
    }

    /// An `out` of `value` to `port`. A failed interrupt or console write is logged, not
    /// fatal: the guest keeps running.
    pub(crate) fn write(&mut self, port: u16, value: u8) {
        if let Some(o) = Self::offset(port)
            && let Err(e) = self.uart.write(o, value)
        {
            tracing::warn!(error = ?e, "serial port write failed");
        }
    }

    /// The console behind the port (the built-in guest's console port writes there too).
    pub(crate) fn console(&mut self) -> &mut Console {
        self.uart.writer_mut()
    }
}
