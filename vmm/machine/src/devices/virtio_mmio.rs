//! The virtio-mmio (version 2) transport: the register window a driver programs, over a
//! device that processes its queues when notified. Queues are rust-vmm `virtio_queue`
//! split queues. When the device puts buffers into a used ring, the transport sets the
//! used-buffer bit of InterruptStatus and raises its interrupt line (an irqfd, see
//! [`super::IrqLine`]); the driver clears the bit with InterruptACK. The built-in guest
//! ignores the interrupt and polls its used rings (abi.rs).

use colo_memory::GuestMemory;
use virtio_queue::{Queue, QueueState, QueueT};

use super::serial::IrqLine;
use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4f4c_4f43; // "COLO"
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
/// InterruptStatus: the device used a buffer.
pub const INT_USED_RING: u32 = 1;

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block).
    fn device_id(&self) -> u32;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Reads device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Processes queue `index` after the driver notified it.
    ///
    /// # Errors
    /// [`Error::Virtio`] for a queue the driver broke; I/O errors of the backend are
    /// reported to the driver in-band where the device type allows it.
    fn notify(&mut self, index: usize, q: &mut [Queue], mem: &GuestMemory) -> Result<()>;
    /// Requests of queue `index` taken from it and not yet completed. They are saved as
    /// not taken, so that a VM restored from the snapshot runs them again.
    fn unfinished(&self, _index: usize) -> u16 {
        0
    }
    /// The driver reset the device: requests in flight are dropped.
    fn reset(&mut self) {}
    /// Saves device-specific state (beyond the transport's).
    fn save(&self, w: &mut Writer);
    /// Restores what [`VirtioDevice::save`] wrote.
    ///
    /// # Errors
    /// [`Error::Snapshot`] for bad bytes.
    fn restore(&mut self, r: &mut Reader<'_>) -> Result<()>;
}

/// The register window of one device.
pub struct MmioTransport<D> {
    /// The device.
    pub device: D,
    /// Its queues.
    pub queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// InterruptStatus: set when the device uses buffers, cleared by InterruptACK.
    interrupt_status: u32,
    /// Per queue, the used index an interrupt was last raised for.
    signalled_used: Vec<u16>,
    /// The interrupt line (none in tests that drive the device without a VM).
    irq: Option<IrqLine>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport over `device`, reset.
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m).expect("queue sizes are powers of two"))
            .collect::<Vec<Queue>>();
        Self {
            device,
            signalled_used: vec![0; queues.len()],
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            interrupt_status: 0,
            irq: None,
        }
    }

    /// The same transport, raising `irq` when it uses buffers.
    pub fn with_irq(mut self, irq: IrqLine) -> Self {
        self.irq = Some(irq);
        self
    }

    /// The InterruptStatus register.
    #[cfg(test)]
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// After the device worked on its queues: if it put buffers into a used ring since the
    /// last interrupt, sets the used-buffer bit of InterruptStatus and raises the line.
    /// Returns whether it did. A line that cannot be raised is logged (the driver still
    /// finds the buffers when it next looks).
    pub fn signal_used(&mut self) -> bool {
        let mut used = false;
        for (q, seen) in self.queues.iter().zip(&mut self.signalled_used) {
            let now = q.next_used();
            if now != *seen {
                *seen = now;
                used = true;
            }
        }
        if used {
            self.interrupt_status |= INT_USED_RING;
            if let Some(irq) = &self.irq
                && let Err(e) = irq.raise()
            {
                tracing::warn!(error = %e, "cannot raise a virtio interrupt");
            }
        }
        used
    }

    /// Whether the driver finished initialization.
    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.signalled_used.fill(0);
        self.device.reset();
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// An MMIO read at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_id(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => q.map_or(0, |q| u32::from(q.max_size())),
            0x044 => q.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    /// An MMIO write at `offset`. Returns the queue index on a notification.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => return Some(v as usize),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    if v & STATUS_FEATURES_OK != 0
                        && self.driver_features & !self.device.features() != 0
                    {
                        // Features the device never offered: refuse FEATURES_OK.
                        self.status = v & !STATUS_FEATURES_OK;
                        return None;
                    }
                    self.status = v;
                }
            }
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
        None
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue() {
            f(q);
        }
    }

    /// Processes queue `index` if the driver is ready and the queue is valid.
    ///
    /// # Errors
    /// As [`VirtioDevice::notify`].
    pub fn notify(&mut self, index: usize, mem: &GuestMemory) -> Result<()> {
        if !self.driver_ok() {
            return Ok(());
        }
        match self.queues.get(index) {
            Some(q) if q.ready() && q.is_valid(mem) => {}
            Some(_) => {
                return Err(Error::Virtio(format!(
                    "queue {index} notified but not valid"
                )));
            }
            None => return Ok(()),
        }
        self.device.notify(index, &mut self.queues, mem)
    }

    /// Saves the transport and the device.
    pub fn save(&self, w: &mut Writer) {
        w.pod(&[
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
            self.config_generation,
            self.interrupt_status,
        ]);
        w.u64(self.driver_features);
        w.u64(self.queues.len() as u64);
        for (i, q) in self.queues.iter().enumerate() {
            let s = q.state();
            // Requests still in flight are saved as not yet taken (see
            // VirtioDevice::unfinished).
            let next_avail = s.next_avail.wrapping_sub(self.device.unfinished(i));
            w.pod(&[
                s.desc_table,
                s.avail_ring,
                s.used_ring,
                u64::from(s.max_size),
                u64::from(next_avail),
                u64::from(s.next_used),
                u64::from(s.size),
                u64::from(s.ready),
                u64::from(s.event_idx_enabled),
            ]);
        }
        self.device.save(w);
    }

    /// Restores what [`MmioTransport::save`] wrote.
    ///
    /// # Errors
    /// [`Error::Snapshot`] for bad bytes or an impossible queue.
    pub fn restore(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let regs: [u32; 6] = r.pod("transport registers")?;
        [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
            self.config_generation,
            self.interrupt_status,
        ] = regs;
        self.driver_features = r.u64("driver features")?;
        let n = r.u64("queue count")?;
        if n != self.queues.len() as u64 {
            return Err(Error::Snapshot(format!(
                "{n} queues for a device with {}",
                self.queues.len()
            )));
        }
        for q in &mut self.queues {
            let v: [u64; 9] = r.pod("queue")?;
            let s = QueueState {
                desc_table: v[0],
                avail_ring: v[1],
                used_ring: v[2],
                max_size: v[3] as u16,
                next_avail: v[4] as u16,
                next_used: v[5] as u16,
                size: v[6] as u16,
                ready: v[7] != 0,
                event_idx_enabled: v[8] != 0,
            };
            if s.max_size != q.max_size() {
                return Err(Error::Snapshot("queue of another maximum size".into()));
            }
            *q = Queue::try_from(s).map_err(|e| Error::Snapshot(format!("queue: {e}")))?;
        }
        // An interrupt raised before the save is in the interrupt controllers' state (the
        // snapshot carries them); raise again only for buffers used after this point.
        for (q, seen) in self.queues.iter().zip(&mut self.signalled_used) {
            *seen = q.next_used();
        }
        self.device.restore(r)
    }
}
