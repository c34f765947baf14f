//! Commit correctness against a reference model: random sequences of primary pushes, SVM
//! writes, checkpoints and incomplete checkpoints, on a guest of two regions.

mod common;

use colo_memory::PageBitmap;
use colo_transport::push::EpochCommit;
use common::{PAGE, PAGES, cache, page_bytes, svm_snapshot, svm_write};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// The primary dirtied page `p` with contents tagged `tag`, and pushed it.
    Push { p: u64, tag: u8 },
    /// The open push epoch is committed (a background push round).
    PushCommit,
    /// The SVM wrote page `p` itself.
    SvmWrite { p: u64, tag: u8 },
    /// A complete checkpoint.
    Checkpoint,
    /// A checkpoint that reaches only some of its steps and is then tried.
    Partial { steps: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PAGES, any::<u8>()).prop_map(|(p, tag)| Op::Push { p, tag }),
        1 => Just(Op::PushCommit),
        3 => (0..PAGES, any::<u8>()).prop_map(|(p, tag)| Op::SvmWrite { p, tag }),
        2 => Just(Op::Checkpoint),
        1 => (0u8..3).prop_map(|steps| Op::Partial { steps }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn svm_equals_the_primary_after_every_commit_and_nothing_more_is_copied(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        let (mut c, svm) = cache();
        // The model: the primary's memory, and the SVM's memory.
        let mut pvm = vec![vec![0u8; PAGE as usize]; PAGES as usize];
        let mut svm_model = pvm.clone();
        // Pages pushed in the open push epoch, and since the last checkpoint.
        let mut open = PageBitmap::new(PAGES);
        let mut pushed = PageBitmap::new(PAGES);
        let mut svm_dirty = PageBitmap::new(PAGES);
        let mut push_epoch = 0;
        let push_commit = |c: &mut colo_ramcache::RamCache, open: &mut PageBitmap, e: &mut u64| {
            *e += 1;
            c.land(&EpochCommit { epoch: *e, bitmap: open.clone(), bytes: 0 }).unwrap();
            open.clear_all();
        };
        for op in ops {
            match op {
                Op::Push { p, tag } => {
                    let b = page_bytes(tag, p);
                    c.region().write_at(p * PAGE, &b).unwrap();
                    pvm[p as usize] = b;
                    open.set(p);
                    pushed.set(p);
                }
                Op::PushCommit => push_commit(&mut c, &mut open, &mut push_epoch),
                Op::SvmWrite { p, tag } => {
                    let b = page_bytes(!tag, p);
                    svm_write(&svm, p, &b);
                    svm_model[p as usize] = b;
                    svm_dirty.set(p);
                }
                Op::Partial { steps } => {
                    // Steps in the protocol's order; a missing one blocks the commit.
                    if steps >= 1 {
                        push_commit(&mut c, &mut open, &mut push_epoch);
                        c.seal_pages(push_epoch).unwrap();
                    }
                    if steps >= 2 {
                        c.stage_state(vec![7; 3]).unwrap();
                    }
                    let before = svm_snapshot(&svm);
                    prop_assert!(c.commit(&svm_dirty).is_err());
                    prop_assert!(svm_snapshot(&svm) == before, "a refused commit touched the SVM");
                    // The controller would finish the checkpoint later: do so now.
                    if steps == 0 {
                        push_commit(&mut c, &mut open, &mut push_epoch);
                        c.seal_pages(push_epoch).unwrap();
                    }
                    if steps <= 1 {
                        c.stage_state(vec![7; 3]).unwrap();
                    }
                    c.stage_disk_acked().unwrap();
                    let mut union = pushed.clone();
                    union.union_with(&svm_dirty);
                    let done = c.commit(&svm_dirty).unwrap();
                    prop_assert_eq!(done.pages, union.count());
                    prop_assert_eq!(done.pushed_pages, pushed.count());
                    svm_model.clone_from(&pvm);
                    pushed.clear_all();
                    svm_dirty.clear_all();
                }
                Op::Checkpoint => {
                    push_commit(&mut c, &mut open, &mut push_epoch);
                    c.seal_pages(push_epoch).unwrap();
                    c.stage_state(push_epoch.to_le_bytes().to_vec()).unwrap();
                    c.stage_disk_acked().unwrap();
                    let mut union = pushed.clone();
                    union.union_with(&svm_dirty);
                    let done = c.commit(&svm_dirty).unwrap();
                    prop_assert_eq!(done.pages, union.count(), "copied more or less than the union");
                    prop_assert_eq!(done.pushed_pages, pushed.count());
                    prop_assert_eq!(done.state, push_epoch.to_le_bytes().to_vec());
                    svm_model.clone_from(&pvm);
                    pushed.clear_all();
                    svm_dirty.clear_all();
                }
            }
            let now = svm_snapshot(&svm);
            for p in 0..PAGES as usize {
                prop_assert!(now[p] == svm_model[p], "SVM page {} differs from the model", p);
            }
        }
    }
}
