//! virtio-net: frames between the guest's queues and a [`NetBackend`].

use std::collections::VecDeque;
use std::io::{Read, Write};

use colo_memory::GuestMemory;
use virtio_queue::{Queue, QueueT};

use super::backend::{MAX_FRAME, NetBackend};
use super::virtio_mmio::{F_VERSION_1, VirtioDevice};
use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};

const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1`.
const HDR: usize = 12;
const RX: usize = 0;
const TX: usize = 1;
/// Frames kept for the guest beyond what its receive queue holds.
const MAX_PENDING: usize = 256;

/// Counters of the device.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames dropped (too large, backend error, no room).
    pub dropped: u64,
    /// Times the vCPU waited because the proxy held the VM (its pacing of a secondary).
    pub holds: u64,
}

/// The virtio-net device.
pub(crate) struct Net {
    mac: [u8; 6],
    backend: NetBackend,
    pending: VecDeque<Vec<u8>>,
    /// Transmit scratch, kept between notifications.
    tx_buf: Vec<u8>,
    /// Counters.
    pub(crate) stats: NetStats,
}

impl Net {
    /// A device with `mac` over `backend`.
    pub(crate) fn new(mac: [u8; 6], backend: NetBackend) -> Self {
        Self {
            mac,
            backend,
            pending: VecDeque::new(),
            tx_buf: Vec::with_capacity(HDR + MAX_FRAME),
            stats: NetStats::default(),
        }
    }

    /// Sends the backend's commit marker after every frame transmitted so far.
    ///
    /// # Errors
    /// `Unsupported` for a backend without markers (a tap), or its I/O error.
    pub(crate) fn commit_marker(&mut self) -> std::io::Result<()> {
        self.backend.sink.marker()
    }

    /// Sends a role word (`colo_netcmp::framing::RoleWord`) after every frame transmitted
    /// so far.
    ///
    /// # Errors
    /// `Unsupported` for a backend without words (a tap), or its I/O error.
    pub(crate) fn role_word(
        &mut self,
        word: colo_netcmp::framing::RoleWord,
    ) -> std::io::Result<()> {
        self.backend.sink.role_word(word)
    }

    /// Written by the backend after each received frame (the device thread waits on it).
    pub(crate) fn rx_event(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.backend.rx_ready
    }

    /// The proxy's pacing words for this VM.
    pub(crate) fn pace(&self) -> &std::sync::Arc<super::backend::Pace> {
        &self.backend.pace
    }

    /// Moves waiting frames into the guest's receive buffers, as many as fit.
    pub(crate) fn deliver(&mut self, queues: &mut [Queue], mem: &GuestMemory) {
        while self.pending.len() < MAX_PENDING {
            match self.backend.rx.try_recv() {
                Ok(f) => self.pending.push_back(f),
                Err(_) => break,
            }
        }
        let q = &mut queues[RX];
        if !q.ready() || self.pending.is_empty() {
            return;
        }
        while let Some(frame) = self.pending.front() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HDR + frame.len() => {
                    let mut hdr = [0u8; HDR];
                    hdr[10] = 1; // num_buffers
                    w.write_all(&hdr)
                        .and_then(|()| w.write_all(frame))
                        .map(|()| HDR + frame.len())
                }
                _ => Ok(0),
            };
            let n = match written {
                Ok(n) if n > 0 => {
                    self.stats.rx_frames += 1;
                    n
                }
                _ => {
                    self.stats.dropped += 1;
                    0
                }
            };
            if q.add_used(mem, head, n as u32).is_err() {
                break;
            }
            self.pending.pop_front();
        }
    }

    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemory) {
        let mut buf = std::mem::take(&mut self.tx_buf);
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            buf.clear();
            let ok = chain.reader(mem).is_ok_and(|mut r| {
                r.available_bytes() <= HDR + MAX_FRAME && r.read_to_end(&mut buf).is_ok()
            });
            if ok && buf.len() > HDR {
                match self.backend.sink.send(&buf[HDR..]) {
                    Ok(()) => self.stats.tx_frames += 1,
                    Err(e) => {
                        self.stats.dropped += 1;
                        if self.stats.dropped.is_power_of_two() {
                            tracing::warn!(backend = %self.backend.name, error = %e, "transmit failed");
                        }
                    }
                }
            } else {
                self.stats.dropped += 1;
            }
            if q.add_used(mem, head, 0).is_err() {
                break;
            }
        }
        self.tx_buf = buf;
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_MAC
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[crate::abi::NET_QUEUE_SIZE, crate::abi::NET_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn notify(&mut self, index: usize, q: &mut [Queue], mem: &GuestMemory) -> Result<()> {
        match index {
            TX => self.transmit(&mut q[TX], mem),
            RX => self.deliver(q, mem),
            _ => return Err(Error::Virtio(format!("net has no queue {index}"))),
        }
        Ok(())
    }

    fn save(&self, w: &mut Writer) {
        w.pod(&self.mac);
        w.u64(self.pending.len() as u64);
        for f in &self.pending {
            w.bytes(f);
        }
    }

    fn restore(&mut self, r: &mut Reader<'_>) -> Result<()> {
        self.mac = r.pod("mac")?;
        let n = r.u64("pending frames")?;
        if n > MAX_PENDING as u64 {
            return Err(Error::Snapshot(format!(
                "{n} pending frames, at most {MAX_PENDING}"
            )));
        }
        self.pending.clear();
        for _ in 0..n {
            let f = r.bytes("frame")?;
            if f.len() > MAX_FRAME {
                return Err(Error::Snapshot(format!("a frame of {} bytes", f.len())));
            }
            self.pending.push_back(f.to_vec());
        }
        Ok(())
    }
}
