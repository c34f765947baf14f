//! The control channel with `--encrypt`: messages cross both ways, also from a reader
//! thread and a writer on clones of one connection (as the heartbeat link uses it), and a
//! sniffer between the sides sees none of the device state.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colo_transport::control::{ControlChannel, Message, Role};

const MARK: &[u8; 16] = b"DEVICE-STATE-SEC";

fn creds() -> colo_auth::Credentials {
    colo_transport::testing::credentials().encrypted(true)
}

/// A relay from a local port to `to` that records what goes through it, both ways.
fn relay(to: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        let Ok((a, _)) = l.accept() else { return };
        let b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
            let record = Arc::clone(&record);
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, seen)
}

#[test]
fn encrypted_control_messages_cross_both_ways_and_the_wire_shows_no_state() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (port, seen) = relay(l.local_addr().unwrap().port());
    let secondary = std::thread::spawn(move || {
        let (mut ch, _) =
            ControlChannel::accept_authenticated(&l, &creds(), Role::Secondary, None, &|| false)
                .unwrap();
        ch.set_recv_timeout(Some(Duration::from_secs(10))).unwrap();
        let got = ch.recv().unwrap();
        // Answer from a clone while this handle reads on (the heartbeat link's shape).
        let mut tx = ch.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for seq in 0..50 {
                tx.send(&Message::Heartbeat { seq }).unwrap();
            }
        });
        let next = ch.recv().unwrap();
        writer.join().unwrap();
        (got, next)
    });
    let mut ch = ControlChannel::connect_authenticated(
        &format!("127.0.0.1:{port}"),
        Duration::from_secs(10),
        &creds(),
        Role::Primary,
    )
    .unwrap();
    let state = MARK.repeat(20_000);
    ch.send(&Message::VmstateSize {
        state: state.clone(),
    })
    .unwrap();
    ch.set_recv_timeout(Some(Duration::from_secs(10))).unwrap();
    for seq in 0..50 {
        assert_eq!(ch.recv().unwrap(), Message::Heartbeat { seq });
    }
    ch.send(&Message::Goodbye).unwrap();
    let (got, next) = secondary.join().unwrap();
    assert_eq!(got, Message::VmstateSize { state });
    assert_eq!(next, Message::Goodbye);
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > 20_000 * MARK.len());
    assert!(
        !wire.windows(MARK.len()).any(|w| w == MARK),
        "a sniffer saw the device state"
    );
}
