//! `colo bench dirty` and `colo bench ramcache` run end to end on small sizes, check what
//! they measure (a run whose KVM log misses a page, or whose commit copies the wrong page
//! count, fails), and refuse bad arguments. Timing figures are not asserted.

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
