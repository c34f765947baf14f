//! `colo bench dirty`: the two costs of dirty tracking at a checkpoint.
//!
//! 1. Turning the bitmap of a large guest into page runs, sparse and dense, against a
//!    same-run popcount over the same words (the floor for any scan of the bitmap).
//! 2. `KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` on real slots after a real guest
//!    dirtied a known number of pages, against the same calls on the clean slot.

use std::time::{Duration, Instant};

use clap::Args;
use colo_memory::PageBitmap;

use super::error::{Error, Result};
use super::guest32::{DirtyGuest, FIRST_GPA};
use super::pages::{PAGE_SIZE, SplitMix64};
use super::report::fmt_bytes;
use super::timing::{fmt_dur, median, time_reps};
use crate::args::parse_size;

const PAGE: u64 = PAGE_SIZE as u64;
/// The sparse scan must stay within this multiple of the popcount time...
const SPARSE_RATIO_TARGET: f64 = 2.0;
/// ...and under this absolute time.
const SPARSE_ABS_TARGET: Duration = Duration::from_millis(1);
/// A 32-bit guest without paging reaches this much memory.
const GUEST32_REACH: u64 = 4 << 30;

/// `colo bench dirty`.
#[derive(Debug, Args)]
#[command(
    after_help = "Sizes take KiB, MiB, GiB or TiB (powers of 1024). The KVM part needs \
                        /dev/kvm; --no-kvm skips it."
)]
pub struct DirtyArgs {
    /// Guest size whose bitmap is scanned (one bit per 4 KiB page).
    #[arg(long, default_value = "16GiB", value_parser = parse_size)]
    guest: u64,
    /// Densities of the scan cases, in percent of pages set at random.
    #[arg(long, default_value = "0.1,30", value_delimiter = ',')]
    density: Vec<f64>,
    /// Repetitions of each scan (the median is shown).
    #[arg(long, default_value_t = 21)]
    reps: u32,
    /// KVM slot sizes, comma-separated.
    #[arg(long, default_value = "1GiB,8GiB", value_delimiter = ',', value_parser = parse_size)]
    slots: Vec<u64>,
    /// Dirty page counts per slot, comma-separated.
    #[arg(long, default_value = "1000,100000", value_delimiter = ',')]
    dirty: Vec<u32>,
    /// Repetitions of each KVM case (the guest dirties the pages again each time).
    #[arg(long, default_value_t = 3)]
    kvm_reps: u32,
    /// Skip the KVM part.
    #[arg(long)]
    no_kvm: bool,
    /// Seed of the random page choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl DirtyArgs {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgs(m));
        if self.guest < PAGE || self.guest % PAGE != 0 {
            return bad(format!(
                "--guest {} is not a non-zero multiple of 4096",
                self.guest
            ));
        }
        if let Some(d) = self.density.iter().find(|d| !(**d > 0.0 && **d <= 100.0)) {
            return bad(format!("density {d}% is outside (0, 100]"));
        }
        if self.reps == 0 || self.kvm_reps == 0 {
            return bad("repetition counts must be at least 1".into());
        }
        for &s in &self.slots {
            if s < 64 << 20 || s % PAGE != 0 {
                return bad(format!("slot size {s} is below 64MiB or not page-aligned"));
            }
            for &n in &self.dirty {
                let reach = s.min(GUEST32_REACH) - FIRST_GPA;
                if n == 0 || u64::from(n) > reach / PAGE {
                    return bad(format!(
                        "{n} dirty pages do not fit a {} slot (1 to {})",
                        fmt_bytes(s),
                        reach / PAGE
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs `colo bench dirty`.
///
/// # Errors
/// Bad arguments, or a KVM failure.
pub fn run(args: &DirtyArgs) -> Result<()> {
    args.check()?;
    scan(args);
    if args.no_kvm {
        println!("\nKVM dirty log: skipped (--no-kvm)");
        return Ok(());
    }
    kvm(args)
}

fn scan(args: &DirtyArgs) {
    let pages = args.guest / PAGE;
    println!(
        "Bitmap scan: {} guest, {pages} pages, {} words; median of {} reps",
        fmt_bytes(args.guest),
        pages.div_ceil(64),
        args.reps
    );
    println!(
        "{:>9} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "density", "pages", "runs", "popcount", "runs scan", "ratio"
    );
    let mut rng = SplitMix64::new(args.seed);
    let mut verdict = None;
    for &d in &args.density {
        let mut b = PageBitmap::new(pages);
        let want = ((pages as f64 * d / 100.0).round() as u64).max(1);
        while b.count() < want {
            // Set in batches and recount: cheaper than counting every insert.
            for _ in 0..(want - b.count()) {
                b.set(rng.below(pages));
            }
        }
        let (pc, set) = time_reps(args.reps, || {
            b.words()
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
        });
        let (sc, (runs, covered)) = time_reps(args.reps, || {
            b.runs().fold((0u64, 0u64), |(n, c), (_, k)| (n + 1, c + k))
        });
        assert_eq!(set, covered, "runs must cover exactly the set pages");
        let (p, s) = (median(&pc), median(&sc));
        let ratio = s.as_secs_f64() / p.as_secs_f64().max(1e-9);
        println!(
            "{:>8}% {set:>10} {runs:>10} {:>12} {:>12} {ratio:>7.2}x",
            d,
            fmt_dur(p),
            fmt_dur(s)
        );
        if verdict.is_none() && d <= 1.0 {
            verdict = Some((d, s, ratio));
        }
    }
    if let Some((d, s, ratio)) = verdict {
        let met = ratio <= SPARSE_RATIO_TARGET && s < SPARSE_ABS_TARGET;
        println!(
            "target: sparse ({d}%) scan <= {SPARSE_RATIO_TARGET}x popcount and < 1 ms: \
             {ratio:.2}x, {} -> {}",
            fmt_dur(s),
            if met { "MET" } else { "NOT MET" }
        );
    }
}

fn kvm(args: &DirtyArgs) -> Result<()> {
    println!(
        "\nKVM dirty log (GET, then CLEAR under manual protection); median of {} reps, \
         against the same calls on the clean slot",
        args.kvm_reps
    );
    println!(
        "{:>8} {:>8} {:>8} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "slot", "dirty", "found", "get", "clear", "get+clear", "clean get", "guest run"
    );
    for &slot in &args.slots {
        let mut g = DirtyGuest::new(slot)?;
        let slot_pages = slot / PAGE;
        for &n in &args.dirty {
            let reach = slot.min(GUEST32_REACH) - FIRST_GPA;
            let stride = ((reach / u64::from(n)) & !(PAGE - 1)) as u32;
            let (mut get, mut clear, mut clean, mut guest) = (vec![], vec![], vec![], vec![]);
            let mut found = 0;
            for _ in 0..args.kvm_reps {
                let t = Instant::now();
                g.dirty(n, stride)?;
                guest.push(t.elapsed());
                let t = Instant::now();
                let mut log = g
                    .vm()
                    .get_dirty_log(0, slot as usize)
                    .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
                get.push(t.elapsed());
                found = log.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                let t = Instant::now();
                if g.manual_protect() {
                    colo_dirty_track::clear_dirty_log(g.vm(), 0, 0, slot_pages as u32, &mut log)
                        .map_err(|e| Error::Guest(format!("KVM_CLEAR_DIRTY_LOG: {e}")))?;
                }
                clear.push(t.elapsed());
                let t = Instant::now();
                let again = g
                    .vm()
                    .get_dirty_log(0, slot as usize)
                    .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))?;
                clean.push(t.elapsed());
                if again.iter().any(|&w| w != 0) {
                    return Err(Error::Guest("the log is not clean after CLEAR".into()));
                }
            }
            for v in [&mut get, &mut clear, &mut clean, &mut guest] {
                v.sort();
            }
            let both: Vec<Duration> = get.iter().zip(&clear).map(|(a, b)| *a + *b).collect();
            let mut both = both;
            both.sort();
            println!(
                "{:>8} {n:>8} {found:>8} {:>11} {:>11} {:>11} {:>11} {:>11}",
                fmt_bytes(slot),
                fmt_dur(median(&get)),
                fmt_dur(median(&clear)),
                fmt_dur(median(&both)),
                fmt_dur(median(&clean)),
                fmt_dur(median(&guest)),
            );
            if found != u64::from(n) {
                println!(
                    "  note: the log held {found} pages, the guest wrote {n} (page-table or \
                     code pages would explain a few more)"
                );
            }
        }
    }
    println!(
        "(the guest is 32-bit without paging: on slots over 4 GiB its pages spread over the \
         first 4 GiB; the log covers the whole slot)"
    );
    Ok(())
}
