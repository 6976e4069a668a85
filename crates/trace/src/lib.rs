//! Reads PyTorch memory snapshots.
