//! Reports drawn from synthetic records into a temporary directory.

use super::draw::PANEL_TITLES;
use super::*;
use crate::colo::metrics::{EpochRecord, Trigger};

fn rec(epoch: u64, trigger: Trigger, pause_us: u64, at_ms: Option<u64>) -> EpochRecord {
    let v = serde_json::json!({
        "epoch": epoch, "at_ms": at_ms, "trigger": trigger, "pause_us": pause_us,
        "pause_pages": epoch * 3, "background_pages": epoch * 5, "bytes": epoch * 4096,
        "state_bytes": 1000,
    });
    serde_json::from_value(v).expect("a record")
}

/// An initial sync, then 200 checkpoints with pauses from 0.4 to ~25 ms and every cause.
fn synthetic(with_time: bool) -> Vec<EpochRecord> {
    let mut v = vec![rec(
        1,
        Trigger::InitialSync,
        900_000,
        with_time.then_some(5),
    )];
    for e in 2..=201 {
        let trigger = match e % 10 {
            0 => Trigger::Mismatch,
            7 => Trigger::Threshold,
            _ => Trigger::Timer,
        };
        let pause = 400 + (e * e * 13) % 25_000;
        v.push(rec(e, trigger, pause, with_time.then_some(1000 + e * 100)));
    }
    v
}

fn jsonl(records: &[EpochRecord]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).expect("json") + "\n")
        .collect()
}

#[test]
fn an_svg_report_is_xml_with_the_four_panels() {
    let dir = tempfile::tempdir().expect("tempdir");
    for with_time in [true, false] {
        let m = dir.path().join("m.jsonl");
        std::fs::write(&m, jsonl(&synthetic(with_time))).expect("write");
        let out = dir.path().join("r.svg");
        let (n, skipped) = report_file(&m, &out, (1000, 800)).expect("report");
        assert_eq!((n, skipped), (201, None));
        let text = std::fs::read_to_string(&out).expect("read svg");
        let doc = roxmltree::Document::parse(&text).expect("the SVG is XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(root.attribute("width"), Some("1000"));
        let texts: Vec<&str> = doc
            .descendants()
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        for title in PANEL_TITLES {
            assert!(
                texts.iter().any(|t| t.contains(title)),
                "no panel {title:?}"
            );
        }
        for cause in ["initial sync", "timer", "mismatch", "threshold"] {
            assert!(texts.contains(&cause), "no bar label {cause:?}");
        }
        let x = if with_time {
            "time since the primary started (s)"
        } else {
            "checkpoint number"
        };
        assert!(texts.contains(&x), "x axis is not {x:?}");
    }
}

#[test]
fn a_png_report_has_the_signature_and_the_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m.jsonl");
    std::fs::write(&m, jsonl(&synthetic(true))).expect("write");
    let out = dir.path().join("r.PNG");
    report_file(&m, &out, (640, 480)).expect("report");
    let png = std::fs::read(&out).expect("read png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR: the first chunk, width and height big-endian after its length and type.
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    assert_eq!((be(&png[16..20]), be(&png[20..24])), (640, 480));
    // Text was drawn (the font is embedded): the image is more than a blank canvas.
    assert!(png.len() > 10_000, "{} bytes", png.len());
}

#[test]
fn malformed_lines_are_skipped_and_counted() {
    let good = jsonl(&synthetic(true)[..3]);
    let text =
        format!("{good}not json\n{{\"epoch\": 9}}\n\n   \n{{\"epoch\":4,\"trigger\":\"timer\"\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(b"\xff\n\xff\xfe\n");
    let r = Records::parse(&bytes);
    assert_eq!(r.records.len(), 3);
    assert_eq!(r.skipped, 5);
    assert_eq!(
        r.skipped_note().as_deref(),
        Some("5 lines were not checkpoint records")
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("m.jsonl");
    std::fs::write(&m, &bytes).expect("write");
    let (n, note) = report_file(&m, &dir.path().join("r.svg"), (800, 600)).expect("report");
    assert_eq!(n, 3);
    assert_eq!(note.as_deref(), Some("5 lines were not checkpoint records"));
}

#[test]
fn a_file_without_records_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("r.svg");
    for (name, body) in [("empty", ""), ("junk", "hello\nworld\n")] {
        let m = dir.path().join(name);
        std::fs::write(&m, body).expect("write");
        let e = report_file(&m, &out, (800, 600)).unwrap_err();
        assert!(matches!(e, Error::Empty { .. }), "{e}");
        assert!(e.to_string().contains("holds no checkpoint records"), "{e}");
    }
    assert!(!out.exists());
    let e = report_file(&dir.path().join("missing"), &out, (800, 600)).unwrap_err();
    assert!(matches!(e, Error::Read { .. }), "{e}");
}

#[test]
fn an_unknown_extension_is_refused_before_reading() {
    for out in ["r.jpg", "r", "r.svg.gz"] {
        let e = report_file(Path::new("/nonexistent"), Path::new(out), (800, 600)).unwrap_err();
        assert!(matches!(e, Error::Format(_)), "{out}: {e}");
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains(".svg or .png"), "{e}");
    }
    assert_eq!(Format::of(Path::new("a.Svg")).ok(), Some(Format::Svg));
}

#[test]
fn only_an_initial_sync_still_draws() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("r.svg");
    render(&synthetic(false)[..1], "t", &out, (800, 600)).expect("render");
    let text = std::fs::read_to_string(&out).expect("read");
    assert!(text.contains("no checkpoint pauses"));
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("1200x900"), Ok((1200, 900)));
    assert!(parse_size("12x9").is_err());
    assert!(parse_size("big").is_err());
}

#[test]
fn records_written_before_at_ms_still_read() {
    let old = br#"{"epoch":2,"trigger":"timer","pause_us":525,"pause_pages":10,"background_pages":828,"bytes":3432448,"state_bytes":9579}"#;
    let r = Records::parse(old);
    assert_eq!((r.records.len(), r.skipped), (1, 0));
    assert_eq!(r.records[0].at_ms, None);
    // And a new record leaves the field out when it has no time.
    let line = serde_json::to_string(&r.records[0]).expect("json");
    assert!(!line.contains("at_ms"), "{line}");
}
