//! Pure analysis of a merged event stream: [`replay`] turns events into a
//! [`Snapshot`] (totals, peak, sites, threads, timeline, problems, the blocks live at
//! exit) in one pass, and [`leaks`] groups the blocks live at exit by site.
//!
//! Totals follow dhat-rs's `HeapStats` (nnethercote/dhat-rs, `src/lib.rs`,
//! `update_counts_for_alloc`): a realloc is one more allocation event whose bytes are
//! its full new size, the live bytes change by `new - old`, the live block count stays,
//! and the peak is the *latest* moment the live bytes reach their maximum (`>=`). A
//! realloc of an address that is not live counts as a new block, as in dhat.
//!
//! Each site's share of the peak is found in the same pass with lazy epochs: every
//! new peak bumps a global epoch; before a site's live bytes change, a site last
//! touched in an older epoch still holds the value it had at the latest peak and
//! saves it. So each event costs O(1) and no second pass is needed.
//!
//! The timeline keeps at most [`TIMELINE_POINTS`] buckets; when time runs past the
//! last bucket, neighbouring buckets merge pairwise and the bucket width doubles.
//! Each bucket keeps its maximum (the latest one on ties), so the peak always shows.
//!
//! INTERNAL events (caused by memscope itself) are kept in the live map, so that their
//! frees pair correctly, but are counted only in [`Snapshot::internal`].
//!
//! Events the runtime's stripe race can stamp out of order (see the runtime's
//! `clock.rs`: a free stamped after the allocation that reuses its address on another
//! thread, or the other way round) are put back in order here: an allocation of a
//! live address, or a free of an address that is not live, is held back for up to
//! [`REORDER_WINDOW`] ticks, with the later events of its thread on that address,
//! until another thread's event on the address that must have come first arrives.
//! Only what is still held when the window closes is a problem.

use memscope::format::Reach;
use rustc_hash::FxHashMap;

use crate::trace::{ClockSample, Event, EventKind};

/// At most this many points in a timeline.
pub const TIMELINE_POINTS: usize = 1000;
/// At most this many problems are kept in detail; the rest are only counted.
pub const MAX_PROBLEMS: usize = 1000;
/// Freed addresses remembered to tell a double free from a free of an unknown pointer.
const FREED_MEMORY: usize = 1 << 20;
/// How long an out-of-order event is held back, in ticks: about 6 ms of time-stamp
/// counter at 3 GHz (16 ms where ticks are nanoseconds). The race inverts two stamps
/// by at most about one period of the runtime's coarse clock, a millisecond.
const REORDER_WINDOW: u64 = 1 << 24;

/// Maps raw ticks to nanoseconds since process start: a straight line through the
/// first and last `Clock` samples, anchored at the process's start time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clock {
    origin_ts: u64,
    origin_ns: f64,
    ns_per_tick: f64,
}

impl Clock {
    /// Needs two samples at different ticks; `None` otherwise (times are then unknown).
    pub fn fit(samples: &[ClockSample], start_unix_ns: u64) -> Option<Clock> {
        let first = samples.iter().min_by_key(|s| s.ts)?;
        let last = samples.iter().max_by_key(|s| s.ts)?;
        if last.ts <= first.ts || last.monotonic_ns < first.monotonic_ns {
            return None;
        }
        let ns_per_tick =
            (last.monotonic_ns - first.monotonic_ns) as f64 / (last.ts - first.ts) as f64;
        let origin_ns = first.unix_ns.saturating_sub(start_unix_ns) as f64;
        Some(Clock {
            origin_ts: first.ts,
            origin_ns,
            ns_per_tick,
        })
    }

    /// Nanoseconds since process start at tick `ts` (0 for ticks before the start).
    pub fn ns(&self, ts: u64) -> u64 {
        let ticks = ts as f64 - self.origin_ts as f64;
        (self.origin_ns + ticks * self.ns_per_tick).max(0.0).round() as u64
    }
}

/// Index into [`Snapshot::sites`].
pub type SiteId = u32;

/// Counts in the sense of dhat-rs's `HeapStats`; see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// `alloc` and `alloc_zeroed` calls.
    pub allocations: u64,
    /// Of which `alloc_zeroed`.
    pub zeroed_allocations: u64,
    pub reallocations: u64,
    /// Frees of live blocks.
    pub frees: u64,
    /// Sizes of allocations plus new sizes of reallocations.
    pub bytes_allocated: u64,
    pub live_blocks: u64,
    pub live_bytes: u64,
    pub peak_blocks: u64,
    pub peak_bytes: u64,
    /// Tick of the latest moment the live bytes were at their peak.
    pub peak_ts: u64,
}

/// The figures of one allocation site (one call stack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteStats {
    /// Stack hash (0: no stack recorded).
    pub stack: u64,
    /// The site's blocks were allocated by memscope itself.
    pub internal: bool,
    pub allocations: u64,
    pub reallocations: u64,
    pub bytes_allocated: u64,
    pub live_blocks: u64,
    pub live_bytes: u64,
    /// Live bytes of this site at the moment of the peak.
    pub peak_bytes: u64,
    /// Epoch of the last change; see the module documentation.
    epoch: u64,
}

/// The figures of one thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadStats {
    pub allocations: u64,
    pub reallocations: u64,
    /// Frees done by this thread.
    pub frees: u64,
    pub bytes_allocated: u64,
    /// Blocks allocated by this thread and still live (whoever frees them).
    pub live_blocks: u64,
    pub live_bytes: u64,
    /// Largest `live_bytes` ever.
    pub peak_bytes: u64,
    /// Ticks of the thread's first and last events.
    pub first_ts: Option<u64>,
    pub last_ts: u64,
    /// The same figures without the blocks [`replay_without`] leaves out.
    pub kept: Kept,
}

/// A thread's figures without the blocks of the stacks [`replay_without`] is asked to
/// leave out (their allocations, reallocations and frees), as if they had never been
/// allocated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    pub allocations: u64,
    pub reallocations: u64,
    pub bytes_allocated: u64,
    pub live_blocks: u64,
    pub live_bytes: u64,
    pub peak_bytes: u64,
}

/// A block in the live map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub size: u64,
    pub site: SiteId,
    /// The thread that allocated it.
    pub thread: u32,
    /// Tick of its (re)allocation.
    pub ts: u64,
    pub internal: bool,
    /// Left out of the threads' [`Kept`] figures.
    pub left_out: bool,
}

/// Something wrong the program did with the heap, as observed in the events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub ts: u64,
    pub thread: u32,
    pub addr: u64,
    /// For a double free: when and where the block was freed first.
    pub first_free: Option<(u64, u32)>,
    /// Site of the block involved, when known.
    pub site: Option<SiteId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// An address freed twice with no allocation in between.
    DoubleFree,
    /// A free of an address no recorded allocation returned.
    UnknownFree,
    /// A realloc of an address no recorded allocation returned.
    UnknownRealloc,
    /// An allocation returned an address that was still live: its free was not recorded.
    AddressStillLive,
}

/// Everything one pass over the events learns.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The program's own figures (INTERNAL events excluded).
    pub totals: Totals,
    /// memscope's own figures (peak fields unused).
    pub internal: Totals,
    pub sites: Vec<SiteStats>,
    pub threads: FxHashMap<u32, ThreadStats>,
    /// Blocks live at the end, by address.
    pub live: FxHashMap<u64, Block>,
    /// `(tick, live bytes)`, at most [`TIMELINE_POINTS`] + 1 points, time-ordered.
    pub timeline: Vec<(u64, u64)>,
    pub problems: Vec<Problem>,
    /// Problems of each kind, including those not kept in detail.
    pub problem_counts: FxHashMap<ProblemKind, u64>,
    pub first_ts: Option<u64>,
    pub last_ts: Option<u64>,
    pub events: u64,
}

/// Runs the events through the heap model.
pub fn replay(events: impl IntoIterator<Item = Event>) -> Snapshot {
    replay_without(events, |_| false)
}

/// [`replay`], with each thread's figures also [`Kept`] without the blocks whose
/// allocating stack `leave_out` names (a block keeps the stack it was first allocated
/// with): per-test figures without libtest's own blocks. `leave_out` is asked about
/// each stack once, when a block is first allocated with it.
pub fn replay_without(
    events: impl IntoIterator<Item = Event>,
    leave_out: impl FnMut(u64) -> bool,
) -> Snapshot {
    let mut state = State::new(leave_out);
    for event in events {
        state.offer(event);
    }
    state.release_held(u64::MAX);
    state.finish()
}

/// How an allocation event changed the heap.
#[derive(Clone, Copy)]
enum Growth {
    Alloc,
    Realloc {
        old_size: u64,
    },
    /// A realloc of an address that was not live.
    ReallocUnknown,
}

struct State<L> {
    snap: Snapshot,
    site_index: FxHashMap<(u64, bool), SiteId>,
    /// Per site: whether its blocks are left out of the [`Kept`] figures.
    site_left_out: Vec<bool>,
    leave_out: L,
    /// Per thread: the block (and its address) taken out by the free half of a
    /// realloc whose alloc half has not come yet.
    in_flight: FxHashMap<u32, Option<(u64, Block)>>,
    /// Recently freed addresses: tick and thread of the free, site of the block.
    freed: FxHashMap<u64, (u64, u32, SiteId)>,
    /// Events held back, by address: the out-of-order one first, then its thread's
    /// later events on the address (see the module documentation).
    held: FxHashMap<u64, Vec<Event>>,
    /// `(tick, address)` of each hold, in the order they started.
    holds: std::collections::VecDeque<(u64, u64)>,
    epoch: u64,
    timeline: Timeline,
    /// Per-thread figures by thread id, for ids below [`DENSE_THREADS`] (the runtime
    /// counts them up from 1); larger ids go to `snap.threads` directly.
    threads: Vec<Option<ThreadStats>>,
}

/// Thread ids [`State`] keeps in a vector rather than a map.
const DENSE_THREADS: usize = 1 << 16;

impl<L: FnMut(u64) -> bool> State<L> {
    fn new(leave_out: L) -> State<L> {
        State {
            snap: Snapshot::default(),
            site_index: FxHashMap::default(),
            site_left_out: Vec::new(),
            leave_out,
            in_flight: FxHashMap::default(),
            freed: FxHashMap::default(),
            held: FxHashMap::default(),
            holds: Default::default(),
            epoch: 0,
            timeline: Timeline::default(),
            threads: Vec::new(),
        }
    }

    /// Takes the next event of the merged stream: applies it, or holds it back when
    /// its stamp may be out of order (see the module documentation).
    fn offer(&mut self, e: Event) {
        if !self.holds.is_empty() {
            self.release_held(e.ts.saturating_sub(REORDER_WINDOW));
        }
        let (addr, is_alloc) = match e.kind {
            EventKind::Alloc { addr, .. } => (addr, true),
            EventKind::Free { addr } => (addr, false),
            _ => return self.apply(&e),
        };
        // Most of the time nothing is held (the map is empty): no lookup then.
        if let Some(queue) = (!self.held.is_empty())
            .then(|| self.held.get_mut(&addr))
            .flatten()
        {
            let first = &queue[0];
            if e.thread == first.thread {
                queue.push(e);
                return;
            }
            let first_is_alloc = matches!(first.kind, EventKind::Alloc { .. });
            let queue = self.held.remove(&addr).unwrap_or_default();
            if first_is_alloc != is_alloc {
                // The event the held ones were waiting for: it goes first.
                self.apply(&e);
                queue.iter().for_each(|h| self.apply(h));
            } else {
                queue.iter().for_each(|h| self.apply(h));
                self.offer(e);
            }
            return;
        }
        if !is_alloc {
            // A free of a live block, the common case: one lookup takes it out.
            if let Some(block) = self.snap.live.remove(&addr) {
                self.count(&e);
                return self.release(&e, addr, &block);
            }
        }
        if is_alloc == self.snap.live.contains_key(&addr) {
            self.holds.push_back((e.ts, addr));
            self.held.insert(addr, vec![e]);
        } else {
            self.apply(&e);
        }
    }

    /// Applies, in order, the holds that started at or before tick `until`.
    fn release_held(&mut self, until: u64) {
        while let Some(&(ts, addr)) = self.holds.front() {
            if ts > until {
                break;
            }
            self.holds.pop_front();
            let current = self.held.get(&addr).is_some_and(|q| q[0].ts == ts);
            if current {
                let queue = self.held.remove(&addr).unwrap_or_default();
                queue.iter().for_each(|h| self.apply(h));
            }
        }
    }

    fn apply(&mut self, e: &Event) {
        if let EventKind::Mark(_) = e.kind {
            return; // instrumentation, see `crate::instrument`
        }
        self.count(e);
        match e.kind {
            EventKind::Alloc {
                addr,
                size,
                zeroed,
                stack,
            } => {
                let site = self.site(stack, e.internal);
                let block = Block {
                    size,
                    site,
                    thread: e.thread,
                    ts: e.ts,
                    internal: e.internal,
                    left_out: self.site_left_out[site as usize],
                };
                self.place(e, addr, block);
                self.totals(e.internal).zeroed_allocations += u64::from(zeroed);
                self.grow(e, &block, Growth::Alloc);
            }
            EventKind::Free { addr } => match self.snap.live.remove(&addr) {
                Some(block) => self.release(e, addr, &block),
                None => self.bad_free(e, addr),
            },
            EventKind::ReallocFree { addr } => {
                let block = self.snap.live.remove(&addr);
                if block.is_none() {
                    self.bad_free(e, addr);
                }
                self.in_flight.insert(e.thread, block.map(|b| (addr, b)));
            }
            EventKind::ReallocAlloc {
                addr, size, stack, ..
            } => {
                let (block, growth) = match self.in_flight.remove(&e.thread).flatten() {
                    Some((_, old)) => (
                        Block {
                            size,
                            ts: e.ts,
                            ..old
                        },
                        Growth::Realloc { old_size: old.size },
                    ),
                    None => {
                        // A realloc of an unknown block counts as a new block, as in dhat.
                        let site = self.site(stack, e.internal);
                        let block = Block {
                            size,
                            site,
                            thread: e.thread,
                            ts: e.ts,
                            internal: e.internal,
                            left_out: self.site_left_out[site as usize],
                        };
                        (block, Growth::ReallocUnknown)
                    }
                };
                self.place(e, addr, block);
                self.grow(e, &block, growth);
            }
            EventKind::Mark(_) => {}
        }
    }

    /// Counts an event that is applied, and when it came.
    fn count(&mut self, e: &Event) {
        self.snap.events += 1;
        self.snap.first_ts.get_or_insert(e.ts);
        self.snap.last_ts = Some(e.ts);
        let actor = self.thread(e.thread);
        actor.first_ts.get_or_insert(e.ts);
        actor.last_ts = e.ts;
    }

    /// Accounts an allocation event that made `block` what it is now.
    fn grow(&mut self, e: &Event, block: &Block, growth: Growth) {
        let (old, new_block) = match growth {
            Growth::Alloc | Growth::ReallocUnknown => (0, 1),
            Growth::Realloc { old_size } => (old_size, 0),
        };
        let realloc = u64::from(!matches!(growth, Growth::Alloc));
        let new = block.size;

        let totals = self.totals(block.internal);
        totals.allocations += 1 - realloc;
        totals.reallocations += realloc;
        totals.bytes_allocated += new;
        totals.live_bytes = totals.live_bytes - old + new;
        totals.live_blocks += new_block;

        self.touch_site(block.site);
        let site = &mut self.snap.sites[block.site as usize];
        site.allocations += 1 - realloc;
        site.reallocations += realloc;
        site.bytes_allocated += new;
        site.live_bytes = site.live_bytes - old + new;
        site.live_blocks += new_block;

        let kept = !block.left_out;
        let actor = self.thread(e.thread);
        actor.allocations += 1 - realloc;
        actor.reallocations += realloc;
        actor.bytes_allocated += new;
        if kept {
            let k = &mut actor.kept;
            k.allocations += 1 - realloc;
            k.reallocations += realloc;
            k.bytes_allocated += new;
        }
        let owner = self.thread(block.thread);
        owner.live_bytes = owner.live_bytes - old + new;
        owner.live_blocks += new_block;
        owner.peak_bytes = owner.peak_bytes.max(owner.live_bytes);
        if kept {
            let k = &mut owner.kept;
            k.live_bytes = k.live_bytes - old + new;
            k.live_blocks += new_block;
            k.peak_bytes = k.peak_bytes.max(k.live_bytes);
        }

        if !block.internal {
            let t = &mut self.snap.totals;
            if t.live_bytes >= t.peak_bytes {
                t.peak_bytes = t.live_bytes;
                t.peak_blocks = t.live_blocks;
                t.peak_ts = e.ts;
                self.epoch += 1;
            }
            self.timeline.record(e.ts, t.live_bytes);
        }
    }

    /// Accounts the free of a live block by thread `e.thread`.
    fn release(&mut self, e: &Event, addr: u64, block: &Block) {
        self.totals(block.internal).frees += 1;
        self.thread(e.thread).frees += 1;
        self.forget(block);
        if !block.internal {
            self.timeline.record(e.ts, self.snap.totals.live_bytes);
        }
        if self.freed.len() >= FREED_MEMORY {
            self.freed.clear();
        }
        self.freed.insert(addr, (e.ts, e.thread, block.site));
    }

    /// Takes a block out of the live figures.
    fn forget(&mut self, block: &Block) {
        let totals = self.totals(block.internal);
        totals.live_blocks -= 1;
        totals.live_bytes -= block.size;
        self.touch_site(block.site);
        let site = &mut self.snap.sites[block.site as usize];
        site.live_blocks -= 1;
        site.live_bytes -= block.size;
        let owner = self.thread(block.thread);
        owner.live_blocks -= 1;
        owner.live_bytes -= block.size;
        if !block.left_out {
            owner.kept.live_blocks -= 1;
            owner.kept.live_bytes -= block.size;
        }
    }

    /// A free (or realloc) of an address that is not live.
    fn bad_free(&mut self, e: &Event, addr: u64) {
        if matches!(e.kind, EventKind::ReallocFree { .. }) {
            return self.problem(e, ProblemKind::UnknownRealloc, addr, None, |_| {});
        }
        match self.freed.get(&addr).copied() {
            Some((ts, thread, site)) => {
                self.problem(e, ProblemKind::DoubleFree, addr, Some(site), |p| {
                    p.first_free = Some((ts, thread))
                })
            }
            None => self.problem(e, ProblemKind::UnknownFree, addr, None, |_| {}),
        }
    }

    /// Makes `block` the one live at `addr`; a block still there lost its free.
    fn place(&mut self, e: &Event, addr: u64, block: Block) {
        self.freed.remove(&addr);
        if let Some(stale) = self.snap.live.insert(addr, block) {
            self.problem(
                e,
                ProblemKind::AddressStillLive,
                addr,
                Some(stale.site),
                |_| {},
            );
            self.forget(&stale);
        }
    }

    /// Saves a site's value at the latest peak before it changes.
    fn touch_site(&mut self, site: SiteId) {
        let site = &mut self.snap.sites[site as usize];
        if site.epoch != self.epoch {
            site.peak_bytes = site.live_bytes;
            site.epoch = self.epoch;
        }
    }

    fn site(&mut self, stack: u64, internal: bool) -> SiteId {
        let sites = &mut self.snap.sites;
        let (left_out, leave_out) = (&mut self.site_left_out, &mut self.leave_out);
        *self.site_index.entry((stack, internal)).or_insert_with(|| {
            left_out.push(leave_out(stack));
            sites.push(SiteStats {
                stack,
                internal,
                allocations: 0,
                reallocations: 0,
                bytes_allocated: 0,
                live_blocks: 0,
                live_bytes: 0,
                peak_bytes: 0,
                epoch: 0,
            });
            (sites.len() - 1) as SiteId
        })
    }

    fn totals(&mut self, internal: bool) -> &mut Totals {
        if internal {
            &mut self.snap.internal
        } else {
            &mut self.snap.totals
        }
    }

    /// The figures of `thread`: a thread seen before is the common case, inlined into
    /// every event's accounting (two or three times an event).
    #[inline(always)]
    fn thread(&mut self, thread: u32) -> &mut ThreadStats {
        let i = thread as usize;
        if self.threads.get(i).is_some_and(Option::is_some) {
            return self.threads[i].as_mut().expect("checked just above");
        }
        self.new_thread(thread)
    }

    #[inline(never)]
    fn new_thread(&mut self, thread: u32) -> &mut ThreadStats {
        let i = thread as usize;
        if i >= DENSE_THREADS {
            return self.snap.threads.entry(thread).or_default();
        }
        if i >= self.threads.len() {
            self.threads.resize_with(i + 1, || None);
        }
        self.threads[i].get_or_insert_with(ThreadStats::default)
    }

    fn problem(
        &mut self,
        e: &Event,
        kind: ProblemKind,
        addr: u64,
        site: Option<SiteId>,
        detail: impl FnOnce(&mut Problem),
    ) {
        *self.snap.problem_counts.entry(kind).or_default() += 1;
        if self.snap.problems.len() < MAX_PROBLEMS {
            let mut p = Problem {
                kind,
                ts: e.ts,
                thread: e.thread,
                addr,
                first_free: None,
                site,
            };
            detail(&mut p);
            self.snap.problems.push(p);
        }
    }

    fn finish(mut self) -> Snapshot {
        // A realloc whose second half never came (the trace was cut between them):
        // its old block is still live as far as anyone knows.
        for (addr, block) in std::mem::take(&mut self.in_flight).into_values().flatten() {
            match self.snap.live.entry(addr) {
                std::collections::hash_map::Entry::Occupied(_) => self.forget(&block),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(block);
                }
            }
        }
        let dense = std::mem::take(&mut self.threads).into_iter().enumerate();
        self.snap
            .threads
            .extend(dense.filter_map(|(i, t)| Some((i as u32, t?))));
        let epoch = self.epoch;
        for site in &mut self.snap.sites {
            if site.epoch != epoch {
                site.peak_bytes = site.live_bytes;
            }
        }
        if self.snap.totals.peak_bytes == 0 {
            for site in &mut self.snap.sites {
                site.peak_bytes = 0;
            }
        }
        self.snap.timeline = self
            .timeline
            .points(self.snap.last_ts, self.snap.totals.live_bytes);
        self.snap
    }
}

/// Live bytes over time, bounded; see the module documentation.
#[derive(Default)]
struct Timeline {
    t0: u64,
    /// log2 of the bucket width in ticks (a shift, not a division, for every event).
    shift: u32,
    /// Per bucket: the tick and value of its maximum; empty until the first event.
    buckets: Vec<Option<(u64, u64)>>,
}

impl Timeline {
    fn record(&mut self, ts: u64, bytes: u64) {
        if self.buckets.is_empty() {
            self.t0 = ts;
            self.buckets = vec![None; TIMELINE_POINTS];
        }
        let mut i = ts.saturating_sub(self.t0) >> self.shift;
        while i >= TIMELINE_POINTS as u64 {
            self.halve();
            i = ts.saturating_sub(self.t0) >> self.shift;
        }
        let slot = &mut self.buckets[i as usize];
        match slot {
            Some((_, max)) if *max > bytes => {}
            _ => *slot = Some((ts, bytes)),
        }
    }

    /// Merges neighbouring buckets, doubling the width.
    fn halve(&mut self) {
        for i in 0..TIMELINE_POINTS / 2 {
            let (a, b) = (self.buckets[2 * i], self.buckets[2 * i + 1]);
            self.buckets[i] = match (a, b) {
                (Some(a), Some(b)) => Some(if a.1 > b.1 { a } else { b }),
                (a, b) => a.or(b),
            };
        }
        for slot in &mut self.buckets[TIMELINE_POINTS / 2..] {
            *slot = None;
        }
        self.shift += 1;
    }

    /// The bucket maxima, plus the final value at the last event.
    fn points(&self, last_ts: Option<u64>, final_bytes: u64) -> Vec<(u64, u64)> {
        let mut points: Vec<(u64, u64)> = self.buckets.iter().flatten().copied().collect();
        if let Some(last) = last_ts {
            match points.last() {
                Some(&(ts, bytes)) if ts == last && bytes == final_bytes => {}
                Some(&(ts, _)) if ts == last => points.push((last, final_bytes)),
                _ => points.push((last, final_bytes)),
            }
        }
        points
    }
}

/// The blocks live at exit of one site that the exit-time scan found the same about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeakGroup {
    pub site: SiteId,
    /// What the exit-time scan found; `None` where it did not run.
    pub reach: Option<Reach>,
    pub blocks: u64,
    pub bytes: u64,
    pub largest: u64,
    /// Threads that allocated them, with their block and byte counts, most blocks first.
    pub threads: Vec<(u32, u64, u64)>,
    /// Tick of the earliest (re)allocation among them.
    pub first_ts: u64,
}

/// Groups the blocks live at exit by site and by what the exit-time scan found about
/// them (`reach`, by address), largest groups first. INTERNAL blocks are grouped too
/// (their sites are marked `internal`); the caller decides what they are.
pub fn leaks(snapshot: &Snapshot, reach: &FxHashMap<u64, Reach>) -> Vec<LeakGroup> {
    /// Per thread of a group: its blocks and bytes.
    type ByThread = FxHashMap<u32, (u64, u64)>;
    let mut groups: FxHashMap<(SiteId, Option<Reach>), (LeakGroup, ByThread)> =
        FxHashMap::default();
    for (addr, block) in &snapshot.live {
        let found = reach.get(addr).copied();
        let (g, threads) = groups.entry((block.site, found)).or_insert_with(|| {
            let group = LeakGroup {
                site: block.site,
                reach: found,
                blocks: 0,
                bytes: 0,
                largest: 0,
                threads: Vec::new(),
                first_ts: u64::MAX,
            };
            (group, FxHashMap::default())
        });
        g.blocks += 1;
        g.bytes += block.size;
        g.largest = g.largest.max(block.size);
        g.first_ts = g.first_ts.min(block.ts);
        let (n, bytes) = threads.entry(block.thread).or_default();
        *n += 1;
        *bytes += block.size;
    }
    let mut out: Vec<LeakGroup> = groups
        .into_values()
        .map(|(mut g, threads)| {
            g.threads = threads.into_iter().map(|(t, (n, b))| (t, n, b)).collect();
            g.threads
                .sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            g
        })
        .collect();
    out.sort_unstable_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(a.site.cmp(&b.site))
            .then(a.reach.cmp(&b.reach))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ts: u64, thread: u32, kind: EventKind) -> Event {
        Event {
            ts,
            thread,
            internal: false,
            kind,
        }
    }
    fn alloc(ts: u64, addr: u64, size: u64, stack: u64) -> Event {
        ev(
            ts,
            1,
            EventKind::Alloc {
                addr,
                size,
                zeroed: false,
                stack,
            },
        )
    }
    fn free(ts: u64, addr: u64, _size: u64) -> Event {
        ev(ts, 1, EventKind::Free { addr })
    }
    fn realloc(ts: u64, old_addr: u64, addr: u64, size: u64) -> [Event; 2] {
        [
            ev(ts, 1, EventKind::ReallocFree { addr: old_addr }),
            ev(
                ts + 1,
                1,
                EventKind::ReallocAlloc {
                    old_addr,
                    addr,
                    size,
                    stack: 0,
                },
            ),
        ]
    }

    /// The figures dhat-rs's `HeapStats` would give for the same calls.
    struct Dhat {
        total_blocks: u64,
        total_bytes: u64,
        curr_blocks: u64,
        curr_bytes: u64,
        max_blocks: u64,
        max_bytes: u64,
    }

    fn dhat_view(t: &Totals) -> Dhat {
        Dhat {
            total_blocks: t.allocations + t.reallocations,
            total_bytes: t.bytes_allocated,
            curr_blocks: t.live_blocks,
            curr_bytes: t.live_bytes,
            max_blocks: t.peak_blocks,
            max_bytes: t.peak_bytes,
        }
    }

    #[test]
    fn a_known_sequence_gives_exact_totals_and_peak_the_way_dhat_counts() {
        let mut events = vec![alloc(1, 0x10, 100, 1), alloc(2, 0x20, 50, 1)];
        events.extend(realloc(3, 0x10, 0x30, 300)); // live 350, peak
        events.push(free(5, 0x20, 50)); // live 300
        events.push(ev(
            6,
            1,
            EventKind::Alloc {
                addr: 0x40,
                size: 50,
                zeroed: true,
                stack: 2,
            },
        )); // 350 again: latest peak
        events.push(free(7, 0x30, 300)); // 50 live at exit
        let snap = replay(events);
        let t = snap.totals;
        assert_eq!(
            (
                t.allocations,
                t.zeroed_allocations,
                t.reallocations,
                t.frees
            ),
            (3, 1, 1, 2)
        );
        assert_eq!(
            (t.bytes_allocated, t.live_blocks, t.live_bytes),
            (500, 1, 50)
        );
        assert_eq!((t.peak_bytes, t.peak_blocks, t.peak_ts), (350, 2, 6));
        let d = dhat_view(&t);
        assert_eq!((d.total_blocks, d.total_bytes), (4, 500));
        assert_eq!(
            (d.curr_blocks, d.curr_bytes, d.max_blocks, d.max_bytes),
            (1, 50, 2, 350)
        );
        assert!(snap.problems.is_empty());
    }

    #[test]
    fn a_realloc_stays_with_the_site_that_allocated_the_block() {
        let mut events = vec![alloc(1, 0x10, 8, 5)];
        events.extend(realloc(2, 0x10, 0x20, 64));
        let snap = replay(events);
        assert_eq!(snap.sites.len(), 1);
        let s = &snap.sites[0];
        assert_eq!(
            (s.stack, s.allocations, s.reallocations, s.bytes_allocated),
            (5, 1, 1, 72)
        );
        assert_eq!((s.live_blocks, s.live_bytes), (1, 64));
        assert_eq!(snap.live[&0x20].size, 64);
    }

    #[test]
    fn each_site_gets_its_live_bytes_at_the_moment_of_the_peak() {
        let events = vec![
            alloc(1, 0x10, 100, 1),
            alloc(2, 0x20, 200, 2),
            alloc(3, 0x30, 300, 3), // peak 600
            free(4, 0x30, 300),
            free(5, 0x10, 100),
            alloc(6, 0x40, 250, 1), // 450, not a peak
            alloc(7, 0x50, 10, 3),  // 460
        ];
        let snap = replay(events);
        assert_eq!(snap.totals.peak_bytes, 600);
        let at_peak: Vec<u64> = snap.sites.iter().map(|s| s.peak_bytes).collect();
        assert_eq!(at_peak, vec![100, 200, 300]);
        assert_eq!(at_peak.iter().sum::<u64>(), snap.totals.peak_bytes);
    }

    #[test]
    fn a_second_free_of_the_same_address_is_a_double_free_and_a_stranger_is_unknown() {
        let snap = replay(vec![
            alloc(1, 0x10, 8, 1),
            free(2, 0x10, 8),
            free(3, 0x10, 8),
            free(4, 0x99, 8),
        ]);
        let kinds: Vec<_> = snap.problems.iter().map(|p| (p.kind, p.addr)).collect();
        assert_eq!(
            kinds,
            vec![
                (ProblemKind::DoubleFree, 0x10),
                (ProblemKind::UnknownFree, 0x99)
            ]
        );
        assert_eq!(snap.problems[0].first_free, Some((2, 1)));
        assert_eq!(snap.totals.frees, 1);
        assert_eq!(snap.totals.live_blocks, 0);
    }

    #[test]
    fn a_reused_address_is_not_a_double_free() {
        let snap = replay(vec![
            alloc(1, 0x10, 8, 1),
            free(2, 0x10, 8),
            alloc(3, 0x10, 8, 1),
            free(4, 0x10, 8),
        ]);
        assert!(snap.problems.is_empty());
    }

    fn on(thread: u32, e: Event) -> Event {
        Event { thread, ..e }
    }

    #[test]
    fn an_allocation_stamped_before_the_free_it_follows_on_another_thread_is_put_after_it() {
        let snap = replay(vec![
            on(1, alloc(1, 0x10, 8, 1)),
            on(2, alloc(5, 0x10, 16, 2)),
            on(2, alloc(6, 0x99, 1, 2)),
            on(1, free(7, 0x10, 8)),
        ]);
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert_eq!(snap.live[&0x10].size, 16);
        assert_eq!((snap.totals.frees, snap.totals.live_blocks), (1, 2));
    }

    #[test]
    fn a_free_stamped_before_the_allocation_it_follows_on_another_thread_is_put_after_it() {
        let snap = replay(vec![on(2, free(9, 0x20, 8)), on(1, alloc(10, 0x20, 8, 1))]);
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert!(snap.live.is_empty());
        assert_eq!(snap.totals.frees, 1);
    }

    #[test]
    fn a_held_allocation_keeps_its_threads_later_events_behind_it() {
        // Thread 2 reuses the address and frees its block before thread 1's free of
        // the old block, stamped late, arrives.
        let snap = replay(vec![
            on(1, alloc(1, 0x30, 8, 1)),
            on(2, alloc(5, 0x30, 16, 2)),
            on(2, free(6, 0x30, 16)),
            on(1, free(7, 0x30, 8)),
        ]);
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert!(snap.live.is_empty());
        assert_eq!(snap.totals.frees, 2);
    }

    #[test]
    fn an_allocation_of_a_live_address_is_a_problem_once_the_window_has_passed() {
        let snap = replay(vec![
            on(1, alloc(1, 0x40, 8, 1)),
            on(2, alloc(5, 0x40, 16, 2)),
            on(1, free(6 + REORDER_WINDOW, 0x40, 8)),
        ]);
        let kinds: Vec<ProblemKind> = snap.problems.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [ProblemKind::AddressStillLive]);
    }

    #[test]
    fn memscopes_own_blocks_stay_out_of_the_programs_figures() {
        let internal = Event {
            internal: true,
            ..alloc(2, 0x20, 1000, 0)
        };
        let snap = replay(vec![
            alloc(1, 0x10, 8, 1),
            internal,
            ev(3, 2, EventKind::Free { addr: 0x20 }),
        ]);
        assert_eq!(
            (
                snap.totals.allocations,
                snap.totals.peak_bytes,
                snap.totals.frees
            ),
            (1, 8, 0)
        );
        assert_eq!(
            (
                snap.internal.allocations,
                snap.internal.frees,
                snap.internal.live_bytes
            ),
            (1, 1, 0)
        );
    }

    #[test]
    fn per_thread_figures_follow_the_allocating_thread() {
        let events = vec![
            ev(
                1,
                1,
                EventKind::Alloc {
                    addr: 0x10,
                    size: 64,
                    zeroed: false,
                    stack: 0,
                },
            ),
            ev(
                2,
                2,
                EventKind::Alloc {
                    addr: 0x20,
                    size: 32,
                    zeroed: false,
                    stack: 0,
                },
            ),
            ev(3, 2, EventKind::Free { addr: 0x10 }),
        ];
        let snap = replay(events);
        let (one, two) = (&snap.threads[&1], &snap.threads[&2]);
        assert_eq!(
            (one.allocations, one.frees, one.live_bytes, one.peak_bytes),
            (1, 0, 0, 64)
        );
        assert_eq!(
            (two.allocations, two.frees, two.live_bytes, two.peak_bytes),
            (1, 1, 32, 32)
        );
    }

    #[test]
    fn dropping_a_stacks_blocks_drops_their_reallocations_and_frees_too() {
        let harness = 9;
        let mut events = vec![
            alloc(1, 0x10, 100, 1),
            alloc(2, 0x20, 5000, harness), // would be the peak
        ];
        events.extend(realloc(3, 0x20, 0x30, 6000)); // stays the harness's
        events.push(free(5, 0x30, 6000));
        events.push(alloc(6, 0x30, 40, 1)); // the address, reused by a kept block
        events.extend(realloc(7, 0x10, 0x40, 200));
        let snap = replay_without(events.clone(), |stack| stack == harness);
        let (all, plain) = (&snap.threads[&1], &replay(events).threads[&1]);
        assert_eq!(all.peak_bytes, 6100);
        assert_eq!(
            Kept { ..all.kept },
            Kept {
                allocations: 2,
                reallocations: 1,
                bytes_allocated: 100 + 40 + 200,
                peak_bytes: 240,
                live_blocks: 2,
                live_bytes: 240,
            }
        );
        // Leaving blocks out of the kept figures changes no other figure.
        assert_eq!(
            ThreadStats {
                kept: Kept::default(),
                ..all.clone()
            },
            ThreadStats {
                kept: Kept::default(),
                ..plain.clone()
            }
        );
        assert_eq!(
            plain.kept,
            Kept {
                allocations: plain.allocations,
                reallocations: plain.reallocations,
                bytes_allocated: plain.bytes_allocated,
                live_blocks: plain.live_blocks,
                live_bytes: plain.live_bytes,
                peak_bytes: plain.peak_bytes
            }
        );
        assert!(snap.problems.is_empty(), "{:?}", snap.problems);
        assert_eq!(snap.live.values().filter(|b| !b.left_out).count(), 2);
    }

    #[test]
    fn blocks_live_at_exit_are_grouped_by_site_largest_first() {
        let snap = replay(vec![
            alloc(1, 0x10, 8, 1),
            alloc(2, 0x20, 8, 1),
            alloc(3, 0x30, 4096, 2),
            alloc(4, 0x40, 1, 3),
            free(5, 0x40, 1),
        ]);
        let groups = leaks(&snap, &FxHashMap::default());
        let got: Vec<_> = groups
            .iter()
            .map(|g| (snap.sites[g.site as usize].stack, g.blocks, g.bytes))
            .collect();
        assert_eq!(got, vec![(2, 1, 4096), (1, 2, 16)]);
        assert_eq!(groups[1].threads, vec![(1, 2, 16)]);
    }

    #[test]
    fn a_sites_blocks_are_grouped_apart_by_what_the_exit_scan_found() {
        let snap = replay(vec![
            alloc(1, 0x10, 8, 1),
            alloc(2, 0x20, 8, 1),
            alloc(3, 0x30, 8, 1),
        ]);
        let reach: FxHashMap<u64, Reach> =
            [(0x10, Reach::FromStatic), (0x20, Reach::DefinitelyLost)]
                .into_iter()
                .collect();
        let got: Vec<_> = leaks(&snap, &reach)
            .iter()
            .map(|g| (g.reach, g.blocks, g.bytes))
            .collect();
        // 0x30 was not in the scan's records: its kind is not known.
        let mut expected = vec![
            (Some(Reach::FromStatic), 1, 8),
            (Some(Reach::DefinitelyLost), 1, 8),
            (None, 1, 8),
        ];
        expected.sort_by_key(|e| e.0);
        let mut got = got;
        got.sort_by_key(|e| e.0);
        assert_eq!(got, expected);
    }

    #[test]
    fn the_timeline_stays_bounded_and_keeps_the_peak() {
        let mut events = Vec::new();
        for i in 0..100_000u64 {
            events.push(alloc(2 * i, 0x1000 + i, 10, 1));
            let size = if i == 31_337 { 1_000_000 } else { 10 };
            events.push(alloc(2 * i + 1, 0x1000_0000 + i, size, 1));
            events.push(free(2 * i + 1, 0x1000_0000 + i, size));
        }
        let snap = replay(events);
        assert!(
            snap.timeline.len() <= TIMELINE_POINTS + 1,
            "{}",
            snap.timeline.len()
        );
        assert!(snap.timeline.len() >= TIMELINE_POINTS / 2);
        assert!(snap
            .timeline
            .contains(&(snap.totals.peak_ts, snap.totals.peak_bytes)));
        assert_eq!(snap.timeline.last(), Some(&(199_999, 1_000_000)));
        assert!(snap.timeline.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn the_clock_maps_ticks_to_nanoseconds_since_start() {
        let samples = [
            ClockSample {
                ts: 1000,
                monotonic_ns: 50,
                unix_ns: 10_500,
            },
            ClockSample {
                ts: 3000,
                monotonic_ns: 1050,
                unix_ns: 11_500,
            },
        ];
        let clock = Clock::fit(&samples, 10_000).unwrap();
        assert_eq!(clock.ns(1000), 500);
        assert_eq!(clock.ns(2000), 1000);
        assert_eq!(clock.ns(0), 0);
        assert_eq!(Clock::fit(&samples[..1], 10_000), None);
    }
}

/// Throughput of the whole read path (index, merge, replay) on a large synthetic
/// trace. Run with `cargo test --release -p cargo-memscope -- --ignored --nocapture
/// analysis_streams`; set `MEMSCOPE_BENCH_EVENTS` to change the event count.
#[cfg(test)]
mod bench {
    use crate::trace::testing::{alloc, free, stack, TraceBytes};
    use crate::trace::Trace;
    use memscope::format::{ChunkHeader, Encoder};
    use std::io::Write;

    #[test]
    #[ignore = "takes a while; a measurement, not a check"]
    #[allow(clippy::needless_range_loop)] // `t` names a thread and indexes several arrays
    fn analysis_streams_millions_of_events_in_bounded_memory() {
        let events: u64 = std::env::var("MEMSCOPE_BENCH_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(25_000_000);
        let threads = 4u32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.mstrace");
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        file.write_all(&TraceBytes::new().meta(0, Some(u64::MAX)).bytes)
            .unwrap();

        // Each thread keeps a window of 1,000 live blocks: allocate, and free the block
        // allocated 1,000 steps earlier. Chunks of 64 KiB, threads interleaved.
        let per_thread = events / u64::from(threads) / 2;
        let mut index = vec![0u32; threads as usize];
        let mut enc: Vec<Encoder> = (0..threads).map(|_| Encoder::default()).collect();
        let mut flush =
            |t: usize, enc: &mut Encoder, file: &mut std::io::BufWriter<std::fs::File>| {
                let header = ChunkHeader {
                    thread: t as u32 + 1,
                    index: index[t],
                    len: enc.bytes.len() as u32,
                    checksum: memscope::format::checksum(&enc.bytes),
                };
                index[t] += 1;
                file.write_all(&header.encode()).unwrap();
                file.write_all(&enc.bytes).unwrap();
                enc.bytes.clear();
            };
        let stacks: Vec<(memscope::format::Record, u64)> = (0..64u64)
            .map(|s| stack(&[0x1000 + s, 0x2000, 0x3000]))
            .collect();
        for e in &mut enc {
            for (record, _) in &stacks {
                e.record(record);
            }
        }
        for i in 0..per_thread {
            for t in 0..threads as usize {
                let ts = i * 8 + t as u64;
                let base = (t as u64 + 1) << 40;
                let hash = stacks[(i % 64) as usize].1;
                enc[t].record(&alloc(ts, base + (i % 4096) * 64, 16 + i % 200, hash));
                if i >= 1000 {
                    let old = i - 1000;
                    enc[t].record(&free(ts + 1, base + (old % 4096) * 64));
                }
                if enc[t].bytes.len() >= 64 * 1024 {
                    flush(t, &mut enc[t], &mut file);
                }
            }
        }
        for t in 0..threads as usize {
            flush(t, &mut enc[t], &mut file);
        }
        drop(file);

        let size = std::fs::metadata(&path).unwrap().len();
        let start = std::time::Instant::now();
        let trace = Trace::open(&path).unwrap();
        let indexed = start.elapsed();
        let mut stream = trace.events();
        let snap = super::replay(stream.by_ref());
        let elapsed = start.elapsed();
        let (tables, damage) = stream.finish();
        assert!(
            damage.is_empty() && trace.damage.is_empty(),
            "{damage:?} {:?}",
            trace.damage
        );
        assert_eq!(tables.stacks.len(), 64);
        assert_eq!(snap.live.len(), threads as usize * 1000);
        eprintln!(
            "{} events, {:.0} MiB trace: indexed in {:.2?}, analysed in {:.2?}: {:.1} M events/s; peak RSS {}",
            snap.events,
            size as f64 / (1 << 20) as f64,
            indexed,
            elapsed,
            snap.events as f64 / elapsed.as_secs_f64() / 1e6,
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM")).map(str::to_owned))
                .unwrap_or_default(),
        );
    }
}
