#![cfg(loom)]
#[test]
fn compiles() {}
