//! Statistics: cheap counters kept on every operation, and the names PyTorch users know.
//!
//! Invariants: every counter is updated in the same critical section as the state it
//! describes, so a snapshot taken under the lock is consistent (the property tests compare
//! them with a shadow model after every step). `current` never underflows; `peak` is the
//! largest `current` since the last [`Stats::reset_peak`]; `allocated`/`freed` are cumulative.

use std::collections::BTreeMap;

/// One counter: current, peak, and cumulative increments and decrements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stat {
    pub current: u64,
    pub peak: u64,
    pub allocated: u64,
    pub freed: u64,
}

impl Stat {
    #[inline]
    pub fn add(&mut self, n: u64) {
        self.current += n;
        self.allocated += n;
        if self.current > self.peak {
            self.peak = self.current;
        }
    }

    #[inline]
    pub fn sub(&mut self, n: u64) {
        debug_assert!(self.current >= n, "stat underflow");
        self.current = self.current.saturating_sub(n);
        self.freed += n;
    }
}

/// Pool groups, as `torch.cuda.memory_stats()` names them (plus the scalar pool).
pub const GROUPS: [&str; 4] = ["all", "small_pool", "large_pool", "scalar_pool"];

/// A counter per pool group: index 0 is "all".
pub type GroupStat = [Stat; 4];

/// Every counter the allocator keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Rounded bytes of buffers in use.
    pub allocated_bytes: GroupStat,
    /// Bytes the backend holds for us (mapped bytes on page-mapped heaps).
    pub reserved_bytes: GroupStat,
    /// Rounded bytes of buffers in use or waiting on events before reuse.
    pub active_bytes: GroupStat,
    /// Bytes callers asked for, of buffers in use.
    pub requested_bytes: GroupStat,
    /// Bytes of cached buffers (freed, kept whole for reuse).
    pub cached_bytes: GroupStat,
    /// Buffers in use.
    pub allocation: GroupStat,
    /// Buffers in use or waiting on events.
    pub active: GroupStat,
    /// Heaps held.
    pub segment: GroupStat,
    /// Requests that needed the fallback chain.
    pub num_alloc_retries: u64,
    /// Requests that failed for lack of memory.
    pub num_ooms: u64,
    /// Backend calls that obtained memory (heap reservations that commit memory, page maps).
    pub num_device_alloc: u64,
    /// Backend calls that gave memory back (heap releases, page unmaps).
    pub num_device_free: u64,
    /// Page map calls.
    pub num_map_calls: u64,
    /// Page unmap calls.
    pub num_unmap_calls: u64,
    /// Physical allocations behind the page maps: a map call counts one per piece of
    /// `BackendCaps::physical_block` it spans (what the driver is charged for on CUDA).
    pub num_physical_allocs: u64,
    /// Times the engine waited on every pending event (a full synchronisation).
    pub num_sync_all_streams: u64,
    /// Times the engine blocked the calling thread until the device caught up (any wait on
    /// an event that had not completed yet, full synchronisations included).
    pub num_device_waits: u64,
    /// Microseconds the calling threads spent blocked in those waits.
    pub device_wait_us: u64,
    /// Microseconds spent in the backend's page map and unmap calls.
    pub page_call_us: u64,
    /// Garbage collection passes that released something.
    pub num_gc_passes: u64,
}

impl Stats {
    /// Counts one blocking wait for the device that began at `start`.
    pub(crate) fn note_device_wait(&mut self, start: std::time::Instant) {
        self.num_device_waits += 1;
        self.device_wait_us += start.elapsed().as_micros() as u64;
    }

    /// A buffer of `size` rounded bytes (`requested` asked for) in pool group `g` leaves use.
    #[inline]
    pub(crate) fn buffer_out_of_use(&mut self, g: usize, size: u64, requested: u64) {
        for i in [0, g] {
            self.allocated_bytes[i].sub(size);
            self.requested_bytes[i].sub(requested);
            self.allocation[i].sub(1);
        }
    }

    /// Every per-group counter.
    fn groups_mut(&mut self) -> [&mut GroupStat; 8] {
        [
            &mut self.allocated_bytes,
            &mut self.reserved_bytes,
            &mut self.active_bytes,
            &mut self.requested_bytes,
            &mut self.cached_bytes,
            &mut self.allocation,
            &mut self.active,
            &mut self.segment,
        ]
    }

    /// Resets every peak to its current value.
    pub fn reset_peak(&mut self) {
        for group in self.groups_mut() {
            for s in group.iter_mut() {
                s.peak = s.current;
            }
        }
    }

    /// Zeroes the cumulative counters (every `allocated` and `freed`, and the event counts
    /// such as `num_ooms` and `num_map_calls`), as `torch.cuda.reset_accumulated_memory_stats()`
    /// does; current values and peaks stay.
    pub fn reset_accumulated(&mut self) {
        // Only the gauges survive: every field that is not a current or a peak is a count.
        let mut fresh = Stats::default();
        for (kept, old) in fresh.groups_mut().into_iter().zip(self.groups_mut()) {
            for (k, o) in kept.iter_mut().zip(old.iter()) {
                k.current = o.current;
                k.peak = o.peak;
            }
        }
        *self = fresh;
    }

    /// Flat map with `torch.cuda.memory_stats()` key names, e.g.
    /// `"allocated_bytes.all.current"`, `"reserved_bytes.large_pool.peak"`, `"num_ooms"`.
    pub fn to_map(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let groups: [(&str, &GroupStat); 8] = [
            ("allocated_bytes", &self.allocated_bytes),
            ("reserved_bytes", &self.reserved_bytes),
            ("active_bytes", &self.active_bytes),
            ("requested_bytes", &self.requested_bytes),
            ("inactive_split_bytes", &self.cached_bytes),
            ("allocation", &self.allocation),
            ("active", &self.active),
            ("segment", &self.segment),
        ];
        for (name, stat) in groups {
            for (g, group) in GROUPS.iter().enumerate() {
                let s = &stat[g];
                out.insert(format!("{name}.{group}.current"), s.current);
                out.insert(format!("{name}.{group}.peak"), s.peak);
                out.insert(format!("{name}.{group}.allocated"), s.allocated);
                out.insert(format!("{name}.{group}.freed"), s.freed);
            }
        }
        for (name, v) in [
            ("num_alloc_retries", self.num_alloc_retries),
            ("num_ooms", self.num_ooms),
            ("num_device_alloc", self.num_device_alloc),
            ("num_device_free", self.num_device_free),
            ("num_map_calls", self.num_map_calls),
            ("num_unmap_calls", self.num_unmap_calls),
            ("num_physical_allocs", self.num_physical_allocs),
            ("num_sync_all_streams", self.num_sync_all_streams),
            ("num_device_waits", self.num_device_waits),
            ("device_wait_us", self.device_wait_us),
            ("page_call_us", self.page_call_us),
            ("num_gc_passes", self.num_gc_passes),
        ] {
            out.insert(name.to_string(), v);
        }
        out
    }
}

/// The cheap figures: a handful of integers, no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Rounded bytes of buffers in use.
    pub allocated: usize,
    /// Bytes caller asked for, of buffers in use.
    pub requested: usize,
    /// Bytes held from the backend.
    pub reserved: usize,
    /// Bytes of buffers in use or waiting on events.
    pub active: usize,
    /// Bytes of cached buffers.
    pub cached: usize,
    /// Buffers in use.
    pub buffers: usize,
    /// Heaps held.
    pub heaps: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_accumulated_keeps_gauges_and_zeroes_counts() {
        let mut st = Stats::default();
        st.allocated_bytes[0].add(300);
        st.allocated_bytes[0].sub(100);
        st.segment[2].add(1);
        st.num_ooms = 2;
        st.num_map_calls = 7;
        st.reset_accumulated();
        let a = st.allocated_bytes[0];
        assert_eq!((a.current, a.peak, a.allocated, a.freed), (200, 300, 0, 0));
        assert_eq!((st.segment[2].current, st.segment[2].allocated), (1, 0));
        assert_eq!((st.num_ooms, st.num_map_calls), (0, 0));
        // counting goes on from zero
        st.allocated_bytes[0].sub(50);
        assert_eq!(st.allocated_bytes[0].freed, 50);
    }
}
