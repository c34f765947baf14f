//! The one error type of the machine.

use std::io;

/// Everything that can stop a VM from being built, run, saved or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot describe a VM (sizes, addresses, options).
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// The guest image is not a loadable x86-64 executable.
    #[error("bad guest image: {0}")]
    Image(String),
    /// The guest image (the built-in guest, or another PVH image given instead) cannot be
    /// loaded.
    #[error("cannot load the guest image")]
    GuestImage(#[source] crate::linux::Error),
    /// The Linux kernel, its initrd or its command line cannot be booted.
    #[error("cannot boot the Linux kernel")]
    Kernel(#[from] crate::linux::Error),
    /// The ACPI tables cannot be written.
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] crate::acpi::Error),
    /// The disk image cannot be used.
    #[error("disk image {path}: {reason}")]
    Disk {
        /// The image's path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An OS operation failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A tap device could not be opened or attached.
    #[error("tap device {name}: {what} failed")]
    Tap {
        /// The tap's name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error (its errno).
        #[source]
        source: io::Error,
    },
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest stopped the VM in a way the VMM did not expect (triple fault, failed
    /// entry, an internal KVM error, an exit status other than 0).
    #[error("the guest stopped: {reason}\n{regs}")]
    GuestCrash {
        /// The exit reason.
        reason: String,
        /// The vCPU registers at the time, for the report.
        regs: String,
    },
    /// The vCPU thread did not answer in time.
    #[error("the vCPU did not {0} in time")]
    Timeout(&'static str),
    /// A VM state snapshot that cannot be decoded or applied.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Dirty tracking failed.
    #[error("dirty tracking")]
    Dirty(#[from] colo_dirty_track::Error),
    /// Guest memory that does not form a layout.
    #[error("guest memory layout")]
    Layout(#[from] colo_memory::Error),
    /// A virtio queue the guest set up is unusable.
    #[error("virtio: {0}")]
    Virtio(String),
}

impl Error {
    /// Wraps a KVM error with what was being done.
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { what, source }
    }

    /// Wraps an OS error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The result type of the machine.
pub type Result<T> = std::result::Result<T, Error>;
