//! The verbs RDMA backend (feature `rdma`, through rdma-sys).
//!
//! This module holds device discovery: the one fact every other part of the backend needs
//! first is whether this machine has RDMA at all. A kernel without RDMA makes
//! `ibv_get_device_list` fail with ENOSYS; a kernel with RDMA but no device returns an empty
//! list. Both mean "no RDMA", and `--transport auto` falls back to TCP on them.

use std::ffi::CStr;

/// Errors of the verbs backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RdmaError {
    /// The kernel or the machine has no RDMA support.
    #[error("no RDMA on this machine: {0}")]
    Unsupported(String),
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
