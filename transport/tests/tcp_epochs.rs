//! Epoch ordering of the TCP backend: the next epoch never lands or commits before the
//! receiver released the last one, even when it carries no data.

use std::sync::Arc;
use std::time::Duration;

use colo_transport::push::{PushReceiver, WriteRun, push_epoch};
use colo_transport::tcp::{TcpPushListener, TcpPushOptions, TcpPushSender};
use colo_transport::{Error, Region};

const PAGE: u32 = 4096;
const PAGES: u64 = 64;

#[test]
fn an_empty_epoch_waits_for_the_release_of_the_previous_one() {
    let cache = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let guest = Arc::new(Region::anonymous((PAGES * u64::from(PAGE)) as usize).unwrap());
    let listener = TcpPushListener::bind("127.0.0.1:0", cache, PAGE).unwrap();
    let desc = *listener.desc();
    let acceptor = std::thread::spawn(move || listener.accept(Duration::from_secs(10)).unwrap());
    let opts = TcpPushOptions {
        streams: 2,
        ..TcpPushOptions::default()
    };
    let mut tx =
        TcpPushSender::connect(([127, 0, 0, 1], desc.port).into(), desc, guest, opts).unwrap();
    let mut rx = acceptor.join().unwrap();

    push_epoch(&mut tx, [WriteRun::pages(3, 1, PAGE)], &[1 << 3]).unwrap();
    assert_eq!(rx.next_commit(Duration::from_secs(10)).unwrap().epoch, 1);
    // Epoch 1 is not released yet. An empty epoch 2 must not commit past it.
    let pusher = std::thread::spawn(move || {
        let r = push_epoch(&mut tx, std::iter::empty(), &[0]);
        (tx, r)
    });
    assert!(matches!(
        rx.next_commit(Duration::from_millis(200)),
        Err(Error::Timeout(..))
    ));
    rx.release(1).unwrap();
    let c = rx.next_commit(Duration::from_secs(10)).unwrap();
    assert_eq!((c.epoch, c.bytes, c.bitmap), (2, 0, vec![0]));
    let (_tx, r) = pusher.join().unwrap();
    assert_eq!(r.unwrap().epoch, 2);
    rx.release(2).unwrap();
}
