//! TCP sequence number arithmetic (modulo 2^32, RFC 793 comparisons).

/// `a` comes before `b` in sequence space.
pub(crate) fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` comes before or is `b` in sequence space.
pub(crate) fn le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

/// The later of `a` and `b` (`b` when `a` is unknown).
pub(crate) fn max(a: Option<u32>, b: u32) -> u32 {
    match a {
        Some(a) if lt(b, a) => a,
        _ => b,
    }
}

/// How far `seq` lies after `base`, negative when before.
pub(crate) fn dist(base: u32, seq: u32) -> i64 {
    i64::from(seq.wrapping_sub(base) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps() {
        assert!(lt(u32::MAX, 0));
        assert!(le(5, 5));
        assert!(!lt(5, 5));
        assert!(lt(0xFFFF_FFF0, 0x10));
        assert_eq!(max(Some(0xFFFF_FFF0), 0x10), 0x10);
        assert_eq!(max(Some(0x10), 0xFFFF_FFF0), 0x10);
        assert_eq!(max(None, 7), 7);
        assert_eq!(dist(0xFFFF_FFFF, 1), 2);
        assert_eq!(dist(1, 0xFFFF_FFFF), -2);
    }
}
