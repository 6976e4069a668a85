//! Low and high watermarks, as the seed defines them.
//!
//! Invariants: `high_limit = floor(high_ratio * recommended)` or `usize::MAX` when the ratio
//! is 0; the same for low; ratios lie in `[0, 2]`; when both are enabled, `low <= high`.

use crate::error::{Error, Result, Watermark};

/// Upper bound of a watermark ratio.
pub const MAX_RATIO: f64 = 2.0;
/// Default high watermark ratio.
pub const DEFAULT_HIGH: f64 = 1.7;
/// Default low watermark ratio on unified memory.
pub const DEFAULT_LOW_UNIFIED: f64 = 1.4;
/// Default low watermark ratio on discrete memory.
pub const DEFAULT_LOW_DISCRETE: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    pub recommended: usize,
    pub low_ratio: f64,
    pub high_ratio: f64,
    pub low_limit: usize,
    pub high_limit: usize,
}

fn limit(ratio: f64, recommended: usize) -> usize {
    if ratio == 0.0 {
        usize::MAX
    } else {
        (ratio * recommended as f64).floor() as usize
    }
}

fn check_range(which: Watermark, ratio: f64) -> Result<()> {
    if !ratio.is_finite() || !(0.0..=MAX_RATIO).contains(&ratio) {
        return Err(Error::InvalidWatermark {
            which,
            ratio,
            reason: format!("must be between 0.0 (disabled) and {MAX_RATIO}"),
        });
    }
    Ok(())
}

impl Limits {
    /// Limits from optional ratios; a missing low ratio defaults to the seed's value, capped
    /// at the high ratio (the seed instead fails with "invalid low watermark ratio 1.4" when
    /// only a low HIGH is set, a known trap for its users).
    pub fn new(
        recommended: usize,
        unified: bool,
        low: Option<f64>,
        high: Option<f64>,
    ) -> Result<Limits> {
        let high_ratio = high.unwrap_or(DEFAULT_HIGH);
        check_range(Watermark::High, high_ratio)?;
        let default_low = if unified {
            DEFAULT_LOW_UNIFIED
        } else {
            DEFAULT_LOW_DISCRETE
        };
        let low_ratio = match low {
            Some(l) => l,
            None if high_ratio > 0.0 => default_low.min(high_ratio),
            None => default_low,
        };
        let mut limits = Limits {
            recommended,
            low_ratio: 0.0,
            high_ratio: 0.0,
            low_limit: usize::MAX,
            high_limit: usize::MAX,
        };
        limits.set_both(low_ratio, high_ratio)?;
        Ok(limits)
    }

    /// Sets both ratios at once, validating them together.
    pub fn set_both(&mut self, low: f64, high: f64) -> Result<()> {
        check_range(Watermark::High, high)?;
        check_range(Watermark::Low, low)?;
        if high > 0.0 && low > high {
            return Err(Error::InvalidWatermark {
                which: Watermark::Low,
                ratio: low,
                reason: format!("must not exceed the high watermark ratio {high}"),
            });
        }
        if high > 0.0 && low == 0.0 {
            // Allowed: GC disabled, hard limit kept.
        }
        self.low_ratio = low;
        self.high_ratio = high;
        self.low_limit = limit(low, self.recommended);
        self.high_limit = limit(high, self.recommended);
        Ok(())
    }

    pub fn set_high(&mut self, high: f64) -> Result<()> {
        check_range(Watermark::High, high)?;
        if high > 0.0 && self.low_ratio > high {
            return Err(Error::InvalidWatermark {
                which: Watermark::High,
                ratio: high,
                reason: format!(
                    "is below the low watermark ratio {}; lower the low ratio first",
                    self.low_ratio
                ),
            });
        }
        self.set_both(self.low_ratio, high)
    }

    pub fn set_low(&mut self, low: f64) -> Result<()> {
        self.set_both(low, self.high_ratio)
    }
}
