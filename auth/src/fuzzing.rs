//! Entry points for the `cargo fuzz` targets in `auth/fuzz/`. They are ordinary functions
//! so that the unit tests run them too (as a 10,000-case proptest) and they cannot rot.

use crate::handshake::Hello;

/// Decodes `data` as a peer's Hello, the first bytes a stranger can send a colo side: any
/// bytes decode or fail with a typed error, never a panic, and a decoded Hello encodes
/// back to the same bytes.
pub fn hello(data: &[u8]) {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(
            &h.encode()[..],
            data,
            "a decoded Hello re-encodes to its bytes"
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{Channel, Role};

    /// The seed corpus of `auth/fuzz` (`seeds/handshake_hello`): the valid ones decode to
    /// what they say, the near misses are refused, and all go through the target's body.
    #[test]
    fn the_fuzz_seeds_decode_as_named() {
        let seeds: [(&str, &[u8]); 6] = [
            (
                "primary-control",
                include_bytes!("../fuzz/seeds/handshake_hello/primary-control"),
            ),
            (
                "secondary-push3",
                include_bytes!("../fuzz/seeds/handshake_hello/secondary-push3"),
            ),
            (
                "primary-disk-insecure",
                include_bytes!("../fuzz/seeds/handshake_hello/primary-disk-insecure"),
            ),
            (
                "bad-version",
                include_bytes!("../fuzz/seeds/handshake_hello/bad-version"),
            ),
            (
                "bad-channel-index",
                include_bytes!("../fuzz/seeds/handshake_hello/bad-channel-index"),
            ),
            (
                "short",
                include_bytes!("../fuzz/seeds/handshake_hello/short"),
            ),
        ];
        for (name, bytes) in seeds {
            hello(bytes);
            let decoded = Hello::decode(bytes).map(|h| (h.role, h.channel, h.insecure, h.pair_id));
            let expected = match name {
                "primary-control" => Some((Role::Primary, Channel::Control, false, 1)),
                "secondary-push3" => Some((
                    Role::Secondary,
                    Channel::Push(3),
                    false,
                    0x0123_4567_89ab_cdef,
                )),
                "primary-disk-insecure" => Some((Role::Primary, Channel::Disk, true, 7)),
                _ => None,
            };
            assert_eq!(decoded.ok(), expected, "seed {name}");
        }
    }

    /// 10,000 cases unless `PROPTEST_CASES` says otherwise (the test command's fallback
    /// for machines without cargo-fuzz sets it).
    fn config() -> ProptestConfig {
        if std::env::var_os("PROPTEST_CASES").is_some() {
            ProptestConfig::default()
        } else {
            ProptestConfig::with_cases(10_000)
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// Any bytes decode to a Hello or a typed error, never a panic; a decoded Hello
        /// encodes back to the same bytes.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            hello(&bytes);
        }

        /// A valid Hello with one byte changed: near misses reach every check.
        #[test]
        fn a_hello_with_one_byte_changed_decodes_or_fails_cleanly(at in 0usize..56, x in 1u8..=255) {
            let mut b = *include_bytes!("../fuzz/seeds/handshake_hello/secondary-push3");
            b[at] ^= x;
            hello(&b);
        }
    }
}
