//! What instrumentation records say (`#[memscope::instrument]`, `memscope::scope`,
//! `track!`, tasks): the scope tree, variables and tasks of one process, and the
//! variable names of allocation sites and leaks.
//!
//! [`Collector::observe`] sees the merged event stream next to [`crate::replay`], in
//! the same pass. Per thread it keeps the stack of scopes entered and not yet left;
//! each allocation belongs to the innermost one (stream order is the thread's own
//! order). From the first instrumentation record on, it keeps a tag per live block
//! (scope, task, stack, and the variables that named it), so memory grows with live
//! blocks, like the replay's own map. A variable names the blocks its value owned
//! when it was bound (`OWNS`); a reallocation moves the names to the new address and a
//! free ends them. Names on blocks the analysis had to deduce (followed through a
//! reallocation, or an interior pointer resolved to the block around it) have basis
//! `inferred`; the others `declared`.

use std::collections::BTreeMap;

use memscope::format::{DefClass, OwnedBlock, Record, TaskState};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::replay::{SiteId, Snapshot};
use crate::report::{Basis, Location};
use crate::trace::{Event, EventKind, Mark};

/// An interned name from a `DEF` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Def {
    pub class: Option<DefClass>,
    pub name: String,
    /// Module path (functions, scopes, task sites) or type (variables).
    pub detail: String,
    pub file: String,
    pub line: u32,
    pub column: u32,
}

/// The names of one trace, filled in by the reader (they may come after the events
/// that use them).
#[derive(Debug, Default)]
pub struct Names {
    pub defs: FxHashMap<u64, Def>,
    pub task_names: FxHashMap<u64, String>,
    /// The process wrote an `INSTRUMENTED` record.
    pub instrumented: bool,
}

impl Names {
    /// Takes a record that names things; false if `record` is not one.
    pub fn take(&mut self, record: &Record) -> bool {
        match record {
            Record::Instrumented { .. } => self.instrumented = true,
            Record::Def {
                id,
                class,
                line,
                column,
                name,
                detail,
                file,
                ..
            } => {
                self.defs.insert(
                    *id,
                    Def {
                        class: DefClass::from_u8(*class),
                        name: name.clone(),
                        detail: detail.clone(),
                        file: file.clone(),
                        line: *line,
                        column: *column,
                    },
                );
            }
            Record::Task { id, name, .. } if !name.is_empty() => {
                self.task_names.insert(*id, name.clone());
            }
            _ => return false,
        }
        true
    }
}

const NONE: u32 = u32::MAX;

/// Figures of a scope or task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub allocations: u64,
    pub reallocations: u64,
    /// Sizes of allocations plus new sizes of reallocations (as the totals count).
    pub bytes_allocated: u64,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.allocations += o.allocations;
        self.reallocations += o.reallocations;
        self.bytes_allocated += o.bytes_allocated;
        self.live_blocks_at_exit += o.live_blocks_at_exit;
        self.live_bytes_at_exit += o.live_bytes_at_exit;
    }
}

struct Node {
    parent: u32,
    /// The `DEF` id of the scope (for a task: of its site).
    def: u64,
    entries: u64,
    own: Figures,
}

struct TaskInfo {
    id: u64,
    site: u64,
    polls: u64,
    own: Figures,
    state: Option<u8>,
}

#[derive(Clone, Copy)]
struct Frame {
    node: u32,
    task: u32,
    /// The id that was entered (a scope's `DEF` id or a task id).
    id: u64,
}

/// What the collector knows about a live block.
#[derive(Clone, Copy)]
struct Tag {
    node: u32,
    task: u32,
    /// Stack hash; `None` for a block allocated before instrumentation began.
    stack: Option<u64>,
    /// The latest link naming this block, or NONE.
    link: u32,
}

/// A variable naming a block.
struct Link {
    var: u64,
    ts: u64,
    claim: OwnedBlock,
    /// Another variable that named the same block before, or NONE.
    prev: u32,
    /// The block was found where the variable said it starts.
    exact: bool,
    reallocated: bool,
    freed: bool,
    stack: Option<u64>,
}

/// Follows the event stream; see the module documentation.
#[derive(Default)]
pub struct Collector {
    active: bool,
    stacks: FxHashMap<u32, Vec<Frame>>,
    nodes: Vec<Node>,
    node_index: FxHashMap<(u32, u64), u32>,
    tasks: Vec<TaskInfo>,
    task_index: FxHashMap<u64, u32>,
    live: FxHashMap<u64, Tag>,
    in_flight: FxHashMap<u32, Option<Tag>>,
    links: Vec<Link>,
}

impl Collector {
    /// Takes in the next event. Until the first instrumentation record, a check
    /// inlined into the caller's loop: most traces have none.
    #[inline(always)]
    pub fn observe(&mut self, e: &Event) {
        if self.active || matches!(e.kind, EventKind::Mark(_)) {
            self.active = true;
            self.take(e);
        }
    }

    fn take(&mut self, e: &Event) {
        if e.internal {
            return;
        }
        match e.kind {
            EventKind::Alloc {
                addr, size, stack, ..
            } => {
                let (node, task) = self.attribute(e.thread, size, false);
                self.live.insert(
                    addr,
                    Tag {
                        node,
                        task,
                        stack: Some(stack),
                        link: NONE,
                    },
                );
            }
            EventKind::Free { addr } => {
                if let Some(tag) = self.live.remove(&addr) {
                    self.each_link(tag.link, |l| l.freed = true);
                }
            }
            EventKind::ReallocFree { addr } => {
                let tag = self.live.remove(&addr);
                self.in_flight.insert(e.thread, tag);
            }
            EventKind::ReallocAlloc {
                addr, size, stack, ..
            } => {
                let (node, task) = self.attribute(e.thread, size, true);
                let tag = match self.in_flight.remove(&e.thread).flatten() {
                    Some(old) => {
                        self.each_link(old.link, |l| l.reallocated = true);
                        old
                    }
                    None => Tag {
                        node,
                        task,
                        stack: Some(stack),
                        link: NONE,
                    },
                };
                self.live.insert(addr, tag);
            }
            EventKind::Mark(mark) => self.mark(e, mark),
        }
    }

    /// Counts an allocation event on `thread` for its innermost scope and task.
    fn attribute(&mut self, thread: u32, size: u64, realloc: bool) -> (u32, u32) {
        let Some(top) = self.stacks.get(&thread).and_then(|s| s.last()).copied() else {
            return (NONE, NONE);
        };
        let count = |f: &mut Figures| {
            if realloc {
                f.reallocations += 1;
            } else {
                f.allocations += 1;
            }
            f.bytes_allocated += size;
        };
        count(&mut self.nodes[top.node as usize].own);
        if top.task != NONE {
            count(&mut self.tasks[top.task as usize].own);
        }
        (top.node, top.task)
    }

    fn each_link(&mut self, mut link: u32, f: impl Fn(&mut Link)) {
        while link != NONE {
            let l = &mut self.links[link as usize];
            f(l);
            link = l.prev;
        }
    }

    fn mark(&mut self, e: &Event, mark: Mark) {
        match mark {
            Mark::Enter { id } => {
                let stack = self.stacks.entry(e.thread).or_default();
                let (parent, outer_task) = stack.last().map_or((NONE, NONE), |f| (f.node, f.task));
                let (def, task) = match self.task_index.get(&id) {
                    Some(&t) => {
                        self.tasks[t as usize].polls += 1;
                        (self.tasks[t as usize].site, t)
                    }
                    None => (id, outer_task),
                };
                let nodes = &mut self.nodes;
                let node = *self.node_index.entry((parent, def)).or_insert_with(|| {
                    nodes.push(Node {
                        parent,
                        def,
                        entries: 0,
                        own: Figures::default(),
                    });
                    (nodes.len() - 1) as u32
                });
                self.nodes[node as usize].entries += 1;
                stack.push(Frame { node, task, id });
            }
            Mark::Exit { id } => {
                let stack = self.stacks.entry(e.thread).or_default();
                // Normally the top; an exit whose enter was missed leaves the stack.
                if let Some(at) = stack.iter().rposition(|f| f.id == id) {
                    stack.truncate(at);
                }
            }
            Mark::Owns { var, block } => self.owns(e, var, block),
            Mark::TaskStart { id, site } => {
                self.task_index.insert(id, self.tasks.len() as u32);
                self.tasks.push(TaskInfo {
                    id,
                    site,
                    polls: 0,
                    own: Figures::default(),
                    state: None,
                });
            }
            Mark::TaskEnd { id, state } => {
                if let Some(&t) = self.task_index.get(&id) {
                    self.tasks[t as usize].state = Some(state);
                }
            }
        }
    }

    fn owns(&mut self, e: &Event, var: u64, claim: OwnedBlock) {
        let index = self.links.len() as u32;
        let mut link = Link {
            var,
            ts: e.ts,
            claim,
            prev: NONE,
            exact: false,
            reallocated: false,
            freed: false,
            stack: None,
        };
        if claim.interior {
            // Resolved against the blocks live at exit (see `finish`).
            self.links.push(link);
            return;
        }
        let tag = self.live.entry(claim.addr).or_insert(Tag {
            node: NONE,
            task: NONE,
            stack: None,
            link: NONE,
        });
        // The same variable naming the same block again adds nothing.
        let mut l = tag.link;
        while l != NONE {
            let earlier = &mut self.links[l as usize];
            if earlier.var == var {
                earlier.claim.counts = claim.counts.or(earlier.claim.counts);
                return;
            }
            l = earlier.prev;
        }
        link.exact = tag.stack.is_some();
        link.stack = tag.stack;
        link.prev = tag.link;
        tag.link = index;
        self.links.push(link);
    }

    /// The report sections of this process; `site_of` maps a stack to its site.
    pub fn finish(self, snap: &Snapshot, names: &Names, pid: u32) -> Sections {
        let mut sections = Sections::default();
        if !self.active && !names.instrumented {
            return sections;
        }
        let site_of: FxHashMap<u64, SiteId> = snap
            .sites
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.internal)
            .map(|(i, s)| (s.stack, i as SiteId))
            .collect();
        let def = |id: u64| names.defs.get(&id);
        let location = |d: &Def| Location {
            function: None,
            file: Some(d.file.clone()),
            line: Some(d.line),
        };

        // Live at exit: per scope, per task, and the names on live blocks.
        let mut nodes_live = vec![Figures::default(); self.nodes.len()];
        let mut tasks_live = vec![Figures::default(); self.tasks.len()];
        let mut var_live: FxHashMap<u64, (u64, u64)> = FxHashMap::default();
        let mut leak_names: BTreeMap<(SiteId, u64), VarRef> = BTreeMap::new();
        for (addr, tag) in &self.live {
            let Some(block) = snap.live.get(addr) else {
                continue;
            };
            if block.internal {
                continue;
            }
            if tag.node != NONE {
                nodes_live[tag.node as usize].live_blocks_at_exit += 1;
                nodes_live[tag.node as usize].live_bytes_at_exit += block.size;
            }
            if tag.task != NONE {
                tasks_live[tag.task as usize].live_blocks_at_exit += 1;
                tasks_live[tag.task as usize].live_bytes_at_exit += block.size;
            }
            let mut l = tag.link;
            while l != NONE {
                let link = &self.links[l as usize];
                let live = var_live.entry(link.var).or_default();
                live.0 += 1;
                live.1 += block.size;
                let basis = if link.exact && !link.reallocated {
                    Basis::Declared
                } else {
                    Basis::Inferred
                };
                if let Some(d) = def(link.var) {
                    add_ref(&mut leak_names, block.site, link.var, d, block.size, basis);
                }
                l = link.prev;
            }
        }
        // Interior pointers: the live block around them, if it was there when bound.
        let mut by_start: Vec<(u64, u64, SiteId, u64)> = snap
            .live
            .iter()
            .filter(|(_, b)| !b.internal)
            .map(|(&a, b)| (a, b.size, b.site, b.ts))
            .collect();
        by_start.sort_unstable();
        for link in self.links.iter().filter(|l| l.claim.interior) {
            let at = by_start.partition_point(|b| b.0 <= link.claim.addr);
            let Some(&(start, size, site, ts)) = at.checked_sub(1).map(|i| &by_start[i]) else {
                continue;
            };
            if link.claim.addr < start + size && ts <= link.ts {
                let live = var_live.entry(link.var).or_default();
                live.0 += 1;
                live.1 += size;
                if let Some(d) = def(link.var) {
                    add_ref(&mut leak_names, site, link.var, d, size, Basis::Inferred);
                }
            }
        }

        // Variables, and the names on every site that a variable's block came from.
        let mut vars: BTreeMap<u64, Variable> = BTreeMap::new();
        let mut site_names: BTreeMap<(SiteId, u64), VarRef> = BTreeMap::new();
        for link in &self.links {
            let Some(d) = def(link.var) else { continue };
            let v = vars.entry(link.var).or_insert_with(|| Variable {
                pid,
                name: d.name.clone(),
                r#type: d.detail.clone(),
                location: location(d),
                column: d.column,
                blocks: 0,
                bytes: 0,
                live_blocks_at_exit: 0,
                live_bytes_at_exit: 0,
                rc: None,
                basis: Basis::Declared,
            });
            v.blocks += 1;
            v.bytes += link.claim.size;
            if let Some((strong, weak)) = link.claim.counts {
                v.rc = Some(RcCounts { strong, weak });
            }
            if let Some(site) = link.stack.and_then(|s| site_of.get(&s)) {
                add_ref(
                    &mut site_names,
                    *site,
                    link.var,
                    d,
                    link.claim.size,
                    Basis::Declared,
                );
            }
        }
        for (var, (blocks, bytes)) in &var_live {
            if let Some(v) = vars.get_mut(var) {
                v.live_blocks_at_exit = *blocks;
                v.live_bytes_at_exit = *bytes;
            }
        }
        // Variables declared but never seen owning a block.
        for (id, d) in &names.defs {
            if d.class == Some(DefClass::Variable) && !vars.contains_key(id) {
                vars.insert(
                    *id,
                    Variable {
                        pid,
                        name: d.name.clone(),
                        r#type: d.detail.clone(),
                        location: location(d),
                        column: d.column,
                        blocks: 0,
                        bytes: 0,
                        live_blocks_at_exit: 0,
                        live_bytes_at_exit: 0,
                        rc: None,
                        basis: Basis::Declared,
                    },
                );
            }
        }
        sections.variables = vars.into_values().collect();
        sections.variables.sort_by(|a, b| {
            (&a.location.file, a.location.line, a.column, &a.name).cmp(&(
                &b.location.file,
                b.location.line,
                b.column,
                &b.name,
            ))
        });
        for ((site, _), r) in site_names {
            sections.site_variables.entry(site).or_default().push(r);
        }
        for ((site, _), r) in leak_names {
            sections.leak_variables.entry(site).or_default().push(r);
        }

        // The scope tree: self figures, then totals bottom-up (children come after
        // their parents).
        let mut totals: Vec<Figures> = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            let mut own = n.own;
            own.live_blocks_at_exit = nodes_live[i].live_blocks_at_exit;
            own.live_bytes_at_exit = nodes_live[i].live_bytes_at_exit;
            totals.push(own);
        }
        for i in (0..self.nodes.len()).rev() {
            let parent = self.nodes[i].parent;
            if parent != NONE {
                let child = totals[i];
                totals[parent as usize].add(&child);
            }
        }
        sections.scopes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let d = def(n.def);
                let mut own = n.own;
                own.live_blocks_at_exit = nodes_live[i].live_blocks_at_exit;
                own.live_bytes_at_exit = nodes_live[i].live_bytes_at_exit;
                Scope {
                    id: i,
                    pid,
                    parent: (n.parent != NONE).then_some(n.parent as usize),
                    name: d.map_or_else(|| format!("<scope {}>", n.def), scope_name),
                    kind: match d.and_then(|d| d.class) {
                        Some(DefClass::Task) => "task",
                        Some(DefClass::Scope) => "scope",
                        _ => "function",
                    }
                    .into(),
                    location: d.map(location),
                    entries: n.entries,
                    own,
                    total: totals[i],
                    basis: Basis::Declared,
                }
            })
            .collect();

        sections.tasks = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let site = def(t.site);
                let mut own = t.own;
                own.live_blocks_at_exit = tasks_live[i].live_blocks_at_exit;
                own.live_bytes_at_exit = tasks_live[i].live_bytes_at_exit;
                let state = match t.state {
                    Some(s) if s == TaskState::Completed as u8 => "completed",
                    Some(_) => "dropped",
                    None => "pending_at_exit",
                };
                let zombie_candidate = (t.state.is_none()).then(|| Zombie {
                    basis: Basis::Inferred,
                    evidence: format!(
                        "the task was polled {} time{} and had neither completed nor been \
                         dropped when the trace ended; it may wait for something that never comes",
                        t.polls,
                        if t.polls == 1 { "" } else { "s" }
                    ),
                });
                Task {
                    pid,
                    id: t.id,
                    name: names
                        .task_names
                        .get(&t.id)
                        .cloned()
                        .or_else(|| site.map(scope_name))
                        .unwrap_or_else(|| format!("task {}", t.id)),
                    location: site.map(location),
                    polls: t.polls,
                    figures: own,
                    state: state.into(),
                    zombie_candidate,
                    basis: Basis::Declared,
                }
            })
            .collect();
        sections
    }
}

fn scope_name(d: &Def) -> String {
    if d.name.is_empty() {
        format!("{}:{}", d.file, d.line)
    } else {
        d.name.clone()
    }
}

fn add_ref(
    into: &mut BTreeMap<(SiteId, u64), VarRef>,
    site: SiteId,
    var: u64,
    d: &Def,
    bytes: u64,
    basis: Basis,
) {
    let r = into.entry((site, var)).or_insert_with(|| VarRef {
        name: d.name.clone(),
        r#type: d.detail.clone(),
        file: d.file.clone(),
        line: d.line,
        column: d.column,
        blocks: 0,
        bytes: 0,
        basis,
    });
    r.blocks += 1;
    r.bytes += bytes;
    if basis == Basis::Inferred {
        r.basis = Basis::Inferred;
    }
}

/// The report sections of one process (merged by concatenation).
#[derive(Debug, Default)]
pub struct Sections {
    pub scopes: Vec<Scope>,
    pub variables: Vec<Variable>,
    pub tasks: Vec<Task>,
    /// Per site (this process's ids): the variables whose blocks it allocated.
    pub site_variables: BTreeMap<SiteId, Vec<VarRef>>,
    /// Per site: the variables naming its blocks live at exit.
    pub leak_variables: BTreeMap<SiteId, Vec<VarRef>>,
}

/// A node of the scope tree: a scope reached by one path of enclosing scopes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scope {
    /// Index in `scopes`.
    pub id: usize,
    pub pid: u32,
    pub parent: Option<usize>,
    pub name: String,
    /// `function`, `scope` (a `memscope::scope` guard) or `task`.
    pub kind: String,
    pub location: Option<Location>,
    /// Times entered (for a task: polls).
    pub entries: u64,
    /// Allocations while this scope was the innermost one.
    #[serde(rename = "self")]
    pub own: Figures,
    /// Its own figures plus those of the scopes inside it.
    pub total: Figures,
    pub basis: Basis,
}

/// A variable declaration and the blocks it named.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Variable {
    pub pid: u32,
    pub name: String,
    #[serde(rename = "type")]
    pub r#type: String,
    pub location: Location,
    pub column: u32,
    /// Blocks it was bound to (each binding counts its blocks).
    pub blocks: u64,
    /// Their sizes when bound.
    pub bytes: u64,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
    /// Counts of an `Rc`/`Arc` at its latest binding.
    pub rc: Option<RcCounts>,
    pub basis: Basis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcCounts {
    pub strong: u32,
    pub weak: u32,
}

/// A variable named on a site or a leak.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarRef {
    pub name: String,
    #[serde(rename = "type")]
    pub r#type: String,
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub blocks: u64,
    pub bytes: u64,
    pub basis: Basis,
}

/// Merges `from` into `into` (same site of several processes).
pub fn merge_refs(into: &mut Vec<VarRef>, from: Vec<VarRef>) {
    for r in from {
        match into
            .iter_mut()
            .find(|e| (&e.name, &e.file, e.line, e.column) == (&r.name, &r.file, r.line, r.column))
        {
            Some(e) => {
                e.blocks += r.blocks;
                e.bytes += r.bytes;
                if r.basis == Basis::Inferred {
                    e.basis = Basis::Inferred;
                }
            }
            None => into.push(r),
        }
    }
}

/// An async task.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub pid: u32,
    pub id: u64,
    pub name: String,
    /// Where it was created.
    pub location: Option<Location>,
    pub polls: u64,
    /// Allocations while it was polled (the innermost task).
    #[serde(flatten)]
    pub figures: Figures,
    /// `completed`, `dropped` (before completing) or `pending_at_exit`.
    pub state: String,
    pub zombie_candidate: Option<Zombie>,
    pub basis: Basis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Zombie {
    pub basis: Basis,
    pub evidence: String,
}
