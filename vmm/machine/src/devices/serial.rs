//! The 16550 serial port at 0x3f8 / IRQ 4 that Linux finds by itself (`console=ttyS0`):
//! rust-vmm's `vm-superio` emulates the registers, its interrupt goes to the in-kernel
//! irqchip through an irqfd (so raising it never waits for the vCPU thread), and what the
//! guest transmits goes to the machine's console sink.
//!
//! Its registers and receive FIFO are in the VM state snapshot (vm-superio's
//! `SerialState`), so a restored VM's port carries on where the saved one stopped.

use std::io;

use kvm_ioctls::VmFd;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::console::{Console, ConsoleSink};
use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};

/// The first I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// The legacy interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;
/// The eight ports of a 16550.
const PORTS: u16 = 8;
/// The 16550's receive FIFO (vm-superio's).
const FIFO_SIZE: usize = 64;

/// An interrupt line into the in-kernel irqchip: writing the eventfd raises the GSI it is
/// registered for.
///
/// The line is edge-triggered: a plain irqfd (no `KVM_IRQFD_FLAG_RESAMPLE`) pulses the
/// GSI (KVM sets it to 1 and back to 0), which the IOAPIC latches for an edge-triggered
/// pin, and that is how the guest sees these lines: the ISA interrupts 4 (COM1), 5 and 6
/// (virtio-mmio) default to edge, active high, and colo describes them so. Edge needs no
/// round trip per interrupt: a level line would have to stay asserted until the driver
/// acknowledges the device, which takes a resample eventfd that KVM signals at each EOI
/// and a thread that re-asserts the line while InterruptStatus is non-zero. An edge is
/// not lost either: Linux's virtio-mmio handler reads InterruptStatus, acknowledges it and
/// then walks every used ring, and a buffer used after that raises a new edge.
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

    /// Raises the line once (an edge).
    ///
    /// # Errors
    /// The eventfd's write error.
    pub fn raise(&self) -> io::Result<()> {
        self.0.write(1)
    }

    /// Another handle on the same line.
    ///
    /// # Errors
    /// `dup` failed.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
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
    /// The port's line, for a UART rebuilt from a snapshot.
    irq: IrqLine,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").finish_non_exhaustive()
    }
}

impl SerialPort {
    /// COM1 raising `irq`, transmitting to `console`.
    ///
    /// # Errors
    /// [`Error::Io`] if the line's eventfd cannot be duplicated.
    pub(crate) fn new(irq: IrqLine, console: Console) -> Result<Self> {
        Ok(Self {
            uart: Serial::new(
                irq.try_clone()
                    .map_err(Error::io("duplicate the serial irqfd"))?,
                console,
            ),
            irq,
        })
    }

    /// Bytes for the guest to read (as if they came down the line).
    #[cfg(test)]
    pub(crate) fn receive(&mut self, bytes: &[u8]) {
        self.uart
            .enqueue_raw_bytes(bytes)
            .expect("room in the FIFO");
    }

    /// The registers and receive FIFO.
    #[cfg(test)]
    pub(crate) fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Saves [`SerialPort::state`].
    pub(crate) fn save(&self, w: &mut Writer) {
        let s = self.uart.state();
        w.pod(&[
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ]);
        w.bytes(&s.in_buffer);
    }

    /// Restores what [`SerialPort::save`] wrote; the console stays. An interrupt the
    /// restored registers say is pending is raised again (vm-superio does that).
    ///
    /// # Errors
    /// [`Error::Snapshot`] for bad bytes (a FIFO longer than the 16550's),
    /// [`Error::Io`] if the line cannot be duplicated or raised.
    pub(crate) fn restore(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let regs: [u8; 9] = r.pod("serial registers")?;
        let fifo = r.bytes("serial FIFO")?;
        if fifo.len() > FIFO_SIZE {
            return Err(Error::Snapshot(format!(
                "a serial FIFO of {} bytes, at most {FIFO_SIZE}",
                fifo.len()
            )));
        }
        let state = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: fifo.to_vec(),
        };
        let dup = || {
            self.irq
                .try_clone()
                .map_err(Error::io("duplicate the serial irqfd"))
        };
        let (line, spare) = (dup()?, dup()?);
        // The console moves from the old UART to the new one; a placeholder (which never
        // receives a byte) stands in between.
        let old = std::mem::replace(
            &mut self.uart,
            Serial::new(spare, Console::new(ConsoleSink::Discard)),
        );
        match Serial::from_state(&state, line, NoEvents, old.into_writer()) {
            Ok(u) => {
                self.uart = u;
                Ok(())
            }
            // The FIFO length was checked, so only raising the line can fail here.
            Err(e) => Err(Error::io("raise the restored serial interrupt")(
                io::Error::other(format!("{e:?}")),
            )),
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
