//! Large writes are forwarded from the primary's page cache: their bytes are read when
//! the secondary receives them, not when the guest writes. A write of the next epoch must
//! never show in a frame of the epoch before (it would be committed with that epoch).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use colo_blk::wire::{Frame, HEADER_LEN, SyncMode};
use colo_blk::{PrimaryDisk, PrimaryOptions};
use common::*;

fn read_frame(c: &mut TcpStream) -> (Frame, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    c.read_exact(&mut h).unwrap();
    let f = Frame::parse(&h).unwrap();
    let mut p = vec![0u8; f.payload_len() as usize];
    c.read_exact(&mut p).unwrap();
    (f, p)
}

#[test]
fn a_write_after_a_barrier_never_shows_in_the_epoch_before() {
    const DISK: u64 = 1 << 20;
    const LEN: usize = 256 << 10;
    let (pd, pf) = image(&vec![0; DISK as usize]);
    let p = Arc::new(PrimaryDisk::new(pd, PrimaryOptions::default()));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (got_tx, got_rx) = mpsc::channel();
    // A secondary that shakes hands, then reads nothing until told to.
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let (hello, _) = read_frame(&mut c);
        assert!(matches!(hello, Frame::Hello { .. }));
        c.write_all(&Frame::HelloAck { disk_len: DISK }.to_bytes())
            .unwrap();
        go_rx.recv().unwrap();
        let (w, payload) = read_frame(&mut c);
        assert!(
            matches!(
                w,
                Frame::Write {
                    seq: 1,
                    offset: 0,
                    ..
                }
            ),
            "{w:?}"
        );
        let (m, _) = read_frame(&mut c);
        assert_eq!(m, Frame::Checkpoint { seq: 2, epoch: 1 });
        got_tx.send(payload).unwrap();
        c.write_all(
            &Frame::Ack {
                seq: 2,
                buffered: 0,
            }
            .to_bytes(),
        )
        .unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    p.attach(TcpStream::connect(addr).unwrap(), SyncMode::InSync, T)
        .unwrap();
    let (a, b) = (data(1, LEN), data(2, LEN));
    p.write_at(0, &a).unwrap();
    let barrier = {
        let p = Arc::clone(&p);
        std::thread::spawn(move || p.checkpoint_barrier(1, T))
    };
    wait_for(T, "the epoch marker to be queued", || {
        p.stats().forwarded_frames == 2
    });
    // The next epoch's write, while epoch 1's frame is still in the socket.
    let writer = {
        let p = Arc::clone(&p);
        let b = b.clone();
        std::thread::spawn(move || p.write_at(0, &b))
    };
    std::thread::sleep(Duration::from_millis(100));
    go_tx.send(()).unwrap();
    let got = got_rx.recv_timeout(T).unwrap();
    assert!(
        got == a,
        "a frame of epoch 1 carried data written in epoch 2"
    );
    barrier.join().unwrap().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(&contents(&pf)[..LEN], &b[..]);
    p.stop_replication();
    fake.join().unwrap();
}
