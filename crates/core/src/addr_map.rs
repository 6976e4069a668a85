//! A hash map keyed by addresses and offsets, with a hasher made for them.
//!
//! Keys are byte addresses or offsets, multiples of [`crate::pool::ALIGN`]: one multiply-shift
//! spreads them, where the standard hasher's SipHash would cost more than the lookup it serves.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// A fast hasher for addresses: one multiply, then the product's high half folded onto its
/// low half. The fold matters: the table picks buckets by the hash's low bits, and the low
/// bits of a product depend only on the low bits of the key, which are zero for aligned
/// addresses.
#[derive(Default, Clone, Copy)]
pub(crate) struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type AddrMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, BuildHasherDefault};

    use super::AddrHasher;

    /// Aligned keys must reach every bucket of a small table: the table indexes buckets by
    /// the low bits of the hash, which a plain multiply leaves zero for aligned keys.
    #[test]
    fn aligned_keys_spread_over_the_low_bits() {
        let build = BuildHasherDefault::<AddrHasher>::default();
        for (base, step) in [(0u64, 512u64), (0x7f00_0000_0000, 512), (0, 2 << 20)] {
            let mut buckets = std::collections::HashSet::new();
            for i in 0..256 {
                buckets.insert(build.hash_one(base + i * step) & 255);
            }
            assert!(buckets.len() > 128, "{} of 256 buckets hit", buckets.len());
        }
    }
}
