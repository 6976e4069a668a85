//! Replays PyTorch memory snapshots through the bufferheap engine
