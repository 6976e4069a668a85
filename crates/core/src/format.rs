//! Human-readable byte counts, as the seed's `formatSize` prints them.

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: usize = 1024 * MIB;

/// Formats a byte count: up to 1 KiB as "N bytes", then KiB, MiB and GiB with two decimals
/// (base 1024): "512 bytes", "1.50 KiB", "3.00 MiB", "2.00 GiB".
pub fn format_size(size: usize) -> String {
    if size <= KIB {
        format!("{size} bytes")
    } else if size <= MIB {
        format!("{:.2} KiB", size as f64 / KIB as f64)
    } else if size <= GIB {
        format!("{:.2} MiB", size as f64 / MIB as f64)
    } else {
        format!("{:.2} GiB", size as f64 / GIB as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::format_size;

    #[test]
    fn formats_like_the_seed() {
        assert_eq!(format_size(0), "0 bytes");
        assert_eq!(format_size(512), "512 bytes");
        assert_eq!(format_size(1024), "1024 bytes");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(1 << 20), "1024.00 KiB");
        assert_eq!(format_size(3 << 20), "3.00 MiB");
        assert_eq!(format_size(2 << 30), "2.00 GiB");
    }
}
