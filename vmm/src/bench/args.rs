//! Arguments of `colo bench transport` and of its receiver process, and their checks.

use std::net::SocketAddr;

use clap::Args;
use colo_transport::tcp::TcpPushOptions;
use colo_transport::tcp::wire::{MAX_BATCH_BYTES, MAX_BATCH_RUNS, MAX_STREAMS};

use super::error::{Error, Result};
use super::pages::PAGE_SIZE;
use super::report::fmt_bytes;
use crate::args::parse_size;

/// Seed used when none is given, so that runs choose the same pages.
const DEFAULT_SEED: u64 = 1;

/// Most repetitions of one case.
const MAX_REPS: u32 = 1000;

/// `colo bench transport`.
#[derive(Debug, Args)]
#[command(
    after_help = "Sizes are byte counts or numbers with KiB, MiB, GiB or TiB (K, M, G and T \
                  are the same powers of 1024), e.g. 64MiB or 2GiB.\n\
                  Progress goes to stderr; RUST_LOG=debug also prints every repetition."
)]
pub struct TransportArgs {
    /// Size of the source region (the "guest memory") and of the receiver's destination;
    /// a non-zero multiple of 4096 bytes.
    #[arg(long, default_value = "2GiB", value_parser = parse_region_size)]
    size: u64,

    /// Random-page cases, comma-separated: for each count, that many distinct 4 KiB pages
    /// chosen at random (adjacent ones merged into runs, as a dirty bitmap gives them).
    #[arg(
        long,
        default_value = "16384,65536",
        value_delimiter = ',',
        value_parser = parse_page_count
    )]
    random_pages: Vec<u64>,

    /// Parallel TCP streams of the push path, comma-separated (1 to 16 each); every push
    /// case runs once per count.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',', value_parser = parse_streams)]
    streams: Vec<usize>,

    /// Repetitions of every measurement; the results show the median and the best.
    #[arg(long, default_value_t = 3, value_parser = parse_reps)]
    reps: u32,

    /// Most payload bytes per push batch (one gather write); longer runs are split.
    /// 4KiB to 64MiB. [default: the transport's, 4MiB]
    #[arg(long, value_parser = parse_batch_bytes)]
    batch_bytes: Option<u64>,

    /// Most runs per push batch (one gather write). 1 to 1023. [default: the
    /// transport's, 512]
    #[arg(long, value_parser = parse_batch_runs)]
    batch_runs: Option<usize>,

    /// Seed of the random bytes and of the random choice of pages.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,

    /// Print the results as one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,

    /// Also push every case sealed (`--encrypt`: AES-256-GCM with keys from the
    /// handshake) at every stream count, beside the plain push of the same run.
    #[arg(long)]
    encrypt: bool,

    /// Testing only: the receiver corrupts one byte of every epoch before checking it, so
    /// that the benchmark must fail with a checksum mismatch.
    #[arg(long, hide = true)]
    corrupt_for_test: bool,

    /// ofi: also push every case with one-sided RMA writes through libfabric (one
    /// connected endpoint, the verbs pipeline), beside the TCP push of the same run
    /// (needs a build with the `ofi` feature).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: BenchTransport,

    /// The libfabric provider of `--transport ofi` (tcp works on any machine).
    #[arg(long, default_value = "tcp", value_name = "NAME")]
    ofi_provider: String,
}

/// What `colo bench transport` pushes with, besides its TCP baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchTransport {
    /// The TCP push only.
    Tcp,
    /// The TCP push and the libfabric one.
    Ofi,
}

/// A checked benchmark plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Region size in bytes.
    pub size: u64,
    /// Page counts of the random-page cases.
    pub random_pages: Vec<u64>,
    /// Stream counts to push with.
    pub streams: Vec<usize>,
    /// Repetitions of every measurement.
    pub reps: u32,
    /// Push tuning (streams are set per session).
    pub opts: TcpPushOptions,
    /// Seed of the random bytes and pages.
    pub seed: u64,
    /// Print JSON instead of the table.
    pub json: bool,
    /// Also push sealed.
    pub encrypt: bool,
    /// The receiver corrupts every epoch (tests the mismatch path).
    pub corrupt_for_test: bool,
    /// Also push through libfabric with this provider (`--transport ofi`).
    pub ofi: Option<String>,
}

impl TransportArgs {
    /// Checks the arguments against each other and builds the plan.
    ///
    /// # Errors
    /// [`Error::InvalidArgs`] if a random-page count exceeds the pages of the region.
    pub fn plan(&self) -> Result<Plan> {
        let pages = self.size / u64::from(PAGE_SIZE);
        if let Some(&n) = self.random_pages.iter().find(|&&n| n > pages) {
            return Err(Error::InvalidArgs(format!(
                "--random-pages {n} asks for more pages than the region holds: --size {} \
                 has {pages} pages of {PAGE_SIZE} bytes",
                fmt_bytes(self.size)
            )));
        }
        let defaults = TcpPushOptions::default();
        let opts = TcpPushOptions {
            batch_bytes: self.batch_bytes.unwrap_or(defaults.batch_bytes),
            batch_runs: self.batch_runs.unwrap_or(defaults.batch_runs),
            ..defaults
        };
        Ok(Plan {
            size: self.size,
            random_pages: dedup(&self.random_pages),
            streams: dedup(&self.streams),
            reps: self.reps,
            opts,
            seed: self.seed,
            json: self.json,
            encrypt: self.encrypt,
            corrupt_for_test: self.corrupt_for_test,
            ofi: (self.transport == BenchTransport::Ofi).then(|| self.ofi_provider.clone()),
        })
    }
}

/// The hidden `colo bench transport-receiver`, started by `colo bench transport`.
#[derive(Debug, Args)]
pub struct ReceiverArgs {
    /// Address of the benchmark's control listener (a loopback address).
    #[arg(long)]
    pub control: SocketAddr,

    /// Size of the destination region in bytes.
    #[arg(long, value_parser = parse_region_size)]
    pub size: u64,

    /// Pair id both sides announce in the handshake.
    #[arg(long)]
    pub pair_id: u64,

    /// Testing only: flip one byte of every committed epoch before checking it.
    #[arg(long)]
    pub corrupt_for_test: bool,

    /// The libfabric provider of `push-ofi` sessions.
    #[arg(long)]
    pub ofi_provider: Option<String>,
}

fn dedup<T: PartialEq + Copy>(v: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for &x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// A region size: non-zero, a whole number of pages, addressable.
fn parse_region_size(s: &str) -> std::result::Result<u64, String> {
    let n = parse_size(s)?;
    if n == 0 {
        return Err("the region size must not be 0".into());
    }
    if n % u64::from(PAGE_SIZE) != 0 {
        return Err(format!(
            "{n} bytes is not a multiple of the {PAGE_SIZE}-byte page size"
        ));
    }
    if usize::try_from(n).is_err() {
        return Err(format!("{n} bytes cannot be mapped on this machine"));
    }
    Ok(n)
}

fn parse_page_count(s: &str) -> std::result::Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("a random-page case needs at least 1 page".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a page count")),
    }
}

fn parse_streams(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_STREAMS as usize).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a stream count: use 1 to {MAX_STREAMS}"
        )),
    }
}

fn parse_reps(s: &str) -> std::result::Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_REPS).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a repetition count: use 1 to {MAX_REPS}"
        )),
    }
}

fn parse_batch_bytes(s: &str) -> std::result::Result<u64, String> {
    let n = parse_size(s)?;
    if !(u64::from(PAGE_SIZE)..=MAX_BATCH_BYTES).contains(&n) {
        return Err(format!(
            "a batch of {n} bytes is outside 4KiB to {}MiB",
            MAX_BATCH_BYTES >> 20
        ));
    }
    Ok(n)
}

fn parse_batch_runs(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BATCH_RUNS as usize).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a run count per batch: use 1 to {MAX_BATCH_RUNS}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sizes_are_whole_pages() {
        assert!(parse_region_size("0").is_err());
        assert!(parse_region_size("4097").is_err());
        assert_eq!(parse_region_size("64MiB"), Ok(64 << 20));
    }

    #[test]
    fn stream_counts_are_bounded() {
        assert!(parse_streams("0").is_err());
        assert!(parse_streams("17").is_err());
        assert_eq!(parse_streams("16"), Ok(16));
    }

    #[test]
    fn lists_lose_duplicates_and_keep_order() {
        assert_eq!(dedup(&[4, 1, 4, 2, 1]), vec![4, 1, 2]);
    }
}
