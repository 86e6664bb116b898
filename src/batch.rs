//! Continuous batching: sequences decoding at the same time on several threads share each
//! step's forward pass ([`Model::forward_batch_each`]).
//!
//! Each sequence decodes on its own thread (sampling, grammar, stop strings and streaming stay
//! there) and hands its state and next token to [`Member::step`]. The first sequence to hand
//! one in while no step runs leads the next step: it waits until every sequence in the batch
//! has handed in its token (or the gather window, [`GATHER`] by default, has passed: a sequence that missed a step, say
//! one whose client reads slowly, is not waited for again until it hands one in), takes up to `max_batch` of them, runs one forward pass over all, and
//! hands every state back with its logits. A sequence joins with [`Batcher::join`] once its
//! prompt is prefilled and leaves when its [`Member`] is dropped (finished, cancelled): the
//! next step runs without it.

use crate::model::{Model, State};
use anyhow::Result;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a step's leader waits by default for the batch's other sequences to hand in
/// their tokens: far above the time a sequence needs between steps (sampling, streaming), far
/// below a step of a real model.
pub const GATHER: Duration = Duration::from_millis(20);

pub struct Batcher {
    model: Arc<Model>,
    max_batch: usize,
    gather: Duration,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Steps run and sequence-steps in them (the mean batch is their ratio).
    pub steps: AtomicU64,
    pub rows: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Sequences in the batch (joined, not yet left).
    members: HashSet<u64>,
    /// Members that missed the last step (not waited for until they hand in a token).
    late: HashSet<u64>,
    /// Handed in for the next step: (ticket, member, state, token).
    queue: Vec<(u64, u64, State, u32)>,
    /// A step is running.
    leading: bool,
    /// Results of the last steps, by ticket.
    done: HashMap<u64, (State, Result<Vec<f32>>)>,
    next: u64,
    next_member: u64,
}

/// A sequence's place in the batch; dropping it leaves.
pub struct Member<'a> {
    b: &'a Batcher,
    id: u64,
}

impl Batcher {
    /// A batch of up to `max_batch` sequences whose leader waits up to `gather` for the
    /// others' tokens.
    pub fn new(model: Arc<Model>, max_batch: usize, gather: Duration) -> Batcher {
        Batcher {
            model,
            max_batch: max_batch.max(1),
            gather,
            inner: Mutex::new(Inner::default()),
            cv: Condvar::new(),
            steps: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the batch: the sequence's steps run together with the others'.
    pub fn join(&self) -> Member<'_> {
        let mut g = self.lock();
        g.next_member += 1;
        let id = g.next_member;
        g.members.insert(id);
        Member { b: self, id }
    }

    /// Sequences in the batch now.
    pub fn members(&self) -> usize {
        self.lock().members.len()
    }

    /// Runs one step over `jobs` (without the lock) and files the results.
    fn lead(&self, jobs: Vec<(u64, u64, State, u32)>) {
        let (tickets, mut states, tokens): (Vec<u64>, Vec<State>, Vec<u32>) =
            jobs.into_iter().fold((vec![], vec![], vec![]), |(mut a, mut b, mut c), (t, _, s, k)| {
                a.push(t);
                b.push(s);
                c.push(k);
                (a, b, c)
            });
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut refs: Vec<&mut State> = states.iter_mut().collect();
            self.model.forward_batch_each(&mut refs, &tokens)
        }));
        let res: Vec<Result<Vec<f32>>> = match res {
            Ok(r) => r,
            Err(_) => {
                states.iter_mut().for_each(|s| s.poisoned = true);
                tokens.iter().map(|_| Err(anyhow::anyhow!("the decode step panicked"))).collect()
            }
        };
        self.steps.fetch_add(1, Relaxed);
        self.rows.fetch_add(tickets.len() as u64, Relaxed);
        let mut g = self.lock();
        for ((t, s), r) in tickets.into_iter().zip(states).zip(res) {
            g.done.insert(t, (s, r));
        }
        g.leading = false;
        drop(g);
        self.cv.notify_all();
    }
}

impl Member<'_> {
    /// Feeds `token` after what `state` holds, in the next step of the batch; returns its
    /// logits row (as [`Model::forward`] of one token would).
    pub fn step(&self, state: &mut State, token: u32) -> Result<Vec<f32>> {
        let b = self.b;
        let placeholder = State { pos: 0, layers: vec![], poisoned: true, device: None };
        let mut g = b.lock();
        let ticket = g.next;
        g.next += 1;
        g.queue.push((ticket, self.id, std::mem::replace(state, placeholder), token));
        g.late.remove(&self.id);
        b.cv.notify_all();
        let mut since: Option<Instant> = None;
        loop {
            if let Some((s, r)) = g.done.remove(&ticket) {
                *state = s;
                return r;
            }
            let queued = g.queue.iter().any(|j| j.0 == ticket);
            if queued && !g.leading {
                let t0 = *since.get_or_insert_with(Instant::now);
                let expected = g.members.len().saturating_sub(g.late.len()).min(b.max_batch);
                let all = g.queue.len() >= expected;
                let left = b.gather.saturating_sub(t0.elapsed());
                if all || left.is_zero() {
                    g.leading = true;
                    let take = g.queue.len().min(b.max_batch);
                    // this sequence among those taken: it leads for its own token
                    let mine = g.queue.iter().position(|j| j.0 == ticket).unwrap();
                    let me = g.queue.remove(mine);
                    let mut jobs = vec![me];
                    jobs.extend(g.queue.drain(..take - 1));
                    if !all {
                        // those not handed in yet are late: the next steps do not wait for them
                        let on_time: HashSet<u64> = jobs.iter().chain(g.queue.iter()).map(|j| j.1).collect();
                        let late: Vec<u64> = g.members.iter().filter(|m| !on_time.contains(m)).copied().collect();
                        g.late.extend(late);
                    }
                    drop(g);
                    b.lead(jobs);
                    g = b.lock();
                    continue;
                }
                g = b.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
            } else {
                g = b.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        let mut g = self.b.lock();
        g.members.remove(&self.id);
        g.late.remove(&self.id);
        drop(g);
        // a leader waiting for this sequence's token goes on without it
        self.b.cv.notify_all();
    }
}
