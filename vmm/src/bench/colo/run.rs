//! One `colo pair` child run of the benchmark, to its end, and the JSON summary it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{ColoBenchArgs, Kind, PAGES_PER_MIB, PairReport, mode_name};
use crate::bench::error::{Error, Result};
use crate::bench::output::{Ended, tail, wait_bounded};

/// A child run may take this much longer than `--duration` (VM start, initial sync, stop).
const RUN_SLACK: Duration = Duration::from_secs(180);

/// Keys every run's summary must have.
const KEYS: &[&str] = &[
    "secs",
    "replies",
    "client_rps",
    "cpu_primary_s",
    "lost_acked",
    "contradictions",
];
/// Keys a protected run's summary must have too.
const PROTECTED_KEYS: &[&str] = &[
    "epochs",
    "pause_p50_ms",
    "pause_p99_ms",
    "pause_max_ms",
    "pauses_us",
    "pages",
    "bytes",
    "cpu_secondary_s",
    "failover",
];

/// Parses the last JSON line of a run's stdout and checks that it has the keys of `kind`.
fn parse_report(stdout: &[String], kind: Kind) -> std::result::Result<PairReport, String> {
    let line = stdout
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .ok_or("printed nothing on stdout")?;
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("last stdout line is not JSON ({e}): {line}"))?;
    let extra = match kind {
        Kind::Unprotected => &[][..],
        Kind::Protected(_) => PROTECTED_KEYS,
    };
    if let Some(k) = KEYS.iter().chain(extra).find(|k| v.get(**k).is_none()) {
        return Err(format!("its JSON summary has no \"{k}\": {line}"));
    }
    serde_json::from_value(v).map_err(|e| format!("unexpected JSON summary ({e}): {line}"))
}

/// The `colo pair` arguments of one run.
fn pair_args(
    args: &ColoBenchArgs,
    kind: Kind,
    rate_mib: u64,
    metrics: Option<&Path>,
) -> Vec<String> {
    let mut v = vec![
        "pair".to_string(),
        "--json".into(),
        format!("--duration={}ms", args.duration.as_millis().max(1)),
        format!("--dirty-rate={}", rate_mib * PAGES_PER_MIB),
        format!("--dirty-pattern={}", args.dirty_pattern.name()),
        format!("--ram={}", args.ram),
        format!("--pipeline={}", args.pipeline.max(1)),
    ];
    match kind {
        Kind::Unprotected => v.push("--unprotected".into()),
        Kind::Protected(m) => {
            v.push(format!(
                "--checkpoint-delay={}us",
                args.checkpoint_delay.as_micros()
            ));
            v.push(format!("--mode={}", mode_name(m)));
        }
    }
    if let Some(m) = metrics {
        v.push(format!("--metrics={}", m.display()));
    }
    v.extend(args.pair_args.iter().cloned());
    v
}

/// Where `--plot` keeps a protected run's records (`.jsonl`) and its report (`.svg`).
fn plot_paths(args: &ColoBenchArgs, kind: Kind, rate_mib: u64, round: u32) -> Option<PathBuf> {
    let (dir, Kind::Protected(m)) = (args.plot.as_ref()?, kind) else {
        return None;
    };
    let round = if args.rounds > 1 {
        format!("-r{round}")
    } else {
        String::new()
    };
    Some(dir.join(format!("{}-{rate_mib}MiBs{round}", mode_name(m))))
}

/// Runs one `colo pair` child to its end and returns its report.
pub(super) fn run_one(
    exe: &Path,
    args: &ColoBenchArgs,
    (kind, rate_mib, round): (Kind, u64, u32),
    label: &str,
) -> Result<PairReport> {
    let plot = plot_paths(args, kind, rate_mib, round);
    let metrics = plot.as_ref().map(|p| p.with_extension("jsonl"));
    if let Some(m) = &metrics {
        // `--metrics` appends: an earlier benchmark's records must not join this run's.
        match std::fs::remove_file(m) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("remove an old --plot records file")(e));
            }
            _ => {}
        }
    }
    let argv = pair_args(args, kind, rate_mib, metrics.as_deref());
    let cmdline = format!("colo {}", argv.join(" "));
    eprintln!("{label} ({} pages/s) ...", rate_mib * PAGES_PER_MIB);
    tracing::debug!(%cmdline, "starting a run");
    let fail = |what: String, stderr: &[String]| {
        Error::Guest(format!(
            "{label}: `{cmdline}` {what}; the last lines of its stderr:\n{}",
            tail(stderr)
        ))
    };
    let t = Instant::now();
    let child = Command::new(exe)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("start a `colo pair` run"))?;
    let limit = args.duration + RUN_SLACK;
    let Ended {
        status,
        stdout,
        stderr,
    } = wait_bounded(child, t, limit)?;
    let Some(status) = status else {
        return Err(fail(
            format!("did not finish within {} s", limit.as_secs()),
            &stderr,
        ));
    };
    if !status.success() {
        return Err(fail(format!("failed ({status})"), &stderr));
    }
    let mut r = parse_report(&stdout, kind).map_err(|e| fail(e, &stderr))?;
    r.load_secs = r.secs.min(args.duration.as_secs_f64());
    if r.lost_acked > 0 || r.contradictions > 0 {
        return Err(fail(
            format!(
                "reported {} lost acknowledged writes and {} contradicted replies",
                r.lost_acked, r.contradictions
            ),
            &stderr,
        ));
    }
    if r.failover {
        return Err(fail(
            "failed over to the secondary mid-run, so it did not measure a healthy pair".into(),
            &stderr,
        ));
    }
    match kind {
        Kind::Unprotected => eprintln!(
            "{label}: done in {:.1} s: {:.0} req/s",
            t.elapsed().as_secs_f64(),
            r.rps()
        ),
        Kind::Protected(_) => eprintln!(
            "{label}: done in {:.1} s: {} checkpoints, pause p50 {:.2} ms p99 {:.2} ms, \
             {:.0} req/s",
            t.elapsed().as_secs_f64(),
            r.pauses_us.len(),
            r.pause_p50_ms,
            r.pause_p99_ms,
            r.rps()
        ),
    }
    if let (Some(p), Some(m)) = (&plot, &metrics) {
        let svg = p.with_extension("svg");
        let (_, skipped) =
            crate::report::report_file(m, &svg, (1200, 900)).map_err(Error::Report)?;
        eprintln!("{label}: report {}", svg.display());
        if let Some(note) = skipped {
            eprintln!("{label}: {}: {note}", m.display());
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colo::Mode;

    #[test]
    fn reports_need_their_keys() {
        let line = r#"{"secs":5.0,"replies":10,"client_rps":2.0,"cpu_primary_s":1.0,"lost_acked":0,"contradictions":0}"#;
        let r = parse_report(
            &["noise".into(), line.into(), String::new()],
            Kind::Unprotected,
        )
        .expect("a baseline summary");
        assert_eq!(r.replies, 10);
        let e = parse_report(&[line.into()], Kind::Protected(Mode::Colo)).unwrap_err();
        assert!(e.contains("\"epochs\""), "{e}");
        assert!(parse_report(&["not json".into()], Kind::Unprotected).is_err());
    }
}
