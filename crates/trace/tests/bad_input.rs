//! Bad input gives a clear error, never a panic or a hang: truncated gzip and pickle data,
//! files that are not pickles, pickles of other shapes, missing keys, wrong types, bit flips
//! of the real traces, decompression bombs and absurd length fields.

mod common;

use std::io::Write;

use bufferheap_trace::{
    Action, TraceError, TraceEvent, parse_snapshot, parse_snapshot_with_limit, read_snapshot,
};
use common::{GPT2, Pickler, RESNET, encode_snapshot, event, gz_bytes, raw_pickle, trace_path};

fn err(bytes: &[u8]) -> TraceError {
    match parse_snapshot(bytes) {
        Ok(_) => panic!("decoded without error"),
        Err(e) => e,
    }
}

fn ev(action: Action, addr: u64, size: u64) -> TraceEvent {
    TraceEvent {
        action,
        addr,
        size,
        stream: 0,
        time_us: 1_795_477_691_554_558,
    }
}

/// A snapshot pickle with no segments and one device whose events are written by `events`.
fn snapshot_with(n: usize, events: &dyn Fn(&mut Pickler, usize)) -> Vec<u8> {
    let mut p = Pickler::new();
    p.empty_dict().mark();
    p.str("segments").empty_list();
    p.str("device_traces").list(1, 1000, &|p, _| {
        p.list(n, 1000, events);
    });
    p.setitems();
    p.stop()
}

fn good_event(p: &mut Pickler, i: usize) {
    event(
        p,
        &ev(Action::Alloc, 0x7f00_0000_0000 + i as u64 * 512, 512),
    );
}

#[test]
fn a_hand_made_snapshot_decodes() {
    let snap = parse_snapshot(&snapshot_with(3, &good_event)).unwrap();
    assert_eq!(snap.device_traces[0].len(), 3);
    assert_eq!(snap.device_traces[0][2].addr, 0x7f00_0000_0400);
}

#[test]
fn truncated_gzip_is_a_gzip_error() {
    let gz = gz_bytes(RESNET);
    for cut in [
        2,
        3,
        10,
        11,
        100,
        4096,
        gz.len() / 3,
        gz.len() / 2,
        gz.len() - 9,
        gz.len() - 1,
    ] {
        let e = err(&gz[..cut]);
        assert!(matches!(e, TraceError::Gzip(_)), "cut at {cut}: {e}");
        assert!(
            e.to_string().starts_with("corrupt or truncated gzip data"),
            "{e}"
        );
    }
}

#[test]
fn gzip_members_and_zero_padding_read_as_pythons_gzip_reads_them() {
    let pickle = snapshot_with(3, &good_event);
    let member = |bytes: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    };
    let (head, tail) = pickle.split_at(pickle.len() / 2);
    for padding in [0, 8, 512] {
        // One member, then zeros (as tape and block devices pad files).
        let mut one = member(&pickle);
        one.extend(std::iter::repeat_n(0u8, padding));
        // Two members with zeros between and after them.
        let mut two = member(head);
        two.extend(std::iter::repeat_n(0u8, padding));
        two.extend(member(tail));
        two.extend(std::iter::repeat_n(0u8, padding));
        for bytes in [one, two] {
            let snap = parse_snapshot(&bytes).unwrap_or_else(|e| panic!("padding {padding}: {e}"));
            assert_eq!(snap.device_traces[0].len(), 3);
        }
    }
    // Anything else after a member is still refused.
    let mut junk = member(&pickle);
    junk.extend(b"\x00\x00junk");
    assert!(matches!(err(&junk), TraceError::Gzip(_)));
}

#[test]
fn truncated_pickle_is_an_error_at_every_cut() {
    let raw = raw_pickle(RESNET);
    let mut cuts: Vec<usize> = (1..300).collect();
    cuts.extend((1..24).map(|k| raw.len() * k / 24));
    cuts.extend([raw.len() - 2, raw.len() - 1]);
    for cut in cuts {
        match err(&raw[..cut]) {
            TraceError::Truncated { offset, .. } => assert!(offset <= cut as u64),
            other => panic!("cut at {cut}: {other}"),
        }
    }
    // The real traces are framed: a cut is found at the last FRAME, before the data runs out.
    let e = err(&raw[..raw.len() - 1]);
    assert!(
        e.to_string()
            .starts_with("pickle data ends early: FRAME at byte offset"),
        "{e}"
    );
    let unframed = snapshot_with(2, &good_event);
    let e = err(&unframed[..unframed.len() - 1]);
    assert_eq!(
        e.to_string(),
        format!(
            "pickle data ends early: the STOP opcode at byte offset {} runs past the end of the data",
            unframed.len() - 1
        )
    );
}

#[test]
fn files_that_are_not_pickles_are_refused() {
    for bytes in [
        &b""[..],
        b"hello world",
        b"{\"segments\": [], \"device_traces\": []}",
        b"(dp0\n.",    // protocol 0
        b"\x80\x09}.", // protocol 9
    ] {
        let e = err(bytes);
        assert!(matches!(e, TraceError::NotPickle(_)), "{bytes:?}: {e}");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"segments,device_traces\n1,2\n").unwrap();
    let e = err(&gz.finish().unwrap());
    assert!(e.to_string().contains("not a pickle"), "{e}");
    assert!(e.to_string().contains("\"segments"), "shows the start: {e}");
}

#[test]
fn a_pickle_of_another_shape_is_refused() {
    let mut p = Pickler::new();
    p.list(3, 1000, &|p, i| {
        p.int(i as i128);
    });
    let e = err(&p.stop());
    assert_eq!(
        e.to_string(),
        "top level: expected a dict with keys 'segments' and 'device_traces' \
         (a PyTorch memory snapshot), found a list whose first item is an integer"
    );

    let mut p = Pickler::new();
    p.empty_dict()
        .mark()
        .str("segments")
        .empty_list()
        .str("x")
        .int(1)
        .setitems();
    let e = err(&p.stop());
    assert_eq!(
        e.to_string(),
        "top level: missing key 'device_traces' (keys present: segments, x)"
    );

    // device_traces given as a flat list of events.
    let mut p = Pickler::new();
    p.empty_dict().mark().str("segments").empty_list();
    p.str("device_traces").list(2, 1000, &good_event);
    p.setitems();
    let e = err(&p.stop());
    assert_eq!(
        e.to_string(),
        "device_traces: expected a list of per-device lists of trace events, found a list of \
         trace events"
    );
}

#[test]
fn a_missing_key_names_the_key_and_the_event() {
    let bytes = snapshot_with(3, &|p, i| {
        if i == 1 {
            p.empty_dict().mark();
            p.str("action").str("free_requested");
            p.str("size").int(512);
            p.str("stream").int(0);
            p.setitems();
        } else {
            good_event(p, i);
        }
    });
    let e = err(&bytes);
    assert_eq!(
        e.to_string(),
        "device_traces[0][1]: missing key 'addr' (keys present: action, size, stream)"
    );
    assert!(matches!(&e, TraceError::MissingKey { key, .. } if key == "addr"));
}

#[test]
fn a_wrong_type_names_the_path_and_what_was_found() {
    let bytes = snapshot_with(1235, &|p, i| {
        if i == 1234 {
            p.empty_dict().mark();
            p.str("action").str("alloc");
            p.str("addr").str("0x7f0000");
            p.str("size").int(512);
            p.setitems();
        } else {
            good_event(p, i);
        }
    });
    assert_eq!(
        err(&bytes).to_string(),
        "device_traces[0][1234].addr: expected a non-negative integer, found the string \"0x7f0000\""
    );

    let bytes = snapshot_with(2, &|p, i| {
        event(p, &ev(Action::Alloc, 4096, 512));
        if i == 0 {
            return;
        }
        // Overwrite the size of the second event with a negative number.
        p.str("size").int(-5).op(0x73);
    });
    assert_eq!(
        err(&bytes).to_string(),
        "device_traces[0][1].size: expected a non-negative integer, found -5"
    );

    let bytes = snapshot_with(3, &|p, i| {
        if i == 2 {
            p.empty_dict()
                .mark()
                .str("size")
                .int(1)
                .str("name")
                .str("x")
                .setitems();
        } else {
            good_event(p, i);
        }
    });
    assert_eq!(
        err(&bytes).to_string(),
        "device_traces[0][2]: expected a trace event (a dict with an 'action' key), \
         found a dict with none of the keys 'action', 'state', 'total_size', 'blocks'"
    );
}

#[test]
fn integers_outside_64_bits_are_named_by_their_range() {
    let with_size = |size: i128| {
        snapshot_with(1, &|p, _| {
            p.empty_dict().mark();
            p.str("action").str("alloc");
            p.str("addr").int(4096);
            p.str("size").int(size);
            p.setitems();
        })
    };
    assert_eq!(
        err(&with_size(1 << 64)).to_string(),
        "device_traces[0][0].size: expected a non-negative integer, found an integer of 2**64 \
         or more"
    );
    assert_eq!(
        err(&with_size(-(1 << 70))).to_string(),
        "device_traces[0][0].size: expected a non-negative integer, found an integer below \
         -2**63"
    );
    let bytes = snapshot_with(1, &|p, _| {
        p.empty_dict().mark();
        p.str("action").str("alloc");
        p.str("addr").int(4096);
        p.str("size").int(512);
        p.str("time_us").int(1 << 63);
        p.setitems();
    });
    assert_eq!(
        err(&bytes).to_string(),
        "device_traces[0][0].time_us: expected a 64-bit integer, found 9223372036854775808"
    );
}

#[test]
fn an_oom_event_with_a_bad_device_free_names_it() {
    let bytes = snapshot_with(1, &|p, _| {
        p.empty_dict().mark();
        p.str("action").str("oom");
        p.str("device_free").int(-5);
        p.str("size").int(1 << 20);
        p.setitems();
    });
    assert_eq!(
        err(&bytes).to_string(),
        "device_traces[0][0].device_free: expected a non-negative integer, found -5"
    );
}

#[test]
fn a_block_without_state_is_reported_inside_its_segment() {
    let snap = read_snapshot(&trace_path(RESNET)).unwrap();
    let mut bytes = encode_snapshot(&snap, 3, 10, 1000);
    // Rename the first 'state' key: its later uses are memo references to the same string.
    let at = bytes.windows(5).position(|w| w == b"state").unwrap();
    bytes[at..at + 5].copy_from_slice(b"stale");
    let e = err(&bytes);
    assert_eq!(
        e.to_string(),
        "segments[0].blocks[0]: expected a block (a dict with a 'state' key), found a dict \
         with none of the keys 'action', 'state', 'total_size', 'blocks'"
    );
}

#[test]
fn unknown_actions_are_kept_and_oom_reads_device_free() {
    let bytes = snapshot_with(3, &|p, i| match i {
        0 => event(p, &ev(Action::Unknown("user_defined".into()), 0, 0)),
        1 => {
            p.empty_dict().mark();
            p.str("action").str("oom");
            p.str("device_free").int(123_456_789);
            p.str("size").int(1 << 40);
            p.setitems();
        }
        _ => good_event(p, i),
    });
    let snap = parse_snapshot(&bytes).unwrap();
    let t = &snap.device_traces[0];
    assert_eq!(t[0].action, Action::Unknown("user_defined".into()));
    assert_eq!(
        (t[1].action.clone(), t[1].addr, t[1].size),
        (Action::Oom, 123_456_789, 1 << 40)
    );
    assert_eq!((t[1].stream, t[1].time_us), (0, 0));
}

#[test]
fn a_shared_event_dict_is_refused_not_misread() {
    let mut p = Pickler::new();
    p.empty_dict().mark();
    p.str("segments").empty_list();
    p.str("device_traces").empty_list(); // memo 3 (0: top dict, 1: "segments", 2: the list)
    p.empty_list().mark(); // the events list
    good_event(&mut p, 0); // the event dict is memo 6, after "device_traces" (4) and this list (5)
    p.op(0x68).op(6); // BINGET 6: the same dict again
    p.appends().op(0x61).setitems();
    let e = err(&p.stop());
    assert_eq!(
        e.to_string(),
        "device_traces[0][1]: expected a trace event (a dict with an 'action' key), found a second \
         reference to an earlier dict (shared objects are not supported here)"
    );
}

#[test]
fn object_building_opcodes_are_refused_with_name_and_offset() {
    let mut p = Pickler::new();
    p.empty_dict().mark().str("segments");
    let offset = p.out.len();
    p.out
        .extend_from_slice(b"\x8c\x08builtins\x94\x8c\x03set\x94\x93");
    let e = err(&p.stop());
    assert_eq!(
        e.to_string(),
        format!(
            "unsupported pickle opcode STACK_GLOBAL (0x93) at byte offset {}; a PyTorch memory \
             snapshot holds only dicts, lists, strings and numbers",
            offset + 17
        )
    );
    let e = err(b"\x80\x04\xff.");
    assert_eq!(
        e.to_string(),
        "corrupt pickle at byte offset 2: 0xff is not a pickle opcode"
    );
}

#[test]
fn absurd_lengths_are_refused_before_allocating() {
    let mut cases: Vec<Vec<u8>> = Vec::new();
    let mut b = b"\x80\x04\x8d".to_vec(); // BINUNICODE8
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    cases.push(b);
    let mut b = b"\x80\x04\x8e".to_vec(); // BINBYTES8
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    cases.push(b);
    cases.push(b"\x80\x04\x8b\xff\xff\xff\x7f".to_vec()); // LONG4, 2 GiB of digits
    cases.push(b"\x80\x04\x58\xff\xff\xff\xff".to_vec()); // BINUNICODE, 4 GiB
    let mut b = b"\x80\x04\x95".to_vec(); // FRAME larger than the input
    b.extend_from_slice(&(1u64 << 40).to_le_bytes());
    b.extend_from_slice(b"}.");
    cases.push(b);
    for c in cases {
        assert!(matches!(err(&c), TraceError::Truncated { .. }), "{c:?}");
    }
    // A memo index far past the end does not allocate a huge table.
    let e = err(b"\x80\x04K\x01r\xff\xff\xff\xffj\xfe\xff\xff\xff.");
    assert_eq!(
        e.to_string(),
        "corrupt pickle at byte offset 9: memo entry 4294967294 is read before it is stored"
    );
}

#[test]
fn nesting_is_limited() {
    let mut deep_marks = b"\x80\x04".to_vec();
    deep_marks.extend(std::iter::repeat_n(b'(', 100_000));
    assert!(matches!(err(&deep_marks), TraceError::Limit { .. }));

    // {"a": {"a": {"a": ...}}} 100 deep, built with SETITEM.
    let mut p = Pickler::new();
    for _ in 0..100 {
        p.empty_dict().str("a");
    }
    p.empty_dict();
    for _ in 0..100 {
        p.op(0x73);
    }
    let e = err(&p.stop());
    assert!(matches!(e, TraceError::Limit { .. }), "{e}");
    assert!(e.to_string().contains("nested more than 64 deep"), "{e}");

    // Deeply nested lists are fine: lists keep no generic items.
    let mut p = Pickler::new();
    p.empty_dict()
        .mark()
        .str("segments")
        .empty_list()
        .str("device_traces")
        .empty_list();
    p.str("x");
    for _ in 0..10_000 {
        p.empty_list();
    }
    for _ in 1..10_000 {
        p.op(0x61);
    }
    p.setitems();
    let snap = parse_snapshot(&p.stop()).unwrap();
    assert!(snap.device_traces.is_empty());
}

#[test]
fn a_gzip_bomb_stops_at_the_limit() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..4 {
        gz.write_all(&zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    let e = parse_snapshot_with_limit(&bomb, 1 << 20).unwrap_err();
    assert!(
        matches!(e, TraceError::TooLarge { limit: 1_048_576 }),
        "{e}"
    );
}

/// A deterministic generator of positions (splitmix64).
fn positions(seed: u64, n: usize, below: usize) -> impl Iterator<Item = (usize, u8)> {
    let mut s = seed;
    (0..n).map(move |_| {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z % below as u64) as usize, 1u8 << (z >> 61))
    })
}

#[test]
fn bit_flips_at_every_byte_of_a_real_trace_prefix_never_panic() {
    // The first events and segments of the real trace, re-encoded as Python does, so that
    // every byte can be flipped and each decode stays quick.
    let snap = read_snapshot(&trace_path(RESNET)).unwrap();
    let small = encode_snapshot(&snap, 3, 80, 1000);
    let mut errors = 0;
    for i in 0..small.len() {
        let mut b = small.clone();
        b[i] ^= 1 << (i % 8);
        errors += usize::from(parse_snapshot(&b).is_err());
    }
    assert!(
        errors > small.len() / 4,
        "{errors} of {} flips were caught",
        small.len()
    );
}

#[test]
fn bit_flips_across_the_real_traces_never_panic() {
    for name in [RESNET, GPT2] {
        let raw = raw_pickle(name);
        for (at, bit) in positions(7, 8, raw.len()) {
            let mut b = raw.clone();
            b[at] ^= bit;
            let _ = parse_snapshot(&b);
        }
        let gz = gz_bytes(name);
        for (at, bit) in positions(11, 8, gz.len()) {
            let mut b = gz.clone();
            b[at] ^= bit;
            assert!(
                parse_snapshot(&b).is_err(),
                "gzip CRC catches a flip at {at}"
            );
        }
    }
}

#[test]
fn read_snapshot_errors_name_the_file() {
    let missing = trace_path("no_such_trace.pkl.gz");
    let e = read_snapshot(&missing).unwrap_err();
    assert!(e.to_string().starts_with("cannot read "), "{e}");
    assert!(e.to_string().contains("no_such_trace.pkl.gz"), "{e}");

    let dir = std::env::temp_dir().join(format!("bufferheap-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notes.pkl.gz");
    std::fs::write(&path, b"not a snapshot").unwrap();
    let e = read_snapshot(&path).unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        e.to_string(),
        format!(
            "{}: not a pickle (protocol 2 or later): it starts with byte 0x6e (\"not a sn\"), \
             not the PROTO opcode 0x80",
            path.display()
        )
    );
    assert!(matches!(e.root(), TraceError::NotPickle(_)));
}
