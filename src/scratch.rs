//! Per-thread pools of scratch for the temporaries of one forward step: once warm, a decode
//! step takes its buffers from the pool and gives them back instead of allocating.
//!
//! A pool is borrowed only for the instant of a pop or a push, never while its value is in
//! use: a rayon worker that waits inside a parallel loop may run another task on the same
//! thread (work stealing), and that task takes its own value from the same pool.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

/// Buffers kept per thread.
const KEEP: usize = 64;
/// Larger buffers (prefill's) go back to the allocator, so a long prompt does not leave the
/// pool holding hundreds of MB.
pub(crate) const MAX_ELEMS: usize = 1 << 20;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A pooled buffer; it returns to the pool of the thread that drops it.
#[derive(Debug, Default)]
pub struct Buf(Vec<f32>);

/// Makes room in `v` for `len` more values, growing it by at least `ahead` at a time, and
/// touches the pages of what it grew: a decode step's cache rows otherwise landed on fresh
/// pages, a page fault per layer and token (~10 µs in the lent machine's VM).
pub fn reserve_touched<T: Copy + Default>(v: &mut Vec<T>, len: usize, ahead: usize) {
    if v.capacity() - v.len() >= len {
        return;
    }
    v.reserve(len.max(ahead));
    let spare = v.spare_capacity_mut();
    let n = spare.len().min(len.max(ahead));
    for page in spare[..n].chunks_mut(4096 / std::mem::size_of::<T>().max(1)) {
        page[0].write(T::default());
        page[page.len() - 1].write(T::default());
    }
}

/// `n` zeros from this thread's pool.
pub fn zeros(n: usize) -> Buf {
    let mut v = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten().unwrap_or_default();
    v.clear();
    if n >= 1 << 18 && crate::tensor::parallel(n) && !crate::par::on_team() {
        // a prompt's buffers run to tens of MB per layer (a 512-token MoE's expert outputs:
        // 42 MB); one thread zeroing them held all the others up. Never in decode: rayon's
        // workers would fight the team's spinning helpers for the cores
        use rayon::prelude::*;
        v.par_extend(rayon::iter::repeat_n(0.0, n));
    } else {
        v.resize(n, 0.0);
    }
    Buf(v)
}

/// `n` elements of unspecified value (whatever the pooled buffer held) from this thread's
/// pool, for outputs written in full before they are read: zeroing decode's per-step buffers
/// was serial time between steps.
pub fn dirty(n: usize) -> Buf {
    // a buffer already that long, if the pool has one: nothing to zero
    let take = |p: &RefCell<Vec<Vec<f32>>>| {
        let mut p = p.borrow_mut();
        let fit = p.iter().rposition(|v| v.len() >= n);
        fit.map(|i| p.swap_remove(i)).or_else(|| p.pop())
    };
    let mut v = POOL.try_with(take).ok().flatten().unwrap_or_default();
    if v.len() < n {
        v.resize(n, 0.0);
    }
    v.truncate(n);
    Buf(v)
}

/// A copy of `x` from this thread's pool.
pub fn copy(x: &[f32]) -> Buf {
    let mut b = zeros(0);
    b.0.extend_from_slice(x);
    b
}

impl Buf {
    /// The vector itself, to grow or clear.
    pub fn vec(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

impl Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a Buf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() > 0 && v.capacity() <= MAX_ELEMS {
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < KEEP {
                    p.push(v);
                }
            });
        }
    }
}

/// A per-thread stack of reusable values of one type (declare it with `thread_local!`).
pub struct Pool<T>(RefCell<Vec<T>>);

impl<T> Pool<T> {
    pub const fn new() -> Pool<T> {
        Pool(RefCell::new(Vec::new()))
    }
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool::new()
    }
}

/// Values of one pool kept per thread: enough for decode's fused expert step, which holds one
/// prepared input per routed expert at once (top-10 plus a shared expert on the largest
/// models), and for the nesting that work stealing produces.
const KEEP_VALUES: usize = 32;

/// A value taken from a [`Pool`]; it goes back to the pool of the thread that drops it.
pub struct Pooled<T: 'static> {
    v: ManuallyDrop<T>,
    pool: &'static LocalKey<Pool<T>>,
}

/// A value from this thread's `pool` (a default one when the pool is empty).
pub fn take<T: Default>(pool: &'static LocalKey<Pool<T>>) -> Pooled<T> {
    let v = pool.try_with(|p| p.0.borrow_mut().pop()).ok().flatten().unwrap_or_default();
    Pooled { v: ManuallyDrop::new(v), pool }
}

impl<T> Deref for Pooled<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.v
    }
}

impl<T> DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.v
    }
}

impl<T> Drop for Pooled<T> {
    fn drop(&mut self) {
        // SAFETY: `v` is never used again after this.
        let v = unsafe { ManuallyDrop::take(&mut self.v) };
        let _ = self.pool.try_with(|p| {
            let mut p = p.0.borrow_mut();
            if p.len() < KEEP_VALUES {
                p.push(v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static WORDS: Pool<Vec<u64>> = const { Pool::new() };
    }

    #[test]
    fn pooled_values_nest_and_come_back() {
        let mut a = take(&WORDS);
        a.push(1);
        {
            // a nested take (what a stolen task does) gets its own value, no panic
            let mut b = take(&WORDS);
            b.push(2);
            assert_eq!(*a, vec![1]);
        }
        drop(a);
        assert_eq!(WORDS.with(|p| p.0.borrow().len()), 2);
        let c = take(&WORDS);
        assert_eq!(*c, vec![1], "the last value given back comes first");
    }

    #[test]
    fn buffers_are_zeroed_reused_and_large_ones_released() {
        let pooled = || POOL.with(|p| p.borrow().len());
        let mut a = zeros(100);
        a[3] = 7.0;
        let p = a.as_ptr();
        drop(a);
        let before = pooled();
        let b = zeros(50);
        assert_eq!(b.as_ptr(), p, "the same allocation comes back");
        assert!(b.iter().all(|&v| v == 0.0) && b.len() == 50);
        assert_eq!(pooled(), before - 1);
        drop(zeros(MAX_ELEMS + 1));
        assert_eq!(pooled(), before - 1, "a prefill-sized buffer is not kept");
        drop(b);
        assert_eq!(pooled(), before);
    }
}
