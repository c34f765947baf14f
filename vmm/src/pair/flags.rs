//! The children's command lines: the options of each side, drawn from `colo pair`'s own.

use std::path::{Path, PathBuf};

use super::{GUEST, PairArgs};
use crate::colo::ColoError;
use crate::colo::cli::{ColoArgs, OfiEndpointArg, TransportKind};

/// The checkpoint and heartbeat options, as both sides take them.
fn colo_flags(c: &ColoArgs) -> Vec<String> {
    let mut flags = vec![
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
        format!("--hot-budget={}", c.hot_budget),
        format!("--pair-id={}", c.pair_id),
        // Both sides run on this machine, over loopback: `auto` means TCP here (RDMA
        // devices are not reachable through 127.0.0.1); a transport asked for by name is
        // passed on (`--transport ofi` works on loopback with the tcp provider).
        match c.transport {
            TransportKind::Auto => "--transport=tcp".into(),
            t => format!(
                "--transport={}",
                clap::ValueEnum::to_possible_value(&t)
                    .map_or("tcp".into(), |v| v.get_name().to_string())
            ),
        },
        format!("--streams={}", c.streams),
    ];
    if c.hot_flush {
        flags.push("--hot-flush".into());
    }
    if let Some(p) = &c.ofi_provider {
        flags.push(format!("--ofi-provider={p}"));
    }
    if c.ofi_endpoint != OfiEndpointArg::Auto {
        flags.push(format!(
            "--ofi-endpoint={}",
            clap::ValueEnum::to_possible_value(&c.ofi_endpoint)
                .map_or("auto".into(), |v| v.get_name().to_string())
        ));
    }
    flags
}

/// The pair-key option both sides get: the user's `--pair-key` or `--insecure`, else a
/// new key in `dir` (mode 0600, removed with `dir`).
///
/// # Errors
/// A key that cannot be made or written.
pub(super) fn pair_key(a: &PairArgs, dir: &Path) -> Result<Vec<String>, ColoError> {
    let encrypt = a.colo.encrypt.then(|| "--encrypt".to_string());
    if a.colo.insecure {
        return Ok(vec!["--insecure".into()]);
    }
    let path = match &a.colo.pair_key {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("pair.key");
            let _ = std::fs::remove_file(&p);
            colo_auth::PairKey::generate()?.write_new(&p)?;
            p
        }
    };
    Ok(std::iter::once(format!("--pair-key={}", path.display()))
        .chain(encrypt)
        .collect())
}

/// The VM options of `side` ("primary" or "secondary"): its disk and network socket in
/// `dir`, the guest's address, its load.
pub(super) fn vm_flags(a: &PairArgs, dir: &Path, side: &str) -> Vec<String> {
    let mut v = vec![
        format!("--vcpus={}", a.vcpus),
        format!("--disk={}", disk_of(a, dir, side).display()),
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
        format!("--dirty-pattern={}", a.dirty_pattern.name()),
    ];
    if a.nondeterministic {
        v.push("--nondeterministic".into());
    }
    if let Some(ram) = a.ram {
        v.push(format!("--ram={ram}"));
    }
    if a.disk.is_none() {
        // The guest's disk log only grows: room for long, fast runs (a sparse file).
        v.push("--disk-size=268435456".into());
    }
    let k = &a.kernel;
    if let Some(kernel) = &k.kernel {
        v.push(format!("--kernel={}", kernel.display()));
    }
    if let Some(initrd) = &k.initrd {
        v.push(format!("--initrd={}", initrd.display()));
    }
    if let Some(cmdline) = &k.cmdline {
        v.push(format!("--cmdline={cmdline}"));
    }
    v
}

/// The disk image of `side`. With `--disk`: that image for the primary, and beside it
/// `<image>.secondary` for the secondary (a copy made by [`copy_disk`], kept after the
/// pair ends: after a failover it is the current one). Without: a fresh file in `dir`.
pub(super) fn disk_of(a: &PairArgs, dir: &Path, side: &str) -> PathBuf {
    match (&a.disk, side) {
        (Some(d), "primary") => d.clone(),
        (Some(d), _) => {
            let mut name = d.as_os_str().to_owned();
            name.push(".secondary");
            PathBuf::from(name)
        }
        (None, _) => dir.join(format!("{side}.img")),
    }
}

/// The secondary starts from the same disk as the primary: a sparse copy of `--disk`
/// (created first if it does not exist) beside it, replacing an older copy (block
/// replication keeps them equal from then on). Nothing to do without --disk:
/// each side makes a fresh, equal image.
///
/// # Errors
/// The image cannot be read or the copy written.
pub(super) fn copy_disk(a: &PairArgs, dir: &Path) -> Result<(), ColoError> {
    let Some(src) = &a.disk else {
        return Ok(());
    };
    // A new image is made here as `colo run` would make it, so that both sides start from it.
    crate::args::prepare_disk(src, None)?;
    let dst = disk_of(a, dir, "secondary");
    let out = std::process::Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(&dst)
        .output()
        .map_err(ColoError::io("run cp(1)"))?;
    if !out.status.success() {
        return Err(ColoError::file("copy for the secondary", src)(
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
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
    if let Some(lead) = a.svm_flush_lead.0 {
        v.push(format!("--disk-flush-lead={lead}"));
    }
    v.extend(metrics_flag(a, 1));
    v.extend(vm_flags(a, dir, "secondary"));
    v.extend(colo_flags(&a.colo));
    v.extend(qmp_flags(&a.colo, "secondary"));
    v
}

/// The QMP socket of `side`, if `colo pair --qmp PATH` was given: PATH for the primary,
/// `PATH.secondary` beside it for the secondary.
pub(super) fn qmp_of(c: &ColoArgs, side: &str) -> Option<PathBuf> {
    let path = c.qmp.as_ref()?;
    if side == "primary" {
        return Some(path.clone());
    }
    let mut name = path.as_os_str().to_owned();
    name.push(".secondary");
    Some(PathBuf::from(name))
}

/// `--qmp` and `--qmp-mode` for `side` (nothing without `colo pair --qmp`).
fn qmp_flags(c: &ColoArgs, side: &str) -> Vec<String> {
    qmp_of(c, side).map_or_else(Vec::new, |p| {
        vec![
            format!("--qmp={}", p.display()),
            format!("--qmp-mode={:o}", c.qmp_mode),
        ]
    })
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
    v.extend(metrics_flag(a, 0));
    v.extend(colo_flags(&a.colo));
    v.extend(qmp_flags(&a.colo, "primary"));
    v
}

/// `--metrics-listen` for a side: the pair's address with its port raised by `by` (0 for
/// the primary, 1 for the secondary; the proxy, in `colo pair` itself, takes 2). Checked
/// by [`metrics_addrs_fit`] before the sides start.
fn metrics_flag(a: &PairArgs, by: u16) -> Option<String> {
    let addr = a.colo.metrics_listen.as_deref()?;
    crate::colo::metrics_http::port_after(addr, by).map(|m| format!("--metrics-listen={m}"))
}

/// Refuses a `--metrics-listen` that leaves no room for the three endpoints.
///
/// # Errors
/// [`ColoError::Usage`] when it is not HOST:PORT with PORT at most 65533.
pub(super) fn metrics_addrs_fit(a: &PairArgs) -> Result<(), ColoError> {
    match a.colo.metrics_listen.as_deref() {
        Some(addr) if crate::colo::metrics_http::port_after(addr, 2).is_none() => {
            Err(ColoError::Usage(
                "--metrics-listen must be HOST:PORT with PORT at most 65533: colo pair serves \
                 the primary's metrics at PORT, the secondary's at PORT+1, the proxy's at PORT+2",
            ))
        }
        _ => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::colo::cli::{PrimaryArgs, SecondaryArgs};

    #[derive(Parser)]
    struct Pair {
        #[command(flatten)]
        a: PairArgs,
    }

    #[derive(Parser)]
    enum Side {
        Primary(PrimaryArgs),
        Secondary(SecondaryArgs),
    }

    /// The children's command lines, parsed as `colo primary` and `colo secondary` parse
    /// them.
    fn children(pair: &[&str]) -> (PrimaryArgs, SecondaryArgs) {
        let a = Pair::try_parse_from(std::iter::once("pair").chain(pair.iter().copied()))
            .unwrap()
            .a;
        let dir = Path::new("/nonexistent-dir");
        let parse = |args: Vec<String>| {
            Side::try_parse_from(std::iter::once("colo".to_string()).chain(args)).unwrap()
        };
        let Side::Primary(p) = parse(primary_args(&a, dir, 7100, &dir.join("ev"))) else {
            panic!("not a primary");
        };
        let s = secondary_args(&a, dir, 7100, &dir.join("alive"), &dir.join("ev"));
        let Side::Secondary(s) = parse(s) else {
            panic!("not a secondary");
        };
        (p, s)
    }

    #[test]
    fn pair_qmp_gives_the_primary_path_and_the_secondary_path_dot_secondary() {
        let (p, s) = children(&["--qmp=/run/colo/q.sock", "--qmp-mode=660"]);
        assert_eq!(p.colo.qmp.as_deref(), Some(Path::new("/run/colo/q.sock")));
        assert_eq!(
            s.colo.qmp.as_deref(),
            Some(Path::new("/run/colo/q.sock.secondary"))
        );
        assert_eq!((p.colo.qmp_mode, s.colo.qmp_mode), (0o660, 0o660));
        let (p, s) = children(&[]);
        assert_eq!(
            (p.colo.qmp, s.colo.qmp),
            (None, None),
            "no --qmp, no socket"
        );
        assert_eq!(p.colo.qmp_mode, 0o600);
    }
}
