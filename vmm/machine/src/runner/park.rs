//! What each vCPU thread and the device thread are doing, as far as the controller
//! cares: running, parked (paused, off the machine for disk requests, or ended), and when
//! they parked. A pause is done once every vCPU and the device thread are parked;
//! [`PauseReport`] says how long each vCPU took.

use std::time::{Duration, Instant};

/// One vCPU thread's (or the device thread's) state.
#[derive(Debug, Default)]
pub(super) struct VcpuCtl {
    /// Parked at the controller's request.
    pub(super) paused: bool,
    /// The thread has ended.
    pub(super) finished: bool,
    /// The thread runs disk requests, or waits to write their outcomes, without the
    /// machine or its vCPU: a pause need not wait for it.
    pub(super) off_machine: bool,
    /// The disk requests are still running.
    pub(super) disk_io: bool,
    /// When it last parked (paused, went off the machine, or ended).
    parked_at: Option<Instant>,
}

impl VcpuCtl {
    /// Whether a controller that asked for a pause may use the machine.
    fn parked(&self) -> bool {
        self.paused || self.finished || self.off_machine
    }

    /// Notes that the thread parks now.
    pub(super) fn parks(&mut self) {
        self.parked_at = Some(Instant::now());
    }
}

/// Every vCPU thread's state, under the runner's lock.
#[derive(Debug)]
pub(super) struct Ctl {
    /// By vCPU index.
    pub(super) vcpus: Vec<VcpuCtl>,
    /// The device thread.
    pub(super) device: VcpuCtl,
    /// Every thread is spawned: they may run.
    pub(super) started: bool,
    /// The vCPU whose end stopped the others (a guest exit or crash), if any did.
    pub(super) first_end: Option<usize>,
}

impl Ctl {
    /// The state of `n` threads that have not started.
    pub(super) fn new(n: usize) -> Self {
        Self {
            vcpus: (0..n).map(|_| VcpuCtl::default()).collect(),
            device: VcpuCtl::default(),
            started: false,
            first_end: None,
        }
    }

    /// Whether every vCPU and the device thread are parked.
    pub(super) fn all_parked(&self) -> bool {
        self.vcpus.iter().all(VcpuCtl::parked) && self.device.parked()
    }

    /// Whether every vCPU thread and the device thread have ended (a vCPU's end stops the
    /// device thread at once).
    pub(super) fn all_finished(&self) -> bool {
        self.vcpus.iter().chain([&self.device]).all(|v| v.finished)
    }

    /// Whether disk requests of the guest are running.
    pub(super) fn disk_io(&self) -> bool {
        self.vcpus.iter().chain([&self.device]).any(|v| v.disk_io)
    }

    /// Whether the machine may be used: every vCPU and the device thread paused or
    /// ended, or (once a pause was `asked` for) off the machine.
    pub(super) fn machine_free(&self, asked: bool) -> bool {
        self.vcpus
            .iter()
            .chain([&self.device])
            .all(|v| v.paused || v.finished || (asked && v.off_machine))
    }

    /// How long after `asked` each vCPU parked (0 for one parked before).
    pub(super) fn report(&self, asked: Instant) -> PauseReport {
        PauseReport {
            stops: self
                .vcpus
                .iter()
                .map(|v| {
                    v.parked_at
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(asked))
                })
                .collect(),
        }
    }
}

/// How a pause went: how long each vCPU took to stop after it was asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseReport {
    stops: Vec<Duration>,
}

impl PauseReport {
    /// Each vCPU's stop time, in index order (zero for a vCPU that was parked already:
    /// paused, ended, or running disk requests off the machine).
    pub fn stops(&self) -> &[Duration] {
        &self.stops
    }

    /// The slowest vCPU's stop time: when the pause was complete, bar the wake-up of the
    /// caller.
    pub fn slowest(&self) -> Duration {
        self.stops.iter().copied().max().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_done_when_every_vcpu_is_parked_and_reports_each() {
        let mut c = Ctl::new(3);
        c.device.paused = true;
        let asked = Instant::now();
        assert!(!c.all_parked() && !c.machine_free(true));
        c.vcpus[0].paused = true;
        c.vcpus[0].parks();
        c.vcpus[1].finished = true;
        assert!(!c.all_parked(), "vCPU 2 still runs");
        c.vcpus[2].off_machine = true;
        c.vcpus[2].disk_io = true;
        std::thread::sleep(Duration::from_millis(2));
        c.vcpus[2].parks();
        assert!(c.all_parked() && c.disk_io());
        assert!(
            c.machine_free(true),
            "off the machine counts once a pause was asked"
        );
        assert!(!c.machine_free(false));
        let r = c.report(asked);
        assert_eq!(r.stops().len(), 3);
        assert_eq!(r.stops()[1], Duration::ZERO, "never parked: ended");
        assert_eq!(r.slowest(), r.stops()[2]);
        assert!(r.slowest() >= Duration::from_millis(2));
        assert!(!c.all_finished());
        c.device.paused = false;
        assert!(
            !c.all_parked() && !c.machine_free(true),
            "the device thread still runs"
        );
    }
}
