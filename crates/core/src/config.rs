//! Configuration: the policy, the watermark ratios and the debug mask, from code or from the
//! environment.
//!
//! Invariants: a `Config` that [`Config::from_env`] returns holds only values that parsed;
//! a variable that is set but unparsable is an error naming the variable and the value (the
//! seed silently reads it as 0, which disables the limit; we do not copy that). Ratios are
//! validated again when the allocator applies them, against the backend's figures.

use crate::error::{Error, Result};

/// How heaps are sized and how cached memory is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Ours: page-mapped heaps where the backend can map pages, best-fit placement with
    /// coalescing, exact-size reuse of cached buffers (up to 1 MiB on page-mapped heaps),
    /// free pages returned under pressure.
    #[default]
    Default,
    /// The seed's system as PyTorch ships it: 8 MiB / 32 MiB / XLarge / dedicated heaps and
    /// whole-buffer reuse with up to 32 MiB of slack.
    Mps,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "default" => Ok(Policy::Default),
            "mps" => Ok(Policy::Mps),
            other => Err(format!(
                "unknown policy {other:?} (expected \"default\" or \"mps\")"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Default => "default",
            Policy::Mps => "mps",
        })
    }
}

/// Bits of the debug mask (`BUFFERHEAP_DEBUG`), the seed's verbosity levels.
pub mod debug {
    /// Watermark limits at start and on change; heap and pool summaries.
    pub const PROFILING: u32 = 1;
    /// Every new heap and every new buffer.
    pub const ALLOCATIONS: u32 = 2;
    /// Every reuse of a cached buffer.
    pub const RECYCLES: u32 = 4;
    /// Every release of memory, pool trims and garbage collection.
    pub const RELEASES: u32 = 8;
    /// Skip the per-buffer lines of the small pools.
    pub const LARGE_ONLY: u32 = 16;
}

/// Allocator configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub policy: Policy,
    /// Low watermark ratio; `None` = the seed's default (1.4 unified, 1.0 discrete).
    pub low_watermark_ratio: Option<f64>,
    /// High watermark ratio; `None` = the seed's default (1.7).
    pub high_watermark_ratio: Option<f64>,
    /// Debug mask, see [`debug`].
    pub debug: u32,
    /// Allocation history kept for snapshots: the last this many events (0: none).
    pub history: usize,
    /// Default policy on page-mapped heaps: reserved bytes may exceed the most bytes ever
    /// placed in a pool by this fraction before idle pages are given back (the budget). Below
    /// the budget growth only maps; above it, the idle pages unused the longest are unmapped
    /// first, down to the middle of the band. Larger: fewer map/unmap calls, more reserved.
    pub idle_page_fraction: f64,
    /// Default policy on page-mapped heaps: the unmaps per 1000 allocations a pool's budget
    /// may cause before the budget doubles (up to 64 times `idle_page_fraction`; it halves
    /// again after a long quiet spell). 0: the budget stays as configured. The default, 2,
    /// leaves training loops alone (they unmap a few pieces per run) and stops the churn of
    /// workloads whose large sizes wander, where each unmap is soon followed by a map that
    /// costs the driver about 0.1 ms per physical allocation.
    pub unmap_rate_limit: f64,
    /// Default policy on page-mapped heaps: the most a burst of growth (consecutive growing
    /// allocations) maps ahead in one call, within the budget's headroom.
    pub map_chunk: usize,
    /// Default policy on page-mapped heaps: an idle page is given back only after this many
    /// allocations without a buffer on it, unless the pool holds more than three times the
    /// budget's fraction over its peak. The default, 24, keeps the budget off the holes that
    /// temporaries freed a moment ago, nearly always filled again within the step: unmapping
    /// them only to map them again cost ViT-B/16's replay a third of its map and unmap calls
    /// (BENCHMARKS.md).
    pub min_idle_age: u64,
    /// Default policy on page-mapped heaps: pages without a buffer for this many allocations
    /// are given back even when the pool is not growing (`u64::MAX`: never).
    pub stale_page_age: u64,
    /// Bytes of freed small buffers each thread may keep in its front cache, in front of the
    /// engine's lock (0: no front caches; every call takes the lock). See `allocator::front`.
    pub front_cache_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Default,
            low_watermark_ratio: None,
            high_watermark_ratio: None,
            debug: 0,
            history: 0,
            idle_page_fraction: 0.01,
            unmap_rate_limit: 2.0,
            map_chunk: 32 << 20,
            min_idle_age: 24,
            stale_page_age: u64::MAX,
            front_cache_bytes: 1 << 20,
        }
    }
}

/// The variables read by [`Config::from_env`], ours first, then the seed's spellings.
pub const ENV_HIGH: [&str; 2] = [
    "BUFFERHEAP_HIGH_WATERMARK_RATIO",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO",
];
pub const ENV_LOW: [&str; 2] = [
    "BUFFERHEAP_LOW_WATERMARK_RATIO",
    "PYTORCH_MPS_LOW_WATERMARK_RATIO",
];
pub const ENV_DEBUG: [&str; 2] = ["BUFFERHEAP_DEBUG", "PYTORCH_DEBUG_MPS_ALLOCATOR"];
pub const ENV_POLICY: &str = "BUFFERHEAP_POLICY";
pub const ENV_HISTORY: &str = "BUFFERHEAP_HISTORY";
pub const ENV_FRONT_CACHE: &str = "BUFFERHEAP_FRONT_CACHE_BYTES";
pub const ENV_IDLE_PAGE_FRACTION: &str = "BUFFERHEAP_IDLE_PAGE_FRACTION";
pub const ENV_UNMAP_RATE_LIMIT: &str = "BUFFERHEAP_UNMAP_RATE_LIMIT";

impl Config {
    /// The default configuration overridden by the environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`], reading variables through `lookup` (for tests and for
    /// embedders that keep their own settings).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut config = Config::default();
        let first = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| lookup(n).map(|v| (n.to_string(), v)))
        };
        if let Some(value) = lookup(ENV_POLICY) {
            config.policy = value.parse().map_err(|reason| Error::InvalidConfig {
                variable: ENV_POLICY.into(),
                value: value.clone(),
                reason,
            })?;
        }
        let high = first(&ENV_HIGH);
        if let Some((var, value)) = &high {
            config.high_watermark_ratio = Some(parse_watermark(var, value)?);
        }
        if let Some((var, value)) = first(&ENV_LOW) {
            let low = parse_watermark(&var, &value)?;
            // Checked here, where the variable can be named (the allocator would refuse the
            // pair at its start, on every allocation).
            let high_ratio = config
                .high_watermark_ratio
                .unwrap_or(crate::allocator::DEFAULT_HIGH);
            if high_ratio > 0.0 && low > high_ratio {
                let high_from = high.map_or("the default".to_owned(), |(v, _)| v);
                return Err(Error::InvalidConfig {
                    variable: var,
                    value,
                    reason: format!(
                        "the low watermark ratio must not exceed the high one ({high_ratio}, \
                         from {high_from})"
                    ),
                });
            }
            config.low_watermark_ratio = Some(low);
        }
        if let Some((var, value)) = first(&ENV_DEBUG) {
            config.debug = parse_mask(&var, &value)?;
        }
        if let Some(value) = lookup(ENV_HISTORY) {
            config.history = parse_count(ENV_HISTORY, &value)?;
        }
        if let Some(value) = lookup(ENV_FRONT_CACHE) {
            config.front_cache_bytes = parse_bytes(ENV_FRONT_CACHE, &value)?;
        }
        if let Some(value) = lookup(ENV_IDLE_PAGE_FRACTION) {
            config.idle_page_fraction = parse_ratio(ENV_IDLE_PAGE_FRACTION, &value)?;
        }
        if let Some(value) = lookup(ENV_UNMAP_RATE_LIMIT) {
            config.unmap_rate_limit = parse_ratio(ENV_UNMAP_RATE_LIMIT, &value)?;
        }
        Ok(config)
    }

    /// Sets one setting by name (the keys of the C ABI's `configure`): `policy`,
    /// `low_watermark_ratio`, `high_watermark_ratio`, `debug`, `history`,
    /// `front_cache_bytes`, `idle_page_fraction`, `unmap_rate_limit`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "policy" => {
                self.policy = value.parse().map_err(|reason| Error::InvalidConfig {
                    variable: key.into(),
                    value: value.into(),
                    reason,
                })?
            }
            "low_watermark_ratio" => self.low_watermark_ratio = Some(parse_watermark(key, value)?),
            "high_watermark_ratio" => {
                self.high_watermark_ratio = Some(parse_watermark(key, value)?)
            }
            "debug" => self.debug = parse_mask(key, value)?,
            "history" => self.history = parse_count(key, value)?,
            "front_cache_bytes" => self.front_cache_bytes = parse_bytes(key, value)?,
            "idle_page_fraction" => self.idle_page_fraction = parse_ratio(key, value)?,
            "unmap_rate_limit" => self.unmap_rate_limit = parse_ratio(key, value)?,
            other => {
                return Err(Error::InvalidConfig {
                    variable: other.into(),
                    value: value.into(),
                    reason: "unknown setting (expected policy, low_watermark_ratio, \
                             high_watermark_ratio, debug, history, front_cache_bytes, \
                             idle_page_fraction or unmap_rate_limit)"
                        .into(),
                });
            }
        }
        Ok(())
    }
}

/// A watermark ratio: a ratio of at most [`crate::MAX_RATIO`] (0 disables the limit).
fn parse_watermark(variable: &str, value: &str) -> Result<f64> {
    let ratio = parse_ratio(variable, value)?;
    if ratio > crate::allocator::MAX_RATIO {
        return Err(Error::InvalidConfig {
            variable: variable.into(),
            value: value.into(),
            reason: format!(
                "must be between 0.0 (disabled) and {}",
                crate::allocator::MAX_RATIO
            ),
        });
    }
    Ok(ratio)
}

fn parse_ratio(variable: &str, value: &str) -> Result<f64> {
    let invalid = |reason: &str| Error::InvalidConfig {
        variable: variable.into(),
        value: value.into(),
        reason: reason.into(),
    };
    let ratio: f64 = value.trim().parse().map_err(|_| invalid("not a number"))?;
    if !ratio.is_finite() || ratio < 0.0 {
        return Err(invalid("must be a finite number >= 0"));
    }
    Ok(ratio)
}

fn parse_count(variable: &str, value: &str) -> Result<usize> {
    value.trim().parse().map_err(|_| Error::InvalidConfig {
        variable: variable.into(),
        value: value.into(),
        reason: "expected a number of entries such as 100000 (0: none)".into(),
    })
}

fn parse_bytes(variable: &str, value: &str) -> Result<usize> {
    value.trim().parse().map_err(|_| Error::InvalidConfig {
        variable: variable.into(),
        value: value.into(),
        reason: "expected a number of bytes such as 1048576 (0: none)".into(),
    })
}

fn parse_mask(variable: &str, value: &str) -> Result<u32> {
    let v = value.trim();
    let parsed = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16)
    } else {
        v.parse::<u32>()
    };
    parsed.map_err(|_| Error::InvalidConfig {
        variable: variable.into(),
        value: value.into(),
        reason: "expected a bit mask such as 15 or 0x1f".into(),
    })
}
