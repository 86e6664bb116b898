//! Fork-join for decode: a team of threads that stay awake between the many small parallel
//! steps of one token.
//!
//! Decoding one token runs ~5 products per layer of a few hundred microseconds each. Rayon
//! parks idle workers within microseconds, and a step started from outside the pool wakes them
//! one by one and waits on a lock: on 16 cores that cost ~0.4 ms per layer, as much as the
//! layer's products (docs/PERFORMANCE.md). A team publishes each step in one atomic word; its
//! helpers spin briefly between steps (when there is a core for each) and claim work items with
//! a compare-and-swap. Prefill keeps rayon: its products are long and nest.
//!
//! A team has `rayon::current_num_threads()` members, so `--threads`, `RAYON_NUM_THREADS` and
//! a rayon pool's `install` size it alike. One caller leads a team at a time; another caller
//! (a second sequence) falls back to rayon, and a step started inside a team item runs inline.

use crossbeam_utils::CachePadded;
use rayon::prelude::*;
use std::cell::Cell;
use std::panic::Location;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Runs `f(i)` for every `i` in `0..n`, spread over the caller's team (the caller takes part).
/// Items may run in any order and on any member; each runs exactly once.
#[track_caller]
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    for_each_at(Location::caller(), n, f)
}

/// [`for_each`] on behalf of `site` (the caller's caller, for the step profile).
pub fn for_each_at(site: &'static Location<'static>, n: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 || IN_TEAM.get() {
        (0..n).for_each(f);
        return;
    }
    match team(threads).lead() {
        Some(lead) => lead.run(n, &f, site),
        None => (0..n).into_par_iter().for_each(&f),
    }
}

/// `f(i, a_i, b_i)` for the `i`-th chunks (`sa` and `sb` elements) of `a` and `b`, as
/// [`for_each`]: decode's per-head steps, each owning its state and output.
#[track_caller]
pub fn zip_chunks_mut<A: Send, B: Send>(
    a: &mut [A],
    sa: usize,
    b: &mut [B],
    sb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let n = a.len() / sa.max(1);
    assert!(a.len() == n * sa && b.len() == n * sb, "chunks of {sa} and {sb} do not tile the slices alike");
    let (pa, pb) = (Shared(a.as_mut_ptr()), Shared(b.as_mut_ptr()));
    for_each(n, |i| {
        // SAFETY: chunk i of each slice is handed to item i alone, inside the slices, which the
        // caller lends mutably for this whole call
        let (ca, cb) = unsafe {
            (std::slice::from_raw_parts_mut(pa.at(i * sa), sa), std::slice::from_raw_parts_mut(pb.at(i * sb), sb))
        };
        f(i, ca, cb)
    });
}

/// `f(i, chunk_i)` for the `size`-element chunks of `data`, as [`for_each`].
#[track_caller]
pub fn chunks_mut<T: Send>(data: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    zip_chunks_mut(data, size, &mut [(); 0], 0, |i, c, _| f(i, c))
}

/// A pointer the items of a step use for disjoint parts of one buffer.
pub struct Shared<T>(pub *mut T);
// SAFETY: items touch disjoint elements (the users' SAFETY comments say why).
unsafe impl<T: Send> Sync for Shared<T> {}
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Shared<T> {
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }

    /// Elements `i..i + len` of the buffer.
    ///
    /// # Safety
    /// Inside the buffer, alive while the slice lives, and no one else writes them meanwhile
    /// (nor reads them, for as long as the slice is written).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice<'a>(&self, i: usize, len: usize) -> &'a mut [T] {
        // SAFETY: the caller's
        unsafe { std::slice::from_raw_parts_mut(self.at(i), len) }
    }
}

/// Keeps the caller's team spinning between steps until dropped (a decode pass: the gaps
/// between its steps are short, but a few, such as the page-cache checks of a layer's experts,
/// can outlast the spin window, and a parked helper takes tens of microseconds to wake).
/// While it lives, [`on_team`] is true on its thread. It stays on the thread that made it.
pub struct Hold {
    team: Option<&'static Team>,
    _here: std::marker::PhantomData<*const ()>,
}

/// Holds the team of the calling thread's pool awake (see [`Hold`]); no team when one thread.
pub fn hold() -> Hold {
    HOLDING.set(HOLDING.get() + 1);
    let threads = rayon::current_num_threads();
    let here = std::marker::PhantomData;
    if threads <= 1 || IN_TEAM.get() {
        return Hold { team: None, _here: here };
    }
    let t = team(threads);
    t.holds.fetch_add(1, SeqCst);
    Hold { team: Some(t), _here: here }
}

impl Drop for Hold {
    fn drop(&mut self) {
        HOLDING.set(HOLDING.get() - 1);
        if let Some(t) = self.team {
            t.holds.fetch_sub(1, SeqCst);
        }
    }
}

/// Whether this thread runs a decode pass (it made a live [`Hold`]) or a team's items: rayon
/// is then no place for work. Its workers are other threads than the team's, and while the
/// helpers spin between steps they hold every core (or the process's CPU quota): a rayon job
/// waits for the scheduler to preempt one, milliseconds on 16 cores (docs/PERFORMANCE.md,
/// "MLA decode").
pub fn on_team() -> bool {
    IN_TEAM.get() || HOLDING.get() > 0
}

thread_local! {
    /// Set on helpers, and on a leader while it leads: a nested step runs inline.
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
    /// Live [`Hold`]s made on this thread.
    static HOLDING: Cell<usize> = const { Cell::new(0) };
}

/// The step word: epoch (24 bits) | items (20) | next unclaimed item (20). One word, so a
/// helper's claim (a compare-and-swap) fails unless the step it read is still the current one.
const BITS: u32 = 20;
const MASK: u64 = (1 << BITS) - 1;
/// Steps of more items are split into several steps.
const MAX_ITEMS: usize = MASK as usize;

fn pack(epoch: u64, n: usize, next: usize) -> u64 {
    ((epoch & 0xff_ffff) << (2 * BITS)) | ((n as u64) << BITS) | next as u64
}

fn items(w: u64) -> usize {
    ((w >> BITS) & MASK) as usize
}

fn next(w: u64) -> usize {
    (w & MASK) as usize
}

fn epoch(w: u64) -> u64 {
    w >> (2 * BITS)
}

type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// The fields every member touches each step sit on cache lines of their own, so that claims,
/// completions and the leader's writes do not invalidate each other.
struct Team {
    word: CachePadded<AtomicU64>,
    /// Items of the current step finished.
    done: CachePadded<AtomicU32>,
    /// The current step's function (a reference on the leader's stack), set while it runs.
    job: CachePadded<AtomicPtr<Job<'static>>>,
    /// A caller leads the team.
    busy: AtomicBool,
    panicked: AtomicBool,
    /// Helpers parked on `wake`.
    sleepers: AtomicUsize,
    /// Live [`Hold`]s: helpers spin past `spin` while there is one.
    holds: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Helpers spin this long for the next step before parking (zero when the team has more
    /// members than the process has CPUs: spinning would take the leader's CPU).
    spin: Duration,
}

/// One team per size, created on first use; helpers live as long as the process. Each thread
/// remembers the last one it asked for, so a step takes no lock.
fn team(threads: usize) -> &'static Team {
    thread_local! {
        static LAST: Cell<Option<(usize, &'static Team)>> = const { Cell::new(None) };
    }
    if let Some((n, t)) = LAST.get()
        && n == threads
    {
        return t;
    }
    let t = team_of(threads);
    LAST.set(Some((threads, t)));
    t
}

fn team_of(threads: usize) -> &'static Team {
    static TEAMS: OnceLock<Mutex<Vec<(usize, &'static Team)>>> = OnceLock::new();
    let mut teams = TEAMS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(&(_, t)) = teams.iter().find(|(n, _)| *n == threads) {
        return t;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spin_us = std::env::var("FLASHMOE_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let t: &'static Team = Box::leak(Box::new(Team {
        word: CachePadded::new(AtomicU64::new(0)),
        done: CachePadded::new(AtomicU32::new(0)),
        job: CachePadded::new(AtomicPtr::new(std::ptr::null_mut())),
        busy: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
        sleepers: AtomicUsize::new(0),
        holds: AtomicUsize::new(0),
        lock: Mutex::new(()),
        wake: Condvar::new(),
        spin: if threads <= cpus { Duration::from_micros(spin_us) } else { Duration::ZERO },
    }));
    for i in 1..threads {
        let spawned = std::thread::Builder::new().name(format!("flashmoe-team-{i}")).spawn(move || t.help());
        if spawned.is_err() {
            // fewer helpers only means less parallelism: the leader claims what is left
            break;
        }
    }
    teams.push((threads, t));
    t
}

/// The right to publish steps to a team, released on drop.
struct Lead(&'static Team);

impl Drop for Lead {
    fn drop(&mut self) {
        IN_TEAM.set(false);
        self.0.busy.store(false, Release);
    }
}

impl Team {
    fn lead(&'static self) -> Option<Lead> {
        self.busy.compare_exchange(false, true, Acquire, Relaxed).ok()?;
        IN_TEAM.set(true);
        Some(Lead(self))
    }

    /// Claims and runs items of the step published as `w` until none is left.
    fn work(&self, mut w: u64) {
        let mut job: Option<Job<'_>> = None;
        let mut finished = 0;
        while next(w) < items(w) {
            match self.word.compare_exchange_weak(w, w + 1, AcqRel, Acquire) {
                Ok(_) => {
                    // SAFETY: the leader set `job` before publishing this step and keeps it
                    // alive until every item, the ones claimed here included, is counted done
                    let f = *job.get_or_insert_with(|| unsafe { *self.job.load(Acquire) });
                    if catch_unwind(AssertUnwindSafe(|| f(next(w)))).is_err() {
                        self.panicked.store(true, Relaxed);
                    }
                    finished += 1;
                    w += 1;
                }
                Err(now) if epoch(now) == epoch(w) => w = now,
                Err(_) => break,
            }
        }
        if finished > 0 {
            self.done.fetch_add(finished, Release);
        }
    }

    /// A helper's life: wait for a step with unclaimed items, work on it, repeat.
    fn help(&'static self) {
        IN_TEAM.set(true);
        let mut seen = 0;
        loop {
            let mut w = self.word.load(Acquire);
            if epoch(w) == seen || next(w) >= items(w) {
                let start = Instant::now();
                let mut spins = 0u32;
                loop {
                    w = self.word.load(Acquire);
                    if epoch(w) != seen && next(w) < items(w) {
                        break;
                    }
                    spins += 1;
                    if spins.is_multiple_of(64)
                        && start.elapsed() >= self.spin
                        && (self.spin.is_zero() || self.holds.load(Relaxed) == 0)
                    {
                        w = self.park(seen);
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            seen = epoch(w);
            self.work(w);
        }
    }

    /// Sleeps until a step newer than `seen` has unclaimed items; returns its word.
    fn park(&self, seen: u64) -> u64 {
        self.sleepers.fetch_add(1, SeqCst);
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let w = loop {
            let w = self.word.load(SeqCst);
            if epoch(w) != seen && next(w) < items(w) {
                break w;
            }
            g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        };
        drop(g);
        self.sleepers.fetch_sub(1, SeqCst);
        w
    }
}

impl Lead {
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync), site: &'static Location<'static>) {
        for base in (0..n).step_by(MAX_ITEMS) {
            let m = (n - base).min(MAX_ITEMS);
            let g = move |i: usize| f(base + i);
            self.step(m, &g, site);
        }
    }

    /// Publishes one step of `n` items, works on it, and returns once every item is done.
    fn step(&self, n: usize, f: &(dyn Fn(usize) + Sync), site: &'static Location<'static>) {
        let t = self.0;
        let t0 = Instant::now();
        let sites = sites();
        let job: Job<'_> = f;
        // helpers dereference it only after claiming one of this step's items, and this
        // function returns only after every item is done
        t.job.store(&job as *const Job<'_> as *mut Job<'static>, Release);
        t.done.store(0, Relaxed);
        t.panicked.store(false, Relaxed);
        let w = pack(epoch(t.word.load(Relaxed)) + 1, n, 0);
        t.word.store(w, SeqCst);
        if t.sleepers.load(SeqCst) > 0 {
            let _g = t.lock.lock().unwrap_or_else(|p| p.into_inner());
            t.wake.notify_all();
        }
        t.work(w);
        let t1 = Instant::now();
        let mut spins = 0u32;
        while (t.done.load(Acquire) as usize) < n {
            spins += 1;
            if t.spin.is_zero() || spins > 1 << 12 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        t.job.store(std::ptr::null_mut(), Relaxed);
        let p = &crate::profile::PROFILE;
        p.steps.fetch_add(1, Relaxed);
        p.step.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        p.step_tail.fetch_add(t1.elapsed().as_nanos() as u64, Relaxed);
        if let Some(sites) = sites {
            let end = Instant::now();
            let mut g = sites.lock().unwrap_or_else(|p| p.into_inner());
            let gap = g.last.map_or(0, |l| t0.saturating_duration_since(l).as_nanos() as u64);
            g.last = Some(end);
            let e = g.by_site.entry(site).or_default();
            e[0] += 1;
            e[1] += (end - t0).as_nanos() as u64;
            e[2] += (end - t1).as_nanos() as u64;
            // a gap longer than a millisecond is between calls (a new token), not between steps
            e[3] += if gap < 1_000_000 { gap } else { 0 };
        }
        if t.panicked.load(Relaxed) {
            panic!("a task of a parallel step panicked");
        }
    }
}

/// Splits the leader's serial time between steps for the step profile: the time since the
/// previous step or mark is booked to this call site (as a gap, with no step), and the next
/// step's gap starts here. Nothing unless `FLASHMOE_STEP_PROFILE` is set; call it only from
/// serial code of a decode pass.
#[track_caller]
pub fn mark() {
    if let Some(sites) = sites() {
        let now = Instant::now();
        let mut g = sites.lock().unwrap_or_else(|p| p.into_inner());
        let gap = g.last.map_or(0, |l| now.saturating_duration_since(l).as_nanos() as u64);
        g.last = Some(now);
        g.by_site.entry(Location::caller()).or_default()[3] += if gap < 1_000_000 { gap } else { 0 };
    }
}

/// Per call site of a step: [steps, ns inside, ns of tails, ns since the previous step ended].
#[derive(Default)]
pub struct Sites {
    by_site: std::collections::HashMap<&'static Location<'static>, [u64; 4]>,
    last: Option<Instant>,
}

/// Step timing by call site, recorded when `FLASHMOE_STEP_PROFILE` is set (a diagnostic:
/// the gap before a step is the leader's serial work since the previous one).
fn sites() -> Option<&'static Mutex<Sites>> {
    static S: OnceLock<Option<Mutex<Sites>>> = OnceLock::new();
    S.get_or_init(|| std::env::var_os("FLASHMOE_STEP_PROFILE").map(|_| Mutex::new(Sites::default()))).as_ref()
}

/// The recorded step timing as lines `site steps step_ms tail_ms gap_ms` (ms in total),
/// largest gap first; empty unless `FLASHMOE_STEP_PROFILE` is set. Resets the record.
pub fn take_step_profile() -> Vec<String> {
    let Some(s) = sites() else { return vec![] };
    let mut g = s.lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<_> = g.by_site.drain().collect();
    g.last = None;
    v.sort_by_key(|(_, e)| std::cmp::Reverse(e[3]));
    let ms = |ns: u64| ns as f64 / 1e6;
    v.iter()
        .map(|(l, e)| {
            format!(
                "{}:{} steps {} in {:.2} ms tails {:.2} ms gaps {:.2} ms",
                l.file(),
                l.line(),
                e[0],
                ms(e[1]),
                ms(e[2]),
                ms(e[3])
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn on_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
    }

    #[test]
    fn every_item_runs_exactly_once() {
        for threads in [1, 2, 3, 8, 32] {
            on_threads(threads, || {
                for n in [0, 1, 2, 5, 64, 1000, 4097] {
                    let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                    for_each(n, |i| {
                        hits[i].fetch_add(1, Relaxed);
                    });
                    assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "{threads} threads, {n} items");
                }
            });
        }
    }

    #[test]
    fn nested_steps_run_inline_and_concurrent_leaders_fall_back() {
        on_threads(8, || {
            let total = AtomicU64::new(0);
            // two callers at once: one leads the team, the other runs on rayon
            rayon::join(
                || {
                    for_each(100, |i| for_each(10, |j| _ = total.fetch_add((i * 10 + j) as u64, Relaxed)));
                },
                || for_each(1000, |i| _ = total.fetch_add(i as u64, Relaxed)),
            );
            assert_eq!(total.load(Relaxed), 2 * (999 * 1000 / 2));
        });
    }

    #[test]
    fn a_panicking_item_panics_the_caller_and_the_team_goes_on() {
        on_threads(4, || {
            let r = catch_unwind(|| for_each(64, |i| assert!(i != 17, "item 17")));
            assert!(r.is_err());
            let sum = AtomicU64::new(0);
            for_each(64, |i| _ = sum.fetch_add(i as u64, Relaxed));
            assert_eq!(sum.load(Relaxed), 63 * 64 / 2);
        });
    }

    #[test]
    fn a_decode_pass_and_the_items_of_its_steps_are_on_the_team() {
        on_threads(4, || {
            assert!(!on_team());
            {
                let _h = hold();
                assert!(on_team());
                let seen = AtomicU64::new(0);
                for_each(64, |_| _ = seen.fetch_add(on_team() as u64, Relaxed));
                assert_eq!(seen.load(Relaxed), 64, "every item, on whichever member");
                let _nested = hold();
            }
            assert!(!on_team(), "dropping the holds ends it");
        });
    }

    #[test]
    fn the_step_word_round_trips() {
        let w = pack(0xff_ffff + 3, MAX_ITEMS, 12345);
        assert_eq!((epoch(w), items(w), next(w)), (2, MAX_ITEMS, 12345));
    }
}
