//! The handshake between real sockets: a good pair, every way a peer can be wrong, a
//! replay, a stall, and the key file's rules.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::handshake::{HELLO_LEN, Hello, MAC_LEN};
use super::*;

const T: Duration = Duration::from_secs(2);

fn creds() -> Credentials {
    Credentials::key(PairKey::from_bytes([7; KEY_LEN]))
}

/// Runs `server` on one end of a socket pair and `client` on the other.
fn pair<A: Send + 'static, B>(
    server: impl FnOnce(&mut UnixStream) -> A + Send + 'static,
    client: impl FnOnce(&mut UnixStream) -> B,
) -> (A, B) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || server(&mut a));
    let c = client(&mut b);
    drop(b);
    (h.join().unwrap(), c)
}

#[test]
fn the_same_key_authenticates_both_ways_and_gives_both_the_same_session_secret() {
    let (s, c) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Push(0), T),
        |b| connect(b, &creds(), Role::Primary, Channel::Push(3), T),
    );
    let (s, c) = (s.unwrap(), c.unwrap());
    assert_eq!(s.role, Role::Primary);
    assert_eq!(c.role, Role::Secondary);
    assert_eq!(
        s.channel,
        Channel::Push(3),
        "the listener learns the stream's index"
    );
    assert_eq!(c.channel, Channel::Push(3));
    assert_eq!(s.session, c.session);
    // And a second run gets a fresh secret (fresh nonces).
    let (s2, _) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Push(0), T),
        |b| connect(b, &creds(), Role::Primary, Channel::Push(3), T),
    );
    assert_ne!(s2.unwrap().session, s.session);
}

#[test]
fn a_peer_with_another_key_is_another_pair_on_both_sides() {
    let other = Credentials::key(PairKey::from_bytes([8; KEY_LEN]));
    let (s, c) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        move |b| connect(b, &other, Role::Primary, Channel::Control, T),
    );
    assert!(matches!(s, Err(AuthError::OtherPair { .. })), "{s:?}");
    assert!(c.is_err());
}

#[test]
fn a_side_without_a_key_and_a_side_with_one_refuse_each_other_saying_which() {
    let (s, c) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        |b| {
            connect(
                b,
                &Credentials::insecure(),
                Role::Primary,
                Channel::Control,
                T,
            )
        },
    );
    assert!(matches!(
        s,
        Err(AuthError::InsecureMismatch {
            peer_insecure: true
        })
    ));
    assert!(c.is_err());
    // Two insecure sides get in.
    let (s, c) = pair(
        |a| {
            accept(
                a,
                &Credentials::insecure(),
                Role::Secondary,
                Channel::Disk,
                T,
            )
        },
        |b| connect(b, &Credentials::insecure(), Role::Primary, Channel::Disk, T),
    );
    assert!(s.is_ok() && c.is_ok());
}

#[test]
fn a_wrong_role_or_channel_is_refused() {
    let (s, _) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        |b| connect(b, &creds(), Role::Secondary, Channel::Control, T),
    );
    assert!(matches!(s, Err(AuthError::WrongRole { .. })), "{s:?}");
    let (s, _) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        |b| connect(b, &creds(), Role::Primary, Channel::Disk, T),
    );
    assert!(matches!(s, Err(AuthError::WrongChannel { .. })), "{s:?}");
}

/// A forger who knows the pair id (it is in every Hello) but not the key: the listener
/// answers its Hello, then refuses its proof; the connector refuses a forged listener.
#[test]
fn a_forger_without_the_key_fails_its_mac_on_either_side() {
    let good = creds();
    let forged_hello = Hello {
        role: Role::Primary,
        channel: Channel::Control,
        insecure: false,
        encrypt: false,
        pair_id: good.pair_key().pair_id(),
        nonce: [1; 32],
    }
    .encode();
    let (s, ()) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        move |b| {
            b.write_all(&forged_hello).unwrap();
            let mut reply = [0u8; HELLO_LEN + MAC_LEN];
            b.read_exact(&mut reply).unwrap();
            b.write_all(&[0x5a; MAC_LEN]).unwrap();
            let mut verdict = [0u8; 1];
            assert_eq!(b.read(&mut verdict).unwrap(), 0, "no verdict: closed");
        },
    );
    assert!(matches!(s, Err(AuthError::BadMac)), "{s:?}");

    let forged_server = Hello {
        role: Role::Secondary,
        channel: Channel::Control,
        insecure: false,
        encrypt: false,
        pair_id: good.pair_key().pair_id(),
        nonce: [2; 32],
    }
    .encode();
    let (_, c) = pair(
        move |a| {
            let mut hello = [0u8; HELLO_LEN];
            a.read_exact(&mut hello).unwrap();
            a.write_all(&forged_server).unwrap();
            a.write_all(&[0x5a; MAC_LEN]).unwrap();
        },
        |b| connect(b, &creds(), Role::Primary, Channel::Control, T),
    );
    assert!(matches!(c, Err(AuthError::BadMac)), "{c:?}");
}

/// Everything a real connector sent, recorded and replayed to a new listener, fails: the
/// listener's nonce is new.
#[test]
fn a_recorded_handshake_replayed_is_refused() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let (mut c1, mut c2) = UnixStream::pair().unwrap();
    // Relay between the real client (b) and the real server (c2), keeping what b sent.
    let server =
        thread::spawn(move || accept(&mut c2, &creds(), Role::Secondary, Channel::Control, T));
    let relay = thread::spawn(move || {
        let mut sent = vec![0u8; HELLO_LEN];
        a.read_exact(&mut sent).unwrap();
        c1.write_all(&sent).unwrap();
        let mut reply = [0u8; HELLO_LEN + MAC_LEN];
        c1.read_exact(&mut reply).unwrap();
        a.write_all(&reply).unwrap();
        let mut proof = [0u8; MAC_LEN];
        a.read_exact(&mut proof).unwrap();
        c1.write_all(&proof).unwrap();
        let mut v = [0u8; 1];
        c1.read_exact(&mut v).unwrap();
        a.write_all(&v).unwrap();
        sent.extend_from_slice(&proof);
        sent
    });
    assert!(connect(&mut b, &creds(), Role::Primary, Channel::Control, T).is_ok());
    assert!(server.join().unwrap().is_ok());
    let recorded = relay.join().unwrap();
    let (s, ()) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        move |b| {
            b.write_all(&recorded[..HELLO_LEN]).unwrap();
            let mut reply = [0u8; HELLO_LEN + MAC_LEN];
            b.read_exact(&mut reply).unwrap();
            b.write_all(&recorded[HELLO_LEN..]).unwrap();
        },
    );
    assert!(matches!(s, Err(AuthError::BadMac)), "{s:?}");
}

#[test]
fn a_truncated_handshake_or_a_stranger_is_refused() {
    let (s, ()) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        |b| b.write_all(b"COL").unwrap(),
    );
    assert!(matches!(s, Err(AuthError::Io { .. })), "{s:?}");
    let (s, ()) = pair(
        |a| accept(a, &creds(), Role::Secondary, Channel::Control, T),
        |b| {
            b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n..............................")
                .unwrap()
        },
    );
    assert!(matches!(s, Err(AuthError::NotColo)), "{s:?}");
}

/// A connection that sends a byte a second is dropped at the handshake's deadline, not
/// when it stops sending.
#[test]
fn a_trickling_connection_is_dropped_at_the_deadline() {
    let limit = Duration::from_millis(600);
    let t0 = Instant::now();
    let (s, ()) = pair(
        move |a| accept(a, &creds(), Role::Secondary, Channel::Control, limit),
        |b| {
            for _ in 0..4 {
                if b.write_all(b"C").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(300));
            }
        },
    );
    assert!(matches!(s, Err(AuthError::Timeout { .. })), "{s:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// A listener with a stalled connection ahead of the real peer accepts the real peer once
/// the stalled one's handshake time is up, and logs the stranger.
#[test]
fn a_stalled_stranger_holds_up_the_real_peer_only_for_its_handshake_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stall = TcpStream::connect(addr).unwrap();
    let garbage = {
        let mut g = TcpStream::connect(addr).unwrap();
        g.write_all(&[0xff; HELLO_LEN]).unwrap();
        g
    };
    let real = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        let mut s = TcpStream::connect(addr).unwrap();
        connect(
            &mut s,
            &creds(),
            Role::Primary,
            Channel::Control,
            Duration::from_secs(10),
        )
    });
    let handshake = Duration::from_millis(500);
    let t0 = Instant::now();
    let (_, _, peer) = accept_peer(
        &l,
        &creds(),
        Role::Secondary,
        Channel::Control,
        Some(Duration::from_secs(20)),
        handshake,
        &|| false,
    )
    .unwrap();
    assert_eq!(peer.role, Role::Primary);
    assert!(real.join().unwrap().is_ok());
    // The stall costs at most its handshake time, the garbage nothing.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop((stall, garbage));
}

#[test]
fn accept_peer_gives_up_at_its_wait_or_when_told_to_stop() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = accept_peer(
        &l,
        &creds(),
        Role::Secondary,
        Channel::Disk,
        Some(Duration::from_millis(100)),
        T,
        &|| false,
    );
    assert!(
        matches!(r, Err(AcceptError::Timeout { refused: 0, .. })),
        "{r:?}"
    );
    let r = accept_peer(
        &l,
        &creds(),
        Role::Secondary,
        Channel::Disk,
        None,
        T,
        &|| true,
    );
    assert!(matches!(r, Err(AcceptError::Stopped { .. })));
}

#[test]
fn a_key_file_is_written_private_read_back_and_refused_when_others_can_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pair.key");
    let k = PairKey::generate().unwrap();
    k.write_new(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(PairKey::load(&path).unwrap(), k);
    assert!(
        k.write_new(&path).is_err(),
        "an existing key is never replaced"
    );
    assert_ne!(PairKey::generate().unwrap(), k);

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = PairKey::load(&path).unwrap_err();
    assert!(matches!(e, KeyError::Exposed { mode: 0o640, .. }), "{e}");
    assert!(
        e.to_string().contains("pair.key") && e.to_string().contains("0640"),
        "{e}"
    );

    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        PairKey::load(&bad),
        Err(KeyError::Malformed { .. })
    ));
    assert!(
        format!("{k:?}").starts_with("PairKey(id "),
        "no key bytes in Debug"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn a_valid_hello_round_trips(role in 1u8..3, kind in 1u8..4, index in any::<u32>(),
                                 insecure in any::<bool>(), pair_id in any::<u64>(),
                                 nonce in any::<[u8; 32]>()) {
        let channel = match kind { 1 => Channel::Control, 2 => Channel::Push(index), _ => Channel::Disk };
        let h = Hello {
            role: if role == 1 { Role::Primary } else { Role::Secondary },
            channel,
            insecure,
            encrypt: false,
            pair_id,
            nonce,
        };
        prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }
}

#[test]
fn a_side_that_encrypts_and_one_that_does_not_refuse_each_other_saying_which() {
    let (s, c) = pair(
        |a| {
            accept(
                a,
                &creds().encrypted(true),
                Role::Secondary,
                Channel::Control,
                T,
            )
        },
        |b| connect(b, &creds(), Role::Primary, Channel::Control, T),
    );
    assert!(
        matches!(
            s,
            Err(AuthError::EncryptMismatch {
                peer_encrypts: false
            })
        ),
        "{s:?}"
    );
    assert!(
        matches!(
            c,
            Err(AuthError::EncryptMismatch {
                peer_encrypts: true
            })
        ),
        "{c:?}"
    );
}

/// The disk link's bridge: two authenticated ends, each presented as a plain loopback
/// socket; bytes cross both ways, and closing one plain end ends the other.
#[test]
fn a_bridged_sealed_connection_carries_bytes_both_ways_and_ends_together() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let c = creds().encrypted(true);
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let peer = accept(
            &mut s,
            &creds().encrypted(true),
            Role::Secondary,
            Channel::Disk,
            T,
        )
        .unwrap();
        seal::bridge(s, &peer).unwrap()
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let peer = connect(&mut s, &c, Role::Primary, Channel::Disk, T).unwrap();
    let mut primary = seal::bridge(s, &peer).unwrap();
    let mut secondary = server.join().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let send = data.clone();
    let mut p2 = primary.try_clone().unwrap();
    let writer = thread::spawn(move || p2.write_all(&send).unwrap());
    let mut got = vec![0u8; data.len()];
    secondary.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data);
    secondary.write_all(b"ack").unwrap();
    let mut ack = [0u8; 3];
    primary.read_exact(&mut ack).unwrap();
    assert_eq!(&ack, b"ack");
    drop(secondary);
    primary.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        primary.read(&mut b).unwrap_or(0),
        0,
        "the other end closed too"
    );
}

/// `write_filled` with chunks that cross record boundaries delivers exactly the bytes the
/// filler put in, in order.
#[test]
fn write_filled_crosses_records_in_order() {
    use seal::{Sealed, SessionKeys};
    let (a, b) = UnixStream::pair().unwrap();
    let session = [5u8; 32];
    let mut tx = Sealed::new(
        a,
        SessionKeys::new(&session, Role::Primary, Channel::Push(1)),
    );
    let mut rx = Sealed::new(
        b,
        SessionKeys::new(&session, Role::Secondary, Channel::Push(1)),
    );
    let want: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let src = want.clone();
    let writer = thread::spawn(move || {
        let mut at = 0;
        tx.write_filled(src.len(), |dst| {
            dst.copy_from_slice(&src[at..at + dst.len()]);
            at += dst.len();
        })
        .unwrap();
        at
    });
    let mut got = vec![0u8; want.len()];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(writer.join().unwrap(), want.len());
    assert!(got == want);
}
