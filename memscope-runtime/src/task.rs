//! Async tasks: a future wrapped by an instrumented `async fn` or by
//! [`TaskExt::memscope_task`]. Creating the wrapper writes a `TASK` record (a fresh
//! id, its site and name); each poll enters and leaves the task's scope on the
//! polling thread, so allocations made while it is polled are attributed to it,
//! whichever executor thread polls it; completion or an early drop writes
//! `TASK_END`. A task with no `TASK_END` was still pending when the process ended.
//!
//! Executors move tasks between threads, and a thread's records are stamped by its own
//! clock: the task's records are stamped after each other through the clock's stripe
//! for the task id (`recorder::emit_after`), so a reader never sees a poll before the
//! task was created.
//!
//! Nothing here knows any executor: it is all `Future::poll` and `Drop`.

use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::format::{DefClass, TaskState, EXT_TASK, EXT_TASK_END};
use crate::instrument::{self, dynamic_site, enabled, fresh_id, pack, ScopeGuard, Site};
use crate::recorder::emit_after;

/// A future whose polls memscope attributes allocations to.
#[must_use = "futures do nothing unless polled"]
pub struct Task<F> {
    fut: F,
    /// 0 when nothing is recorded (not tracking).
    id: u64,
    done: bool,
}

impl<F> Task<F> {
    /// Wraps `fut` as a task created at `site` (generated code for an `async fn`).
    #[inline]
    pub fn new(site: &'static Site, fut: F) -> Task<F> {
        let id = if enabled() { start(site.id(), "") } else { 0 };
        Task {
            fut,
            id,
            done: false,
        }
    }
}

/// Writes the `TASK` record of a new task; its id, or 0.
fn start(site: u64, name: &str) -> u64 {
    let id = fresh_id();
    let mut words = [0u64; 128];
    let name = instrument::cut(name, (words.len() - 3) * 8);
    words[0] = id;
    words[1] = site;
    words[2] = name.len() as u64;
    let n = 3 + pack(&mut words[3..], &[name]);
    if emit_after(EXT_TASK, &words[..n], id) {
        id
    } else {
        0
    }
}

impl<F: Future> Future for Task<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: structural pinning of `fut`: it is never moved out of a pinned
        // `Task` (no method hands it out by value, and `Drop` only reads `id`/`done`),
        // and `Task` is `Unpin` only when `F` is.
        let this = unsafe { self.get_unchecked_mut() };
        // SAFETY: see above; `this.fut` stays where it is until `this` is dropped.
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        if this.id == 0 {
            return fut.poll(cx);
        }
        let polled = {
            let _poll = ScopeGuard::enter_task(this.id);
            fut.poll(cx)
        };
        if polled.is_ready() {
            this.done = true;
            emit_after(
                EXT_TASK_END,
                &[this.id, TaskState::Completed as u64],
                this.id,
            );
        }
        polled
    }
}

impl<F> Drop for Task<F> {
    fn drop(&mut self) {
        if self.id != 0 && !self.done {
            emit_after(EXT_TASK_END, &[self.id, TaskState::Dropped as u64], self.id);
        }
    }
}

/// Makes any future a memscope task: `tokio::spawn(work().memscope_task("ingest"))`.
pub trait TaskExt: Future + Sized {
    /// Wraps the future: the report lists it as a task named `name`, with the
    /// allocations made while it was polled.
    #[track_caller]
    fn memscope_task(self, name: &str) -> Task<Self> {
        let id = if enabled() {
            let site = dynamic_site(DefClass::Task, "", Location::caller());
            start(site, name)
        } else {
            0
        };
        Task {
            fut: self,
            id,
            done: false,
        }
    }
}

impl<F: Future> TaskExt for F {}
