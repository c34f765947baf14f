//! The header prefix every frame starts with, generic over its protocol.

use std::fmt::Debug;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, TryFromBytes, Unaligned};

use super::error::{Error, Result};

/// A wire protocol built on [`Header`], implemented by the enum of its frame types: a
/// fieldless `#[repr(u16)]` enum, so that a code that is none of its variants is refused
/// at parse time ([`Error::UnknownKind`]). It names what its frames start with and the
/// fields that follow.
pub trait Protocol: TryFromBytes + IntoBytes + Immutable + Copy + Debug + Eq {
    /// The protocol's name in error messages ("not a {NAME} peer").
    const NAME: &'static str;
    /// The first four bytes of every frame, as a little-endian `u32`.
    const MAGIC: u32;
    /// The version this build speaks. A frame of another version is refused.
    const VERSION: u16;
    /// The fixed fields after the kind. Their layout is the protocol's; a protocol checks
    /// them itself after [`Header::parse`].
    type Fields: FromBytes + IntoBytes + KnownLayout + Immutable + Unaligned + Copy + Debug + Eq;
}

/// A frame header of the protocol whose frame types are `P`: magic, version, kind, then
/// `P`'s fields, little-endian and without padding. Its fields are private: build it with
/// [`new`](Self::new), check and read it with [`parse`](Self::parse), send its
/// [`as_bytes`](IntoBytes::as_bytes).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct Header<P: Protocol> {
    magic: U32,
    version: U16,
    kind: U16,
    fields: P::Fields,
}

impl<P: Protocol> Header<P> {
    /// Size on the wire.
    pub const LEN: usize = size_of::<Self>();

    /// A header of this build's version.
    pub fn new(kind: P, fields: P::Fields) -> Self {
        Self {
            magic: P::MAGIC.into(),
            version: P::VERSION.into(),
            kind: kind_code::<P>(kind).into(),
            fields,
        }
    }

    /// Checks the header at the start of `bytes`: its magic, its version and its kind,
    /// in that order. The fields are the protocol's to check.
    ///
    /// # Errors
    /// [`Error::Truncated`] if `bytes` is shorter than a header, [`Error::BadMagic`],
    /// [`Error::VersionMismatch`] or [`Error::UnknownKind`].
    pub fn parse(bytes: &[u8]) -> Result<(P, P::Fields)> {
        let (h, _) = Self::read_from_prefix(bytes).map_err(|_| Error::Truncated {
            got: bytes.len(),
            want: Self::LEN,
        })?;
        if h.magic.get() != P::MAGIC {
            return Err(Error::BadMagic {
                protocol: P::NAME,
                found: h.magic.get(),
                expected: P::MAGIC,
            });
        }
        if h.version.get() != P::VERSION {
            return Err(Error::VersionMismatch {
                protocol: P::NAME,
                ours: P::VERSION,
                theirs: h.version.get(),
            });
        }
        // The code is read little-endian above; the enum is checked in native order.
        let code = h.kind.get();
        let kind = P::try_read_from_bytes(&code.to_ne_bytes()).map_err(|_| Error::UnknownKind {
            protocol: P::NAME,
            kind: code,
        })?;
        Ok((kind, h.fields))
    }
}

/// The numeric code of a kind (its `#[repr(u16)]` discriminant).
fn kind_code<P: Protocol>(kind: P) -> u16 {
    const { assert!(size_of::<P>() == 2, "a frame kind is a #[repr(u16)] enum") };
    let mut code = [0u8; 2];
    code.copy_from_slice(kind.as_bytes());
    u16::from_ne_bytes(code)
}

#[cfg(test)]
mod tests {
    use zerocopy::little_endian::U64;

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromBytes, IntoBytes, Immutable)]
    #[repr(u16)]
    enum Kind {
        A = 1,
        B = 0x0102,
    }

    #[derive(
        Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
    )]
    #[repr(C)]
    struct Fields {
        x: U64,
    }

    impl Protocol for Kind {
        const NAME: &'static str = "test";
        const MAGIC: u32 = u32::from_le_bytes(*b"TEST");
        const VERSION: u16 = 3;
        type Fields = Fields;
    }

    const GOLDEN: [u8; 16] = [
        b'T', b'E', b'S', b'T', // magic
        3, 0, // version
        2, 1, // kind B, little-endian
        9, 0, 0, 0, 0, 0, 0, 0, // x
    ];

    #[test]
    fn golden_construct_and_deconstruct() {
        assert_eq!(Header::<Kind>::LEN, 16);
        let h = Header::<Kind>::new(Kind::B, Fields { x: 9.into() });
        assert_eq!(h.as_bytes(), GOLDEN);
        let (kind, fields) = Header::<Kind>::parse(&GOLDEN).unwrap();
        assert_eq!((kind, fields.x.get()), (Kind::B, 9));
        // Bytes after the header (a payload) are left alone.
        let mut longer = GOLDEN.to_vec();
        longer.push(0xFF);
        assert_eq!(Header::<Kind>::parse(&longer).unwrap().0, Kind::B);
        let a = Header::<Kind>::new(Kind::A, Fields { x: 0.into() });
        assert_eq!(&a.as_bytes()[6..8], &[1, 0]);
    }

    #[test]
    fn each_check_refuses_with_its_error() {
        let mut b = GOLDEN;
        b[3] = b'X';
        assert!(matches!(
            Header::<Kind>::parse(&b),
            Err(Error::BadMagic {
                protocol: "test",
                expected: 0x5453_4554,
                ..
            })
        ));
        let mut b = GOLDEN;
        b[4] = 4;
        assert!(matches!(
            Header::<Kind>::parse(&b),
            Err(Error::VersionMismatch {
                ours: 3,
                theirs: 4,
                ..
            })
        ));
        for code in [0u16, 2, 0x0201, u16::MAX] {
            let mut b = GOLDEN;
            b[6..8].copy_from_slice(&code.to_le_bytes());
            assert!(
                matches!(
                    Header::<Kind>::parse(&b),
                    Err(Error::UnknownKind { kind, .. }) if kind == code
                ),
                "{code}"
            );
        }
        assert!(matches!(
            Header::<Kind>::parse(&GOLDEN[..15]),
            Err(Error::Truncated { got: 15, want: 16 })
        ));
    }
}
