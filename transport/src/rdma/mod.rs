//! The verbs RDMA backend (feature `rdma`, through rdma-sys): an [`Endpoint`] on a real
//! RC queue pair, driven by the pipeline of [`crate::verbs`].
//!
//! - Discovery: a kernel without RDMA makes `ibv_get_device_list` fail with ENOSYS; a
//!   kernel with RDMA but no device returns an empty list. Both mean "no RDMA", and
//!   `--transport auto` falls back to TCP on them.
//! - Connection setup with rdma_cm ([`RdmaListener`] on the receiver, [`connect`] on the
//!   sender): RC queue pairs; the receiver's region address, rkey and length travel over
//!   the COLO control channel as a [`RegionDesc`](crate::push::RegionDesc).
//! - Registration: the receiver registers its RAM cache with local and remote write
//!   access only (never remote read), so its rkey grants exactly that. The sender registers
//!   its source (guest memory) once, read-only; where that fails it registers bounce
//!   buffers instead. A locked-memory limit too small for the region is reported with the
//!   fix.
//!
//! [`Endpoint`]: crate::verbs::Endpoint

mod endpoint;

use std::ffi::CStr;

pub use endpoint::{RdmaEndpoint, RdmaListener, connect, connect_endpoint};

/// Where and how to set up the queue pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOptions {
    /// The device to use (`mlx5_0`, `rxe0`); the one that owns the address if `None`.
    pub device: Option<String>,
    /// The device port (1-based).
    pub port: u8,
    /// RoCE: the GID table index whose IP address to use as the local address. `None`:
    /// rdma_cm picks from the routing table.
    pub gid_index: Option<u8>,
    /// Send queue depth asked for (clamped to the device).
    pub send_queue: u32,
    /// Scatter-gather entries per request asked for (clamped to the device).
    pub max_sge: u32,
    /// Bytes of bounce buffers registered where the source cannot be.
    pub bounce_len: usize,
}

impl Default for RdmaOptions {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            send_queue: 256,
            max_sge: 16,
            bounce_len: 32 << 20,
        }
    }
}

/// Errors of the verbs backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// The kernel or the machine has no RDMA support.
    #[error("no RDMA on this machine: {0}")]
    Unsupported(String),
    /// A verbs or rdma_cm call failed.
    #[error("{call} failed: {source}")]
    Call {
        /// The call.
        call: &'static str,
        /// The errno it left.
        #[source]
        source: std::io::Error,
    },
    /// Memory registration failed under the locked-memory limit.
    #[error(
        "cannot register {len} bytes for RDMA: {source}; the locked-memory limit (ulimit -l) \
         is {limit}. Raise it: `ulimit -l unlimited` in the shell that starts colo, \
         `LimitMEMLOCK=infinity` in a systemd unit, or a memlock line in \
         /etc/security/limits.conf"
    )]
    Memlock {
        /// Bytes that could not be registered.
        len: usize,
        /// The current soft limit, readable.
        limit: String,
        /// The registration error.
        #[source]
        source: std::io::Error,
    },
    /// The address does not belong to the device or port asked for.
    #[error("{what}")]
    Mismatch {
        /// What disagrees, readable.
        what: String,
    },
    /// The device asked for is not present.
    #[error("RDMA device {wanted:?} not found; present: {present:?}")]
    NoSuchDevice {
        /// The device asked for.
        wanted: String,
        /// The devices that exist.
        present: Vec<String>,
    },
}

/// Lists the names of the RDMA devices of this machine.
///
/// # Errors
/// [`RdmaError::Unsupported`] when the kernel has no RDMA (ENOSYS), the verbs library
/// cannot list devices, or the list is empty.
pub fn device_names() -> Result<Vec<String>, RdmaError> {
    let mut n: libc::c_int = 0;
    // SAFETY: `n` is a valid out-pointer; the returned list is freed below.
    let list = unsafe { rdma_sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        let why = if e.raw_os_error() == Some(libc::ENOSYS) {
            "the kernel has no RDMA support (ibv_get_device_list: ENOSYS)".to_string()
        } else {
            format!("ibv_get_device_list failed: {e}")
        };
        return Err(RdmaError::Unsupported(why));
    }
    let mut names = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` valid device pointers (the verbs API contract).
        let dev = unsafe { *list.add(i) };
        // SAFETY: `dev` is a live device of the list; the name is a NUL-terminated string
        // owned by the library for as long as the list lives, and we copy it out now.
        let name = unsafe { CStr::from_ptr(rdma_sys::ibv_get_device_name(dev)) };
        names.push(name.to_string_lossy().into_owned());
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed exactly once.
    unsafe { rdma_sys::ibv_free_device_list(list) };
    if names.is_empty() {
        return Err(RdmaError::Unsupported(
            "the verbs library lists no RDMA device".into(),
        ));
    }
    Ok(names)
}

/// Picks the device to use: `wanted` if given (it must exist), else the first one.
///
/// # Errors
/// [`RdmaError::Unsupported`] without RDMA, [`RdmaError::NoSuchDevice`] if `wanted` is
/// absent.
pub fn select_device(wanted: Option<&str>) -> Result<String, RdmaError> {
    let present = device_names()?;
    match wanted {
        None => Ok(present[0].clone()),
        Some(w) if present.iter().any(|p| p == w) => Ok(w.to_string()),
        Some(w) => Err(RdmaError::NoSuchDevice {
            wanted: w.to_string(),
            present,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_answers_either_devices_or_a_clear_no() {
        match device_names() {
            Ok(names) => assert!(!names.is_empty() && names.iter().all(|n| !n.is_empty())),
            Err(RdmaError::Unsupported(why)) => assert!(!why.is_empty()),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn asking_for_a_missing_device_names_what_exists() {
        let e = select_device(Some("no-such-device-xyz")).unwrap_err();
        assert!(
            matches!(
                e,
                RdmaError::Unsupported(_) | RdmaError::NoSuchDevice { .. }
            ),
            "{e}"
        );
    }
}
