//! Every verbs scenario twice: on the in-process queue pair (runs everywhere) and on the
//! RDMA device named by `COLO_RDMA_DEVICE`/`COLO_RDMA_ADDR` (run by
//! `soft-roce-tests/run.sh`, or by hand with `--ignored`).

use colo_soft_roce_tests::{
    Device, Ofi, Sim, bad_rkey_is_refused, qp_error_mid_epoch_keeps_the_previous_epoch,
    random_pages_land_and_commit, write_outside_the_region_is_refused,
};

fn device() -> Device {
    match Device::from_env() {
        Ok(d) => d,
        Err(why) => panic!("device tests need an RDMA device: {why}"),
    }
}

#[test]
fn sim_random_pages_land_and_commit() {
    random_pages_land_and_commit(&Sim, 1024, 6).unwrap();
}

#[test]
fn sim_bad_rkey_is_refused() {
    bad_rkey_is_refused(&Sim).unwrap();
}

#[test]
fn sim_qp_error_mid_epoch_keeps_the_previous_epoch() {
    qp_error_mid_epoch_keeps_the_previous_epoch(&Sim).unwrap();
}

#[test]
#[ignore = "requires an RDMA device"]
fn device_random_pages_land_and_commit() {
    random_pages_land_and_commit(&device(), 1024, 6).unwrap();
}

#[test]
#[ignore = "requires an RDMA device"]
fn device_bad_rkey_is_refused() {
    bad_rkey_is_refused(&device()).unwrap();
}

#[test]
#[ignore = "requires an RDMA device"]
fn device_qp_error_mid_epoch_keeps_the_previous_epoch() {
    qp_error_mid_epoch_keeps_the_previous_epoch(&device()).unwrap();
}

#[test]
fn ofi_tcp_random_pages_land_and_commit() {
    random_pages_land_and_commit(&Ofi::provider("tcp"), 1024, 6).unwrap();
}

#[test]
fn ofi_tcp_bad_rkey_is_refused() {
    bad_rkey_is_refused(&Ofi::provider("tcp")).unwrap();
}

#[test]
fn ofi_tcp_qp_error_mid_epoch_keeps_the_previous_epoch() {
    qp_error_mid_epoch_keeps_the_previous_epoch(&Ofi::provider("tcp")).unwrap();
}

#[test]
fn ofi_tcp_write_outside_the_region_is_refused() {
    write_outside_the_region_is_refused(&Ofi::provider("tcp")).unwrap();
}

#[test]
fn sim_write_outside_the_region_is_refused() {
    write_outside_the_region_is_refused(&Sim).unwrap();
}

#[test]
#[ignore = "requires an RDMA device"]
fn device_write_outside_the_region_is_refused() {
    write_outside_the_region_is_refused(&device()).unwrap();
}

/// Reliable datagram endpoints: the endpoint names travel in the descriptor and the
/// sender's first message, and completions retire in order.
mod rdm {
    use super::*;

    #[test]
    fn ofi_shm_random_pages_land_and_commit() {
        random_pages_land_and_commit(&Ofi::rdm("shm"), 1024, 6).unwrap();
    }

    #[test]
    fn ofi_shm_bad_rkey_is_refused() {
        bad_rkey_is_refused(&Ofi::rdm("shm")).unwrap();
    }

    #[test]
    fn ofi_shm_qp_error_mid_epoch_keeps_the_previous_epoch() {
        qp_error_mid_epoch_keeps_the_previous_epoch(&Ofi::rdm("shm")).unwrap();
    }

    #[test]
    fn ofi_shm_write_outside_the_region_is_refused() {
        write_outside_the_region_is_refused(&Ofi::rdm("shm")).unwrap();
    }

    #[test]
    fn ofi_tcp_rxm_random_pages_land_and_commit() {
        random_pages_land_and_commit(&Ofi::rdm("tcp"), 1024, 6).unwrap();
    }

    #[test]
    fn ofi_tcp_rxm_bad_rkey_is_refused() {
        bad_rkey_is_refused(&Ofi::rdm("tcp")).unwrap();
    }

    #[test]
    fn ofi_tcp_rxm_qp_error_mid_epoch_keeps_the_previous_epoch() {
        qp_error_mid_epoch_keeps_the_previous_epoch(&Ofi::rdm("tcp")).unwrap();
    }

    #[test]
    fn ofi_tcp_rxm_write_outside_the_region_is_refused() {
        write_outside_the_region_is_refused(&Ofi::rdm("tcp")).unwrap();
    }
}
