//! AFL++ target: `cargo afl build --release && cargo afl fuzz -i corpus -o out
//! target/release/snapshot`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        bufferheap_fuzz::exercise(data);
    });
}
