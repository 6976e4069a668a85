//! Opcode-level tests of the pickle machine, on hand-assembled byte strings.

use super::value::{DictKind, ListAcc, Name, Value};
use super::*;
use crate::model::{Action, SettingValue, TraceEvent};

/// Runs the machine on `body` (after PROTO 4) and returns the value STOP pops.
fn run(body: &[u8]) -> Result<Value> {
    let mut bytes = vec![0x80, 4];
    bytes.extend_from_slice(body);
    Vm::new(&bytes).run()
}

fn s(text: &str) -> Vec<u8> {
    let mut v = vec![0x8c, text.len() as u8];
    v.extend_from_slice(text.as_bytes());
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `{"segments": [], "device_traces": [[<event>]]}` around one event dict body.
fn one_event(event: &[u8]) -> Vec<u8> {
    cat(&[
        b"\x80\x04}(",
        &s("segments"),
        b"]",
        &s("device_traces"),
        b"]]",
        event,
        b"aau.",
    ])
}

#[test]
fn values_stay_small() {
    assert!(std::mem::size_of::<Value>() <= 24);
    assert!(std::mem::size_of::<TraceEvent>() <= 56);
}

#[test]
fn long_integers_decode_like_python() {
    let cases: &[(&[u8], Option<i128>)] = &[
        (b"", Some(0)),
        (b"\xff", Some(-1)),
        (b"\x80", Some(-128)),
        (b"\xff\x00", Some(255)),
        (b"\x00\x80", Some(-32768)),
        (b"\xff\xff\xff\xff\xff\xff\xff\x7f", Some(i64::MAX as i128)),
        (b"\x00\x00\x00\x00\x00\x00\x00\x80", Some(i64::MIN as i128)),
        (
            b"\xff\xff\xff\xff\xff\xff\xff\xff\x00",
            Some(u64::MAX as i128),
        ),
        (b"\xff\xff\xff\xff\xff\xff\xff\x7f\xff", None),
        (b"\x00\x00\x00\x00\x00\x00\x00\x00\x01", None),
    ];
    for (bytes, want) in cases {
        let got = match long_value(bytes) {
            Value::Int(i) => Some(i128::from(i)),
            Value::UInt(u) => Some(i128::from(u)),
            Value::HugeInt(_) => None,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, *want, "{bytes:?}");
    }
    assert!(matches!(long_value(&[0u8; 17]), Value::Int(0)));
    assert!(matches!(long_value(&[0x80; 17]), Value::HugeInt(true)));
}

#[test]
fn memoized_keys_are_found_again_by_binget() {
    // Protocol-2 style: BINPUT/LONG_BINPUT with explicit indices, BINGET and LONG_BINGET.
    let e1 = cat(&[
        b"}q\x05(",
        &s("action"),
        b"q\x06",
        &s("alloc"),
        b"r\x07\x01\x00\x00",
        &s("addr"),
        b"q\x08M\x00\x10",
        &s("size"),
        b"q\x09K\x40u",
    ]);
    let e2 = b"}(h\x06j\x07\x01\x00\x00h\x08M\x00\x20h\x09K\x80u";
    let bytes = cat(&[
        b"\x80\x02}(",
        &s("segments"),
        b"]",
        &s("device_traces"),
        b"]](",
        &e1,
        e2,
        b"eau.",
    ]);
    let snap = decode_snapshot(&bytes).unwrap();
    let ev = |addr, size| TraceEvent {
        action: Action::Alloc,
        addr,
        size,
        stream: 0,
        time_us: 0,
    };
    assert_eq!(
        snap.device_traces,
        vec![vec![ev(0x1000, 64), ev(0x2000, 128)]]
    );
}

#[test]
fn memo_entries_can_be_overwritten_and_containers_are_not_aliased() {
    // "a" stored at 0, then overwritten by "b"; BINGET 0 gives "b".
    let v = run(&cat(&[&s("a"), b"q\x000", &s("b"), b"q\x000h\x00."])).unwrap();
    assert_eq!(v.as_text(), Some("b"));
    // A memoized dict comes back as a reference, not a copy.
    let v = run(b"}\x940h\x00.").unwrap();
    assert!(matches!(v, Value::Shared(_)));
}

#[test]
fn memoize_after_a_sparse_put_stores_where_python_does() {
    // BINPUT 1 makes one entry; CPython's MEMOIZE then stores at index 1 (the number of
    // entries), overwriting it, so BINGET 1 reads 8192.
    let v = run(b"J\x00\x10\x00\x00q\x010J\x00\x20\x00\x00\x940h\x01.").unwrap();
    assert!(matches!(v, Value::Int(8192)), "{v:?}");
    // An entry stored ahead (1) and then again once the dense part reaches it counts once:
    // two entries, so MEMOIZE stores at 2.
    let body = b"K\x07q\x010K\x08q\x000K\x09q\x010K\x0a\x940";
    let v = run(&cat(&[body, b"h\x02."])).unwrap();
    assert!(matches!(v, Value::Int(10)), "{v:?}");
    let v = run(&cat(&[body, b"h\x01."])).unwrap();
    assert!(matches!(v, Value::Int(9)), "{v:?}");
}

#[test]
fn ignored_values_of_every_kind_are_skipped() {
    // An event with extra keys holding tuples, sets, bytes, floats, None, nested lists, etc.
    let junk = cat(&[
        &s("compile_context"),
        b"(K\x01K\x02t",
        &s("frames"),
        b"](}(",
        &s("filename"),
        &s("x.py"),
        &s("line"),
        b"K\x07u]K\x01ae",
        &s("x1"),
        b")",
        &s("x2"),
        b"K\x01\x85",
        &s("x3"),
        b"K\x01K\x02\x86",
        &s("x4"),
        b"K\x01K\x02K\x03\x87",
        &s("x5"),
        b"\x8f(K\x01\x90",
        &s("x6"),
        b"(K\x01\x91",
        &s("x7"),
        b"C\x03abc",
        &s("x8"),
        b"B\x02\x00\x00\x00ab",
        &s("x9"),
        b"G\x3f\xf8\x00\x00\x00\x00\x00\x00",
        &s("x10"),
        b"N",
        &s("x11"),
        b"K\x05K\x06020",
        &s("x12"),
        b"(K\x01K\x021N",
        &s("x13"),
        b"\x88",
    ]);
    let event = cat(&[
        b"}(",
        &s("action"),
        &s("segment_map"),
        &s("addr"),
        b"K\x10",
        &s("size"),
        b"K\x20",
        &junk,
        b"u",
    ]);
    let snap = decode_snapshot(&one_event(&event)).unwrap();
    let e = &snap.device_traces[0][0];
    assert_eq!(
        (e.action.clone(), e.addr, e.size),
        (Action::SegmentMap, 16, 32)
    );
}

#[test]
fn dict_and_list_opcodes_build_containers_from_marks() {
    // Protocol-0 style containers: MARK items DICT / MARK items LIST.
    let event = cat(&[
        b"(",
        &s("action"),
        &s("free_completed"),
        &s("addr"),
        b"K\x01",
        &s("size"),
        b"K\x02d",
    ]);
    let bytes = cat(&[
        b"\x80\x05(",
        &s("segments"),
        b"(l",
        &s("device_traces"),
        b"((",
        &event,
        b"ll",
        &s("allocator_settings"),
        b"(",
        &s("k"),
        b"K\x01",
        &s("k"),
        b"K\x02d",
        b"d.",
    ]);
    let snap = decode_snapshot(&bytes).unwrap();
    assert_eq!(snap.device_traces[0][0].action, Action::FreeCompleted);
    assert_eq!(
        snap.allocator_settings,
        vec![("k".to_owned(), SettingValue::Int(2))]
    );
}

#[test]
fn strings_that_are_not_utf8_are_kept_lossily() {
    let v = run(b"\x8c\x03a\xed\xa0.").unwrap();
    assert_eq!(v.as_text(), Some("a\u{fffd}\u{fffd}"));
    let v = run(&cat(&[&s("state"), b"."])).unwrap();
    assert!(matches!(v, Value::Name(Name::State)));
}

#[test]
fn records_classify_by_their_keys() {
    let v = run(&cat(&[b"}(", &s("state"), &s("inactive"), b"u."])).unwrap();
    assert!(matches!(v, Value::Dict(ref r) if r.kind == DictKind::Block));
    let v = run(&cat(&[b"}(", &s("blocks"), b"]", &s("action"), b"Nu."])).unwrap();
    assert!(matches!(v, Value::Dict(ref r) if r.kind == DictKind::Event));
    let v = run(b"](}}e.").unwrap();
    assert!(matches!(v, Value::List(ref l) if matches!(**l, ListAcc::Untyped { len: 2, .. })));
}

fn corrupt_reason(body: &[u8]) -> String {
    match run(body) {
        Err(TraceError::Corrupt { reason, .. }) => reason,
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_stacks_are_errors() {
    assert_eq!(
        corrupt_reason(b"."),
        "STOP needs a value but the stack is empty"
    );
    assert_eq!(
        corrupt_reason(b"K\x01(0"),
        "POP needs a value but the stack is empty"
    );
    assert_eq!(corrupt_reason(b"u"), "no MARK is open to close");
    assert_eq!(
        corrupt_reason(b"}(K\x01u"),
        "SETITEMS with an odd number of items"
    );
    assert_eq!(
        corrupt_reason(b"(K\x01K\x02u"),
        "SETITEM(S) with nothing below the items"
    );
    assert_eq!(
        corrupt_reason(b"K\x01K\x02a"),
        "APPEND(S) to an integer, not a list"
    );
    assert_eq!(
        corrupt_reason(b"]K\x01K\x02s"),
        "SETITEM(S) on an empty list, not a dict"
    );
    assert_eq!(
        corrupt_reason(b"}]K\x01s"),
        "unhashable dict key: an empty list"
    );
    assert_eq!(corrupt_reason(b"K\x01\x90"), "no MARK is open to close");
    assert_eq!(
        corrupt_reason(b"K\x01(\x90"),
        "ADDITEMS without a set below the MARK"
    );
    assert_eq!(corrupt_reason(b"(\x94"), "memo store with an empty stack");
    assert_eq!(
        corrupt_reason(b"h\x03"),
        "memo entry 3 is read before it is stored"
    );
    assert_eq!(
        corrupt_reason(b"]\x940h\x00K\x01a"),
        "APPEND(S) to a list reached through a memo reference"
    );
    assert!(matches!(
        run(b"\x8b\xff\xff\xff\xff"),
        Err(TraceError::Corrupt { .. })
    ));
    assert!(matches!(
        run(b"\x80\x06"),
        Err(TraceError::NotPickle(m)) if m.contains("protocol 6")
    ));
}

#[test]
fn every_opcode_has_a_name() {
    for op in [
        opcodes::GLOBAL,
        opcodes::REDUCE,
        opcodes::BUILD,
        opcodes::PERSID,
    ] {
        let err = run(&[op]).unwrap_err();
        assert!(
            matches!(err, TraceError::UnsupportedOpcode { offset: 2, .. }),
            "{err}"
        );
    }
    assert_eq!(opcodes::name(0x95), "FRAME");
    assert_eq!(opcodes::name(0xff), opcodes::UNKNOWN);
}

#[test]
fn random_opcode_programs_never_panic() {
    // Short programs over the supported opcodes (plus a few refused ones), with random
    // argument bytes: every outcome must be a value or an error.
    const OPS: &[u8] = b"(.012JKMN]}aeuhjqrst)\x85\x86\x87\x88\x89\x8a\x8c\x8f\x90\x91\x94\x95Gdlc";
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 48) as usize;
        let mut body = Vec::with_capacity(len + 1);
        for _ in 0..len {
            let r = next();
            if r % 3 == 0 {
                body.push((r >> 8) as u8 % 8);
            } else {
                body.push(OPS[(r >> 8) as usize % OPS.len()]);
            }
        }
        body.push(b'.');
        let _ = run(&body);
        let mut bytes = vec![0x80, 4];
        bytes.extend_from_slice(&body);
        let _ = decode_snapshot(&bytes);
    }
}
