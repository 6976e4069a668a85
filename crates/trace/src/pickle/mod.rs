//! A streaming pickle decoder for PyTorch memory snapshots.
//!
//! It runs the pickle virtual machine (stack, marks, memo) over the opcodes that Python's
//! pickler emits for dicts, lists, tuples, sets, strings, bytes and numbers, protocols 2 to 5,
//! and refuses every opcode that builds objects (GLOBAL, REDUCE, ...) with its name and offset.
//! It never builds the object tree: a dict becomes a [`value::Record`] that drops keys the
//! snapshot does not need (`frames`, `user_metadata`, ...), and a list turns each item into a
//! typed struct the moment it is appended (see [`value`]), so a 900k-event trace costs about
//! 56 bytes per event.
//!
//! Invariants:
//! - Every read checks the remaining input first; lengths are checked before any allocation.
//! - Each opcode consumes at least one byte and does work linear in what it pops, so decoding
//!   is linear in the input; the stack, the memo, open MARKs and nested dicts are capped.
//! - Memo semantics are Python's: `MEMOIZE`/`BINPUT` store the top of the stack, `BINGET`
//!   pushes a copy; strings and scalars round-trip exactly, containers come back as
//!   [`value::Value::Shared`] (PyTorch never shares them outside the skipped stack frames).
//! - Items below the innermost MARK are out of reach of every opcode but the one that pops it.

mod opcodes;
mod schema;
mod value;

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::{Result, TraceError};
use crate::model::Snapshot;
use value::{Budget, InsertError, ListAcc, Name, Record, SharedKind, Value};

/// Most values on the pickle stack at once.
const MAX_STACK: usize = 1 << 24;
/// Most memo entries.
const MAX_MEMO: usize = 1 << 25;

/// Decodes a raw (uncompressed) pickle into a [`Snapshot`].
pub(crate) fn decode_snapshot(data: &[u8]) -> Result<Snapshot> {
    if data.is_empty() {
        return Err(TraceError::NotPickle("the input is empty".into()));
    }
    if data[0] != opcodes::PROTO {
        return Err(TraceError::NotPickle(format!(
            "it starts with byte 0x{:02x} ({}), not the PROTO opcode 0x80",
            data[0],
            printable(&data[..data.len().min(8)])
        )));
    }
    let mut vm = Vm::new(data);
    let top = vm.run()?;
    schema::snapshot(top, &mut vm.budget).map_err(|e| e.into_error())
}

fn printable(b: &[u8]) -> String {
    let text: String = b
        .iter()
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '.'
            }
        })
        .collect();
    format!("{text:?}")
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for errors.
    op_at: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: Vec<Option<Value>>,
    /// Memo entries set at indices far past the end of `memo`.
    memo_far: HashMap<u64, Value>,
    /// Distinct memo indices stored so far (in `memo` and `memo_far`): where MEMOIZE stores
    /// next, as in CPython, whose memo may be sparse.
    memo_count: u64,
    budget: Budget,
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Vm {
            data,
            pos: 0,
            op_at: 0,
            stack: Vec::with_capacity(4096),
            marks: Vec::new(),
            memo: Vec::new(),
            memo_far: HashMap::new(),
            memo_count: 0,
            budget: Budget::default(),
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> TraceError {
        TraceError::Corrupt {
            offset: self.op_at as u64,
            reason: reason.into(),
        }
    }

    fn limit(&self, what: impl Into<String>) -> TraceError {
        TraceError::Limit {
            offset: self.op_at as u64,
            what: what.into(),
        }
    }

    fn truncated(&self) -> TraceError {
        let what = self
            .data
            .get(self.op_at)
            .map_or("the next opcode", |&op| opcodes::name(op));
        TraceError::Truncated {
            offset: self.op_at as u64,
            what,
        }
    }

    #[inline]
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        if n > rest.len() as u64 {
            return Err(self.truncated());
        }
        let n = n as usize;
        self.pos += n;
        Ok(&rest[..n])
    }

    #[inline]
    fn byte(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn u16_le(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    #[inline]
    fn u32_le(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    fn u64_le(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Stack length below which the current opcode may not reach.
    #[inline]
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    #[inline]
    fn room(&self) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.limit(format!("more than {MAX_STACK} values on the pickle stack")));
        }
        Ok(())
    }

    #[inline]
    fn push(&mut self, v: Value) -> Result<()> {
        self.room()?;
        self.stack.push(v);
        Ok(())
    }

    #[inline]
    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow());
        }
        self.stack.pop().ok_or_else(|| self.underflow())
    }

    fn underflow(&self) -> TraceError {
        let op = self.data.get(self.op_at).copied().unwrap_or(0);
        self.corrupt(format!(
            "{} needs a value but the stack is empty",
            opcodes::name(op)
        ))
    }

    /// Drops a value, releasing what it held from the budget.
    fn discard(&mut self, v: Value) {
        self.budget.release(v.weight());
    }

    fn pop_mark(&mut self) -> Result<usize> {
        self.marks
            .pop()
            .ok_or_else(|| self.corrupt("no MARK is open to close"))
    }

    /// Runs until STOP and returns the top of the stack.
    fn run(&mut self) -> Result<Value> {
        use opcodes::*;
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                return Err(TraceError::Truncated {
                    offset: self.pos as u64,
                    what: "the STOP opcode",
                });
            };
            self.pos += 1;
            match op {
                BININT1 => {
                    let v = self.byte()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                BININT2 => {
                    let v = self.u16_le()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                BININT => {
                    let v = self.u32_le()? as i32;
                    self.push(Value::Int(i64::from(v)))?;
                }
                LONG1 => {
                    let n = self.byte()?;
                    let bytes = self.take(u64::from(n))?;
                    self.push(long_value(bytes))?;
                }
                LONG4 => {
                    let n = self.u32_le()? as i32;
                    if n < 0 {
                        return Err(self.corrupt("LONG4 with a negative length"));
                    }
                    let bytes = self.take(n as u64)?;
                    self.push(long_value(bytes))?;
                }
                BINFLOAT => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?;
                }
                NONE => self.push(Value::None)?,
                NEWTRUE => self.push(Value::Bool(true))?,
                NEWFALSE => self.push(Value::Bool(false))?,
                SHORT_BINUNICODE => {
                    let n = self.byte()?;
                    self.string(u64::from(n))?;
                }
                BINUNICODE => {
                    let n = self.u32_le()?;
                    self.string(u64::from(n))?;
                }
                BINUNICODE8 => {
                    let n = self.u64_le()?;
                    self.string(n)?;
                }
                SHORT_BINBYTES => {
                    let n = self.byte()?;
                    self.take(u64::from(n))?;
                    self.push(Value::Bytes(u64::from(n)))?;
                }
                BINBYTES => {
                    let n = self.u32_le()?;
                    self.take(u64::from(n))?;
                    self.push(Value::Bytes(u64::from(n)))?;
                }
                BINBYTES8 | BYTEARRAY8 => {
                    let n = self.u64_le()?;
                    self.take(n)?;
                    self.push(Value::Bytes(n))?;
                }
                EMPTY_DICT => self.push(Value::Dict(Record::new()))?,
                EMPTY_LIST => self.push(Value::List(Box::new(ListAcc::Empty)))?,
                EMPTY_TUPLE => self.push(Value::Tuple(0))?,
                EMPTY_SET => self.push(Value::Set)?,
                MARK => {
                    if self.marks.len() >= value::MAX_DEPTH as usize {
                        return Err(self
                            .limit(format!("more than {} MARKs open at once", value::MAX_DEPTH)));
                    }
                    self.marks.push(self.stack.len());
                }
                SETITEM => {
                    let m = self.items_from_top(2)?;
                    self.set_items(m)?;
                }
                SETITEMS => {
                    let m = self.pop_mark()?;
                    self.set_items(m)?;
                }
                APPEND => {
                    let m = self.items_from_top(1)?;
                    self.append_items(m)?;
                }
                APPENDS => {
                    let m = self.pop_mark()?;
                    self.append_items(m)?;
                }
                DICT => {
                    let m = self.pop_mark()?;
                    self.room()?;
                    self.stack.insert(m, Value::Dict(Record::new()));
                    self.set_items(m + 1)?;
                }
                LIST => {
                    let m = self.pop_mark()?;
                    self.room()?;
                    self.stack.insert(m, Value::List(Box::new(ListAcc::Empty)));
                    self.append_items(m + 1)?;
                }
                ADDITEMS => {
                    let m = self.pop_mark()?;
                    self.drop_from(m);
                    match self.stack.last() {
                        Some(Value::Set) if self.stack.len() > self.floor() => {}
                        Some(Value::Shared(SharedKind::Set)) if self.stack.len() > self.floor() => {
                            return Err(self.corrupt("ADDITEMS to a set through a memo reference"));
                        }
                        _ => return Err(self.corrupt("ADDITEMS without a set below the MARK")),
                    }
                }
                FROZENSET => {
                    let m = self.pop_mark()?;
                    self.drop_from(m);
                    self.push(Value::Set)?;
                }
                TUPLE => {
                    let m = self.pop_mark()?;
                    let n = self.stack.len() - m;
                    self.drop_from(m);
                    self.push(Value::Tuple(n as u64))?;
                }
                TUPLE1 | TUPLE2 | TUPLE3 => {
                    let n = usize::from(op - TUPLE1 + 1);
                    if self.stack.len() < self.floor() + n {
                        return Err(self.underflow());
                    }
                    self.drop_from(self.stack.len() - n);
                    self.push(Value::Tuple(n as u64))?;
                }
                POP => {
                    let v = self.pop()?;
                    self.discard(v);
                }
                POP_MARK => {
                    let m = self.pop_mark()?;
                    self.drop_from(m);
                }
                DUP => {
                    let v = match self.stack.last() {
                        Some(v) if self.stack.len() > self.floor() => v.memo_copy(),
                        _ => return Err(self.underflow()),
                    };
                    self.push(v)?;
                }
                MEMOIZE => {
                    self.memo_put(self.memo_count)?;
                }
                BINPUT => {
                    let i = self.byte()?;
                    self.memo_put(u64::from(i))?;
                }
                LONG_BINPUT => {
                    let i = self.u32_le()?;
                    self.memo_put(u64::from(i))?;
                }
                BINGET => {
                    let i = self.byte()?;
                    self.memo_get(u64::from(i))?;
                }
                LONG_BINGET => {
                    let i = self.u32_le()?;
                    self.memo_get(u64::from(i))?;
                }
                FRAME => {
                    // Frames only group opcodes for buffered reading; the data is all here.
                    let n = self.u64_le()?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return Err(self.truncated());
                    }
                }
                PROTO => {
                    let v = self.byte()?;
                    if !(2..=5).contains(&v) {
                        return Err(TraceError::NotPickle(format!(
                            "pickle protocol {v} at byte offset {}; only protocols 2 to 5 are read",
                            self.op_at
                        )));
                    }
                }
                STOP => {
                    let top = self.pop()?;
                    return Ok(top);
                }
                other => {
                    let name = opcodes::name(other);
                    if name == opcodes::UNKNOWN {
                        return Err(self.corrupt(format!("0x{other:02x} is not a pickle opcode")));
                    }
                    return Err(TraceError::UnsupportedOpcode {
                        opcode: other,
                        name,
                        offset: self.op_at as u64,
                    });
                }
            }
        }
    }

    fn string(&mut self, n: u64) -> Result<()> {
        let bytes = self.take(n)?;
        let v = match Name::lookup(bytes) {
            Some(name) => Value::Name(name),
            None => Value::Str(match std::str::from_utf8(bytes) {
                Ok(s) => Rc::from(s),
                // Python writes lone surrogates with "surrogatepass"; keep the rest of the text.
                Err(_) => Rc::from(String::from_utf8_lossy(bytes).as_ref()),
            }),
        };
        self.push(v)
    }

    fn drop_from(&mut self, at: usize) {
        let mut released = 0;
        for v in self.stack.drain(at..) {
            released += v.weight();
        }
        self.budget.release(released);
    }

    /// Start of the last `n` stack items, which must be above the innermost MARK.
    fn items_from_top(&self, n: usize) -> Result<usize> {
        match self.stack.len().checked_sub(n) {
            Some(m) if m >= self.floor() => Ok(m),
            _ => Err(self.underflow()),
        }
    }

    /// The container that items from stack index `m` go into: the value just below them, which
    /// must itself be above the innermost MARK.
    fn target_index(&self, m: usize, what: &str) -> Result<usize> {
        if m == 0 || m <= self.floor() || m > self.stack.len() {
            return Err(self.corrupt(format!("{what} with nothing below the items")));
        }
        Ok(m - 1)
    }

    /// `SETITEM(S)`: stack items from `m` on are key/value pairs for the dict at `m - 1`.
    fn set_items(&mut self, m: usize) -> Result<()> {
        let t = self.target_index(m, "SETITEM(S)")?;
        if !(self.stack.len() - m).is_multiple_of(2) {
            return Err(self.corrupt("SETITEMS with an odd number of items"));
        }
        let (below, items) = self.stack.split_at_mut(m);
        let Value::Dict(rec) = &mut below[t] else {
            let reason = match &below[t] {
                Value::Shared(SharedKind::Dict) => {
                    "SETITEM(S) on a dict reached through a memo reference".to_owned()
                }
                other => format!("SETITEM(S) on {}, not a dict", other.describe()),
            };
            return Err(self.corrupt(reason));
        };
        rec.entries.reserve(items.len() / 2);
        let mut failed = None;
        for pair in items.chunks_exact_mut(2) {
            let k = std::mem::replace(&mut pair[0], Value::None);
            let v = std::mem::replace(&mut pair[1], Value::None);
            if let Err(reason) = rec.insert(k, v, &mut self.budget) {
                failed = Some(reason);
                break;
            }
        }
        self.drop_from(m);
        match failed {
            None => Ok(()),
            Some(InsertError::Corrupt(r)) => Err(self.corrupt(r)),
            Some(InsertError::Limit(r)) => Err(self.limit(r)),
        }
    }

    /// `APPEND(S)`: stack items from `m` on go into the list at `m - 1`.
    fn append_items(&mut self, m: usize) -> Result<()> {
        let t = self.target_index(m, "APPEND(S)")?;
        let (below, items) = self.stack.split_at_mut(m);
        let Value::List(acc) = &mut below[t] else {
            let reason = match &below[t] {
                Value::Shared(SharedKind::List) => {
                    "APPEND(S) to a list reached through a memo reference".to_owned()
                }
                other => format!("APPEND(S) to {}, not a list", other.describe()),
            };
            return Err(self.corrupt(reason));
        };
        for item in items.iter_mut() {
            acc.push(std::mem::replace(item, Value::None), &mut self.budget);
        }
        self.stack.truncate(m);
        Ok(())
    }

    fn memo_put(&mut self, i: u64) -> Result<()> {
        let v = match self.stack.last() {
            Some(v) if self.stack.len() > self.floor() => v.memo_copy(),
            _ => return Err(self.corrupt("memo store with an empty stack")),
        };
        let len = self.memo.len() as u64;
        let stored_before = if i < len {
            let stored = self.memo[i as usize].is_some();
            self.memo[i as usize] = Some(v);
            stored
        } else if i == len {
            if self.memo.len() >= MAX_MEMO {
                return Err(self.limit(format!("more than {MAX_MEMO} memo entries")));
            }
            self.memo.push(Some(v));
            // An entry stored far ahead earlier now lives in `memo`.
            self.memo_far.remove(&i).is_some()
        } else {
            if self.memo_far.len() >= MAX_MEMO {
                return Err(self.limit(format!("more than {MAX_MEMO} memo entries")));
            }
            self.memo_far.insert(i, v).is_some()
        };
        if !stored_before {
            self.memo_count += 1;
        }
        Ok(())
    }

    fn memo_get(&mut self, i: u64) -> Result<()> {
        let found = match usize::try_from(i).ok().and_then(|i| self.memo.get(i)) {
            Some(Some(v)) => Some(v.memo_copy()),
            _ => self.memo_far.get(&i).map(Value::memo_copy),
        };
        match found {
            Some(v) => self.push(v),
            None => Err(self.corrupt(format!("memo entry {i} is read before it is stored"))),
        }
    }
}

/// A little-endian two's-complement integer (LONG1/LONG4 payload).
fn long_value(bytes: &[u8]) -> Value {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    // Strip sign-extension bytes that carry no value.
    let pad = if negative { 0xff } else { 0x00 };
    let mut len = bytes.len();
    while len > 0 && bytes[len - 1] == pad {
        len -= 1;
    }
    let significant = &bytes[..len];
    if significant.len() > 8 {
        return Value::HugeInt(negative);
    }
    let mut a = [pad; 8];
    a[..significant.len()].copy_from_slice(significant);
    let raw = u64::from_le_bytes(a);
    if negative {
        // Sign-extended into 8 bytes; it must still read as negative to fit an i64.
        let v = raw as i64;
        if v < 0 {
            Value::Int(v)
        } else {
            Value::HugeInt(true)
        }
    } else if raw <= i64::MAX as u64 {
        Value::Int(raw as i64)
    } else {
        Value::UInt(raw)
    }
}

#[cfg(test)]
mod tests;
