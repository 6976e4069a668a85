//! The decoder's values: small scalars, dict records that keep only what the schema may need,
//! and list accumulators that turn their items into typed structs as they are appended.
//!
//! Invariants:
//! - A [`Value`] is at most 24 bytes; strings the snapshot format names (keys, actions, states)
//!   are [`Name`]s and cost no allocation.
//! - Containers are never shared: the memo stores [`Value::Shared`] in place of a dict, list or
//!   set, so a memo reference never aliases (or keeps alive) a container being built.
//! - A list never keeps generic items: each item becomes a `TraceEvent`, `Block`, `Segment` or
//!   event list at once, or is dropped and the list remembers only its length and what its first
//!   item was. Only dicts nested in dicts stay as generic records, and the [`Budget`] counts
//!   every entry they hold, so their memory is bounded.
//! - A record's nesting depth is at most [`MAX_DEPTH`], so dropping one cannot overflow the stack.

use std::fmt;
use std::rc::Rc;

use crate::error::{PendingError, Seg};
use crate::model::{Segment, TraceEvent};
use crate::pickle::schema;

/// Deepest nesting of dicts inside dicts, and of open MARKs, that the decoder accepts.
pub(crate) const MAX_DEPTH: u32 = 64;
/// Most dict entries kept at once outside typed structs (about 48 bytes each).
pub(crate) const MAX_RETAINED: usize = 1 << 24;

macro_rules! names {
    ($($variant:ident = $text:literal,)*) => {
        /// A string the snapshot format uses, interned.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Name { $($variant,)* }

        impl Name {
            pub(crate) fn lookup(bytes: &[u8]) -> Option<Name> {
                if bytes.len() > 24 {
                    return None;
                }
                match std::str::from_utf8(bytes).ok()? {
                    $($text => Some(Name::$variant),)*
                    _ => None,
                }
            }

            pub(crate) fn as_str(self) -> &'static str {
                match self { $(Name::$variant => $text,)* }
            }
        }
    };
}

names! {
    Segments = "segments",
    DeviceTraces = "device_traces",
    AllocatorSettings = "allocator_settings",
    ExternalAnnotations = "external_annotations",
    Action = "action",
    Addr = "addr",
    Size = "size",
    Stream = "stream",
    TimeUs = "time_us",
    DeviceFree = "device_free",
    CompileContext = "compile_context",
    UserMetadata = "user_metadata",
    Frames = "frames",
    History = "history",
    Device = "device",
    Address = "address",
    TotalSize = "total_size",
    AllocatedSize = "allocated_size",
    ActiveSize = "active_size",
    RequestedSize = "requested_size",
    SegmentType = "segment_type",
    SegmentPoolId = "segment_pool_id",
    IsExpandable = "is_expandable",
    Blocks = "blocks",
    State = "state",
    Alloc = "alloc",
    FreeRequested = "free_requested",
    FreeCompleted = "free_completed",
    SegmentAlloc = "segment_alloc",
    SegmentFree = "segment_free",
    SegmentMap = "segment_map",
    SegmentUnmap = "segment_unmap",
    Snapshot = "snapshot",
    Oom = "oom",
    ActiveAllocated = "active_allocated",
    ActivePendingFree = "active_pending_free",
    Inactive = "inactive",
    Large = "large",
    Small = "small",
    NotApplicable = "N/A",
    EmptyString = "",
}

impl Name {
    /// Keys whose values are never needed: their values are dropped as soon as they are set.
    fn ignored(self) -> bool {
        matches!(
            self,
            Name::Frames
                | Name::History
                | Name::CompileContext
                | Name::UserMetadata
                | Name::SegmentPoolId
                | Name::ExternalAnnotations
        )
    }

    /// What a dict holding this key is taken for.
    fn dict_kind(self) -> DictKind {
        match self {
            Name::Action | Name::Addr | Name::DeviceFree => DictKind::Event,
            Name::TotalSize | Name::Blocks | Name::SegmentType | Name::IsExpandable => {
                DictKind::Segment
            }
            Name::State => DictKind::Block,
            Name::Segments | Name::DeviceTraces => DictKind::Root,
            _ => DictKind::Plain,
        }
    }
}

/// One decoded pickle value.
#[derive(Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A positive integer above `i64::MAX` that fits in 64 bits.
    UInt(u64),
    /// An integer outside 64 bits; `true` if negative. The digits are not kept.
    HugeInt(bool),
    Float(f64),
    Name(Name),
    Str(Rc<str>),
    /// Bytes or bytearray; only the length is kept.
    Bytes(u64),
    /// A tuple; only the length is kept.
    Tuple(u64),
    Set,
    Dict(Box<Record>),
    List(Box<ListAcc>),
    /// A memo reference to a dict, list or set.
    Shared(SharedKind),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedKind {
    Dict,
    List,
    Set,
}

impl Value {
    /// The value the memo keeps for this one (containers become [`Value::Shared`]).
    pub(crate) fn memo_copy(&self) -> Value {
        match self {
            Value::None => Value::None,
            Value::Bool(b) => Value::Bool(*b),
            Value::Int(i) => Value::Int(*i),
            Value::UInt(u) => Value::UInt(*u),
            Value::HugeInt(n) => Value::HugeInt(*n),
            Value::Float(x) => Value::Float(*x),
            Value::Name(n) => Value::Name(*n),
            Value::Str(s) => Value::Str(Rc::clone(s)),
            Value::Bytes(n) => Value::Bytes(*n),
            Value::Tuple(n) => Value::Tuple(*n),
            Value::Set => Value::Shared(SharedKind::Set),
            Value::Dict(_) => Value::Shared(SharedKind::Dict),
            Value::List(_) => Value::Shared(SharedKind::List),
            Value::Shared(k) => Value::Shared(*k),
        }
    }

    /// Dict entries this value keeps (counted by the [`Budget`]).
    pub(crate) fn weight(&self) -> usize {
        match self {
            Value::Dict(r) => r.weight,
            _ => 0,
        }
    }

    /// A short description for error messages, with the content of scalars.
    pub(crate) fn describe(&self) -> String {
        match self {
            Value::Str(s) => describe_str(s),
            Value::Name(n) => describe_str(n.as_str()),
            other => Found::of(other).to_string(),
        }
    }

    /// The text of a string value.
    pub(crate) fn as_text(&self) -> Option<&str> {
        match self {
            Value::Name(n) => Some(n.as_str()),
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn describe_str(s: &str) -> String {
    const SHOWN: usize = 40;
    match s.char_indices().nth(SHOWN) {
        None => format!("the string {s:?}"),
        Some((cut, _)) => format!("the string {:?}...", &s[..cut]),
    }
}

/// What a dict looks like, judged by its keys (first matching rule wins: `action`/`addr`/
/// `device_free` make an event; `total_size`/`blocks`/`segment_type`/`is_expandable` a segment;
/// `state` a block; `segments`/`device_traces` a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DictKind {
    Plain,
    Root,
    Block,
    Segment,
    Event,
}

/// A dict being decoded: its entries (minus ignored keys), in insertion order.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) entries: Vec<(Value, Value)>,
    /// Entries held by this record and the records nested in it.
    pub(crate) weight: usize,
    /// 1 for a record holding no records.
    pub(crate) depth: u32,
    pub(crate) kind: DictKind,
}

impl Record {
    pub(crate) fn new() -> Box<Record> {
        Box::new(Record {
            entries: Vec::new(),
            weight: 0,
            depth: 1,
            kind: DictKind::Plain,
        })
    }

    /// `self[key] = value`. A later duplicate key shadows an earlier one at lookup.
    pub(crate) fn insert(
        &mut self,
        key: Value,
        value: Value,
        budget: &mut Budget,
    ) -> Result<(), InsertError> {
        match &key {
            Value::Name(n) if n.ignored() => {
                budget.release(value.weight());
                return Ok(());
            }
            Value::Name(n) => self.kind = self.kind.max(n.dict_kind()),
            Value::Dict(_) | Value::List(_) | Value::Set | Value::Shared(_) => {
                budget.release(value.weight());
                return Err(InsertError::Corrupt(format!(
                    "unhashable dict key: {}",
                    key.describe()
                )));
            }
            _ => {}
        }
        if let Value::Dict(child) = &value {
            if child.depth >= MAX_DEPTH {
                budget.release(value.weight());
                return Err(InsertError::Limit(format!(
                    "dicts nested more than {MAX_DEPTH} deep"
                )));
            }
            self.depth = self.depth.max(child.depth + 1);
        }
        self.weight += 1 + value.weight();
        self.entries.push((key, value));
        budget.retain(1)
    }

    /// The value of the last entry with this key.
    pub(crate) fn get(&self, name: Name) -> Option<&Value> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, Value::Name(n) if *n == name))
            .map(|(_, v)| v)
    }

    /// Moves the value of the last entry with this key out of the record.
    pub(crate) fn take(&mut self, name: Name) -> Option<Value> {
        self.entries
            .iter_mut()
            .rev()
            .find(|(k, _)| matches!(k, Value::Name(n) if *n == name))
            .map(|(_, v)| std::mem::replace(v, Value::None))
    }

    /// The keys, for "keys present" in error messages.
    pub(crate) fn key_list(&self) -> String {
        const SHOWN: usize = 16;
        let mut out = String::new();
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if i == SHOWN {
                out.push_str(", ...");
                break;
            }
            if i > 0 {
                out.push_str(", ");
            }
            match k.as_text() {
                Some(t) => out.push_str(t),
                None => out.push_str(&k.describe()),
            }
        }
        if out.is_empty() {
            out.push_str("none");
        }
        out
    }
}

/// Why a dict entry was refused.
#[derive(Debug)]
pub(crate) enum InsertError {
    Corrupt(String),
    Limit(String),
}

/// Counts dict entries held in generic records, to bound memory on hostile input.
#[derive(Debug, Default)]
pub(crate) struct Budget {
    retained: usize,
}

impl Budget {
    fn retain(&mut self, n: usize) -> Result<(), InsertError> {
        self.retained = self.retained.saturating_add(n);
        if self.retained > MAX_RETAINED {
            return Err(InsertError::Limit(format!(
                "more than {MAX_RETAINED} dict entries held outside the trace events"
            )));
        }
        Ok(())
    }

    /// Called whenever a value leaves the decoder (dropped or turned into a typed struct).
    pub(crate) fn release(&mut self, weight: usize) {
        self.retained = self.retained.saturating_sub(weight);
    }
}

/// What a list has become so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListShape {
    Empty,
    Events,
    Blocks,
    Segments,
    Traces,
    /// Its first item was none of the typed kinds.
    Untyped(Leaf),
    /// It started typed and then an item did not fit.
    Broken,
}

impl ListShape {
    /// What each item of a list of this shape is, in words.
    pub(crate) fn item_words(self) -> &'static str {
        match self {
            ListShape::Events => "a trace event (a dict with an 'action' key)",
            ListShape::Blocks => "a block (a dict with a 'state' key)",
            ListShape::Segments => "a segment (a dict with 'total_size' and 'blocks')",
            ListShape::Traces => "a list of trace events",
            _ => "a value",
        }
    }
}

/// A list being decoded.
#[derive(Debug)]
pub(crate) enum ListAcc {
    Empty,
    Events(Vec<TraceEvent>),
    /// Blocks, and whether every block had an `address` key.
    Blocks(Vec<crate::model::Block>, bool),
    Segments(Vec<Segment>),
    Traces(Vec<Vec<TraceEvent>>),
    Untyped {
        len: u64,
        first: Leaf,
    },
    Broken {
        len: u64,
        err: Box<PendingError>,
    },
}

/// An item as a typed list sees it.
enum Item {
    Event(Result<TraceEvent, PendingError>),
    Block(Result<(crate::model::Block, bool), PendingError>),
    Segment(Result<Segment, PendingError>),
    Trace(Result<Vec<TraceEvent>, PendingError>),
    Other(Found),
}

impl ListAcc {
    pub(crate) fn len(&self) -> u64 {
        match self {
            ListAcc::Empty => 0,
            ListAcc::Events(v) => v.len() as u64,
            ListAcc::Blocks(v, _) => v.len() as u64,
            ListAcc::Segments(v) => v.len() as u64,
            ListAcc::Traces(v) => v.len() as u64,
            ListAcc::Untyped { len, .. } | ListAcc::Broken { len, .. } => *len,
        }
    }

    pub(crate) fn shape(&self) -> ListShape {
        match self {
            ListAcc::Empty => ListShape::Empty,
            ListAcc::Events(_) => ListShape::Events,
            ListAcc::Blocks(..) => ListShape::Blocks,
            ListAcc::Segments(_) => ListShape::Segments,
            ListAcc::Traces(_) => ListShape::Traces,
            ListAcc::Untyped { first, .. } => ListShape::Untyped(*first),
            ListAcc::Broken { .. } => ListShape::Broken,
        }
    }

    /// Appends one item, converting it to its typed form.
    pub(crate) fn push(&mut self, item: Value, budget: &mut Budget) {
        let index = self.len();
        let item = classify(item, budget);
        let fail = |expected: ListShape, got: Item| -> PendingError {
            match got {
                Item::Event(Err(e))
                | Item::Block(Err(e))
                | Item::Segment(Err(e))
                | Item::Trace(Err(e)) => e,
                other => PendingError::shape(expected.item_words(), item_found(&other).to_string()),
            }
            .at(Seg::Index(index))
        };
        let broken = match (&mut *self, item) {
            (ListAcc::Events(v), Item::Event(Ok(e))) => return v.push(e),
            (ListAcc::Blocks(v, all), Item::Block(Ok((b, has)))) => {
                *all &= has;
                return v.push(b);
            }
            (ListAcc::Segments(v), Item::Segment(Ok(s))) => return v.push(s),
            (ListAcc::Traces(v), Item::Trace(Ok(t))) => return v.push(t),
            (ListAcc::Untyped { len, .. } | ListAcc::Broken { len, .. }, _) => {
                *len = len.saturating_add(1);
                return;
            }
            (ListAcc::Empty, Item::Event(Ok(e))) => return *self = ListAcc::Events(vec![e]),
            (ListAcc::Empty, Item::Block(Ok((b, has)))) => {
                return *self = ListAcc::Blocks(vec![b], has);
            }
            (ListAcc::Empty, Item::Segment(Ok(s))) => return *self = ListAcc::Segments(vec![s]),
            (ListAcc::Empty, Item::Trace(Ok(t))) => return *self = ListAcc::Traces(vec![t]),
            (ListAcc::Empty, Item::Other(found)) => {
                return *self = ListAcc::Untyped {
                    len: 1,
                    first: found.leaf(),
                };
            }
            (ListAcc::Empty, got @ Item::Event(Err(_))) => fail(ListShape::Events, got),
            (ListAcc::Empty, got @ Item::Block(Err(_))) => fail(ListShape::Blocks, got),
            (ListAcc::Empty, got @ Item::Segment(Err(_))) => fail(ListShape::Segments, got),
            (ListAcc::Empty, got @ Item::Trace(Err(_))) => fail(ListShape::Traces, got),
            (acc, got) => fail(acc.shape(), got),
        };
        *self = ListAcc::Broken {
            len: index.saturating_add(1),
            err: Box::new(broken),
        };
    }
}

fn classify(item: Value, budget: &mut Budget) -> Item {
    match item {
        Value::Dict(rec) => {
            budget.release(rec.weight);
            match rec.kind {
                DictKind::Event => Item::Event(schema::event(&rec)),
                DictKind::Block => Item::Block(schema::block(&rec)),
                DictKind::Segment => Item::Segment(schema::segment(*rec)),
                kind => Item::Other(Found::Dict(kind)),
            }
        }
        Value::List(acc) => match *acc {
            ListAcc::Empty => Item::Trace(Ok(Vec::new())),
            ListAcc::Events(v) => Item::Trace(Ok(v)),
            // A broken event list inside a list of lists: report the inner error.
            ListAcc::Broken { err, .. } => Item::Trace(Err(*err)),
            other => Item::Other(Found::List(other.shape())),
        },
        other => Item::Other(Found::of(&other)),
    }
}

fn item_found(item: &Item) -> Found {
    match item {
        Item::Event(_) => Found::Dict(DictKind::Event),
        Item::Block(_) => Found::Dict(DictKind::Block),
        Item::Segment(_) => Found::Dict(DictKind::Segment),
        Item::Trace(_) => Found::List(ListShape::Events),
        Item::Other(f) => *f,
    }
}

/// A value's kind, small enough to keep for error messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Found {
    Leaf(Leaf),
    Dict(DictKind),
    List(ListShape),
}

/// A value's kind without nesting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leaf {
    None,
    Bool,
    Int,
    Float,
    Str,
    Bytes,
    Tuple,
    Set,
    Dict(DictKind),
    List,
    Shared(SharedKind),
}

impl Found {
    pub(crate) fn of(v: &Value) -> Found {
        Found::Leaf(match v {
            Value::None => Leaf::None,
            Value::Bool(_) => Leaf::Bool,
            Value::Int(_) | Value::UInt(_) | Value::HugeInt(_) => Leaf::Int,
            Value::Float(_) => Leaf::Float,
            Value::Name(_) | Value::Str(_) => Leaf::Str,
            Value::Bytes(_) => Leaf::Bytes,
            Value::Tuple(_) => Leaf::Tuple,
            Value::Set => Leaf::Set,
            Value::Dict(r) => return Found::Dict(r.kind),
            Value::List(l) => return Found::List(l.shape()),
            Value::Shared(k) => Leaf::Shared(*k),
        })
    }

    fn leaf(self) -> Leaf {
        match self {
            Found::Leaf(l) => l,
            Found::Dict(k) => Leaf::Dict(k),
            Found::List(_) => Leaf::List,
        }
    }
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Leaf::None => "None",
            Leaf::Bool => "a bool",
            Leaf::Int => "an integer",
            Leaf::Float => "a float",
            Leaf::Str => "a string",
            Leaf::Bytes => "bytes",
            Leaf::Tuple => "a tuple",
            Leaf::Set => "a set",
            Leaf::Dict(DictKind::Event) => "a trace event dict",
            Leaf::Dict(DictKind::Block) => "a block dict",
            Leaf::Dict(DictKind::Segment) => "a segment dict",
            Leaf::Dict(DictKind::Root) => "a snapshot dict",
            Leaf::Dict(DictKind::Plain) => {
                "a dict with none of the keys 'action', 'state', 'total_size', 'blocks'"
            }
            Leaf::List => "a list",
            Leaf::Shared(SharedKind::Dict) => {
                "a second reference to an earlier dict (shared objects are not supported here)"
            }
            Leaf::Shared(SharedKind::List) => {
                "a second reference to an earlier list (shared objects are not supported here)"
            }
            Leaf::Shared(SharedKind::Set) => "a reference to a set",
        })
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Leaf(l) => l.fmt(f),
            Found::Dict(k) => Leaf::Dict(*k).fmt(f),
            Found::List(shape) => match shape {
                ListShape::Empty => f.write_str("an empty list"),
                ListShape::Events => f.write_str("a list of trace events"),
                ListShape::Blocks => f.write_str("a list of blocks"),
                ListShape::Segments => f.write_str("a list of segments"),
                ListShape::Traces => f.write_str("a list of lists of trace events"),
                ListShape::Untyped(first) => write!(f, "a list whose first item is {first}"),
                ListShape::Broken => f.write_str("a list with items of mixed kinds"),
            },
        }
    }
}
