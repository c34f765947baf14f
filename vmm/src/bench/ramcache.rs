//! `colo bench ramcache`: the commit flush of the RAM cache (cache → SVM memory for the
//! pages of an epoch) against a same-run memcpy of the same pages between the same two
//! mappings.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use colo_memory::Region;
use colo_memory::{GuestLayout, GuestRegion, PageBitmap};
use colo_ramcache::RamCache;
use colo_transport::push::EpochCommit;

use super::error::{Error, Result};
use super::pages::{PAGE_SIZE, SplitMix64, fill_random, random_bitmap, set_pages};
use super::report::fmt_bytes;
use super::timing::{fmt_dur, median};
use crate::args::parse_size;

const PAGE: u64 = PAGE_SIZE as u64;
const GIB: f64 = (1u64 << 30) as f64;
/// The flush should reach this fraction of the same-run memcpy rate.
const TARGET: f64 = 0.80;

/// `colo bench ramcache`.
#[derive(Debug, Args)]
#[command(after_help = "Both mappings are pre-faulted before timing starts.")]
pub struct RamcacheArgs {
    /// Guest memory size (the cache and the SVM memory are this size each).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Random-page cases, comma-separated page counts.
    #[arg(long, default_value = "16384,65536", value_delimiter = ',')]
    random_pages: Vec<u64>,
    /// Repetitions of each case (the median is shown).
    #[arg(long, default_value_t = 7)]
    reps: u32,
    /// Seed of the random page choice and contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn err(what: &'static str) -> impl FnOnce(colo_ramcache::Error) -> Error {
    move |e| Error::Guest(format!("{what}: {e}"))
}

/// Runs `colo bench ramcache`.
///
/// # Errors
/// Bad arguments, or a failed mapping or commit.
pub fn run(args: &RamcacheArgs) -> Result<()> {
    let pages = args.size / PAGE;
    if args.size == 0 || args.size % PAGE != 0 || usize::try_from(args.size).is_err() {
        return Err(Error::InvalidArgs(format!(
            "--size {} is not a usable size",
            args.size
        )));
    }
    if let Some(n) = args.random_pages.iter().find(|&&n| n == 0 || n > pages) {
        return Err(Error::InvalidArgs(format!(
            "{n} pages do not fit {pages} pages"
        )));
    }
    if args.reps == 0 {
        return Err(Error::InvalidArgs("--reps must be at least 1".into()));
    }
    let layout = GuestLayout::new(
        PAGE,
        vec![GuestRegion {
            slot: 0,
            gpa: 0,
            len: args.size,
        }],
    )
    .map_err(|e| Error::InvalidArgs(e.to_string()))?;
    eprintln!("mapping and pre-faulting 2 x {} ...", fmt_bytes(args.size));
    let svm = Arc::new(
        Region::anonymous(args.size as usize).map_err(Error::transport("map SVM memory"))?,
    );
    let mut cache = RamCache::new(layout, vec![Arc::clone(&svm)]).map_err(err("map the cache"))?;
    fill_random(cache.region(), args.seed);
    println!(
        "Commit flush: {} guest, cache huge pages: {}; median of {} reps; memcpy = the same \
         pages copied one by one between the same two mappings",
        fmt_bytes(args.size),
        cache.huge_pages(),
        args.reps
    );
    println!(
        "{:>8} {:>8} {:>11} {:>11} {:>10} {:>10} {:>7}",
        "pages", "runs", "commit", "memcpy", "GiB/s", "memcpy", "ratio"
    );
    let mut rng = SplitMix64::new(args.seed ^ 0x5eed);
    let clean = PageBitmap::new(pages);
    let mut epoch = 0;
    let mut worst: Option<f64> = None;
    for &n in &args.random_pages {
        let bitmap = PageBitmap::from_words(random_bitmap(&mut rng, pages, n), pages)
            .expect("the bench draws pages inside the guest");
        let runs = bitmap.runs().count();
        let (mut commit, mut copy) = (Vec::<Duration>::new(), Vec::<Duration>::new());
        for _ in 0..args.reps {
            epoch += 1;
            cache
                .land(&EpochCommit {
                    epoch,
                    bitmap: bitmap.clone(),
                    bytes: n * PAGE,
                })
                .map_err(err("land"))?;
            cache.seal_pages(epoch).map_err(err("seal"))?;
            cache.stage_state(Vec::new()).map_err(err("stage state"))?;
            cache.stage_disk_acked().map_err(err("stage disk"))?;
            let t = std::time::Instant::now();
            let done = cache.commit(&clean).map_err(err("commit"))?;
            commit.push(t.elapsed());
            if done.pages != n {
                return Err(Error::Guest(format!(
                    "commit copied {} pages, not {n}",
                    done.pages
                )));
            }
            let t = std::time::Instant::now();
            memcpy_pages(cache.region(), &svm, bitmap.words());
            copy.push(t.elapsed());
        }
        commit.sort();
        copy.sort();
        let rate = |d: Duration| (n * PAGE) as f64 / GIB / d.as_secs_f64().max(1e-9);
        let (c, m) = (median(&commit), median(&copy));
        let ratio = rate(c) / rate(m);
        worst = Some(worst.map_or(ratio, |w| w.min(ratio)));
        println!(
            "{n:>8} {runs:>8} {:>11} {:>11} {:>10.2} {:>10.2} {ratio:>6.2}x",
            fmt_dur(c),
            fmt_dur(m),
            rate(c),
            rate(m)
        );
    }
    if let Some(w) = worst {
        println!(
            "target: commit flush >= {:.0}% of the same-run memcpy rate: worst case {:.0}% -> {}",
            TARGET * 100.0,
            w * 100.0,
            if w >= TARGET { "MET" } else { "NOT MET" }
        );
    }
    Ok(())
}

/// The baseline: every page of `bitmap` copied on its own from `src` to `dst`.
fn memcpy_pages(src: &Region, dst: &Region, bitmap: &[u64]) {
    for p in set_pages(bitmap) {
        let off = (p * PAGE) as usize;
        // SAFETY: p < pages of both regions (the bitmap was drawn over them), so both
        // page-sized spans are inside their mappings, which are distinct.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(off),
                dst.as_ptr().add(off),
                PAGE as usize,
            )
        };
    }
}
