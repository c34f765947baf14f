//! `colo bench idle`: the CPU an idle pair costs. One run of `colo pair --pipeline 0` (no
//! client: the guest only idles, the pair only checkpoints and heartbeats) for
//! `--duration`, beside the same-run baseline of the same guest alone and idle
//! (`colo pair --unprotected --pipeline 0`: `colo run` behind the proxy). Each side's CPU
//! is its process's user + system time (from /proc) over the idle window, in % of one
//! core: `colo pair`'s `cpu_*_load_s`, which leave out the start-up and, for the pair,
//! the initial sync (a copy of all of RAM).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use super::error::{Error, Result};
use crate::args::{parse_ms, parse_secs};

/// Target: an idle side uses at most this much of one core.
const TARGET_PCT: f64 = 5.0;

/// `colo bench idle`.
#[derive(Debug, Args)]
#[command(
    after_help = "Both runs are `colo pair --json --pipeline 0` in a child process. Needs \
                  /dev/kvm, no root.\nExample: colo bench idle --duration 10s"
)]
pub struct IdleArgs {
    /// How long each run idles (e.g. 10s; plain numbers are seconds).
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    duration: Duration,
    /// Time between checkpoints of the protected run.
    #[arg(long, default_value = "100ms", value_parser = parse_ms)]
    checkpoint_delay: Duration,
    /// vCPUs of each VM.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    vcpus: u32,
}

/// The keys of `colo pair --json` this benchmark reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Report {
    secs: f64,
    epochs: u64,
    cpu_primary_load_s: f64,
    cpu_secondary_load_s: f64,
}

/// Runs `colo <argv>` to its end and parses its last stdout line.
fn run(exe: &Path, argv: &[String], budget: Duration) -> Result<Report> {
    let cmdline = format!("colo {}", argv.join(" "));
    eprintln!("{cmdline} ...");
    let mut child = Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("start a `colo pair` run"))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let err_reader = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let out_reader = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < budget => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Guest(format!("`{cmdline}` did not end in time")));
            }
        }
    };
    let err = err_reader.join().unwrap_or_default();
    let out = out_reader.join().unwrap_or_default();
    let tail: String = err
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|l| format!("    {l}\n"))
        .collect();
    if !status.success() {
        return Err(Error::Guest(format!(
            "`{cmdline}` failed ({status}); its stderr ends:\n{tail}"
        )));
    }
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| {
        Error::Guest(format!(
            "`{cmdline}`: its last stdout line is not the JSON summary ({e}): {line}"
        ))
    })
}

/// % of one core for `cpu_s` CPU seconds over `secs` of wall time.
fn pct(cpu_s: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        cpu_s / secs * 100.0
    } else {
        0.0
    }
}

/// Runs the benchmark and prints its table.
///
/// # Errors
/// A run that fails or prints no summary.
pub fn run_bench(a: &IdleArgs) -> Result<()> {
    let exe = std::env::current_exe().map_err(Error::io("find this program's executable"))?;
    let common = vec![
        "pair".to_string(),
        "--json".into(),
        "--pipeline=0".into(),
        format!("--duration={}ms", a.duration.as_millis().max(1)),
        format!("--vcpus={}", a.vcpus),
    ];
    let budget = a.duration + Duration::from_secs(120);
    let mut base_args = common.clone();
    base_args.push("--unprotected".into());
    let base = run(&exe, &base_args, budget)?;
    let mut pair_args = common;
    pair_args.push(format!(
        "--checkpoint-delay={}us",
        a.checkpoint_delay.as_micros()
    ));
    let pair = run(&exe, &pair_args, budget)?;
    let (p, s, b) = (
        pct(pair.cpu_primary_load_s, pair.secs),
        pct(pair.cpu_secondary_load_s, pair.secs),
        pct(base.cpu_primary_load_s, base.secs),
    );
    println!(
        "\ncolo bench idle: an idle pair (no client) for {:.1} s, {} vCPU(s), a checkpoint \
         every {} ms ({} epochs), beside the same guest idle and unprotected",
        pair.secs,
        a.vcpus,
        a.checkpoint_delay.as_millis(),
        pair.epochs
    );
    println!("{:<34} {:>10} {:>12}", "process", "CPU s", "% of a core");
    for (name, cpu, pc) in [
        ("unprotected (colo run)", base.cpu_primary_load_s, b),
        ("pair: primary", pair.cpu_primary_load_s, p),
        ("pair: secondary", pair.cpu_secondary_load_s, s),
    ] {
        println!("{name:<34} {cpu:>10.2} {pc:>11.1}%");
    }
    let ok = p <= TARGET_PCT && s <= TARGET_PCT;
    println!(
        "target: each side of an idle pair <= {TARGET_PCT:.0}% of a core: primary {p:.1}%, \
         secondary {s:.1}% ({})",
        if ok { "met" } else { "NOT met" }
    );
    Ok(())
}
