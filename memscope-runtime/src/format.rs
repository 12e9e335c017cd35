//! The memscope trace format, version 3: the one description shared by the writer in
//! this crate and the reader in `cargo-memscope`.
//!
//! A trace file is one process's record of allocation events:
//!
//! ```text
//! file    := file_header chunk*
//! header  := "MEMSCOPE" version:u32 flags:u32 pid:u32 ppid:u32 start_unix_ns:u64   (32 bytes)
//! chunk   := chunk_header payload
//! chunk_header := magic:u32 thread:u32 index:u32 len:u32 checksum:u64 reserved:u64 (32 bytes)
//! payload := record*            (len bytes, a multiple of 8)
//! ```
//!
//! All integers are little-endian. Each thread writes its own stream of records; a
//! chunk carries part of one stream: `thread` names the stream (thread 0 is the
//! process's meta stream) and `index` counts that thread's chunks from 0. The same
//! chunk may be written more than once as it grows (at exit, memscope copies the
//! buffers of threads that are still running); a later copy is always an extension
//! of an earlier one, so a reader keeps the longest copy of each `(thread, index)`.
//! `checksum` is [`checksum`] of the payload; a chunk whose payload is short or whose
//! checksum does not match ends the readable part of the file.
//!
//! Every chunk of a thread after its first opens with a `STAMP` record whose `wide`
//! field is the length of the thread's previous chunk as it was handed over (0 if
//! that chunk was lost): a reader that follows the file while the process still
//! writes it knows from it when it holds a chunk whole, whatever copy of it came
//! first. (Older version-3 traces carry 0 there: they are read once they are whole.)
//!
//! ## Records
//!
//! Records are sequences of 64-bit words and are compact, because the allocator hook
//! writes one per event: word 0 packs `tag:4 | small:12 | wide:48` (tag in the low
//! bits). A stream must be decoded in order with a [`StreamDecoder`], which carries
//! the stream's clock and its stack slots from record to record and chunk to chunk.
//!
//! | tag | small | wide | further words |
//! |---|---|---|---|
//! | `ALLOC` 1 | stamp delta | address | `size:40 \| log2(align):6 \| slot:12 \| zeroed:1 \| internal:1` |
//! | `FREE` 2 | stamp delta | address | — |
//! | `REALLOC` 3 | delta of the free half | old address | word 1 = `delta of the alloc half (bits 4..16) \| new address (bits 16..)`, word 2 as `ALLOC`'s word 1 |
//! | `STAMP` 4 | 0 | 0, or at the start of a chunk: the length of the thread's previous chunk | the stream clock's new value |
//! | `STACK` 5 | frame count n | slot | n return addresses, innermost first |
//! | `THREAD` 6 | name length | 0 | OS thread id, name bytes padded to 8 |
//! | `REALLOC_WIDE` 7 | 0 | old address | new address, `ALLOC`'s word 1, free-half stamp, alloc-half stamp |
//! | `SCOPE` 8 | stamp delta | `id << 1 \| exit` | — (version 2: a scope entered or left on this thread, as `ENTER` / `EXIT` below in one word) |
//! | `ALLOC_NEAR` 9 | — | — | — (version 3: an allocation in one word, see below) |
//! | `EXTENDED` 15 | kind | word count n | n words; kinds below, unknown kinds are skipped |
//!
//! `ALLOC_NEAR` packs a common allocation into one word, `tag:4 | stamp delta:6 |
//! slot:12 | size:12 | log2(align):3 | offset:27`, where the address is the *near
//! address* plus `offset` bytes (a signed 27-bit number). The near address is that of
//! the stream's latest `ALLOC` record in the same chunk (0 at the start of every
//! chunk). It is neither zeroed nor internal. The runtime writes it whenever the
//! allocation fits, and a full `ALLOC` otherwise: most allocations of a thread lie
//! within 64 MiB of each other (one malloc arena), so a small-object workload writes
//! 16 instead of 24 bytes per allocation and free.
//!
//! Extended kinds: `CLOCK` 1 (counter, monotonic ns, unix ns), `MODULE` 2 (load bias,
//! start, end, path length, path bytes padded to 8), `END` 3 (reason, stamp, events
//! dropped), `SCAN` 4 and `REACH` 5 (the exit-time scan of the blocks still live, in the
//! meta stream before `END`; see the runtime's `reach.rs`):
//!
//! | kind | words |
//! |---|---|
//! | `SCAN` 4 | blocks scanned, bytes of static data scanned, bytes of thread stacks scanned, stacks scanned, bytes that could not be read |
//! | `REACH` 5 | [`Reach`] as a number, then the addresses of the blocks found so |
//!
//! Instrumentation kinds (written by `#[memscope::instrument]` and the registration
//! API through the runtime's `__private::emit`; word 1 is always the event's stamp,
//! which since version 3 also sets the stream clock, as `STAMP` does):
//!
//! | kind | words after the stamp |
//! |---|---|
//! | `INSTRUMENTED` 16 | runtime API version: the process uses instrumentation |
//! | `DEF` 17 | id, `class:8 \| line:32 \| column:24`, `name_len:16 \| detail_len:16 \| file_len:16`, name, detail and file bytes back to back, padded to 8 |
//! | `ENTER` 18 | id of a scope (`DEF`) or a task (`TASK`) entered on this thread (scopes are written as `SCOPE` records since version 2) |
//! | `EXIT` 19 | id of the scope or task left |
//! | `OWNS` 20 | variable id (`DEF`), block count n, then per block: `address:48 \| flags:8 << 56` (1 = interior pointer, 2 = reference-counted), size, `strong:32 \| weak:32` |
//! | `TASK` 21 | task id, site id (`DEF`, 0 = none), name length, name bytes padded to 8 |
//! | `TASK_END` 22 | task id, [`TaskState`] |
//!
//! A task's `TASK`, the `ENTER`s of its polls and its `TASK_END` are stamped in the
//! order they happened, whichever threads wrote them; other instrumentation records
//! are ordered within their thread.
//!
//! Ids come from one per-process counter: a `DEF` is written once per call site or
//! declaration, before or after (on another thread) the events that name it, so
//! readers resolve ids at the end. `DEF` classes are [`DefClass`].
//!
//! **Stamps.** An event's stamp is the stream clock plus its delta; the stream clock
//! then becomes that stamp. A `STAMP` record sets the clock outright (the writer puts
//! one at the start of every chunk and wherever a delta would not fit 12 bits), so a
//! chunk decodes on its own. Stamps come from a hybrid logical clock in CPU counter
//! units (see the runtime's `clock.rs`): within a thread they strictly increase, they
//! stay within about a millisecond of real time, and for any one address they order
//! its allocations and frees as they happened, across threads (the reader still
//! checks, see `clock.rs`). `CLOCK` records map counter values to nanoseconds.
//!
//! **Stacks.** A stream names stacks by slot (1..=4095; 0 = no stack). `STACK` binds a
//! slot to frames until the slot is bound again. The decoder turns slots into the
//! stack's [`stack_hash`], the same in every stream, so [`Record`]s name stacks by hash.
//!
//! **Internal.** The `internal` bit marks an event caused by memscope itself; readers
//! keep such blocks out of the user's figures.

/// Bytes that open every trace file.
pub const MAGIC: &[u8; 8] = b"MEMSCOPE";
/// The version written in the file header. Version 2 added the `SCOPE` record;
/// version 3 the `ALLOC_NEAR` record, and instrumentation records' stamps set the
/// stream clock. Readers take versions 1 to 3 and reject others.
pub const VERSION: u32 = 3;
/// Size of the file header.
pub const FILE_HEADER_LEN: usize = 32;
/// Size of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Opens every chunk header ("CHNK").
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"CHNK");
/// File header flag: call stacks were recorded.
pub const FLAG_STACKS: u32 = 1;
/// File header flag: the process is a `fork` child, traced from the fork on; blocks it
/// inherited from its parent are not in its trace.
pub const FLAG_FORKED: u32 = 2;
/// The stream of process-wide records (clock, modules, end).
pub const META_THREAD: u32 = 0;
/// The deepest stack recorded.
pub const MAX_FRAMES: usize = 64;
/// Stack slots per stream, slot 0 meaning "no stack".
pub const STACK_SLOTS: usize = 4096;
/// Largest stamp delta that fits a record.
pub const MAX_DELTA: u64 = (1 << 12) - 1;
/// Largest size that fits a record; larger sizes are recorded as this.
pub const MAX_SIZE: u64 = (1 << 40) - 1;

pub const TAG_ALLOC: u64 = 1;
pub const TAG_FREE: u64 = 2;
pub const TAG_REALLOC: u64 = 3;
pub const TAG_STAMP: u64 = 4;
pub const TAG_STACK: u64 = 5;
pub const TAG_THREAD: u64 = 6;
pub const TAG_REALLOC_WIDE: u64 = 7;
pub const TAG_SCOPE: u64 = 8;
pub const TAG_ALLOC_NEAR: u64 = 9;
pub const TAG_EXTENDED: u64 = 15;

pub const EXT_CLOCK: u64 = 1;
pub const EXT_MODULE: u64 = 2;
pub const EXT_END: u64 = 3;
pub const EXT_SCAN: u64 = 4;
pub const EXT_REACH: u64 = 5;
pub const EXT_INSTRUMENTED: u64 = 16;
pub const EXT_DEF: u64 = 17;
pub const EXT_ENTER: u64 = 18;
pub const EXT_EXIT: u64 = 19;
pub const EXT_OWNS: u64 = 20;
pub const EXT_TASK: u64 = 21;
pub const EXT_TASK_END: u64 = 22;

/// `OWNS` block flag: the address points inside the block, not at its start.
pub const OWNS_INTERIOR: u64 = 1;
/// `OWNS` block flag: a reference-counted block (`Rc`, `Arc`); counts are valid.
pub const OWNS_REFCOUNTED: u64 = 2;

/// What the exit-time scan found out about a block still live, as written in `REACH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Reach {
    /// A pointer to it (or into it) was found in a loaded object's static data, or
    /// in a block reachable from there.
    FromStatic = 1,
    /// Found so from a thread's stack, not from static data.
    FromStack = 2,
    /// No pointer to it was found anywhere.
    DefinitelyLost = 3,
    /// Pointed to only from lost blocks, and reachable from a definitely lost one.
    IndirectlyLost = 4,
    /// Pointed to only from lost blocks that point back to it: a reference cycle, or
    /// reachable only from one.
    Cycle = 5,
}

impl Reach {
    pub fn from_u64(v: u64) -> Option<Reach> {
        Some(match v {
            1 => Reach::FromStatic,
            2 => Reach::FromStack,
            3 => Reach::DefinitelyLost,
            4 => Reach::IndirectlyLost,
            5 => Reach::Cycle,
            _ => return None,
        })
    }
}

/// What the exit-time scan read, as written in `SCAN`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Blocks live at exit that the scan classified.
    pub blocks: u64,
    pub static_bytes: u64,
    pub stack_bytes: u64,
    /// Thread stacks scanned (the exiting thread's and those of threads still running).
    pub stacks: u64,
    /// Bytes of roots or blocks that could not be read (unmapped meanwhile).
    pub unreadable_bytes: u64,
}

/// What a `DEF` record names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DefClass {
    /// An instrumented function (detail: module path).
    Function = 1,
    /// A `let` binding or a `track!`ed variable (detail: its type).
    Variable = 2,
    /// A manual scope guard, `memscope::scope("name")` (detail: module path).
    Scope = 3,
    /// Where tasks are created: an instrumented `async fn` or `memscope_task` (detail:
    /// module path).
    Task = 4,
}

impl DefClass {
    pub fn from_u8(v: u8) -> Option<DefClass> {
        Some(match v {
            1 => DefClass::Function,
            2 => DefClass::Variable,
            3 => DefClass::Scope,
            4 => DefClass::Task,
            _ => return None,
        })
    }
}

/// How a task ended, as written in `TASK_END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TaskState {
    /// Its future returned `Ready`.
    Completed = 1,
    /// It was dropped before completing (cancelled, or its executor shut down).
    Dropped = 2,
}

/// One heap block that a variable owns, as written in `OWNS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnedBlock {
    /// The block's start, or an address inside it when `interior`.
    pub addr: u64,
    /// The block's size as the owner knows it (capacity × element size).
    pub size: u64,
    pub interior: bool,
    /// `(strong, weak)` counts of an `Rc`/`Arc` block.
    pub counts: Option<(u32, u32)>,
}

impl OwnedBlock {
    /// The three words of this block in an `OWNS` record.
    pub fn words(&self) -> [u64; 3] {
        let flags = if self.interior { OWNS_INTERIOR } else { 0 }
            | if self.counts.is_some() {
                OWNS_REFCOUNTED
            } else {
                0
            };
        let (strong, weak) = self.counts.unwrap_or((0, 0));
        [
            (self.addr & ADDR_MASK) | (flags << 56),
            self.size,
            u64::from(strong) | (u64::from(weak) << 32),
        ]
    }

    fn from_words(w: [u64; 3]) -> OwnedBlock {
        let flags = w[0] >> 56;
        OwnedBlock {
            addr: w[0] & ADDR_MASK,
            size: w[1],
            interior: flags & OWNS_INTERIOR != 0,
            counts: (flags & OWNS_REFCOUNTED != 0).then_some((w[2] as u32, (w[2] >> 32) as u32)),
        }
    }
}

/// Packs word 2 of a `DEF` record.
pub const fn def_word(class: DefClass, line: u32, column: u32) -> u64 {
    class as u64 | ((line as u64) << 8) | (((column as u64) & 0xff_ffff) << 40)
}

/// Packs word 3 of a `DEF` record.
pub const fn def_lengths(name: usize, detail: usize, file: usize) -> u64 {
    (name as u64 & 0xffff) | ((detail as u64 & 0xffff) << 16) | ((file as u64 & 0xffff) << 32)
}

const ADDR_MASK: u64 = (1 << 48) - 1;

/// Packs word 0 of a record.
#[inline(always)]
pub const fn head(tag: u64, small: u64, wide: u64) -> u64 {
    tag | (small << 4) | (wide << 16)
}

/// Packs the size word of `ALLOC` and `REALLOC` records.
#[inline(always)]
pub const fn size_word(size: u64, align_log2: u64, slot: u64, zeroed: bool, internal: bool) -> u64 {
    let size = if size > MAX_SIZE { MAX_SIZE } else { size };
    size | (align_log2 << 40) | (slot << 46) | ((zeroed as u64) << 58) | ((internal as u64) << 59)
}

/// Bits of `ALLOC_NEAR`'s offset field.
const NEAR_BITS: u32 = 27;

/// The `ALLOC_NEAR` word for an allocation of `size` bytes at `addr`, stamped `delta`
/// after the stream clock, when the stream's near address is `near`; `None` when it
/// does not fit one word (a full `ALLOC` is written instead).
#[inline(always)]
pub const fn alloc_near(
    delta: u64,
    addr: u64,
    near: u64,
    size: u64,
    align_log2: u64,
    slot: u64,
) -> Option<u64> {
    let offset = addr.wrapping_sub(near);
    // Every condition as bits that must be zero, tested at once.
    let misfit = (size >> 12)
        | (delta >> 6)
        | (align_log2 >> 3)
        | (offset.wrapping_add(1 << (NEAR_BITS - 1)) >> NEAR_BITS);
    if misfit != 0 {
        return None;
    }
    Some(
        TAG_ALLOC_NEAR
            | (delta << 4)
            | (slot << 10)
            | (size << 22)
            | (align_log2 << 34)
            | (offset << (64 - NEAR_BITS)),
    )
}

/// Why a process's trace ended, as written in `END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// The process exited (return from `main`, `process::exit`, or a panic in `main`).
    Exit = 0,
}

/// The hash that names a stack (`frames` innermost first) in decoded records; never 0
/// (0 means "no stack"). FxHash-style mixing ([`stack_mix`] per frame, from the
/// outermost frame in) with MurmurHash3's 64-bit finaliser ([`stack_finish`]); the
/// runtime keeps the state after each frame, so that it can reuse the outer part.
pub fn stack_hash(frames: &[u64]) -> u64 {
    stack_finish(
        frames.iter().rev().fold(0, |h, &f| stack_mix(h, f)),
        frames.len(),
    )
}

/// Mixes one frame into a stack hash.
#[inline(always)]
pub fn stack_mix(h: u64, frame: u64) -> u64 {
    (h.rotate_left(5) ^ frame).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95)
}

/// Finishes a stack hash over `len` frames.
#[inline(always)]
pub fn stack_finish(h: u64, len: usize) -> u64 {
    let mut h = h ^ len as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h | (h == 0) as u64
}

/// Checksum of a chunk payload: four independent multiply-xor lanes over 64-bit
/// words (fast on the writer thread), strong enough to notice torn or corrupt writes.
pub fn checksum(payload: &[u8]) -> u64 {
    let mut lanes = [
        0xcbf2_9ce4_8422_2325u64,
        0x8422_2325_cbf2_9ce4,
        0x9e37_79b9_7f4a_7c15,
        0x7f4a_7c15_9e37_79b9,
    ];
    let mut words = payload.chunks_exact(32);
    for block in &mut words {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
            *lane = (*lane ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let mut tail = [0u8; 32];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    for (lane, word) in lanes.iter_mut().zip(tail.chunks_exact(8)) {
        let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
        *lane = (*lane ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    lanes.iter().fold(payload.len() as u64, |h, &l| {
        (h ^ l ^ (l >> 29)).wrapping_mul(0xff51_afd7_ed55_8ccd)
    })
}

/// The fixed header at the start of a trace file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub version: u32,
    pub flags: u32,
    pub pid: u32,
    pub ppid: u32,
    pub start_unix_ns: u64,
}

impl FileHeader {
    pub fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut out = [0u8; FILE_HEADER_LEN];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out[16..20].copy_from_slice(&self.pid.to_le_bytes());
        out[20..24].copy_from_slice(&self.ppid.to_le_bytes());
        out[24..32].copy_from_slice(&self.start_unix_ns.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<FileHeader, FormatError> {
        if bytes.len() < FILE_HEADER_LEN || &bytes[0..8] != MAGIC {
            return Err(FormatError::NotATrace);
        }
        let version = u32_at(bytes, 8);
        if !(1..=VERSION).contains(&version) {
            return Err(FormatError::Version(version));
        }
        Ok(FileHeader {
            version,
            flags: u32_at(bytes, 12),
            pid: u32_at(bytes, 16),
            ppid: u32_at(bytes, 20),
            start_unix_ns: u64_at(bytes, 24),
        })
    }
}

/// The header in front of each chunk's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub thread: u32,
    pub index: u32,
    pub len: u32,
    pub checksum: u64,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.thread.to_le_bytes());
        out[8..12].copy_from_slice(&self.index.to_le_bytes());
        out[12..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ChunkHeader, FormatError> {
        if bytes.len() < CHUNK_HEADER_LEN || u32_at(bytes, 0) != CHUNK_MAGIC {
            return Err(FormatError::BadChunk);
        }
        let len = u32_at(bytes, 12);
        if !len.is_multiple_of(8) {
            return Err(FormatError::BadChunk);
        }
        Ok(ChunkHeader {
            thread: u32_at(bytes, 4),
            index: u32_at(bytes, 8),
            len,
            checksum: u64_at(bytes, 16),
        })
    }
}

/// A one-word event record ([`StreamDecoder::decode_brief`]): an `ALLOC_NEAR`
/// allocation (never zeroed, never memscope's own) or a free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Brief {
    Alloc {
        ts: u64,
        addr: u64,
        size: u64,
        align: u64,
        stack: u64,
    },
    Free {
        ts: u64,
        addr: u64,
    },
}

impl From<Brief> for Record {
    fn from(brief: Brief) -> Record {
        match brief {
            Brief::Alloc {
                ts,
                addr,
                size,
                align,
                stack,
            } => Record::Alloc {
                internal: false,
                zeroed: false,
                ts,
                addr,
                size,
                align,
                stack,
            },
            Brief::Free { ts, addr } => Record::Free { ts, addr },
        }
    }
}

/// One decoded record, with absolute stamps and stacks named by [`stack_hash`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Alloc {
        internal: bool,
        zeroed: bool,
        ts: u64,
        addr: u64,
        size: u64,
        align: u64,
        stack: u64,
    },
    Realloc {
        internal: bool,
        ts_before: u64,
        ts_after: u64,
        old_addr: u64,
        new_addr: u64,
        new_size: u64,
        align: u64,
        stack: u64,
    },
    /// A free. Its size is not recorded: it is the size of the block it frees.
    Free {
        ts: u64,
        addr: u64,
    },
    /// Frames of a stack, innermost return address first; `hash` names it in events.
    Stack {
        hash: u64,
        frames: Vec<u64>,
    },
    Thread {
        os_tid: u64,
        name: String,
    },
    Clock {
        ts: u64,
        monotonic_ns: u64,
        unix_ns: u64,
    },
    Module {
        bias: u64,
        start: u64,
        end: u64,
        path: String,
    },
    End {
        reason: u8,
        ts: u64,
        dropped: u64,
    },
    /// What the exit-time scan read.
    Scan(ScanSummary),
    /// The exit-time scan found the blocks at `addrs` to be `reach`.
    Reach {
        reach: Reach,
        addrs: Vec<u64>,
    },
    /// The process uses instrumentation (`version` of the registration API).
    Instrumented {
        ts: u64,
        version: u64,
    },
    /// An interned name: a call site or a declaration (see [`DefClass`]).
    Def {
        ts: u64,
        id: u64,
        class: u8,
        line: u32,
        column: u32,
        name: String,
        detail: String,
        file: String,
    },
    /// The thread entered scope or task `id`.
    Enter {
        ts: u64,
        id: u64,
    },
    /// The thread left scope or task `id`.
    Exit {
        ts: u64,
        id: u64,
    },
    /// Variable `var` (a `DEF` id) owns these blocks now.
    Owns {
        ts: u64,
        var: u64,
        blocks: Vec<OwnedBlock>,
    },
    /// Task `id` was created at `site` (a `DEF` id, 0 = none).
    Task {
        ts: u64,
        id: u64,
        site: u64,
        name: String,
    },
    /// Task `id` ended ([`TaskState`] as `state`).
    TaskEnd {
        ts: u64,
        id: u64,
        state: u8,
    },
}

impl Record {
    /// The stamp of an instrumentation record, which sets the stream clock.
    fn instrumentation_stamp(&self) -> Option<u64> {
        match self {
            Record::Instrumented { ts, .. }
            | Record::Def { ts, .. }
            | Record::Enter { ts, .. }
            | Record::Exit { ts, .. }
            | Record::Owns { ts, .. }
            | Record::Task { ts, .. }
            | Record::TaskEnd { ts, .. } => Some(*ts),
            _ => None,
        }
    }
}

/// What can be wrong with trace bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    NotATrace,
    Version(u32),
    BadChunk,
    UnknownTag(u8),
    Truncated,
    /// A stack slot outside 1..4096.
    BadSlot,
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::NotATrace => write!(f, "not a memscope trace (bad magic bytes)"),
            FormatError::Version(v) => write!(
                f,
                "trace format version {v} is not supported (this memscope reads versions 1 to {VERSION})"
            ),
            FormatError::BadChunk => write!(f, "corrupt chunk header"),
            FormatError::UnknownTag(t) => write!(f, "unknown record tag {t}"),
            FormatError::Truncated => write!(f, "record runs past the end of its chunk"),
            FormatError::BadSlot => write!(f, "stack slot out of range"),
        }
    }
}

impl std::error::Error for FormatError {}

/// Decodes one thread's stream, record by record, across its chunks in order.
#[derive(Clone, Debug)]
pub struct StreamDecoder {
    /// The trace's format version.
    version: u32,
    clock: u64,
    /// The near address of `ALLOC_NEAR` records.
    near: u64,
    slots: Vec<u64>,
}

impl Default for StreamDecoder {
    /// A decoder for this version's traces.
    fn default() -> Self {
        StreamDecoder::new(VERSION)
    }
}

impl StreamDecoder {
    /// A decoder for a trace of format `version` (from its file header).
    pub fn new(version: u32) -> StreamDecoder {
        StreamDecoder {
            version,
            clock: 0,
            near: 0,
            slots: vec![0; STACK_SLOTS],
        }
    }

    /// Decodes the record at byte offset `pos` of `payload` (one chunk's payload;
    /// offset 0 starts the chunk); returns it and the offset of the next record.
    /// `Ok(None, next)` is a record that only updates the decoder (a `STAMP`) or that
    /// this version does not know (an unknown extended kind).
    pub fn decode(
        &mut self,
        payload: &[u8],
        pos: usize,
    ) -> Result<(Option<Record>, usize), FormatError> {
        if pos == 0 {
            self.near = 0;
        }
        let words = |n: usize| -> Result<usize, FormatError> {
            let end = n
                .checked_mul(8)
                .and_then(|b| b.checked_add(pos))
                .ok_or(FormatError::Truncated)?;
            if end > payload.len() {
                Err(FormatError::Truncated)
            } else {
                Ok(end)
            }
        };
        let w0 = u64_at_checked(payload, pos)?;
        let w = |i: usize| u64_at(payload, pos + 8 * i);
        let small = (w0 >> 4) & 0xfff;
        let wide = w0 >> 16;
        let record = match w0 & 0xf {
            TAG_ALLOC => {
                let end = words(2)?;
                let ts = self.advance(small);
                let (size, align, stack, zeroed, internal) = self.size_word(w(1))?;
                self.near = wide;
                (
                    Some(Record::Alloc {
                        internal,
                        zeroed,
                        ts,
                        addr: wide,
                        size,
                        align,
                        stack,
                    }),
                    end,
                )
            }
            TAG_ALLOC_NEAR | TAG_FREE => {
                let (brief, end) = self
                    .decode_brief(payload, pos)
                    .ok_or(FormatError::Truncated)?;
                (Some(brief.into()), end)
            }
            TAG_SCOPE => {
                let end = words(1)?;
                let (ts, id) = (self.advance(small), wide >> 1);
                let record = if wide & 1 == 0 {
                    Record::Enter { ts, id }
                } else {
                    Record::Exit { ts, id }
                };
                (Some(record), end)
            }
            TAG_REALLOC => {
                let end = words(3)?;
                let ts_before = self.advance(small);
                let w1 = w(1);
                let ts_after = self.advance((w1 >> 4) & 0xfff);
                let (new_size, align, stack, _, internal) = self.size_word(w(2))?;
                let new_addr = w1 >> 16;
                (
                    Some(Record::Realloc {
                        internal,
                        ts_before,
                        ts_after,
                        old_addr: wide,
                        new_addr,
                        new_size,
                        align,
                        stack,
                    }),
                    end,
                )
            }
            TAG_REALLOC_WIDE => {
                let end = words(5)?;
                let (new_size, align, stack, _, internal) = self.size_word(w(2))?;
                let (ts_before, ts_after) = (w(3), w(4));
                self.clock = ts_after;
                (
                    Some(Record::Realloc {
                        internal,
                        ts_before,
                        ts_after,
                        old_addr: wide,
                        new_addr: w(1) & ADDR_MASK,
                        new_size,
                        align,
                        stack,
                    }),
                    end,
                )
            }
            TAG_STAMP => {
                let end = words(2)?;
                self.clock = w(1);
                (None, end)
            }
            TAG_STACK => {
                let n = small as usize;
                let end = words(1 + n)?;
                let slot = (wide & 0xfff) as usize;
                if slot == 0 {
                    return Err(FormatError::BadSlot);
                }
                let frames: Vec<u64> = (0..n).map(|i| w(1 + i)).collect();
                let hash = stack_hash(&frames);
                self.slots[slot] = hash;
                (Some(Record::Stack { hash, frames }), end)
            }
            TAG_THREAD => {
                let len = small as usize;
                let end = words(2 + len.div_ceil(8))?;
                (
                    Some(Record::Thread {
                        os_tid: w(1),
                        name: string_at(payload, pos + 16, len),
                    }),
                    end,
                )
            }
            TAG_EXTENDED => {
                let n = usize::try_from(wide).map_err(|_| FormatError::Truncated)?;
                let end = words(n.checked_add(1).ok_or(FormatError::Truncated)?)?;
                let record = match small {
                    EXT_CLOCK if n >= 3 => Some(Record::Clock {
                        ts: w(1),
                        monotonic_ns: w(2),
                        unix_ns: w(3),
                    }),
                    EXT_MODULE if n >= 4 => {
                        let len = (w(4) as usize).min((n - 4) * 8);
                        Some(Record::Module {
                            bias: w(1),
                            start: w(2),
                            end: w(3),
                            path: string_at(payload, pos + 40, len),
                        })
                    }
                    EXT_END if n >= 3 => Some(Record::End {
                        reason: w(1) as u8,
                        ts: w(2),
                        dropped: w(3),
                    }),
                    EXT_SCAN if n >= 5 => Some(Record::Scan(ScanSummary {
                        blocks: w(1),
                        static_bytes: w(2),
                        stack_bytes: w(3),
                        stacks: w(4),
                        unreadable_bytes: w(5),
                    })),
                    EXT_REACH if n >= 1 => Reach::from_u64(w(1)).map(|reach| Record::Reach {
                        reach,
                        addrs: (2..=n).map(w).collect(),
                    }),
                    EXT_INSTRUMENTED if n >= 2 => Some(Record::Instrumented {
                        ts: w(1),
                        version: w(2),
                    }),
                    EXT_DEF if n >= 4 => {
                        let (cw, lw) = (w(3), w(4));
                        let room = (n - 4) * 8;
                        let name_len = ((lw & 0xffff) as usize).min(room);
                        let detail_len = (((lw >> 16) & 0xffff) as usize).min(room - name_len);
                        let file_len =
                            (((lw >> 32) & 0xffff) as usize).min(room - name_len - detail_len);
                        let at = pos + 40;
                        Some(Record::Def {
                            ts: w(1),
                            id: w(2),
                            class: cw as u8,
                            line: (cw >> 8) as u32,
                            column: ((cw >> 40) & 0xff_ffff) as u32,
                            name: string_at(payload, at, name_len),
                            detail: string_at(payload, at + name_len, detail_len),
                            file: string_at(payload, at + name_len + detail_len, file_len),
                        })
                    }
                    EXT_ENTER if n >= 2 => Some(Record::Enter { ts: w(1), id: w(2) }),
                    EXT_EXIT if n >= 2 => Some(Record::Exit { ts: w(1), id: w(2) }),
                    EXT_OWNS if n >= 3 => {
                        let count = (w(3) as usize).min((n - 3) / 3);
                        let blocks = (0..count)
                            .map(|i| {
                                OwnedBlock::from_words([w(4 + 3 * i), w(5 + 3 * i), w(6 + 3 * i)])
                            })
                            .collect();
                        Some(Record::Owns {
                            ts: w(1),
                            var: w(2),
                            blocks,
                        })
                    }
                    EXT_TASK if n >= 4 => {
                        let len = (w(4) as usize).min((n - 4) * 8);
                        Some(Record::Task {
                            ts: w(1),
                            id: w(2),
                            site: w(3),
                            name: string_at(payload, pos + 40, len),
                        })
                    }
                    EXT_TASK_END if n >= 3 => Some(Record::TaskEnd {
                        ts: w(1),
                        id: w(2),
                        state: w(3) as u8,
                    }),
                    _ => None,
                };
                if small >= EXT_INSTRUMENTED && n >= 1 && self.version >= 3 {
                    self.clock = w(1);
                }
                (record, end)
            }
            tag => return Err(FormatError::UnknownTag(tag as u8)),
        };
        Ok(record)
    }

    /// The record at `pos` if it is one of the one-word events (`ALLOC_NEAR`, `FREE`)
    /// that most of a trace is, decoded as [`decode`](Self::decode) decodes it but
    /// without building a [`Record`]; `None` for any other record (or none at `pos`).
    #[inline]
    pub fn decode_brief(&mut self, payload: &[u8], pos: usize) -> Option<(Brief, usize)> {
        if pos == 0 {
            self.near = 0;
        }
        let w0 = u64_at_checked(payload, pos).ok()?;
        let brief = match w0 & 0xf {
            TAG_ALLOC_NEAR => {
                let (ts, addr, size, align_log2, slot) = self.alloc_near(w0);
                Brief::Alloc {
                    ts,
                    addr,
                    size,
                    align: 1 << align_log2,
                    stack: self.slots[slot],
                }
            }
            TAG_FREE => Brief::Free {
                ts: self.advance((w0 >> 4) & 0xfff),
                addr: w0 >> 16,
            },
            _ => return None,
        };
        Some((brief, pos + 8))
    }

    /// Calls `f(stamp, address, Some(size))` for each allocation and `f(stamp, address,
    /// None)` for each free (a reallocation is both) in one chunk's `payload`, without
    /// building [`Record`]s: the exit-time scan reads a whole trace back this way.
    /// Stops at the first malformed record.
    pub fn block_events(&mut self, payload: &[u8], mut f: impl FnMut(u64, u64, Option<u64>)) {
        self.near = 0;
        let mut pos = 0;
        while pos + 8 <= payload.len() {
            let w = |i: usize| u64_at_checked(payload, pos + 8 * i);
            let Ok(w0) = w(0) else { return };
            let (small, wide) = ((w0 >> 4) & 0xfff, w0 >> 16);
            let step = match w0 & 0xf {
                TAG_ALLOC => {
                    let Ok(w1) = w(1) else { return };
                    f(self.advance(small), wide, Some(w1 & MAX_SIZE));
                    self.near = wide;
                    2
                }
                TAG_ALLOC_NEAR => {
                    let (ts, addr, size, _, _) = self.alloc_near(w0);
                    f(ts, addr, Some(size));
                    1
                }
                TAG_FREE => {
                    f(self.advance(small), wide, None);
                    1
                }
                TAG_REALLOC => {
                    let (Ok(w1), Ok(w2)) = (w(1), w(2)) else {
                        return;
                    };
                    f(self.advance(small), wide, None);
                    f(
                        self.advance((w1 >> 4) & 0xfff),
                        w1 >> 16,
                        Some(w2 & MAX_SIZE),
                    );
                    3
                }
                TAG_REALLOC_WIDE => {
                    let (Ok(w1), Ok(w2), Ok(w3), Ok(w4)) = (w(1), w(2), w(3), w(4)) else {
                        return;
                    };
                    f(w3, wide, None);
                    f(w4, w1 & ADDR_MASK, Some(w2 & MAX_SIZE));
                    self.clock = w4;
                    5
                }
                TAG_STAMP => {
                    let Ok(w1) = w(1) else { return };
                    self.clock = w1;
                    2
                }
                TAG_SCOPE => {
                    self.advance(small);
                    1
                }
                _ => match self.decode(payload, pos) {
                    Ok((_, next)) => {
                        pos = next;
                        continue;
                    }
                    Err(_) => return,
                },
            };
            pos += 8 * step;
        }
    }

    /// An `ALLOC_NEAR` word's stamp, address, size, log2 of alignment and slot.
    fn alloc_near(&mut self, w0: u64) -> (u64, u64, u64, u64, usize) {
        let ts = self.advance((w0 >> 4) & 0x3f);
        let offset = (w0 as i64) >> (64 - NEAR_BITS);
        let addr = self.near.wrapping_add(offset as u64);
        let slot = ((w0 >> 10) & 0xfff) as usize;
        (ts, addr, (w0 >> 22) & 0xfff, (w0 >> 34) & 7, slot)
    }

    fn advance(&mut self, delta: u64) -> u64 {
        self.clock = self.clock.wrapping_add(delta);
        self.clock
    }

    fn size_word(&self, w: u64) -> Result<(u64, u64, u64, bool, bool), FormatError> {
        let size = w & MAX_SIZE;
        let align = 1u64 << ((w >> 40) & 0x3f);
        let slot = ((w >> 46) & 0xfff) as usize;
        let stack = if slot == 0 { 0 } else { self.slots[slot] };
        Ok((size, align, stack, (w >> 58) & 1 == 1, (w >> 59) & 1 == 1))
    }
}

fn string_at(bytes: &[u8], pos: usize, len: usize) -> String {
    let end = (pos + len).min(bytes.len());
    String::from_utf8_lossy(&bytes[pos.min(end)..end]).into_owned()
}

fn u32_at(bytes: &[u8], pos: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[pos..pos + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], pos: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[pos..pos + 8]);
    u64::from_le_bytes(b)
}

fn u64_at_checked(bytes: &[u8], pos: usize) -> Result<u64, FormatError> {
    if pos.checked_add(8).is_none_or(|end| end > bytes.len()) {
        return Err(FormatError::Truncated);
    }
    Ok(u64_at(bytes, pos))
}

/// Encodes one stream's records into bytes, as the runtime does; used for the meta
/// stream and by tests that build synthetic traces. (The allocator's hot path packs
/// its words directly, see the runtime's `recorder.rs`.) Stacks are bound to slots
/// in the order their `Stack` records are encoded; events must name stacks whose
/// record came first in the same stream.
#[derive(Debug, Clone, Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
    clock: u64,
    slots: Vec<u64>,
    /// Whether allocations that fit are written as `ALLOC_NEAR`; see [`Encoder::chunk`].
    near_records: bool,
    near: u64,
}

impl Encoder {
    /// An encoder of one chunk's payload that writes `ALLOC_NEAR` records where they
    /// fit, as the runtime does. (Their near address starts again with every chunk,
    /// so an encoder whose bytes are cut into several chunks must not write them:
    /// [`Encoder::default`] does not.)
    pub fn chunk() -> Encoder {
        Encoder {
            near_records: true,
            ..Encoder::default()
        }
    }

    pub fn word(&mut self, w: u64) -> &mut Self {
        self.bytes.extend_from_slice(&w.to_le_bytes());
        self
    }

    fn padded(&mut self, s: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(s);
        self.bytes.resize(self.bytes.len().div_ceil(8) * 8, 0);
        self
    }

    /// The delta from the stream clock to `ts`, writing a `STAMP` first if needed.
    fn delta(&mut self, ts: u64) -> u64 {
        match ts.checked_sub(self.clock) {
            Some(d) if d <= MAX_DELTA => {
                self.clock = ts;
                d
            }
            _ => {
                self.word(head(TAG_STAMP, 0, 0)).word(ts);
                self.clock = ts;
                0
            }
        }
    }

    fn slot(&self, stack: u64) -> u64 {
        if stack == 0 {
            return 0;
        }
        self.slots
            .iter()
            .position(|&h| h == stack)
            .map_or(0, |i| (i % (STACK_SLOTS - 1)) as u64 + 1)
    }

    pub fn record(&mut self, record: &Record) -> &mut Self {
        self.encode(record);
        if let Some(ts) = record.instrumentation_stamp() {
            self.clock = ts;
        }
        self
    }

    fn encode(&mut self, record: &Record) -> &mut Self {
        let log2 = |align: u64| align.trailing_zeros() as u64;
        match record {
            Record::Alloc {
                internal,
                zeroed,
                ts,
                addr,
                size,
                align,
                stack,
            } => {
                let d = self.delta(*ts);
                let slot = self.slot(*stack);
                let near = alloc_near(d, *addr, self.near, *size, log2(*align), slot)
                    .filter(|_| self.near_records && !zeroed && !internal);
                if let Some(word) = near {
                    return self.word(word);
                }
                self.near = *addr;
                let sw = size_word(*size, log2(*align), slot, *zeroed, *internal);
                self.word(head(TAG_ALLOC, d, *addr)).word(sw)
            }
            Record::Realloc {
                internal,
                ts_before,
                ts_after,
                old_addr,
                new_addr,
                new_size,
                align,
                stack,
            } => {
                let sw = size_word(*new_size, log2(*align), self.slot(*stack), false, *internal);
                let after = ts_after.checked_sub(*ts_before).filter(|d| *d <= MAX_DELTA);
                match (
                    ts_before
                        .checked_sub(self.clock)
                        .filter(|d| *d <= MAX_DELTA),
                    after,
                ) {
                    (Some(before), Some(after)) => {
                        self.clock = *ts_after;
                        self.word(head(TAG_REALLOC, before, *old_addr))
                            .word(head(0, after, *new_addr))
                            .word(sw)
                    }
                    _ => {
                        self.clock = *ts_after;
                        self.word(head(TAG_REALLOC_WIDE, 0, *old_addr))
                            .word(*new_addr)
                            .word(sw)
                            .word(*ts_before)
                            .word(*ts_after)
                    }
                }
            }
            Record::Free { ts, addr } => {
                let d = self.delta(*ts);
                self.word(head(TAG_FREE, d, *addr))
            }
            Record::Stack { hash, frames } => {
                self.slots.push(*hash);
                let slot = self.slot(*hash);
                self.word(head(TAG_STACK, frames.len() as u64, slot));
                for f in frames {
                    self.word(*f);
                }
                self
            }
            Record::Thread { os_tid, name } => self
                .word(head(TAG_THREAD, name.len() as u64, 0))
                .word(*os_tid)
                .padded(name.as_bytes()),
            Record::Clock {
                ts,
                monotonic_ns,
                unix_ns,
            } => self
                .word(head(TAG_EXTENDED, EXT_CLOCK, 3))
                .word(*ts)
                .word(*monotonic_ns)
                .word(*unix_ns),
            Record::Module {
                bias,
                start,
                end,
                path,
            } => {
                let n = 4 + path.len().div_ceil(8) as u64;
                self.word(head(TAG_EXTENDED, EXT_MODULE, n))
                    .word(*bias)
                    .word(*start)
                    .word(*end)
                    .word(path.len() as u64)
                    .padded(path.as_bytes())
            }
            Record::End {
                reason,
                ts,
                dropped,
            } => self
                .word(head(TAG_EXTENDED, EXT_END, 3))
                .word(*reason as u64)
                .word(*ts)
                .word(*dropped),
            Record::Scan(scan) => self
                .word(head(TAG_EXTENDED, EXT_SCAN, 5))
                .word(scan.blocks)
                .word(scan.static_bytes)
                .word(scan.stack_bytes)
                .word(scan.stacks)
                .word(scan.unreadable_bytes),
            Record::Reach { reach, addrs } => {
                self.word(head(TAG_EXTENDED, EXT_REACH, 1 + addrs.len() as u64))
                    .word(*reach as u64);
                for &addr in addrs {
                    self.word(addr);
                }
                self
            }
            Record::Instrumented { ts, version } => self
                .word(head(TAG_EXTENDED, EXT_INSTRUMENTED, 2))
                .word(*ts)
                .word(*version),
            Record::Def {
                ts,
                id,
                class,
                line,
                column,
                name,
                detail,
                file,
            } => {
                let text = [name.as_bytes(), detail.as_bytes(), file.as_bytes()].concat();
                let n = 4 + text.len().div_ceil(8) as u64;
                let class = DefClass::from_u8(*class).unwrap_or(DefClass::Function);
                self.word(head(TAG_EXTENDED, EXT_DEF, n))
                    .word(*ts)
                    .word(*id)
                    .word(def_word(class, *line, *column))
                    .word(def_lengths(name.len(), detail.len(), file.len()))
                    .padded(&text)
            }
            Record::Enter { ts, id } => self
                .word(head(TAG_EXTENDED, EXT_ENTER, 2))
                .word(*ts)
                .word(*id),
            Record::Exit { ts, id } => self
                .word(head(TAG_EXTENDED, EXT_EXIT, 2))
                .word(*ts)
                .word(*id),
            Record::Owns { ts, var, blocks } => {
                let n = 3 + 3 * blocks.len() as u64;
                self.word(head(TAG_EXTENDED, EXT_OWNS, n))
                    .word(*ts)
                    .word(*var)
                    .word(blocks.len() as u64);
                for b in blocks {
                    for w in b.words() {
                        self.word(w);
                    }
                }
                self
            }
            Record::Task { ts, id, site, name } => {
                let n = 4 + name.len().div_ceil(8) as u64;
                self.word(head(TAG_EXTENDED, EXT_TASK, n))
                    .word(*ts)
                    .word(*id)
                    .word(*site)
                    .word(name.len() as u64)
                    .padded(name.as_bytes())
            }
            Record::TaskEnd { ts, id, state } => self
                .word(head(TAG_EXTENDED, EXT_TASK_END, 3))
                .word(*ts)
                .word(*id)
                .word(*state as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Record> {
        let frames = vec![0x401000, 0x402000, 0x403000];
        let stack = stack_hash(&frames);
        vec![
            Record::Stack {
                hash: stack,
                frames,
            },
            Record::Alloc {
                internal: false,
                zeroed: true,
                ts: 7,
                addr: 0x1000,
                size: 4096,
                align: 16,
                stack,
            },
            Record::Realloc {
                internal: true,
                ts_before: 8,
                ts_after: 9,
                old_addr: 0x1000,
                new_addr: 0x2000,
                new_size: 8192,
                align: 8,
                stack: 0,
            },
            Record::Realloc {
                internal: false,
                ts_before: 10,
                ts_after: 10 + 1_000_000,
                old_addr: 0x2000,
                new_addr: 0x3000,
                new_size: 1,
                align: 1,
                stack,
            },
            Record::Free {
                ts: 5_000_000_000,
                addr: 0x3000,
            },
            Record::Thread {
                os_tid: 42,
                name: "worker-<1>".into(),
            },
            Record::Clock {
                ts: 1,
                monotonic_ns: 2,
                unix_ns: 3,
            },
            Record::Module {
                bias: 0x5555,
                start: 1,
                end: 2,
                path: "/bin/x".into(),
            },
            Record::End {
                reason: 0,
                ts: 11,
                dropped: 0,
            },
            Record::Scan(ScanSummary {
                blocks: 3,
                static_bytes: 4096,
                stack_bytes: 512,
                stacks: 1,
                unreadable_bytes: 0,
            }),
            Record::Reach {
                reach: Reach::IndirectlyLost,
                addrs: vec![0x5000, 0x5040],
            },
            Record::Instrumented { ts: 12, version: 1 },
            Record::Def {
                ts: 13,
                id: 7,
                class: DefClass::Variable as u8,
                line: 42,
                column: 9,
                name: "cache".into(),
                detail: "alloc::vec::Vec<u8>".into(),
                file: "src/main.rs".into(),
            },
            Record::Enter { ts: 14, id: 7 },
            Record::Owns {
                ts: 15,
                var: 7,
                blocks: vec![
                    OwnedBlock {
                        addr: 0x5000,
                        size: 4096,
                        interior: false,
                        counts: None,
                    },
                    OwnedBlock {
                        addr: 0x6010,
                        size: 40,
                        interior: true,
                        counts: Some((2, 1)),
                    },
                ],
            },
            Record::Exit { ts: 16, id: 7 },
            Record::Task {
                ts: 17,
                id: 8,
                site: 0,
                name: "ingest-7".into(),
            },
            Record::TaskEnd {
                ts: 18,
                id: 8,
                state: TaskState::Completed as u8,
            },
        ]
    }

    #[test]
    fn a_scope_record_is_an_enter_or_exit_in_one_word_that_moves_the_clock() {
        let words = [
            head(TAG_STAMP, 0, 0),
            100,
            head(TAG_SCOPE, 5, 7 << 1),
            head(TAG_SCOPE, 3, (7 << 1) | 1),
            head(TAG_FREE, 2, 0x1000),
        ];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(
            decode_all(&bytes).unwrap(),
            [
                Record::Enter { ts: 105, id: 7 },
                Record::Exit { ts: 108, id: 7 },
                Record::Free {
                    ts: 110,
                    addr: 0x1000
                },
            ]
        );
    }

    #[test]
    fn version_1_traces_are_still_read() {
        let mut h = FileHeader {
            version: 1,
            flags: 0,
            pid: 1,
            ppid: 0,
            start_unix_ns: 0,
        }
        .encode();
        assert_eq!(FileHeader::decode(&h).unwrap().version, 1);
        h[8] = 4;
        assert!(matches!(
            FileHeader::decode(&h),
            Err(FormatError::Version(4))
        ));
    }

    #[test]
    fn instrumentation_stamps_set_the_stream_clock_from_version_3_only() {
        let words = [
            head(TAG_STAMP, 0, 0),
            100,
            head(TAG_EXTENDED, EXT_ENTER, 2),
            500,
            7,
            head(TAG_FREE, 2, 0x1000),
        ];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let free_at = |version| {
            let mut dec = StreamDecoder::new(version);
            let (mut pos, mut last) = (0, None);
            while pos < bytes.len() {
                let (r, next) = dec.decode(&bytes, pos).unwrap();
                last = r.or(last);
                pos = next;
            }
            last
        };
        assert_eq!(
            free_at(3),
            Some(Record::Free {
                ts: 502,
                addr: 0x1000
            })
        );
        assert_eq!(
            free_at(2),
            Some(Record::Free {
                ts: 102,
                addr: 0x1000
            })
        );
    }

    /// Allocations of one chunk, most of them near each other.
    fn allocations_near_and_far() -> Vec<Record> {
        let alloc = |ts, addr, size, align| Record::Alloc {
            internal: false,
            zeroed: false,
            ts,
            addr,
            size,
            align,
            stack: 0,
        };
        vec![
            alloc(10, 0x7f00_1000_0000, 32, 8),
            // Below and above the near address, at the edges of the offset's range.
            alloc(11, 0x7f00_1000_0000 - (1 << 26), 4095, 16),
            alloc(12, 0x7f00_1000_0000 + (1 << 26) - 4, 4, 128),
            // Too far, too large, too aligned, too late: full records.
            alloc(13, 0x7f00_1000_0000 + (1 << 26), 8, 8),
            alloc(14, 0x7f00_1400_0000, 4096, 8),
            alloc(15, 0x7f00_1400_0040, 64, 256),
            alloc(16 + 64, 0x7f00_1400_0100, 64, 8),
            // Near the last full record, not the first.
            alloc(81, 0x7f00_1400_0203, 3, 1),
            Record::Free {
                ts: 82,
                addr: 0x7f00_1400_0203,
            },
        ]
    }

    #[test]
    fn allocations_near_the_last_full_one_take_one_word_and_decode_to_the_same_records() {
        let mut enc = Encoder::chunk();
        for r in allocations_near_and_far() {
            enc.record(&r);
        }
        // 3 near records, 5 full ones and a free.
        assert_eq!(enc.bytes.len(), 8 * (3 + 5 * 2 + 1));
        let near = enc
            .bytes
            .chunks(8)
            .filter(|w| u64::from_le_bytes((*w).try_into().unwrap()) & 0xf == TAG_ALLOC_NEAR)
            .count();
        assert_eq!(near, 3);
        assert_eq!(decode_all(&enc.bytes).unwrap(), allocations_near_and_far());
        let mut events = Vec::new();
        StreamDecoder::default()
            .block_events(&enc.bytes, |ts, addr, size| events.push((ts, addr, size)));
        let expected: Vec<_> = allocations_near_and_far()
            .iter()
            .map(|r| match *r {
                Record::Alloc { ts, addr, size, .. } => (ts, addr, Some(size)),
                Record::Free { ts, addr } => (ts, addr, None),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(events, expected);
    }

    #[test]
    fn one_word_records_decoded_briefly_are_the_records_decode_gives() {
        let mut enc = Encoder::chunk();
        for r in allocations_near_and_far() {
            enc.record(&r);
        }
        // As a reader does: briefly where it can, in full elsewhere.
        let (mut dec, mut pos, mut records, mut briefs) = (StreamDecoder::default(), 0, vec![], 0);
        while pos < enc.bytes.len() {
            if let Some((brief, next)) = dec.decode_brief(&enc.bytes, pos) {
                records.push(Record::from(brief));
                briefs += 1;
                pos = next;
                continue;
            }
            let (record, next) = dec.decode(&enc.bytes, pos).unwrap();
            records.extend(record);
            pos = next;
        }
        assert_eq!(records, allocations_near_and_far());
        // The 3 near allocations and the free.
        assert_eq!(briefs, 4);
    }

    #[test]
    fn the_near_address_starts_again_with_every_chunk() {
        let mut enc = Encoder::chunk();
        for r in &allocations_near_and_far()[..2] {
            enc.record(r);
        }
        // The second allocation, as the first record of a later chunk, has no near
        // address to be relative to: decoded alone, it is somewhere else.
        let near_word = &enc.bytes[16..24];
        let mut dec = StreamDecoder::default();
        dec.decode(&enc.bytes, 0).unwrap();
        let (record, _) = dec.decode(near_word, 0).unwrap();
        assert!(
            matches!(record, Some(Record::Alloc { addr, .. }) if addr != 0x7f00_1000_0000 - (1 << 26))
        );
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Record>, FormatError> {
        let mut dec = StreamDecoder::default();
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < bytes.len() {
            let (r, next) = dec.decode(bytes, pos)?;
            out.extend(r);
            pos = next;
        }
        Ok(out)
    }

    #[test]
    fn every_record_kind_decodes_to_what_was_encoded() {
        let mut enc = Encoder::default();
        for r in all_kinds() {
            enc.record(&r);
        }
        assert_eq!(decode_all(&enc.bytes).unwrap(), all_kinds());
    }

    #[test]
    fn block_events_are_the_allocations_and_frees_that_decode_reads() {
        let mut enc = Encoder::default();
        for r in all_kinds() {
            enc.record(&r);
        }
        let mut expected = Vec::new();
        for r in decode_all(&enc.bytes).unwrap() {
            match r {
                Record::Alloc { ts, addr, size, .. } => expected.push((ts, addr, Some(size))),
                Record::Free { ts, addr } => expected.push((ts, addr, None)),
                Record::Realloc {
                    ts_before,
                    ts_after,
                    old_addr,
                    new_addr,
                    new_size,
                    ..
                } => {
                    expected.push((ts_before, old_addr, None));
                    expected.push((ts_after, new_addr, Some(new_size)));
                }
                _ => {}
            }
        }
        let mut got = Vec::new();
        StreamDecoder::default()
            .block_events(&enc.bytes, |ts, addr, size| got.push((ts, addr, size)));
        assert!(
            expected.len() >= 4,
            "the sample has block events: {expected:?}"
        );
        assert_eq!(got, expected);
    }

    #[test]
    fn a_record_cut_short_is_reported_as_truncated() {
        let mut enc = Encoder::default();
        enc.record(&all_kinds()[2]);
        let cut = &enc.bytes[..enc.bytes.len() - 8];
        assert_eq!(decode_all(cut), Err(FormatError::Truncated));
    }

    #[test]
    fn garbage_never_panics_the_decoder() {
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            let _ = decode_all(&bytes);
        }
    }

    #[test]
    fn headers_round_trip_and_reject_garbage() {
        let h = FileHeader {
            version: VERSION,
            flags: FLAG_STACKS,
            pid: 1,
            ppid: 2,
            start_unix_ns: 3,
        };
        assert_eq!(FileHeader::decode(&h.encode()), Ok(h));
        assert_eq!(
            FileHeader::decode(b"not a trace at all, nope, no....."),
            Err(FormatError::NotATrace)
        );
        let c = ChunkHeader {
            thread: 3,
            index: 4,
            len: 64,
            checksum: 9,
        };
        assert_eq!(ChunkHeader::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn checksums_notice_a_flipped_bit() {
        let data: Vec<u8> = (0..200u8).collect();
        let mut flipped = data.clone();
        flipped[77] ^= 4;
        assert_ne!(checksum(&data), checksum(&flipped));
    }
}
