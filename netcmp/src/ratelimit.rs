//! Rate limiting for logs that can fire once per packet.

use std::time::{Duration, Instant};

/// Lets through at most `burst` events per second and counts the rest, so that a flood of
/// bad packets cannot flood the log.
#[derive(Debug)]
pub(crate) struct LogLimit {
    burst: u32,
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogLimit {
    /// A limiter of `burst` events per second.
    pub(crate) const fn new(burst: u32) -> Self {
        Self {
            burst,
            window: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Whether to log now. `Some(n)` means yes, after `n` suppressed events.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1));
        if fresh {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_second() {
        let t = Instant::now();
        let mut l = LogLimit::new(2);
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), Some(0));
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t), None);
        assert_eq!(l.allow(t + Duration::from_secs(1)), Some(2));
    }
}
