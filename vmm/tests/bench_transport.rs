//! `colo bench transport` end to end: the built binary, two processes on loopback, small
//! sizes. Nothing here asserts on timing; rates only have to be positive.

mod common;

use std::process::Output;

use serde_json::Value;

fn colo(args: &[&str]) -> Output {
    common::colo()
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the colo binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Typed access to the report that panics, naming what is missing or mistyped.
trait Expect {
    fn at(&self, key: &str) -> &Value;
    fn num(&self) -> f64;
    fn bool(&self) -> bool;
    fn str(&self) -> &str;
    fn arr(&self) -> &[Value];
}

impl Expect for Value {
    fn at(&self, key: &str) -> &Value {
        self.get(key)
            .unwrap_or_else(|| panic!("no key {key:?} in {self}"))
    }
    fn num(&self) -> f64 {
        self.as_f64()
            .unwrap_or_else(|| panic!("{self} is not a number"))
    }
    fn bool(&self) -> bool {
        self.as_bool()
            .unwrap_or_else(|| panic!("{self} is not a bool"))
    }
    fn str(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("{self} is not a string"))
    }
    fn arr(&self) -> &[Value] {
        self.as_array()
            .unwrap_or_else(|| panic!("{self} is not an array"))
    }
}

fn assert_rates(v: &Value, what: &str) {
    let median = v.at("median_gibs").num();
    let best = v.at("best_gibs").num();
    assert!(
        median > 0.0 && median.is_finite(),
        "{what}: median {median}"
    );
    assert!(best >= median, "{what}: best {best} < median {median}");
    assert!(
        v.at("secs").arr().iter().all(|s| s.num() > 0.0),
        "{what}: {v:?}"
    );
}

/// A sample's CPU readings: a median per GiB of both sides, and one reading per repetition.
fn assert_cpu(v: &Value, what: &str) {
    let cpu = v.at("cpu");
    for key in [
        "s_per_gib",
        "sender_s_per_gib",
        "receiver_s_per_gib",
        "user_s_per_gib",
        "sys_s_per_gib",
    ] {
        assert!(cpu.at(key).num() >= 0.0, "{what}: {key}");
    }
    assert_eq!(
        cpu.at("reps").arr().len(),
        v.at("secs").arr().len(),
        "{what}"
    );
}

#[test]
fn small_run_reports_every_case_with_verified_checksums() {
    let out = colo(&[
        "bench",
        "transport",
        "--size",
        "64MiB",
        "--random-pages",
        "1024,4096",
        "--reps",
        "1",
        "--streams",
        "1,2",
        "--json",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "status {}\n{stderr}", out.status);
    let v = serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));

    assert_eq!(v.at("bench").str(), "transport");
    assert_eq!(v.at("size_bytes").num(), (64u64 << 20) as f64);
    assert!(v.at("checksums_verified").bool());
    // 3 cases x 2 stream counts x 1 rep.
    assert_eq!(v.at("verified_epochs").num(), 6.0);

    let cases = v.at("cases").arr();
    let names: Vec<&str> = cases.iter().map(|c| c.at("name").str()).collect();
    assert_eq!(names, ["random-1024", "random-4096", "contiguous"]);
    for (c, pages) in cases.iter().zip([1024u64, 4096, 16384]) {
        let name = c.at("name").str();
        assert_eq!(c.at("pages").num(), pages as f64, "{name}");
        assert_eq!(c.at("bytes").num(), (pages * 4096) as f64, "{name}");
        assert!(c.at("runs").num() >= 1.0, "{name}");
        assert_rates(c.at("memcpy"), &format!("{name} memcpy"));
        assert_rates(c.at("raw_tcp"), &format!("{name} raw tcp"));
        let pushes = c.at("push").arr();
        let streams: Vec<f64> = pushes.iter().map(|p| p.at("streams").num()).collect();
        assert_eq!(streams, [1.0, 2.0], "{name}");
        for p in pushes {
            assert_rates(p, &format!("{name} push"));
            assert!(p.at("checksums_verified").bool(), "{name}");
            assert_eq!(p.at("verified_epochs").num(), 1.0, "{name}");
            assert!(p.at("push_over_memcpy").num() > 0.0, "{name}");
            assert!(p.at("push_over_raw_tcp").num() > 0.0, "{name}");
            // CPU of both processes for the push; the ratio is null only if the raw
            // stream's reading were zero.
            assert_cpu(p, &format!("{name} push"));
            assert!(p.get("cpu_over_raw_tcp").is_some(), "{name}");
        }
        assert_cpu(c.at("raw_tcp"), &format!("{name} raw tcp"));
        assert!(c.at("memcpy").get("cpu").is_none(), "{name}");
        let ct = c.at("cpu_target");
        assert_eq!(
            ct.at("ratio").str(),
            "push_cpu_per_gib/raw_tcp_cpu_per_gib",
            "{name}"
        );
        assert!(ct.at("value").num() >= 0.0, "{name}");
        assert_eq!(ct.at("goal").is_null(), name == "contiguous", "{name}");
        let t = c.at("target");
        assert!(t.at("value").num() > 0.0, "{name}");
        let want = if name == "contiguous" {
            "push/raw_tcp"
        } else {
            "push/memcpy"
        };
        assert_eq!(t.at("ratio").str(), want);
    }
    assert_eq!(cases[2].at("kind").str(), "contiguous");
    assert_eq!(cases[2].at("runs").num(), 1.0);
}

#[test]
fn table_names_every_case_and_both_targets() {
    let out = colo(&[
        "bench",
        "transport",
        "--size",
        "16MiB",
        "--random-pages",
        "64",
        "--reps",
        "2",
        "--streams",
        "3",
        "--batch-bytes",
        "256KiB",
        "--batch-runs",
        "16",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "status {}\n{stderr}", out.status);
    for want in [
        "random-64",
        "contiguous",
        "checksums: all 4 pushed epochs verified",
        "random pages: push/memcpy = ",
        "(target >= 0.60)",
        "contiguous: push/raw-tcp = ",
        "(target >= 1.50)",
        "cpu/GiB",
        "random-64: push cpu/GiB / raw-tcp cpu/GiB = ",
        "(target <= 1.20: ",
        "contiguous: push cpu/GiB / raw-tcp cpu/GiB = ",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in\n{stdout}");
    }
}

#[test]
fn bad_arguments_fail_with_a_helpful_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--size", "0"], "must not be 0"),
        (
            &["--size", "10000"],
            "not a multiple of the 4096-byte page size",
        ),
        (&["--size", "2GB"], "unknown unit"),
        (
            &["--size", "64MiB", "--random-pages", "16385"],
            "more pages than the region holds",
        ),
        (&["--random-pages", "0"], "at least 1 page"),
        (&["--streams", "0"], "use 1 to 16"),
        (&["--streams", "1,17"], "use 1 to 16"),
        (&["--reps", "0"], "use 1 to 1000"),
        (&["--batch-bytes", "1"], "outside 4KiB to 64MiB"),
        (&["--batch-runs", "1024"], "use 1 to 1023"),
    ];
    for (args, hint) in cases {
        let mut all = vec!["bench", "transport"];
        all.extend_from_slice(args);
        let out = colo(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(hint), "{args:?}: want {hint:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn receiver_refuses_a_control_address_off_loopback() {
    let out = colo(&[
        "bench",
        "transport-receiver",
        "--control",
        "192.0.2.1:9",
        "--size",
        "4096",
        "--pair-id",
        "1",
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[test]
fn help_explains_every_option() {
    let out = colo(&["bench", "transport", "--help"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    for opt in [
        "--size",
        "--random-pages",
        "--streams",
        "--reps",
        "--batch-bytes",
        "--batch-runs",
        "--seed",
        "--json",
    ] {
        assert!(stdout.contains(opt), "{opt} missing from\n{stdout}");
    }
    assert!(!stdout.contains("transport-receiver"));
    let top = text(&colo(&["bench", "--help"]).stdout);
    assert!(!top.contains("transport-receiver"), "{top}");
}

#[test]
fn a_corrupted_epoch_fails_the_bench_loudly() {
    let out = colo(&[
        "bench",
        "transport",
        "--size",
        "4MiB",
        "--random-pages",
        "8",
        "--reps",
        "1",
        "--streams",
        "1",
        "--corrupt-for-test",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("CHECKSUM MISMATCH"), "{stderr}");
    assert!(out.stdout.is_empty(), "no results after a mismatch");
}

/// `--transport ofi`: every case is also pushed through libfabric's real `tcp` provider,
/// checked byte for byte by the receiver process, with its ratio to the best TCP push.
#[cfg(feature = "ofi")]
#[test]
fn the_libfabric_push_runs_beside_the_tcp_one_and_is_verified() {
    let out = colo(&[
        "bench",
        "transport",
        "--size",
        "64MiB",
        "--random-pages",
        "1024",
        "--reps",
        "1",
        "--streams",
        "1",
        "--transport",
        "ofi",
        "--ofi-provider",
        "tcp",
        "--json",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "status {}\n{stderr}", out.status);
    let v = serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(v.at("checksums_verified").bool());
    // 2 cases x (1 TCP stream count + the libfabric endpoint) x 1 rep.
    assert_eq!(v.at("verified_epochs").num(), 4.0);
    for c in v.at("cases").arr() {
        let name = c.at("name").str();
        let pushes = c.at("push").arr();
        let ofi: Vec<&Value> = pushes.iter().filter(|p| p.at("ofi").bool()).collect();
        assert_eq!(ofi.len(), 1, "{name}: one libfabric push");
        assert!(ofi[0].at("checksums_verified").bool(), "{name}");
        assert_rates(ofi[0], &format!("{name} ofi push"));
        assert!(ofi[0].at("ofi_over_tcp").num() > 0.0, "{name}");
    }
}
