//! Log-spaced histogram bins for checkpoint pauses.

/// Log-spaced histogram bins in milliseconds: `per_decade` bins per power of ten, from
/// `10^lo_exp` over `decades` decades.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogBins {
    /// Lowest edge, a power of ten (as an exponent).
    pub lo_exp: i32,
    /// Powers of ten the bins span.
    pub decades: u32,
    /// Bins per power of ten.
    pub per_decade: u32,
}

impl LogBins {
    /// Bins that cover every value of `values_ms` and `also_ms`, from 10 us up.
    pub fn covering(
        values_ms: impl IntoIterator<Item = f64>,
        also_ms: f64,
        per_decade: u32,
    ) -> Self {
        let (mut lo, mut hi) = (also_ms, also_ms);
        for v in values_ms.into_iter().filter(|v| *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let lo_exp = (lo.max(0.01).log10().floor() as i32).min(2);
        let hi_exp = (hi.log10().ceil() as i32).max(lo_exp + 1);
        Self {
            lo_exp,
            decades: (hi_exp - lo_exp) as u32,
            per_decade: per_decade.max(1),
        }
    }

    /// The number of bins.
    pub fn len(&self) -> usize {
        (self.decades * self.per_decade) as usize
    }

    /// The lower edge of bin `i` (`i == len()` gives the top edge).
    pub fn edge(&self, i: usize) -> f64 {
        10f64.powf(f64::from(self.lo_exp) + i as f64 / f64::from(self.per_decade))
    }

    /// Where `v` lies on the axis, 0 at the lowest edge and 1 at the top one (clamped).
    fn position(&self, v: f64) -> f64 {
        if v <= 0.0 {
            return 0.0;
        }
        ((v.log10() - f64::from(self.lo_exp)) / f64::from(self.decades)).clamp(0.0, 1.0)
    }

    /// The bin of `v`; values outside the range land in the first or the last bin.
    pub fn index(&self, v: f64) -> usize {
        let x = self.position(v) * self.len() as f64;
        // A value on an edge belongs to the bin above it, despite rounding in log10.
        ((x + 1e-9).floor() as usize).min(self.len() - 1)
    }

    /// How many of `values_ms` fall in each bin.
    pub fn counts(&self, values_ms: impl IntoIterator<Item = f64>) -> Vec<u64> {
        let mut c = vec![0; self.len()];
        for v in values_ms {
            c[self.index(v)] += 1;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_bins_cover_the_values_and_the_target() {
        let b = LogBins::covering([0.3, 42.0], 10.0, 10);
        assert_eq!((b.lo_exp, b.decades), (-1, 3));
        assert_eq!(b.len(), 30);
        assert!((b.edge(0) - 0.1).abs() < 1e-12);
        assert!((b.edge(30) - 100.0).abs() < 1e-9);
        // Values on a decade edge go to the bin that starts there.
        assert_eq!(b.index(1.0), 10);
        assert_eq!(b.index(10.0), 20);
        assert_eq!(b.index(0.1), 0);
        // Outside the range: clamped into the first and last bin.
        assert_eq!(b.index(0.0), 0);
        assert_eq!(b.index(1e6), 29);
        let c = b.counts([0.1, 0.5, 1.0, 1.0, 99.0, 500.0]);
        assert_eq!(c.iter().sum::<u64>(), 6);
        assert_eq!(c[10], 2);
        assert_eq!(c[29], 2);
    }

    #[test]
    fn log_bins_of_nothing_still_span_a_decade() {
        let b = LogBins::covering([], 10.0, 4);
        assert_eq!((b.lo_exp, b.decades, b.len()), (1, 1, 4));
    }
}
