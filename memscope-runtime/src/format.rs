//! The memscope trace format, version 1: the one description shared by the writer in
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
//! chunk may be written more than once as it grows (the writer snapshots buffers of
//! idle threads so that a killed process loses little); a later copy is always an
//! extension of an earlier one, so a reader keeps the longest copy of each
//! `(thread, index)`. `checksum` is [`checksum`] of the payload; a chunk whose payload
//! is short or whose checksum does not match ends the readable part of the file.
//!
//! A record is a sequence of 64-bit words. Word 0 packs `tag:8 | a:8 | b:48` (tag in
//! the low byte). Timestamps are raw CPU clock ticks; [`Tag::Clock`] records in the
//! meta stream map them to nanoseconds. Within one thread's stream timestamps never
//! decrease, and across threads a free is always stamped before the allocation that
//! reuses its address, so merging the streams by timestamp orders events correctly.
//!
//! | tag | a | b | following words |
//! |---|---|---|---|
//! | `Alloc` 1, `AllocZeroed` 2 | log2(align) | size | ts, addr, stack |
//! | `Realloc` 3 | log2(align) | new size | ts_before, ts_after, old addr, new addr, stack |
//! | `Free` 4 | log2(align) | size | ts, addr |
//! | `Stack` 5 | 0 | frame count n | hash, n return addresses (innermost first) |
//! | `Thread` 6 | 0 | name length | os thread id, name bytes padded to 8 |
//! | `Clock` 16 | 0 | 0 | ts, monotonic ns, unix ns |
//! | `Module` 17 | 0 | path length | load bias, start, end, path padded to 8 |
//! | `End` 18 | reason | 0 | ts, events dropped |
//!
//! Tag bit `0x80` ([`INTERNAL`]) marks an event caused by memscope itself (for example
//! the thread handle std creates when memscope asks a thread for its name); readers
//! keep such blocks out of the user's figures. Stack `0` means "no stack recorded".

/// Bytes that open every trace file.
pub const MAGIC: &[u8; 8] = b"MEMSCOPE";
/// The version written in the file header; readers reject other versions.
pub const VERSION: u32 = 1;
/// Size of the file header.
pub const FILE_HEADER_LEN: usize = 32;
/// Size of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Opens every chunk header ("CHNK").
pub const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"CHNK");
/// File header flag: call stacks were recorded.
pub const FLAG_STACKS: u32 = 1;
/// The stream of process-wide records (clock, modules, end).
pub const META_THREAD: u32 = 0;
/// Tag bit marking an event caused by memscope itself.
pub const INTERNAL: u8 = 0x80;
/// The deepest stack recorded.
pub const MAX_FRAMES: usize = 64;
/// Largest size that fits the 48-bit size field.
pub const MAX_SIZE: u64 = (1 << 48) - 1;

/// Record kinds; see the module documentation for their layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    Alloc = 1,
    AllocZeroed = 2,
    Realloc = 3,
    Free = 4,
    Stack = 5,
    Thread = 6,
    Clock = 16,
    Module = 17,
    End = 18,
}

impl Tag {
    fn from_u8(tag: u8) -> Option<Tag> {
        Some(match tag {
            1 => Tag::Alloc,
            2 => Tag::AllocZeroed,
            3 => Tag::Realloc,
            4 => Tag::Free,
            5 => Tag::Stack,
            6 => Tag::Thread,
            16 => Tag::Clock,
            17 => Tag::Module,
            18 => Tag::End,
            _ => return None,
        })
    }
}

/// Why a process's trace ended, as written in [`Tag::End`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// The process exited (return from `main`, `process::exit`, or a panic in `main`).
    Exit = 0,
}

/// Packs word 0 of a record.
#[inline(always)]
pub const fn head(tag: u8, a: u8, b: u64) -> u64 {
    (tag as u64) | ((a as u64) << 8) | (b << 16)
}

/// Number of words a record with this head occupies, or `None` for an unknown tag.
pub fn record_words(word0: u64) -> Option<usize> {
    let b = (word0 >> 16) as usize;
    Some(match Tag::from_u8(word0 as u8 & !INTERNAL)? {
        Tag::Alloc | Tag::AllocZeroed => 4,
        Tag::Realloc => 6,
        Tag::Free => 3,
        Tag::Stack => 2 + b,
        Tag::Thread => 2 + b.div_ceil(8),
        Tag::Clock => 4,
        Tag::Module => 4 + b.div_ceil(8),
        Tag::End => 3,
    })
}

/// Words needed for a byte string padded to 8.
#[inline]
pub const fn padded_words(len: usize) -> usize {
    len.div_ceil(8)
}

/// Checksum of a chunk payload: FNV-1a style mixing over 64-bit words, fast enough for
/// the writer thread and strong enough to notice a torn or truncated write.
pub fn checksum(payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for word in payload.chunks(8) {
        let mut buf = [0u8; 8];
        buf[..word.len()].copy_from_slice(word);
        h ^= u64::from_le_bytes(buf);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 29;
    }
    h
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
        if version != VERSION {
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

/// One decoded record. Addresses and timestamps are as the writer saw them.
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
    Free {
        internal: bool,
        ts: u64,
        addr: u64,
        size: u64,
        align: u64,
    },
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
}

/// What can be wrong with trace bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    NotATrace,
    Version(u32),
    BadChunk,
    UnknownTag(u8),
    Truncated,
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::NotATrace => write!(f, "not a memscope trace (bad magic bytes)"),
            FormatError::Version(v) => write!(
                f,
                "trace format version {v} is not supported (this memscope reads version {VERSION})"
            ),
            FormatError::BadChunk => write!(f, "corrupt chunk header"),
            FormatError::UnknownTag(t) => write!(f, "unknown record tag {t}"),
            FormatError::Truncated => write!(f, "record runs past the end of its chunk"),
        }
    }
}

impl std::error::Error for FormatError {}

/// Decodes the record at byte offset `pos` of `payload`; returns it and the offset of
/// the next record.
pub fn decode(payload: &[u8], pos: usize) -> Result<(Record, usize), FormatError> {
    if pos + 8 > payload.len() {
        return Err(FormatError::Truncated);
    }
    let word0 = u64_at(payload, pos);
    let raw_tag = word0 as u8;
    let words = record_words(word0).ok_or(FormatError::UnknownTag(raw_tag))?;
    let end = pos
        .checked_add(words.checked_mul(8).ok_or(FormatError::Truncated)?)
        .ok_or(FormatError::Truncated)?;
    if end > payload.len() {
        return Err(FormatError::Truncated);
    }
    let w = |i: usize| u64_at(payload, pos + 8 * i);
    let internal = raw_tag & INTERNAL != 0;
    let a = (word0 >> 8) as u8;
    let b = word0 >> 16;
    let align = 1u64.checked_shl(a as u32).unwrap_or(0);
    let tag = Tag::from_u8(raw_tag & !INTERNAL).ok_or(FormatError::UnknownTag(raw_tag))?;
    let record = match tag {
        Tag::Alloc | Tag::AllocZeroed => Record::Alloc {
            internal,
            zeroed: tag == Tag::AllocZeroed,
            ts: w(1),
            addr: w(2),
            size: b,
            align,
            stack: w(3),
        },
        Tag::Realloc => Record::Realloc {
            internal,
            ts_before: w(1),
            ts_after: w(2),
            old_addr: w(3),
            new_addr: w(4),
            new_size: b,
            align,
            stack: w(5),
        },
        Tag::Free => Record::Free {
            internal,
            ts: w(1),
            addr: w(2),
            size: b,
            align,
        },
        Tag::Stack => Record::Stack {
            hash: w(1),
            frames: (0..b as usize).map(|i| w(2 + i)).collect(),
        },
        Tag::Thread => Record::Thread {
            os_tid: w(1),
            name: string_at(payload, pos + 16, b as usize),
        },
        Tag::Clock => Record::Clock {
            ts: w(1),
            monotonic_ns: w(2),
            unix_ns: w(3),
        },
        Tag::Module => Record::Module {
            bias: w(1),
            start: w(2),
            end: w(3),
            path: string_at(payload, pos + 32, b as usize),
        },
        Tag::End => Record::End {
            reason: a,
            ts: w(1),
            dropped: w(2),
        },
    };
    Ok((record, end))
}

fn string_at(bytes: &[u8], pos: usize, len: usize) -> String {
    String::from_utf8_lossy(&bytes[pos..pos + len]).into_owned()
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

/// Encodes records into a byte vector; used for the meta stream and by tests. The
/// allocator's hot path writes words directly instead (see `buffer.rs`).
#[derive(Default, Debug, Clone)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    pub fn word(&mut self, w: u64) -> &mut Self {
        self.bytes.extend_from_slice(&w.to_le_bytes());
        self
    }

    pub fn padded(&mut self, s: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(s);
        let pad = padded_words(s.len()) * 8 - s.len();
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn record(&mut self, record: &Record) -> &mut Self {
        let flag = |internal: bool| if internal { INTERNAL } else { 0 };
        let log2 = |align: u64| align.trailing_zeros() as u8;
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
                let tag = if *zeroed {
                    Tag::AllocZeroed
                } else {
                    Tag::Alloc
                } as u8;
                self.word(head(tag | flag(*internal), log2(*align), *size))
                    .word(*ts)
                    .word(*addr)
                    .word(*stack)
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
            } => self
                .word(head(
                    Tag::Realloc as u8 | flag(*internal),
                    log2(*align),
                    *new_size,
                ))
                .word(*ts_before)
                .word(*ts_after)
                .word(*old_addr)
                .word(*new_addr)
                .word(*stack),
            Record::Free {
                internal,
                ts,
                addr,
                size,
                align,
            } => self
                .word(head(Tag::Free as u8 | flag(*internal), log2(*align), *size))
                .word(*ts)
                .word(*addr),
            Record::Stack { hash, frames } => {
                self.word(head(Tag::Stack as u8, 0, frames.len() as u64))
                    .word(*hash);
                for f in frames {
                    self.word(*f);
                }
                self
            }
            Record::Thread { os_tid, name } => self
                .word(head(Tag::Thread as u8, 0, name.len() as u64))
                .word(*os_tid)
                .padded(name.as_bytes()),
            Record::Clock {
                ts,
                monotonic_ns,
                unix_ns,
            } => self
                .word(head(Tag::Clock as u8, 0, 0))
                .word(*ts)
                .word(*monotonic_ns)
                .word(*unix_ns),
            Record::Module {
                bias,
                start,
                end,
                path,
            } => self
                .word(head(Tag::Module as u8, 0, path.len() as u64))
                .word(*bias)
                .word(*start)
                .word(*end)
                .padded(path.as_bytes()),
            Record::End {
                reason,
                ts,
                dropped,
            } => self
                .word(head(Tag::End as u8, *reason, 0))
                .word(*ts)
                .word(*dropped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Record> {
        vec![
            Record::Alloc {
                internal: false,
                zeroed: true,
                ts: 7,
                addr: 0x1000,
                size: 4096,
                align: 16,
                stack: 99,
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
            Record::Free {
                internal: false,
                ts: 10,
                addr: 0x2000,
                size: 8192,
                align: 4096,
            },
            Record::Stack {
                hash: 5,
                frames: vec![1, 2, 3],
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
        ]
    }

    #[test]
    fn every_record_kind_decodes_to_what_was_encoded() {
        let mut enc = Encoder::default();
        for r in all_kinds() {
            enc.record(&r);
        }
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < enc.bytes.len() {
            let (r, next) = decode(&enc.bytes, pos).unwrap();
            out.push(r);
            pos = next;
        }
        assert_eq!(out, all_kinds());
    }

    #[test]
    fn a_record_cut_short_is_reported_as_truncated() {
        let mut enc = Encoder::default();
        enc.record(&all_kinds()[1]);
        let cut = &enc.bytes[..enc.bytes.len() - 8];
        assert_eq!(decode(cut, 0), Err(FormatError::Truncated));
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
}
