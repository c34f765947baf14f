//! `colo pair --metrics-listen`: the primary, the secondary and the proxy each serve their
//! Prometheus metrics while a real pair runs on loopback, and what they show moves with
//! the pair: checkpoints and pages on both sides, pauses in the histogram, both sides
//! protected, each with its role.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Reaper, kvm, wait_timeout};

/// A loopback port P with P+1 and P+2 free too.
fn three_free_ports() -> u16 {
    (0..200)
        .find_map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
            let p = l.local_addr().ok()?.port();
            (p < u16::MAX - 2
                && (1..=2).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()))
            .then_some(p)
        })
        .expect("three consecutive free ports")
}

/// `GET /metrics` on `port`: the body, or `None` while nothing answers there.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: colo\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    Some(body.to_string())
}

/// The value of the sample `series` (name and labels), if the text has it.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// The sum of a counter family's samples over every label set.
fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Scrapes all three until `ready` says yes for the pair, for at most `limit`.
fn scrape_until(
    ports: [u16; 3],
    limit: Duration,
    ready: impl Fn(&[String; 3]) -> bool,
) -> Option<[String; 3]> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let (Some(p), Some(s), Some(x)) = (scrape(ports[0]), scrape(ports[1]), scrape(ports[2]))
        {
            let all = [p, s, x];
            if ready(&all) {
                return Some(all);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    None
}

fn protected(text: &str) -> bool {
    value(text, r#"colo_state{state="protected"}"#) == Some(1.0)
}

#[test]
fn a_running_pair_serves_metrics_that_move_on_both_sides_and_the_proxy() {
    if !kvm() {
        return;
    }
    let port = three_free_ports();
    let ports = [port, port + 1, port + 2];
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = common::colo()
        .args([
            "pair",
            "--insecure",
            "--duration=20s",
            &format!("--metrics-listen=127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let tail = || {
        let mut s = String::new();
        let _ = std::fs::File::open(log.path()).and_then(|mut f| f.read_to_string(&mut s));
        s.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    };

    // Both sides protected, and the primary past a timer checkpoint.
    let first = scrape_until(ports, Duration::from_secs(60), |[p, s, _]| {
        protected(p)
            && protected(s)
            && value(p, r#"colo_checkpoints_total{cause="timer"}"#).is_some_and(|n| n >= 1.0)
    })
    .unwrap_or_else(|| panic!("the pair never showed protected on both sides:\n{}", tail()));
    let [p1, s1, x1] = &first;
    assert_eq!(value(p1, r#"colo_role{role="primary"}"#), Some(1.0), "{p1}");
    assert_eq!(
        value(s1, r#"colo_role{role="secondary"}"#),
        Some(1.0),
        "{s1}"
    );
    assert_eq!(value(x1, r#"colo_role{role="proxy"}"#), Some(1.0), "{x1}");
    assert!(!p1.contains(r#"role="secondary""#), "{p1}");
    assert_eq!(
        value(p1, r#"colo_checkpoints_total{cause="initial-sync"}"#),
        Some(1.0),
        "{p1}"
    );
    assert!(
        value(p1, "colo_checkpoint_pause_seconds_count").is_some_and(|n| n >= 1.0),
        "{p1}"
    );
    for text in [p1, s1] {
        assert!(
            value(text, "colo_heartbeat_silence_seconds").is_some_and(|s| s < 5.0),
            "{text}"
        );
        assert_eq!(value(text, r#"colo_state{state="waiting"}"#), Some(0.0));
    }
    // The disk replication is watched on both sides.
    assert_eq!(value(p1, "colo_disk_replicating"), Some(1.0), "{p1}");
    assert!(value(s1, "colo_disk_buffer_bytes").is_some(), "{s1}");
    assert!(value(x1, "colo_proxy_mismatches_total").is_some(), "{x1}");
    assert!(value(x1, "colo_proxy_queued_events").is_some(), "{x1}");

    // A few hundred milliseconds on (longer only if the host is slow), everything moved.
    std::thread::sleep(Duration::from_millis(400));
    let moved = |a: &str, b: &str, name: &str| family_sum(b, name) > family_sum(a, name);
    let second = scrape_until(ports, Duration::from_secs(20), |[p, s, _]| {
        moved(p1, p, "colo_checkpoints_total")
            && moved(p1, p, "colo_pushed_pages_total")
            && moved(p1, p, "colo_checkpoint_pause_seconds_count")
            && moved(s1, s, "colo_checkpoints_applied_total")
            && moved(s1, s, "colo_applied_pages_total")
    })
    .unwrap_or_else(|| panic!("the counters did not move:\n{p1}\n{s1}\n{}", tail()));
    let [p2, s2, x2] = &second;
    assert!(protected(p2) && protected(s2), "{p2}\n{s2}");
    assert!(family_sum(p2, "colo_pushed_bytes_total") > family_sum(p1, "colo_pushed_bytes_total"));
    // The proxy released the client's replies meanwhile.
    assert!(
        value(x2, "colo_proxy_released_frames_total").is_some_and(|n| n > 0.0),
        "{x2}"
    );
    assert_eq!(value(p2, "colo_failovers_total"), Some(0.0), "{p2}");
    // Heartbeats are answered: by the second scrape both sides measured a round trip.
    for text in [p2, s2] {
        assert!(
            value(text, "colo_heartbeat_round_trip_seconds").is_some_and(|s| s < 5.0),
            "{text}"
        );
    }
    assert_eq!(value(s2, "colo_failovers_total"), Some(0.0), "{s2}");

    let status = wait_timeout(&mut child.0, Duration::from_secs(90))
        .unwrap_or_else(|| panic!("colo pair did not end:\n{}", tail()));
    assert!(status.success(), "{status:?}\n{}", tail());
    // Every endpoint ended with its side.
    for p in ports {
        assert!(TcpStream::connect(("127.0.0.1", p)).is_err(), "port {p}");
    }
}
