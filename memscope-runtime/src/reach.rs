//! At exit: which of the blocks still live can be reached, and from where.
//!
//! The hot path keeps no table of live blocks, so at exit the runtime reads its own
//! trace back: for each address the event with the latest stamp says whether a block
//! is live there (stamps order each address's events, see `clock.rs`), and how large.
//! Then, like valgrind's leak check, it looks for pointers:
//!
//! - roots: the writable segments of every loaded object (static data: `.data`,
//!   `.bss`), except the C library's and the dynamic loader's, whose allocator state
//!   points at free chunks next to live blocks, and except memscope's own clock
//!   stripes; and thread stacks: the exiting thread's from the frame of whoever called
//!   `exit` (none of it after a return from `main`, see `stack::caller_of_exit`), and
//!   the stacks of threads still running, on the pages ever written;
//! - every aligned word that points at or into a live block is a pointer to it, and
//!   the blocks reached are scanned in turn.
//!
//! Blocks reached from static data are [`Reach::FromStatic`], from stacks only
//! [`Reach::FromStack`]. Of the others, those no lost block points to are definitely
//! lost, those reachable from one are indirectly lost, and the rest are pointed to
//! only from lost blocks that can be followed back to themselves: a cycle.
//!
//! Memory is read with `process_vm_readv` on the process itself, which fails instead
//! of faulting where a thread still running freed and unmapped a block meanwhile.
//! When the trace or the live blocks are many megabytes, the writer thread, idle at
//! exit, reads part of them ([`HELP`]).
//! Like any conservative scan it can take an integer for a pointer (a block then
//! looks reachable), and it does not see pointers held only in registers of other
//! threads or in memory the program mapped itself.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::format::{ChunkHeader, Reach, Record, ScanSummary, StreamDecoder};
use crate::format::{CHUNK_HEADER_LEN, FILE_HEADER_LEN, META_THREAD};

/// What the scan starts from.
pub struct Roots {
    /// Static data, `[start, end)`.
    pub statics: Vec<(usize, usize)>,
    /// Thread stacks, `[low, high)`.
    pub stacks: Vec<(usize, usize)>,
    /// Ranges inside `statics` to leave out (memscope's own).
    pub skip: Vec<(usize, usize)>,
}

/// The records to append to the trace whose first `len` bytes are in `fd`: a `SCAN`
/// summary and one `REACH` per kind found (split so that no record grows past a few
/// thousand words); `None` when the trace could not be read back or the kernel refused
/// to read memory.
pub fn scan(fd: i32, len: u64, roots: &Roots) -> Option<Vec<Record>> {
    let blocks = live_blocks(fd, len)?;
    let mut memory = Memory::default();
    let reach = classify(&blocks, roots, &mut memory);
    if memory.refused {
        return None;
    }
    let mut summary = memory.summary;
    summary.blocks = blocks.len() as u64;
    let mut records = vec![Record::Scan(summary)];
    for kind in [
        Reach::FromStatic,
        Reach::FromStack,
        Reach::DefinitelyLost,
        Reach::IndirectlyLost,
        Reach::Cycle,
    ] {
        let addrs: Vec<u64> = blocks
            .iter()
            .zip(&reach)
            .filter(|(_, r)| **r == Some(kind))
            .map(|(b, _)| b.0 as u64)
            .collect();
        for part in addrs.chunks(4096) {
            records.push(Record::Reach {
                reach: kind,
                addrs: part.to_vec(),
            });
        }
    }
    Some(records)
}

/// Multiply-shift hashing for addresses (SipHash costs more than the rest here).
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        // The table indexes by the low bits: fold the product's high bits into them
        // (addresses differ mostly in their middle bits).
        let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}

/// The latest event seen at each address: its stamp, and the block's size if it is an
/// allocation (0 for a free).
///
/// Kept per 1 KiB of addresses (a leaf), one slot per 16-byte granule (where malloc
/// puts blocks), so that the events of neighbouring blocks touch neighbouring memory:
/// a hash table of addresses made every event a cache miss. Addresses off the granule
/// (allocators that place blocks at any alignment) go to a plain table.
///
/// The leaves lie one after the other in one reservation of [`MAX_TABLE_BYTES`],
/// which the kernel is asked to back with huge pages: std's debug-information cache
/// (52,000 blocks at exit) takes 12,800 leaves, whose page faults one by one were
/// most of the time the table took.
#[derive(Default)]
struct Latest {
    /// The leaf of each span of addresses with an event, by `address / SPAN`.
    pages: HashMap<u64, usize, BuildHasherDefault<AddrHasher>>,
    leaves: Vec<[(u64, u64); SLOTS]>,
    /// Which slots of each leaf hold an allocation, a bit each: the live blocks are
    /// read from these, not from every slot of the leaves (as many bytes as the heap).
    allocated: Vec<[u64; SLOTS / 64]>,
    odd: HashMap<u64, (u64, u64), BuildHasherDefault<AddrHasher>>,
    /// Recent pages and their leaves, by page modulo [`RECENT`] (`u64::MAX`: none).
    recent: Vec<(u64, usize)>,
    /// The tables outgrew [`MAX_TABLE_BYTES`]: the scan gives up.
    too_big: bool,
}

/// The most memory one reader's tables of latest events may take (leaves of 1 KiB,
/// entries of the plain table counted as 48 bytes; two readers may each take that): a
/// program whose heap spans more addresses than that at exit gets no leak kinds rather
/// than a large allocation at exit.
const MAX_TABLE_BYTES: usize = 256 << 20;

const RECENT: usize = 256;

const GRANULE: u64 = 16;
/// Bytes of addresses per leaf.
const SPAN: u64 = 1024;
const SLOTS: usize = (SPAN / GRANULE) as usize;

impl Latest {
    /// Tables for the events of a trace of `len` bytes.
    fn new(len: u64) -> Latest {
        let mut leaves = Vec::new();
        // Huge pages for a trace of a megabyte or more: for a short one, the first
        // 2 MiB page costs more than the few leaves it gets.
        if len >= 1 << 20 {
            let most = MAX_TABLE_BYTES / std::mem::size_of::<[(u64, u64); SLOTS]>();
            // Address space only: the kernel backs what the leaves touch.
            if leaves.try_reserve_exact(most).is_ok() {
                huge_pages(leaves.spare_capacity_mut());
            }
        }
        Latest {
            leaves,
            recent: vec![(u64::MAX, 0); RECENT],
            ..Latest::default()
        }
    }

    fn note(&mut self, ts: u64, addr: u64, size: u64) {
        if !addr.is_multiple_of(GRANULE) {
            if !self.odd.contains_key(&addr) && self.grown_too_big() {
                return;
            }
            let slot = self.odd.entry(addr).or_insert((0, 0));
            if ts >= slot.0 {
                *slot = (ts, size);
            }
            return;
        }
        let page = addr / SPAN;
        let recent = page as usize % RECENT;
        let leaf = if self.recent[recent].0 == page {
            self.recent[recent].1
        } else {
            let leaf = match self.pages.get(&page) {
                Some(&leaf) => leaf,
                None => {
                    if self.grown_too_big() {
                        return;
                    }
                    self.leaves.push([(0, 0); SLOTS]);
                    self.allocated.push([0; SLOTS / 64]);
                    self.pages.insert(page, self.leaves.len() - 1);
                    self.leaves.len() - 1
                }
            };
            self.recent[recent] = (page, leaf);
            leaf
        };
        let i = (addr % SPAN / GRANULE) as usize;
        let slot = &mut self.leaves[leaf][i];
        if ts >= slot.0 {
            *slot = (ts, size);
            let word = &mut self.allocated[leaf][i / 64];
            *word = (*word & !(1 << (i % 64))) | (u64::from(size > 0) << (i % 64));
        }
    }

    /// Takes in the events `other` saw (of other chunks of the same trace): at each
    /// address the later of the two.
    fn merge(&mut self, other: Latest) {
        self.too_big |= other.too_big;
        for (page, leaf) in other.pages {
            let base = page * SPAN;
            for (i, &(ts, size)) in other.leaves[leaf].iter().enumerate() {
                if (ts, size) != (0, 0) {
                    self.note(ts, base + i as u64 * GRANULE, size);
                }
            }
        }
        for (addr, (ts, size)) in other.odd {
            self.note(ts, addr, size);
        }
    }

    /// Whether the tables are as large as they may grow (and so `too_big` is set):
    /// checked before they grow.
    fn grown_too_big(&mut self) -> bool {
        self.too_big |= self.leaves.len() * SPAN as usize + self.odd.len() * 48 > MAX_TABLE_BYTES;
        self.too_big
    }

    /// The live blocks, `(start, size)` sorted by start.
    fn live(self) -> Vec<(usize, usize)> {
        let mut blocks: Vec<(usize, usize)> = Vec::new();
        let mut pages: Vec<(u64, usize)> = self.pages.into_iter().collect();
        pages.sort_unstable();
        for (page, leaf) in pages {
            let base = page * SPAN;
            for (w, &word) in self.allocated[leaf].iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let i = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let size = self.leaves[leaf][i].1;
                    blocks.push(((base + i as u64 * GRANULE) as usize, size as usize));
                }
            }
        }
        if !self.odd.is_empty() {
            blocks.extend(
                self.odd
                    .into_iter()
                    .filter(|(_, (_, size))| *size > 0)
                    .map(|(addr, (_, size))| (addr as usize, size as usize)),
            );
            blocks.sort_unstable();
        }
        blocks
    }
}

/// Asks the kernel to back `memory` with huge pages where it can (transparent huge
/// pages on request, where the system allows them); nothing changes otherwise.
fn huge_pages<T>(memory: &mut [MaybeUninit<T>]) {
    let start = memory.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(memory);
    let start = start.next_multiple_of(PAGE);
    if end > start {
        // SAFETY: advice on whole pages of memory this process owns and has not
        // touched; MADV_HUGEPAGE changes how it is backed, not what it holds.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}

/// The blocks live at the end of the trace in the first `len` bytes of `fd`, `(start,
/// size)` sorted by start. A trace of megabytes is read with the writer thread's help.
fn live_blocks(fd: i32, len: u64) -> Option<Vec<(usize, usize)>> {
    let chunks = event_chunks(fd, len)?;
    let bytes: u64 = chunks.iter().map(|c| u64::from(c.1)).sum();
    let reading = Reading {
        fd,
        chunks: &chunks,
        next: AtomicUsize::new(0),
        len,
        helper: Mutex::new(None),
        helped: AtomicBool::new(false),
    };
    let job: &dyn Job = &reading;
    let offered = bytes >= HELP_FROM_BYTES as u64 && HELP.offer(&job);
    let mut latest = reading.read();
    if offered {
        HELP.withdraw(&job);
    }
    if let Some(theirs) = reading
        .helper
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        latest.merge(theirs);
    }
    (!latest.too_big).then(|| latest.live())
}

/// Where the payload of each chunk of events in the first `len` bytes of `fd` is, and
/// how long; `None` if not even the first chunk can be read.
fn event_chunks(fd: i32, len: u64) -> Option<Vec<(u64, u32)>> {
    let mut chunks = Vec::new();
    let mut pos = FILE_HEADER_LEN as u64;
    loop {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        if pos + CHUNK_HEADER_LEN as u64 > len || !read_file_at(fd, pos, &mut head) {
            // The file opens with the meta stream's first chunk: if even that cannot
            // be read, nothing can.
            if pos == FILE_HEADER_LEN as u64 {
                return None;
            }
            break;
        }
        let Ok(header) = ChunkHeader::decode(&head) else {
            break;
        };
        let payload = pos + CHUNK_HEADER_LEN as u64;
        if payload + u64::from(header.len) > len {
            break;
        }
        if header.thread != META_THREAD {
            chunks.push((payload, header.len));
        }
        pos = payload + u64::from(header.len);
    }
    Some(chunks)
}

/// Reading the chunks of events of a trace into [`Latest`] tables, by the exiting
/// thread and perhaps the writer's, each taking the next chunk not yet taken into a
/// table of its own.
struct Reading<'a> {
    fd: i32,
    chunks: &'a [(u64, u32)],
    /// The next chunk to take.
    next: AtomicUsize,
    len: u64,
    /// The writer thread's table, once it is through.
    helper: Mutex<Option<Latest>>,
    helped: AtomicBool,
}

impl Reading<'_> {
    /// Reads chunks until none is left, into a table of this reader's.
    fn read(&self) -> Latest {
        let mut latest = Latest::new(self.len);
        let mut decoder = StreamDecoder::default();
        let mut payload = Vec::new();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(pos, len)) = self.chunks.get(i) else {
                break;
            };
            payload.resize(len as usize, 0);
            // No checksum: this process wrote the file, and the decoder checks bounds.
            if !read_file_at(self.fd, pos, &mut payload) {
                continue;
            }
            // Every chunk opens with a `STAMP` (see `format.rs`), so one decoder serves
            // all the streams, whatever the order of the chunks; copies of a chunk
            // repeat its events, which changes nothing here.
            decoder.block_events(&payload, |ts, addr, size| {
                // A block's size is at least 1 here: 0 marks a free.
                latest.note(ts, addr, size.map_or(0, |size| size.max(1)));
            });
        }
        latest
    }
}

impl Job for Reading<'_> {
    fn help(&self) {
        let latest = self.read();
        *self.helper.lock().unwrap_or_else(|p| p.into_inner()) = Some(latest);
    }

    fn helped(&self) -> &AtomicBool {
        &self.helped
    }
}

fn read_file_at(fd: i32, pos: u64, out: &mut [u8]) -> bool {
    let mut done = 0;
    while done < out.len() {
        // SAFETY: writes at most `out.len() - done` bytes into `out` behind `done`.
        let n = unsafe {
            libc::pread(
                fd,
                out[done..].as_mut_ptr() as *mut libc::c_void,
                out.len() - done,
                (pos + done as u64) as libc::off_t,
            )
        };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Reads this process's memory without faulting, counting what was read.
#[derive(Default)]
struct Memory {
    buf: Vec<u8>,
    summary: ScanSummary,
    /// Reading failed for another reason than an unmapped page (`process_vm_readv`
    /// refused, say, by a sandbox): nothing the scan found can be trusted.
    refused: bool,
    /// Aligned windows of memory read so far, by index: their readable prefix. Most
    /// blocks are small and near each other: one system call reads many.
    windows: HashMap<usize, Vec<u8>, BuildHasherDefault<AddrHasher>>,
    /// Buffers of windows dropped from `windows`, for the next ones.
    spare: Vec<Vec<u8>>,
    pid: libc::pid_t,
}

/// Size of a window of [`Memory`], and how many are kept (4 MiB).
const WINDOW: usize = 64 << 10;
const MAX_WINDOWS: usize = 64;

/// Bytes read at once.
const PIECE: usize = 1 << 20;
const PAGE: usize = 4096;

impl Memory {
    /// Calls `f` with the readable contents of `[start, start + len)` in pieces, each
    /// with its address; returns the bytes read. Unreadable pages are skipped.
    fn visit(&mut self, start: usize, len: usize, mut f: impl FnMut(usize, &[u8])) -> u64 {
        if self.pid == 0 {
            // SAFETY: getpid cannot fail.
            self.pid = unsafe { libc::getpid() };
        }
        if len <= WINDOW {
            if let Some(read) = self.visit_windows(start, len, &mut f) {
                return read;
            }
        }
        let mut read = 0;
        let mut at = start;
        let end = start.saturating_add(len);
        while at < end {
            let n = (end - at).min(PIECE);
            self.buf.resize(n, 0);
            let got = match read_self(self.pid, at, &mut self.buf[..n]) {
                Ok(got) => got,
                Err(_) => {
                    self.refused = true;
                    return read;
                }
            };
            if got > 0 {
                f(at, &self.buf[..got]);
                read += got as u64;
                at += got;
                continue;
            }
            // Not readable from `at`: skip to the next page.
            let next = ((at / PAGE) + 1) * PAGE;
            self.summary.unreadable_bytes += (next.min(end) - at) as u64;
            at = next;
        }
        read
    }

    /// [`visit`](Self::visit) of a short range from the windows it lies in, read as
    /// needed; `None` if their readable part does not cover it.
    fn visit_windows(
        &mut self,
        start: usize,
        len: usize,
        f: &mut impl FnMut(usize, &[u8]),
    ) -> Option<u64> {
        let end = start.checked_add(len)?;
        let (first, last) = (start / WINDOW, end.saturating_sub(1) / WINDOW);
        if self.windows.len() + 2 > MAX_WINDOWS {
            self.spare
                .extend(self.windows.drain().map(|(_, bytes)| bytes));
        }
        for w in first..=last {
            if !self.windows.contains_key(&w) {
                // Read into the buffer's spare room, not zeroed first: only what is
                // read is kept.
                let mut bytes = self.spare.pop().unwrap_or_default();
                bytes.clear();
                bytes.reserve_exact(WINDOW);
                let got = match read_self_into(
                    self.pid,
                    w * WINDOW,
                    &mut bytes.spare_capacity_mut()[..WINDOW],
                ) {
                    Ok(got) => got,
                    Err(_) => {
                        self.refused = true;
                        return Some(0);
                    }
                };
                // SAFETY: the kernel wrote the first `got` bytes of the spare room.
                unsafe { bytes.set_len(got) };
                self.windows.insert(w, bytes);
            }
            if self.windows[&w].len() < end.min((w + 1) * WINDOW) - w * WINDOW {
                return None;
            }
        }
        for w in first..=last {
            let base = w * WINDOW;
            let (from, to) = (start.max(base), end.min(base + WINDOW));
            f(from, &self.windows[&w][from - base..to - base]);
        }
        Some(len as u64)
    }
}

/// Copies this process's memory at `addr` into `out`; returns how many bytes could be
/// read (fewer, or 0, when a page on the way is not mapped), or the error when the
/// kernel refused for another reason.
fn read_self(pid: libc::pid_t, addr: usize, out: &mut [u8]) -> Result<usize, std::io::Error> {
    // SAFETY: the kernel writes only bytes it read into `out`, never uninitialized
    // memory, so `out` stays initialized.
    read_self_into(pid, addr, unsafe {
        &mut *(out as *mut [u8] as *mut [MaybeUninit<u8>])
    })
}

/// [`read_self`] into memory not yet written: the bytes read are written, and only
/// those.
fn read_self_into(
    pid: libc::pid_t,
    addr: usize,
    out: &mut [MaybeUninit<u8>],
) -> Result<usize, std::io::Error> {
    let local = libc::iovec {
        iov_base: out.as_mut_ptr() as *mut libc::c_void,
        iov_len: out.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: out.len(),
    };
    // SAFETY: `local` describes `out`, which is writable; the kernel reads `remote`
    // from this process's address space and reports a fault instead of raising one.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EFAULT) => Ok(0),
        _ => Err(err),
    }
}

/// The blocks (sorted by start, disjoint) and, for finding the one an address points
/// into, the 64 KiB pages they start on: a search among the few blocks of one page,
/// found in a small table, instead of one among all blocks, most of whose steps miss
/// the cache (the scan looks up every word that could be a pointer).
struct BlockIndex<'b> {
    blocks: &'b [(usize, usize)],
    /// `(page, first block starting on it, one past the last)`, sorted by page.
    pages: Vec<(usize, u32, u32)>,
    /// Where the first block starts and the last ends.
    lo: usize,
    hi: usize,
    /// The pages some block covers, as one bit each at a hash of the page (several
    /// pages share a bit). Most words between `lo` and `hi` that point at no block
    /// point at code, static data or mapped files, pages no block covers: a clear bit
    /// says so without the two searches.
    covered: Box<[u64]>,
}

/// log2 of [`BlockIndex`]'s page size.
const INDEX_PAGE_BITS: u32 = 16;
/// Bits of [`BlockIndex::covered`] (8 KiB of them).
const COVERED_BITS: usize = 1 << 16;

/// The bit of [`BlockIndex::covered`] for `page`.
#[inline]
fn covered_bit(page: usize) -> usize {
    ((page as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - COVERED_BITS.trailing_zeros()))
        as usize
}

impl<'b> BlockIndex<'b> {
    fn new(blocks: &'b [(usize, usize)]) -> BlockIndex<'b> {
        let mut pages: Vec<(usize, u32, u32)> = Vec::new();
        for (i, &(start, _)) in blocks.iter().enumerate() {
            let page = start >> INDEX_PAGE_BITS;
            match pages.last_mut() {
                Some(entry) if entry.0 == page => entry.2 = i as u32 + 1,
                _ => pages.push((page, i as u32, i as u32 + 1)),
            }
        }
        let (lo, hi) = match (blocks.first(), blocks.last()) {
            (Some(first), Some(last)) => (first.0, last.0 + last.1),
            _ => (0, 0),
        };
        let mut covered = vec![0u64; COVERED_BITS / 64].into_boxed_slice();
        for &(start, size) in blocks {
            let first = start >> INDEX_PAGE_BITS;
            let last = (start + size.max(1) - 1) >> INDEX_PAGE_BITS;
            if last - first >= COVERED_BITS {
                covered.fill(u64::MAX);
                break;
            }
            for page in first..=last {
                let bit = covered_bit(page);
                covered[bit / 64] |= 1 << (bit % 64);
            }
        }
        BlockIndex {
            blocks,
            pages,
            lo,
            hi,
            covered,
        }
    }

    /// The block containing `addr`, by index into `blocks`.
    #[inline]
    fn block_at(&self, addr: usize) -> Option<usize> {
        if addr < self.lo || addr >= self.hi {
            return None;
        }
        let page = addr >> INDEX_PAGE_BITS;
        let bit = covered_bit(page);
        if self.covered[bit / 64] & (1 << (bit % 64)) == 0 {
            return None;
        }
        // The last page at or before `addr`'s that blocks start on: the block holding
        // `addr` starts there, or is the last one before it (a large block).
        let at = self.pages.partition_point(|p| p.0 <= page).checked_sub(1)?;
        let (_, first, end) = self.pages[at];
        let (first, end) = (first as usize, end as usize);
        let i = first + self.blocks[first..end].partition_point(|b| b.0 <= addr);
        let i = i.checked_sub(1)?;
        let (start, size) = self.blocks[i];
        (addr >= start && addr < start + size).then_some(i)
    }

    /// Calls `f` with the index of every block some aligned word of `bytes` (read at
    /// `at`) points at or into. (Neighbouring words often point into the same block,
    /// or the next one: an array of pointers to blocks allocated one after the other.
    /// Those two are tried before the index.)
    fn pointers(&self, at: usize, bytes: &[u8], mut f: impl FnMut(usize)) {
        let skip = (8 - at % 8) % 8;
        let mut last = 0;
        for word in bytes.get(skip..).unwrap_or_default().chunks_exact(8) {
            let value = usize::from_le_bytes(word.try_into().unwrap_or_default());
            if value < self.lo || value >= self.hi {
                continue;
            }
            let holds = |i: usize| {
                self.blocks
                    .get(i)
                    .is_some_and(|&(start, size)| value >= start && value < start + size)
            };
            let found = if holds(last) {
                Some(last)
            } else if holds(last + 1) {
                Some(last + 1)
            } else {
                self.block_at(value)
            };
            if let Some(i) = found {
                last = i;
                f(i);
            }
        }
    }
}

/// Blocks live at exit from which on the writer thread helps to read the reachable
/// ones (std's 39 MB debug-information cache takes a single thread 0.08 s to read).
const HELP_FROM_BYTES: usize = 4 << 20;

/// Reading the blocks reachable from one kind of root, on the exiting thread and
/// perhaps the writer's: each keeps a stack of blocks to read of its own, and hands
/// half of it over when the other has none.
struct Reached<'a> {
    blocks: &'a [(usize, usize)],
    index: &'a BlockIndex<'a>,
    /// Each block's kind so far (`Reach as u8`, 0 for none), set once.
    marks: &'a [AtomicU8],
    kind: u8,
    pool: Mutex<Pool>,
    /// A reader is waiting for blocks to read.
    hungry: AtomicBool,
    /// What the helper's reads came to: bytes it could not read, and whether the
    /// kernel refused (see [`Memory`]).
    helper: Mutex<(u64, bool)>,
    /// The helper is through with this (its last access).
    helped: AtomicBool,
}

/// Blocks handed over, and how many readers are reading.
#[derive(Default)]
struct Pool {
    blocks: Vec<usize>,
    reading: usize,
}

impl Reached<'_> {
    /// Reads `[start, start + len)`, giving this kind to the blocks it points to that
    /// have none yet and adding them to `found`; returns the bytes read.
    fn read(&self, memory: &mut Memory, start: usize, len: usize, found: &mut Vec<usize>) -> u64 {
        memory.visit(start, len, |at, bytes| {
            self.index.pointers(at, bytes, |i| {
                let mark = &self.marks[i];
                if mark.load(Ordering::Relaxed) == 0
                    && mark
                        .compare_exchange(0, self.kind, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    found.push(i);
                }
            })
        })
    }

    /// Reads blocks, starting with `found`, until no reader has any left.
    fn take_part(&self, memory: &mut Memory, mut found: Vec<usize>) {
        self.lock().reading += 1;
        loop {
            while let Some(b) = found.pop() {
                let (start, size) = self.blocks[b];
                self.read(memory, start, size, &mut found);
                if found.len() > 1 && self.hungry.load(Ordering::Relaxed) {
                    let half = found.len() / 2;
                    self.lock().blocks.extend(found.drain(..half));
                    self.hungry.store(false, Ordering::Relaxed);
                }
            }
            let mut pool = self.lock();
            pool.reading -= 1;
            loop {
                if !pool.blocks.is_empty() {
                    found.append(&mut pool.blocks);
                    pool.reading += 1;
                    break;
                }
                if pool.reading == 0 {
                    return;
                }
                self.hungry.store(true, Ordering::Relaxed);
                drop(pool);
                std::thread::yield_now();
                pool = self.lock();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Job for Reached<'_> {
    /// With a reader of its own, whose results it leaves.
    fn help(&self) {
        let mut memory = Memory::default();
        self.take_part(&mut memory, Vec::new());
        *self.helper.lock().unwrap_or_else(|p| p.into_inner()) =
            (memory.summary.unreadable_bytes, memory.refused);
    }

    fn helped(&self) -> &AtomicBool {
        &self.helped
    }
}

/// Work the exiting thread shares with the writer thread, idle at exit.
trait Job: Sync {
    /// The writer thread's part.
    fn help(&self);
    /// Set (last of all) once the writer thread is through with the job.
    fn helped(&self) -> &AtomicBool;
}

/// The scan's offer of work to the writer thread, which looks for one each time round
/// its loop ([`take_part`](Help::take_part)): at most one at a time.
pub struct Help {
    /// The offered `&dyn Job`, by the address of the reference (which lives on the
    /// offering thread's stack until the offer is withdrawn); null when there is none
    /// or it was taken.
    offered: AtomicPtr<()>,
}

/// The offer the writer thread looks for.
pub static HELP: Help = Help {
    offered: AtomicPtr::new(std::ptr::null_mut()),
};

impl Help {
    /// Offers `job`; false if another offer is open. An offer must be withdrawn
    /// before `job` goes.
    fn offer(&self, job: &&dyn Job) -> bool {
        let ptr = job as *const &dyn Job as *mut ();
        self.offered
            .compare_exchange(
                std::ptr::null_mut(),
                ptr,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Withdraws the offer of `job`: at once if it was not taken, else once the
    /// helper is done with it.
    fn withdraw(&self, job: &&dyn Job) {
        let ptr = job as *const &dyn Job as *mut ();
        let untaken = self
            .offered
            .compare_exchange(
                ptr,
                std::ptr::null_mut(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok();
        if !untaken {
            while !job.helped().load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        }
    }

    /// Drops an offer inherited from the parent process (a `fork` while another thread
    /// scanned): nobody in this process made it.
    pub fn forget(&self) {
        self.offered.store(std::ptr::null_mut(), Ordering::Relaxed);
    }

    /// Takes the work on offer, if any, and does it.
    pub fn take_part(&self) {
        if self.offered.load(Ordering::Relaxed).is_null() {
            return;
        }
        let taken = self.offered.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if taken.is_null() {
            return;
        }
        // SAFETY: `offer` published the address of a live `&dyn Job`, and its owner
        // does not let it go before `withdraw` returns, which (since we took the
        // pointer, so its compare-exchange fails) waits for `helped`, stored last of
        // all here.
        let job = unsafe { *(taken as *const &dyn Job) };
        job.help();
        job.helped().store(true, Ordering::Release);
    }
}

/// The kind of each block, by index (every block gets one).
fn classify(blocks: &[(usize, usize)], roots: &Roots, memory: &mut Memory) -> Vec<Option<Reach>> {
    let index = BlockIndex::new(blocks);
    let marks: Vec<AtomicU8> = (0..blocks.len()).map(|_| AtomicU8::new(0)).collect();
    let live_bytes: usize = blocks.iter().map(|b| b.1).sum();
    // Reachable: from static data first, then from stacks. Blocks found from the roots
    // are read in turn, with the writer thread's help when there are many bytes.
    for (ranges, kind) in [
        (without(&roots.statics, &roots.skip), Reach::FromStatic),
        (written(&roots.stacks), Reach::FromStack),
    ] {
        let reached = Reached {
            blocks,
            index: &index,
            marks: &marks,
            kind: kind as u8,
            pool: Mutex::new(Pool::default()),
            hungry: AtomicBool::new(false),
            helper: Mutex::new((0, false)),
            helped: AtomicBool::new(false),
        };
        let mut found = Vec::new();
        for (start, end) in ranges {
            let read = reached.read(memory, start, end - start, &mut found);
            match kind {
                Reach::FromStatic => memory.summary.static_bytes += read,
                _ => memory.summary.stack_bytes += read,
            }
        }
        if kind == Reach::FromStack {
            memory.summary.stacks = roots.stacks.len() as u64;
        }
        let job: &dyn Job = &reached;
        let offered = live_bytes >= HELP_FROM_BYTES && HELP.offer(&job);
        reached.take_part(memory, found);
        if offered {
            HELP.withdraw(&job);
        }
        let (unreadable, refused) = reached
            .helper
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        memory.summary.unreadable_bytes += unreadable;
        memory.refused |= refused;
    }
    let mut reach: Vec<Option<Reach>> = marks
        .iter()
        .map(|m| Reach::from_u64(m.load(Ordering::Relaxed).into()))
        .collect();

    // The rest is lost: follow the pointers among lost blocks.
    let lost: Vec<usize> = (0..blocks.len()).filter(|&i| reach[i].is_none()).collect();
    let mut edges: Vec<Vec<u32>> = vec![Vec::new(); blocks.len()];
    let mut pointed_to = vec![false; blocks.len()];
    for &b in &lost {
        let (start, size) = blocks[b];
        let out = &mut edges[b];
        memory.visit(start, size, |at, bytes| {
            index.pointers(at, bytes, |i| {
                if i != b && reach[i].is_none() {
                    pointed_to[i] = true;
                    out.push(i as u32);
                }
            })
        });
    }
    let mut work = Vec::new();
    for &b in &lost {
        if !pointed_to[b] {
            reach[b] = Some(Reach::DefinitelyLost);
            work.push(b);
        }
    }
    while let Some(b) = work.pop() {
        for &i in &edges[b] {
            let i = i as usize;
            if reach[i].is_none() {
                reach[i] = Some(Reach::IndirectlyLost);
                work.push(i);
            }
        }
    }
    for &b in &lost {
        if reach[b].is_none() {
            reach[b] = Some(Reach::Cycle);
        }
    }
    reach
}

/// The parts of thread stacks that were ever written: a stack of megabytes, mapped
/// whole, is mostly pages never touched.
fn written(stacks: &[(usize, usize)]) -> Vec<(usize, usize)> {
    stacks
        .iter()
        .flat_map(|&(low, high)| {
            crate::sys::written_parts(low, high).unwrap_or_else(|| vec![(low, high)])
        })
        .collect()
}

/// `ranges` with the parts in `skip` cut out.
fn without(ranges: &[(usize, usize)], skip: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &(mut start, end) in ranges {
        let mut cuts: Vec<&(usize, usize)> =
            skip.iter().filter(|s| s.0 < end && s.1 > start).collect();
        cuts.sort_unstable();
        for &(cut_start, cut_end) in cuts {
            if cut_start > start {
                out.push((start, cut_start));
            }
            start = start.max(cut_end);
        }
        if start < end {
            out.push((start, end));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace file of two threads' streams, each in several chunks, and the blocks
    /// live at its end, worked out plainly.
    /// A trace of two threads' events, `per_chunk` in each of 12 chunks, some of them
    /// off the 16-byte granule when `odd`; and the blocks live at its end.
    fn trace_with_live_blocks(
        per_chunk: u64,
        odd: bool,
    ) -> (std::fs::File, u64, Vec<(usize, usize)>) {
        use crate::format::{Encoder, FileHeader, VERSION};
        let mut file = FileHeader {
            version: VERSION,
            flags: 0,
            pid: 1,
            ppid: 0,
            start_unix_ns: 0,
        }
        .encode()
        .to_vec();
        let mut chunk = |thread: u32, index: u32, records: &[Record]| {
            let mut enc = Encoder::chunk();
            for r in records {
                enc.record(r);
            }
            let header = ChunkHeader {
                thread,
                index,
                len: enc.bytes.len() as u32,
                checksum: crate::format::checksum(&enc.bytes),
            };
            file.extend_from_slice(&header.encode());
            file.extend_from_slice(&enc.bytes);
        };
        chunk(META_THREAD, 0, &[]);
        let mut latest: HashMap<u64, (u64, u64)> = HashMap::new();
        // Every chunk opens with a `STAMP`, as the runtime's do: each encoder's clock
        // starts at 0, and stamps beyond `MAX_DELTA` do not fit a delta from it.
        let mut ts = crate::format::MAX_DELTA;
        for index in 0..6u32 {
            for thread in 1..=2u32 {
                let mut records = Vec::new();
                for i in 0..per_chunk {
                    ts += 1;
                    // Blocks on many pages, some of them off the 16-byte granule.
                    let addr = 0x7f00_0000_0000
                        + (u64::from(thread) << 32)
                        + i * 4096 * 3
                        + u64::from(index % 3) * 48
                        + (odd && i % 5 == 0) as u64 * 8;
                    let record = if (i + u64::from(index)) % 4 == 0 {
                        Record::Free { ts, addr }
                    } else {
                        Record::Alloc {
                            internal: false,
                            zeroed: false,
                            ts,
                            addr,
                            size: 16 + i,
                            align: 8,
                            stack: 0,
                        }
                    };
                    latest.insert(
                        addr,
                        match record {
                            Record::Alloc { size, .. } => (ts, size),
                            _ => (ts, 0),
                        },
                    );
                    records.push(record);
                }
                chunk(thread, index, &records);
            }
        }
        let mut expected: Vec<(usize, usize)> = latest
            .into_iter()
            .filter(|(_, (_, size))| *size > 0)
            .map(|(addr, (_, size))| (addr as usize, size as usize))
            .collect();
        expected.sort_unstable();
        let path = std::env::temp_dir().join(format!(
            "memscope-reach-test-{}-{:?}.mstrace",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, &file).unwrap();
        let opened = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (opened, file.len() as u64, expected)
    }

    #[test]
    fn the_blocks_live_at_a_trace_s_end_are_those_whose_latest_event_is_an_allocation() {
        use std::os::fd::AsRawFd;
        let (file, len, expected) = trace_with_live_blocks(500, true);
        assert!(expected.len() > 1000, "{} live blocks", expected.len());
        assert_same_blocks(&live_blocks(file.as_raw_fd(), len).unwrap(), &expected);
    }

    #[test]
    fn the_blocks_live_at_the_end_of_a_trace_of_megabytes_come_sorted_from_the_leaves() {
        use std::os::fd::AsRawFd;
        // Past the megabyte from which the leaves ask for huge pages; every block on
        // the granule, so the leaves alone give them in order.
        let (file, len, expected) = trace_with_live_blocks(20_000, false);
        assert!(len >= 1 << 20, "{len} bytes");
        assert_same_blocks(&live_blocks(file.as_raw_fd(), len).unwrap(), &expected);
    }

    #[test]
    fn tables_of_two_halves_of_a_trace_merged_give_the_blocks_of_the_whole() {
        use std::os::fd::AsRawFd;
        let (file, len, expected) = trace_with_live_blocks(500, true);
        let chunks = event_chunks(file.as_raw_fd(), len).unwrap();
        // Each thread's chunks alternate: the halves split every thread's events.
        let half = |chunks: &[(u64, u32)]| {
            Reading {
                fd: file.as_raw_fd(),
                chunks,
                next: AtomicUsize::new(0),
                len,
                helper: Mutex::new(None),
                helped: AtomicBool::new(false),
            }
            .read()
        };
        for cut in [1, chunks.len() / 2, chunks.len() - 1] {
            let (first, second) = chunks.split_at(cut);
            // Merged either way round.
            for (mut one, other) in [(half(first), half(second)), (half(second), half(first))] {
                one.merge(other);
                assert!(one.live() == expected, "cut at chunk {cut}");
            }
        }
    }

    #[test]
    fn a_trace_of_megabytes_read_with_the_writer_thread_s_help_gives_the_same_blocks() {
        use std::os::fd::AsRawFd;
        // Past HELP_FROM_BYTES of events.
        let (file, len, expected) = trace_with_live_blocks(60_000, true);
        assert!(len >= 2 * HELP_FROM_BYTES as u64, "{len} bytes");
        with_a_helper(|| {
            for _ in 0..3 {
                assert_same_blocks(&live_blocks(file.as_raw_fd(), len).unwrap(), &expected);
            }
        });
    }

    #[test]
    fn a_trace_cut_short_is_read_up_to_its_last_whole_chunk() {
        use std::os::fd::AsRawFd;
        let (file, len, _) = trace_with_live_blocks(500, true);
        let whole = live_blocks(file.as_raw_fd(), len).unwrap();
        let cut = live_blocks(file.as_raw_fd(), len - 100).unwrap();
        assert!(cut != whole, "{} blocks either way", cut.len());
        assert!(live_blocks(file.as_raw_fd(), FILE_HEADER_LEN as u64).is_none());
    }

    /// Blocks made by hand in one buffer: their contents are the test's to set.
    fn heap(words: usize) -> Vec<u64> {
        vec![0u64; words]
    }

    /// Asserts that `found` are the `expected` blocks, naming the first that differs.
    fn assert_same_blocks(found: &[(usize, usize)], expected: &[(usize, usize)]) {
        let first_difference = found.iter().zip(expected).find(|(a, b)| a != b);
        assert_eq!((found.len(), first_difference), (expected.len(), None));
    }

    /// Runs `f` while a thread stands in for the writer thread at exit, taking part
    /// in whatever work is on offer.
    fn with_a_helper(f: impl FnOnce()) {
        /// Stops the helper however `f` ends, so that a failing test fails, not hangs.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    HELP.take_part();
                    std::hint::spin_loop();
                }
            });
            let _stop = Stop(&stop);
            f();
        });
    }

    fn kinds(blocks: &[(usize, usize)], roots: &Roots) -> Vec<Option<Reach>> {
        classify(blocks, roots, &mut Memory::default())
    }

    #[test]
    fn blocks_are_told_apart_by_who_points_at_them() {
        // Six blocks of four words each; block i starts at word 4 * i.
        let mut mem = heap(24);
        let base = mem.as_ptr() as usize;
        let addr = |i: usize| (base + 32 * i) as u64;
        let blocks: Vec<(usize, usize)> = (0..6).map(|i| (addr(i) as usize, 32)).collect();
        // A static points into block 0, which points at block 1.
        let statics = [addr(0) + 8];
        mem[0] = addr(1);
        // Block 2 is pointed to by nothing and points at block 3.
        mem[8] = addr(3);
        // Blocks 4 and 5 point at each other.
        mem[16] = addr(5);
        mem[20] = addr(4);
        let roots = Roots {
            statics: vec![(statics.as_ptr() as usize, statics.as_ptr() as usize + 8)],
            stacks: Vec::new(),
            skip: Vec::new(),
        };
        assert_eq!(
            kinds(&blocks, &roots),
            vec![
                Some(Reach::FromStatic),
                Some(Reach::FromStatic),
                Some(Reach::DefinitelyLost),
                Some(Reach::IndirectlyLost),
                Some(Reach::Cycle),
                Some(Reach::Cycle),
            ]
        );
        drop(mem);
    }

    #[test]
    fn a_large_heap_read_with_a_helper_thread_gets_the_same_kinds() {
        // 4096 blocks of 2 KiB (8 MiB, past HELP_FROM_BYTES): block i points at blocks
        // 2i + 1 and 2i + 2 while they are below 3000, a static at block 0; the
        // blocks from 3000 on point at nothing and nothing points at them.
        const WORDS: usize = 256;
        let count = 4096;
        let mut mem = heap(WORDS * count);
        let base = mem.as_ptr() as usize;
        let addr = |i: usize| (base + 8 * WORDS * i) as u64;
        for i in 0..count {
            for (k, child) in [2 * i + 1, 2 * i + 2].into_iter().enumerate() {
                if child < 3000 {
                    mem[WORDS * i + k] = addr(child);
                }
            }
        }
        let blocks: Vec<(usize, usize)> =
            (0..count).map(|i| (addr(i) as usize, 8 * WORDS)).collect();
        let statics = [addr(0)];
        let roots = Roots {
            statics: vec![(statics.as_ptr() as usize, statics.as_ptr() as usize + 8)],
            stacks: Vec::new(),
            skip: Vec::new(),
        };
        with_a_helper(|| {
            for _ in 0..20 {
                let kinds = kinds(&blocks, &roots);
                assert!(kinds[..3000].iter().all(|k| *k == Some(Reach::FromStatic)));
                assert!(kinds[3000..]
                    .iter()
                    .all(|k| *k == Some(Reach::DefinitelyLost)));
            }
        });
        drop(mem);
    }

    #[test]
    fn a_stack_is_read_only_where_it_was_written() {
        // A "stack" of 64 pages of which one was written, holding a pointer to a block.
        let stack = crate::sys::Mapping::new(64 * PAGE);
        let mem = heap(8);
        let blocks = [
            (mem.as_ptr() as usize, 32),
            (mem.as_ptr() as usize + 32, 32),
        ];
        stack.write(40 * PAGE + 16, blocks[0].0 as u64);
        let roots = Roots {
            statics: Vec::new(),
            stacks: vec![(stack.start, stack.start + stack.len)],
            skip: Vec::new(),
        };
        let mut memory = Memory::default();
        assert_eq!(
            classify(&blocks, &roots, &mut memory),
            vec![Some(Reach::FromStack), Some(Reach::DefinitelyLost)]
        );
        let summary = &memory.summary;
        assert_eq!((summary.stacks, summary.stack_bytes), (1, PAGE as u64));
        drop(mem);
    }

    #[test]
    fn a_pointer_in_a_skipped_range_reaches_nothing() {
        let mem = heap(4);
        let block = (mem.as_ptr() as usize, 32);
        let statics = [block.0 as u64, 0];
        let start = statics.as_ptr() as usize;
        let roots = Roots {
            statics: vec![(start, start + 16)],
            stacks: Vec::new(),
            skip: vec![(start, start + 8)],
        };
        assert_eq!(kinds(&[block], &roots), vec![Some(Reach::DefinitelyLost)]);
        drop(mem);
    }

    #[test]
    fn unmapped_memory_is_skipped_and_counted() {
        let mut memory = Memory::default();
        // The zero page is never mapped.
        let read = memory.visit(0, 2 * PAGE, |_, _| panic!("nothing is readable there"));
        assert_eq!(
            (read, memory.summary.unreadable_bytes),
            (0, 2 * PAGE as u64)
        );
    }

    #[test]
    fn a_range_across_two_windows_is_read_whole_and_in_order() {
        let data: Vec<u8> = (0..3 * WINDOW).map(|i| (i % 251) as u8).collect();
        let base = data.as_ptr() as usize;
        // A range across the boundary between the second and third windows that `data`
        // covers whole (the windows before and after it are readable).
        let boundary = (base / WINDOW + 2) * WINDOW;
        let (start, len) = (boundary - 40, 100);
        let mut pieces = Vec::new();
        let read =
            Memory::default().visit(start, len, |at, bytes| pieces.push((at, bytes.to_vec())));

        assert_eq!(read, len as u64);
        assert_eq!(pieces.len(), 2, "one piece per window");
        assert_eq!(pieces[0].0, start);
        assert_eq!(pieces[1].0, boundary);
        let whole: Vec<u8> = pieces.into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(whole, data[start - base..start - base + len]);
    }

    #[test]
    fn the_block_index_finds_the_block_holding_an_address_as_a_search_of_all_would() {
        // Small blocks on shared pages, a large one over several pages, gaps.
        let page = 1usize << INDEX_PAGE_BITS;
        let base = 0x7f00_0000_0000usize;
        let blocks = vec![
            (base + 16, 32),
            (base + 64, 8),
            (base + page - 16, 48),
            (base + 3 * page + 100, 5 * page),
            (base + 9 * page, 1),
            (base + 9 * page + 1, 15),
        ];
        let index = BlockIndex::new(&blocks);
        let by_search = |addr: usize| {
            blocks
                .iter()
                .position(|&(start, size)| addr >= start && addr < start + size)
        };
        let probes = (0..12 * page)
            .step_by(4)
            .map(|o| base + o)
            .chain([0, usize::MAX]);
        for addr in probes {
            assert_eq!(index.block_at(addr), by_search(addr), "at {addr:#x}");
        }
    }

    #[test]
    fn cutting_ranges_keeps_what_is_outside_the_cuts() {
        assert_eq!(
            without(&[(0, 100)], &[(10, 20), (50, 60), (90, 200)]),
            vec![(0, 10), (20, 50), (60, 90)]
        );
    }
}
