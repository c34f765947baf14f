//! The randomized model test: sequences of primary writes, flushes and reads, SVM writes
//! and reads, checkpoints and failovers run against a real primary and secondary (real
//! files, a real loopback socket) and against a plain in-memory reference model. Every
//! read and the final content of both disks must match the model byte for byte.
//!
//! The model:
//! - `primary`: the primary's disk. A primary write changes it.
//! - `svm`: what the SVM sees: the disk as of the last commit plus its own writes since.
//! - A committed checkpoint sets `committed = primary` and `svm = committed`; the
//!   secondary's disk file must then equal `primary`.
//! - A failover (the primary dies mid-epoch, or after the disk acknowledgement of an
//!   epoch but before its commit) keeps `svm`: the secondary's disk must end equal to it.

mod common;

use colo_blk::{
    BufferOptions, PrimaryDisk, PrimaryOptions, ReplicationState, SecondaryDisk, SecondaryPhase,
    SyncMode,
};
use common::*;
use proptest::prelude::*;

const SECTORS: u64 = 96;
const S: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    PrimaryWrite {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    PrimaryFlush,
    PrimaryRead {
        sector: u64,
        sectors: u64,
    },
    SvmWrite {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    SvmRead {
        sector: u64,
        sectors: u64,
    },
    Checkpoint,
    /// The primary dies after the secondary acknowledged the epoch, before the commit.
    DieAfterBarrier,
    /// The primary dies mid-epoch.
    Die,
}

fn span() -> impl Strategy<Value = (u64, u64)> {
    (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(20)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (span(), any::<u64>()).prop_map(|((sector, sectors), seed)| Op::PrimaryWrite { sector, sectors, seed }),
        1 => Just(Op::PrimaryFlush),
        1 => span().prop_map(|(sector, sectors)| Op::PrimaryRead { sector, sectors }),
        5 => (span(), any::<u64>()).prop_map(|((sector, sectors), seed)| Op::SvmWrite { sector, sectors, seed }),
        5 => span().prop_map(|(sector, sectors)| Op::SvmRead { sector, sectors }),
        3 => Just(Op::Checkpoint),
        1 => Just(Op::DieAfterBarrier),
        1 => Just(Op::Die),
    ]
}

fn range(sector: u64, sectors: u64) -> std::ops::Range<usize> {
    (sector * S) as usize..((sector + sectors) * S) as usize
}

fn run(ops: &[Op], mem_limit: usize, window_frames: usize, send_delay_us: u64, init_seed: u64) {
    let init = data(init_seed, (SECTORS * S) as usize);
    let (pdisk, pfile) = image(&init);
    let (sdisk, sfile) = image(&init);
    let primary = PrimaryDisk::new(
        pdisk,
        PrimaryOptions {
            window_frames,
            send_delay: std::time::Duration::from_micros(send_delay_us),
            ..PrimaryOptions::default()
        },
    );
    let secondary = SecondaryDisk::new(
        sdisk,
        BufferOptions {
            mem_limit,
            ..BufferOptions::default()
        },
    );
    connect(&primary, &secondary, SyncMode::InSync);

    let mut m_primary = init.clone();
    let mut m_svm = init;
    let mut epoch = 0;
    let mut dead = false;
    for op in ops {
        match *op {
            Op::PrimaryWrite {
                sector,
                sectors,
                seed,
            } => {
                if dead {
                    continue;
                }
                let d = data(seed, (sectors * S) as usize);
                primary.write_at(sector * S, &d).unwrap();
                m_primary[range(sector, sectors)].copy_from_slice(&d);
            }
            Op::PrimaryFlush => {
                if !dead {
                    primary.flush().unwrap();
                }
            }
            Op::PrimaryRead { sector, sectors } => {
                let mut b = vec![0u8; (sectors * S) as usize];
                primary.read_at(sector * S, &mut b).unwrap();
                assert!(
                    b == m_primary[range(sector, sectors)],
                    "primary read differs"
                );
            }
            Op::SvmWrite {
                sector,
                sectors,
                seed,
            } => {
                let d = data(seed ^ 0xABCD, (sectors * S) as usize);
                secondary.write_at(sector * S, &d).unwrap();
                m_svm[range(sector, sectors)].copy_from_slice(&d);
            }
            Op::SvmRead { sector, sectors } => {
                let mut b = vec![0u8; (sectors * S) as usize];
                secondary.read_at(sector * S, &mut b).unwrap();
                assert!(
                    b == m_svm[range(sector, sectors)],
                    "SVM read at sector {sector}+{sectors} differs from the model"
                );
            }
            Op::Checkpoint => {
                if dead {
                    continue;
                }
                epoch += 1;
                primary.checkpoint_barrier(epoch, T).unwrap();
                let c = secondary.commit(epoch, T).unwrap();
                assert_eq!(c.epoch, epoch);
                let st = secondary.stats().buffer;
                assert_eq!(
                    (st.hidden_extents, st.active_extents, st.footprint()),
                    (0, 0, 0)
                );
                m_svm = m_primary.clone();
                assert!(
                    contents(&sfile) == m_primary,
                    "secondary disk differs from the primary's after commit {epoch}"
                );
            }
            Op::DieAfterBarrier | Op::Die => {
                if dead {
                    continue;
                }
                if matches!(op, Op::DieAfterBarrier) {
                    epoch += 1;
                    primary.checkpoint_barrier(epoch, T).unwrap();
                }
                let f = secondary.failover().unwrap();
                assert_eq!(
                    f.committed,
                    epoch - u64::from(matches!(op, Op::DieAfterBarrier))
                );
                dead = true;
                assert_eq!(secondary.phase(), SecondaryPhase::FailedOver);
                // The primary notices (its next barrier fails) but keeps serving.
                wait_for(T, "the primary to notice", || {
                    matches!(primary.state(), ReplicationState::Lost(_))
                });
                assert!(primary.checkpoint_barrier(epoch + 10, T).is_err());
                assert!(
                    contents(&sfile) == m_svm,
                    "secondary disk after failover differs from the SVM's view"
                );
            }
        }
    }
    if !dead {
        epoch += 1;
        primary.checkpoint_barrier(epoch, T).unwrap();
        secondary.commit(epoch, T).unwrap();
        m_svm = m_primary.clone();
        assert!(
            contents(&sfile) == m_primary,
            "secondary disk differs at the end"
        );
    }
    let mut all = vec![0u8; (SECTORS * S) as usize];
    secondary.read_at(0, &mut all).unwrap();
    assert!(all == m_svm, "final SVM view differs");
    assert!(
        contents(&pfile) == m_primary,
        "primary disk differs at the end"
    );
    if dead {
        assert!(
            contents(&sfile) == m_svm,
            "secondary disk differs at the end"
        );
    }
    drop(primary);
    drop(secondary);
}

proptest! {
    #![proptest_config(ProptestConfig {
        // 24 by default keeps CI short; COLO_BLK_MODEL_CASES=500 for a soak run.
        cases: std::env::var("COLO_BLK_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn replication_matches_the_model(
        ops in proptest::collection::vec(op(), 1..60),
        mem_limit in prop::sample::select(vec![0usize, 2048, 1 << 20]),
        window in prop::sample::select(vec![1usize, 3, 1024]),
        send_delay_us in prop::sample::select(vec![0u64, 1000]),
        init_seed in any::<u64>(),
    ) {
        run(&ops, mem_limit, window, send_delay_us, init_seed);
    }
}

/// A fixed scenario the random one may miss: the same sectors written by both sides in
/// the same epoch, over a spill-only buffer, then a failover before the commit.
#[test]
fn overlapping_writes_then_failover_before_commit() {
    use Op::*;
    run(
        &[
            PrimaryWrite {
                sector: 0,
                sectors: 16,
                seed: 1,
            },
            SvmWrite {
                sector: 8,
                sectors: 16,
                seed: 2,
            },
            Checkpoint,
            PrimaryWrite {
                sector: 4,
                sectors: 8,
                seed: 3,
            },
            PrimaryWrite {
                sector: 0,
                sectors: 20,
                seed: 4,
            },
            SvmWrite {
                sector: 2,
                sectors: 3,
                seed: 5,
            },
            SvmRead {
                sector: 0,
                sectors: 24,
            },
            DieAfterBarrier,
            SvmRead {
                sector: 0,
                sectors: 24,
            },
            SvmWrite {
                sector: 90,
                sectors: 6,
                seed: 6,
            },
        ],
        0,
        2,
        1000,
        9,
    );
}
