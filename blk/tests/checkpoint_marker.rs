//! Ending an epoch without waiting: the primary queues the end-of-epoch marker, the
//! secondary waits for it (so the controller can answer the checkpoint only once the disk
//! is there), and the primary's barrier then only takes the acknowledgement.

mod common;

use std::time::Duration;

use colo_blk::Error;
use common::*;

const T: Duration = Duration::from_secs(10);

#[test]
fn a_queued_marker_reaches_the_secondary_after_every_write_before_it() {
    let (primary, secondary) = in_sync_pair(1 << 20);

    // No marker yet: the wait ends with a typed error, not a hang.
    assert!(matches!(
        secondary.wait_next_marker(Duration::from_millis(100)),
        Err(Error::EpochNotReady { epoch: 1, .. })
    ));
    for i in 0..64u64 {
        primary.write_at(i * 4096, &data(i, 4096)).unwrap();
    }
    primary.checkpoint_marker(1).unwrap();
    primary.checkpoint_marker(1).unwrap(); // the same epoch again: nothing more is sent
    assert!(matches!(
        primary.checkpoint_marker(0),
        Err(Error::EpochOrder { epoch: 0, after: 1 })
    ));
    assert_eq!(secondary.wait_next_marker(T).unwrap(), 1);
    // The SVM still sees the last checkpoint (the writes are behind the hidden buffer)...
    let mut b = vec![0u8; 4096];
    secondary.read_at(0, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "the epoch shows before its commit"
    );
    let s = primary.checkpoint_barrier(1, T).unwrap();
    assert_eq!(s.epoch, 1);
    assert_eq!(secondary.commit_next(T).unwrap().epoch, 1);
    // ...and after the commit every write before the marker.
    for i in 0..64u64 {
        secondary.read_at(i * 4096, &mut b).unwrap();
        assert!(b == data(i, 4096), "block {i} differs after the commit");
    }
    // The next epoch works the same, and its marker is a new one.
    primary.write_at(0, &[7; 4096]).unwrap();
    primary.checkpoint_marker(2).unwrap();
    assert_eq!(secondary.wait_next_marker(T).unwrap(), 2);
    primary.checkpoint_barrier(2, T).unwrap();
    assert_eq!(secondary.commit(2, T).unwrap().epoch, 2);
}
