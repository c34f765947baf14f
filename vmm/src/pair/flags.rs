//! The children's command lines: the options of each side, drawn from `colo pair`'s own.

use std::path::Path;

use super::{GUEST, PairArgs};
use crate::colo::ColoError;
use crate::colo::cli::ColoArgs;

/// The checkpoint and heartbeat options, as both sides take them.
fn colo_flags(c: &ColoArgs) -> Vec<String> {
    vec![
        format!("--checkpoint-delay={}us", c.checkpoint_delay.as_micros()),
        format!("--push-interval={}us", c.push_interval.as_micros()),
        format!("--disk-send-delay={}us", c.disk_send_delay.as_micros()),
        format!(
            "--heartbeat-interval={}us",
            c.heartbeat_interval.as_micros()
        ),
        format!("--heartbeat-timeout={}us", c.heartbeat_timeout.as_micros()),
        format!(
            "--mode={}",
            clap::ValueEnum::to_possible_value(&c.mode)
                .map_or("colo".into(), |v| v.get_name().to_string())
        ),
        format!("--dirty-threshold={}", c.dirty_threshold),
        format!("--pair-id={}", c.pair_id),
        "--transport=tcp".into(),
        format!("--streams={}", c.streams),
    ]
}

/// The VM options of `side` ("primary" or "secondary"): its disk and network socket in
/// `dir`, the guest's address, its load.
pub(super) fn vm_flags(a: &PairArgs, dir: &Path, side: &str) -> Vec<String> {
    let mut v = vec![
        format!("--ram={}", a.ram),
        format!("--vcpus={}", a.vcpus),
        format!("--disk={}", dir.join(format!("{side}.img")).display()),
        // The guest's disk log only grows: room for long, fast runs (a sparse file).
        "--disk-size=268435456".into(),
        format!(
            "--net-socket={}",
            dir.join(format!("{side}.sock")).display()
        ),
        format!(
            "--guest-ip={}.{}.{}.{}/24",
            GUEST.0[0], GUEST.0[1], GUEST.0[2], GUEST.0[3]
        ),
        format!("--port={}", GUEST.1),
        format!("--dirty-rate={}", a.dirty_rate),
    ];
    if a.nondeterministic {
        v.push("--nondeterministic".into());
    }
    v
}

/// `colo secondary` listening on loopback `port`, taking over only once `alive` is gone,
/// with its events on `events`.
pub(super) fn secondary_args(
    a: &PairArgs,
    dir: &Path,
    port: u16,
    alive: &Path,
    events: &Path,
) -> Vec<String> {
    let mut v = vec![
        "secondary".to_string(),
        format!("--listen=127.0.0.1:{port}"),
        format!("--events={}", events.display()),
    ];
    v.push(format!("--takeover-check=test ! -e {}", alive.display()));
    v.push(format!("--vcpu-nice={}", a.svm_nice));
    v.extend(vm_flags(a, dir, "secondary"));
    v.extend(colo_flags(&a.colo));
    v
}

/// `colo primary` for the secondary on loopback `port`, with its events on `events`.
pub(super) fn primary_args(a: &PairArgs, dir: &Path, port: u16, events: &Path) -> Vec<String> {
    let mut v = vec![
        "primary".to_string(),
        format!("--peer=127.0.0.1:{port}"),
        format!("--events={}", events.display()),
        "--commit-marker".to_string(),
    ];
    v.extend(vm_flags(a, dir, "primary"));
    if a.reprotect {
        v.push("--reprotect".into());
    }
    v.extend(colo_flags(&a.colo));
    v
}

/// A loopback port P with P+1 free too (the secondary's control and disk replication).
pub(super) fn free_port() -> Result<u16, ColoError> {
    for _ in 0..64 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(ColoError::io("bind a loopback port"))?;
        let p = l
            .local_addr()
            .map_err(ColoError::io("read a loopback port"))?
            .port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(ColoError::NoFreePorts)
}
