//! One `colo pair` child run of `colo bench failover`, to its end, and the parts of its JSON
//! summary the benchmark reads.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::FailoverArgs;
use crate::bench::error::{Error, Result};
use crate::bench::output::{Ended, tail, wait_bounded};

/// A child run may take this much longer than `--duration` (VM start, initial sync, stop).
const RUN_SLACK: Duration = Duration::from_secs(120);

/// What a run does to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub(super) enum Fault {
    /// Nothing: a baseline run.
    None,
    /// SIGKILL this long after the client load starts.
    Kill {
        /// When.
        #[serde(serialize_with = "secs")]
        after: Duration,
    },
    /// The primary aborts at `phase` of checkpoint `checkpoint` (`COLO_TEST_CRASH_AT`).
    Crash {
        /// The checkpoint step.
        phase: &'static str,
        /// The checkpoint.
        checkpoint: u64,
    },
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e3).round() / 1e3)
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("no fault"),
            Self::Kill { after } => write!(f, "kill at {:.2} s", after.as_secs_f64()),
            Self::Crash { phase, checkpoint } => {
                write!(f, "crash at {phase} of checkpoint {checkpoint}")
            }
        }
    }
}

/// `colo pair --json`'s `failover_timeline`: milliseconds from the primary's death.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub(super) struct Timeline {
    pub(super) cause: String,
    pub(super) exit_seen_ms: Option<f64>,
    pub(super) lost_ms: Option<f64>,
    pub(super) decided_ms: Option<f64>,
    pub(super) switched_ms: Option<f64>,
    pub(super) resumed_ms: Option<f64>,
    pub(super) gap_ms: Option<f64>,
    pub(super) longest_silence_ms: Option<f64>,
    pub(super) max_wait_ms: Option<f64>,
    pub(super) caught_wait_ms: Option<f64>,
}

/// The keys of `colo pair --json` this benchmark reads.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(super) struct Summary {
    pub(super) replies: u64,
    pub(super) max_wait_ms: f64,
    pub(super) lost_acked: u64,
    pub(super) contradictions: u64,
    pub(super) failover: bool,
    /// Replies the client got after the supervisor saw the takeover.
    #[serde(default)]
    pub(super) replies_after_failover: Option<u64>,
    #[serde(default)]
    pub(super) failover_timeline: Option<Timeline>,
}

impl Summary {
    /// The secondary took over but the client got no reply from it (to the run's end).
    pub(super) fn stalled(&self) -> bool {
        self.failover && self.replies_after_failover == Some(0)
    }
}

/// One run: what it did and what it reported.
#[derive(Debug, Clone, Serialize)]
pub(super) struct RunReport {
    #[serde(flatten)]
    pub(super) fault: Fault,
    #[serde(flatten)]
    pub(super) summary: Summary,
    /// The pair's exit status was success.
    pub(super) ok: bool,
}

impl RunReport {
    /// The run's progress line.
    pub(super) fn line(&self) -> String {
        let s = &self.summary;
        let mut l = format!(
            "{}: longest wait {:.1} ms, {} lost, {} contradicted",
            self.fault, s.max_wait_ms, s.lost_acked, s.contradictions
        );
        if self.fault != Fault::None {
            match (&s.failover_timeline, s.failover) {
                (Some(_), true) if s.stalled() => {
                    l.push_str("; NO REPLY after the takeover");
                }
                (Some(t), true) => {
                    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
                    let _ = write!(
                        l,
                        "; caught by the death: wait {} ms; after it: wait {} ms, gap {} ms; \
                         lost {} / seen {} / decided {} / switched {} / resumed {} ms",
                        f(t.caught_wait_ms),
                        f(t.max_wait_ms),
                        f(t.gap_ms),
                        f(t.lost_ms),
                        f(t.exit_seen_ms),
                        f(t.decided_ms),
                        f(t.switched_ms),
                        f(t.resumed_ms)
                    );
                }
                _ => l.push_str("; NO FAILOVER"),
            }
        }
        l
    }
}

/// Parses the last non-empty stdout line as the JSON summary.
pub(super) fn parse_summary(stdout: &[String]) -> std::result::Result<Summary, String> {
    let line = stdout
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .ok_or("printed nothing on stdout")?;
    serde_json::from_str(line)
        .map_err(|e| format!("its last stdout line is not the summary ({e}): {line}"))
}

/// The `colo pair` arguments of a run.
fn pair_args(a: &FailoverArgs, fault: Fault) -> Vec<String> {
    let mut v = vec![
        "pair".to_string(),
        "--json".into(),
        format!("--pipeline={}", a.pipeline),
        format!("--duration={}ms", a.duration.as_millis().max(1)),
        format!(
            "--heartbeat-interval={}us",
            a.heartbeat_interval.as_micros()
        ),
        format!("--heartbeat-timeout={}us", a.heartbeat_timeout.as_micros()),
    ];
    if let Fault::Kill { after } = fault {
        v.push(format!(
            "--kill-primary-after={}ms",
            after.as_millis().max(1)
        ));
    }
    v.extend(a.pair_args.iter().cloned());
    v
}

/// Runs one `colo pair` child to its end and returns its report. A run that lost data
/// exits with an error but still prints its summary: that is a report, not an error.
///
/// # Errors
/// The child cannot start, does not end in time, or prints no summary.
pub(super) fn run_one(
    exe: &Path,
    a: &FailoverArgs,
    fault: Fault,
    label: &str,
) -> Result<RunReport> {
    let argv = pair_args(a, fault);
    let mut cmd = Command::new(exe);
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut cmdline = format!("colo {}", argv.join(" "));
    if let Fault::Crash { phase, checkpoint } = fault {
        cmd.env("COLO_TEST_CRASH_AT", format!("{phase}:{checkpoint}"));
        cmdline = format!("COLO_TEST_CRASH_AT={phase}:{checkpoint} {cmdline}");
    } else {
        cmd.env_remove("COLO_TEST_CRASH_AT");
    }
    tracing::debug!(%cmdline, "starting a run");
    let fail = |what: String, stderr: &[String]| {
        Error::Guest(format!(
            "{label}: `{cmdline}` {what}; the last lines of its stderr:\n{}",
            tail(stderr)
        ))
    };
    let t = Instant::now();
    let child = cmd.spawn().map_err(Error::io("start a `colo pair` run"))?;
    let limit = a.duration + RUN_SLACK;
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
    let summary =
        parse_summary(&stdout).map_err(|e| fail(format!("failed ({status}): {e}"), &stderr))?;
    if !status.success() && summary.lost_acked == 0 && summary.contradictions == 0 {
        return Err(fail(format!("failed ({status})"), &stderr));
    }
    Ok(RunReport {
        fault,
        summary,
        ok: status.success(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_read_with_or_without_a_timeline() {
        let line =
            r#"{"replies":10,"max_wait_ms":31.5,"lost_acked":0,"contradictions":0,"failover":true,
            "failover_timeline":{"cause":"kill","lost_ms":3.0,"exit_seen_ms":8.0,"decided_ms":8.5,
            "switched_ms":8.8,"resumed_ms":9.0,"gap_ms":22.0,"longest_silence_ms":22.0,
            "max_wait_ms":30.0,"long_silences":[[9.0,22.0]]},"other":1}"#
                .replace('\n', " ");
        let s = parse_summary(&["noise".into(), line, String::new()]).expect("a summary");
        let t = s.failover_timeline.expect("a timeline");
        assert_eq!((t.switched_ms, t.gap_ms), (Some(8.8), Some(22.0)));
        let base = r#"{"replies":10,"max_wait_ms":12.0,"lost_acked":0,"contradictions":0,"failover":false,"failover_timeline":null}"#;
        assert!(
            parse_summary(&[base.into()])
                .unwrap()
                .failover_timeline
                .is_none()
        );
        assert!(parse_summary(&["not json".into()]).is_err());
        assert!(parse_summary(&[]).is_err());
    }

    #[test]
    fn a_run_names_its_fault() {
        let kill = Fault::Kill {
            after: Duration::from_millis(4250),
        };
        assert_eq!(kill.to_string(), "kill at 4.25 s");
        let crash = Fault::Crash {
            phase: "push",
            checkpoint: 31,
        };
        assert_eq!(crash.to_string(), "crash at push of checkpoint 31");
        let v = serde_json::to_value(kill).unwrap();
        assert_eq!(v, serde_json::json!({"fault": "kill", "after": 4.25}));
    }
}
