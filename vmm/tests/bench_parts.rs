//! `colo bench dirty`, `colo bench ramcache` and `colo bench idle` run end to end on small
//! sizes; the first two check what they measure (a run whose KVM log misses a page, or
//! whose commit copies the wrong page count, fails), and refuse bad arguments. Timing
//! figures are not asserted.

mod common;

fn colo(args: &[&str]) -> (i32, String, String) {
    let out = common::colo().args(args).output().expect("run colo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn dirty_bench_finds_exactly_the_pages_the_guest_wrote() {
    if !common::kvm() {
        return;
    }
    let (code, out, err) = colo(&[
        "bench",
        "dirty",
        "--guest",
        "64MiB",
        "--reps",
        "1",
        "--slots",
        "64MiB",
        "--dirty",
        "7,300",
        "--kvm-reps",
        "2",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("64.0 MiB"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "one row per dirty count:\n{out}");
    for (row, want) in rows.iter().zip(["7", "300"]) {
        // "64.0 MiB <dirty> <found> ..."
        assert_eq!(
            (row[2], row[3]),
            (want, want),
            "the log holds exactly the written pages"
        );
    }
    assert!(out.contains("target: sparse"), "{out}");
}

#[test]
fn ramcache_bench_commits_the_exact_page_count() {
    let (code, out, err) = colo(&[
        "bench",
        "ramcache",
        "--size",
        "16MiB",
        "--random-pages",
        "1,100",
        "--reps",
        "2",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("target: commit flush"), "{out}");
}

#[test]
fn bad_arguments_are_refused_with_a_message() {
    for args in [
        &["bench", "dirty", "--dirty", "0"][..],
        &["bench", "dirty", "--density", "0"],
        &["bench", "dirty", "--slots", "1MiB"],
        &["bench", "ramcache", "--random-pages", "999999999"],
        &["bench", "ramcache", "--size", "4097"],
    ] {
        let (code, _, err) = colo(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("invalid arguments"), "{args:?}: {err}");
    }
}

/// `colo bench idle` runs an idle pair and the idle guest alone, and prints each side's CPU
/// over the idle window beside the baseline, and the target line. The figures themselves
/// are not asserted (this machine is shared), only that they are there and sane.
#[test]
fn idle_bench_shows_both_sides_beside_the_unprotected_guest() {
    if !common::kvm() {
        return;
    }
    let (code, out, err) = colo(&["bench", "idle", "--duration", "2s"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let pct = |name: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} line:\n{out}"));
        let last = line.split_whitespace().last().unwrap();
        last.trim_end_matches('%').parse().unwrap()
    };
    for name in ["unprotected (colo run)", "pair: primary", "pair: secondary"] {
        let p = pct(name);
        assert!((0.0..=200.0).contains(&p), "{name}: {p}%\n{out}");
    }
    assert!(
        out.contains("target: each side of an idle pair <= 5% of a core"),
        "{out}"
    );
}

/// `colo bench failover` with two dying runs (a kill and a crash at a checkpoint step) and
/// one baseline: its JSON has every figure's distribution, the heartbeat timeout and each
/// run, and nothing was lost or contradicted. The times themselves are not asserted.
#[test]
fn failover_bench_reports_the_gap_beside_a_baseline_and_loses_nothing() {
    if !common::kvm() {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    }
    let (code, out, err) = colo(&[
        "bench",
        "failover",
        "--runs",
        "2",
        "--baseline-runs",
        "1",
        "--crash-every",
        "2",
        "--duration",
        "4s",
        "--kill-from",
        "1500ms",
        "--kill-to",
        "2500ms",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["contradicted"], 0, "{v}");
    assert_eq!(v["baseline_runs"], 1, "{v}");
    assert_eq!(v["heartbeat_timeout_ms"], 1000.0, "{v}");
    let deaths = v["runs"].as_u64().unwrap();
    assert_eq!(
        v["failovers"].as_u64(),
        Some(deaths),
        "every death fails over: {v}"
    );
    assert_eq!(deaths + v["no_death"].as_u64().unwrap(), 2, "{v}");
    assert_eq!(
        v["stalled"], 0,
        "the client got replies after every takeover: {v}"
    );
    assert!(deaths >= 1, "the kill at least happened: {v}");
    for key in [
        "max_wait_ms",
        "baseline_max_wait_ms",
        "gap_ms",
        "switched_ms",
        "resumed_ms",
    ] {
        let d = &v["figures"][key];
        for q in ["min", "median", "p90", "p99", "max"] {
            assert!(d[q].as_f64().is_some(), "{key}.{q}: {v}");
        }
        assert!(d["min"].as_f64() <= d["max"].as_f64(), "{key}: {v}");
    }
    let each = v["each"].as_array().unwrap();
    assert_eq!(each.len(), 3, "{v}");
    assert_eq!(each[0]["fault"], "none", "the baseline goes first: {v}");
    assert!(
        v["target"]
            .as_str()
            .unwrap()
            .contains("heartbeat timeout 1000 ms"),
        "{v}"
    );
    assert!(err.contains("run 3/3: "), "a progress line per run:\n{err}");

    let (code, _, err) = colo(&["bench", "failover", "--kill-to", "9s", "--duration", "8s"]);
    assert_eq!(code, 2, "kills past the run are refused: {err}");
    assert!(err.contains("invalid arguments"), "{err}");
}
