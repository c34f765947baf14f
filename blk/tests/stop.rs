//! A secondary told to stop leaves its disk as of the last committed checkpoint: the
//! primary's writes of the running epoch undone, the SVM's own writes dropped.

mod common;

use colo_blk::{
    BufferOptions, PrimaryDisk, PrimaryOptions, SecondaryDisk, SecondaryPhase, SyncMode,
};
use common::{T, connect, contents, data, image, wait_for};

#[test]
fn a_stopped_secondary_holds_the_last_commit() {
    const LEN: usize = 64 * 512;
    let (pd, pcheck) = image(&vec![0; LEN]);
    let (sd, scheck) = image(&vec![0; LEN]);
    let primary = PrimaryDisk::new(pd, PrimaryOptions::default());
    let secondary = SecondaryDisk::new(sd, BufferOptions::default());
    connect(&primary, &secondary, SyncMode::InSync);

    // Epoch 1, committed.
    primary.write_at(0, &data(1, 8 * 512)).unwrap();
    primary.checkpoint_barrier(1, T).unwrap();
    secondary.commit(1, T).unwrap();
    let committed = contents(&pcheck);

    // Epoch 2 runs: the primary overwrites part of epoch 1 and writes elsewhere, the SVM
    // writes too; none of it is committed.
    primary.write_at(4 * 512, &data(2, 8 * 512)).unwrap();
    primary.write_at(40 * 512, &data(3, 4 * 512)).unwrap();
    secondary.write_at(20 * 512, &data(4, 2 * 512)).unwrap();
    wait_for(T, "the epoch's writes to land on the secondary", || {
        primary.stats().inflight_frames == 0
    });
    assert_ne!(
        contents(&scheck),
        committed,
        "the running epoch reached the disk"
    );

    secondary.stop_at_commit().unwrap();
    assert_eq!(secondary.phase(), SecondaryPhase::Stopped);
    assert!(
        contents(&scheck) == committed,
        "the disk is not the last commit"
    );
    let mut b = vec![0u8; 512];
    assert!(
        secondary.read_at(0, &mut b).is_err(),
        "a stopped disk served a read"
    );
}
