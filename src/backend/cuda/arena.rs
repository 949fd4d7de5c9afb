//! Where a recorded decode step's buffers come from: one workspace, handed out first fit.
//!
//! Allocated from the stream while it is recorded, each buffer would be a memory node of the
//! graph, between the kernel before it and the kernel after it; a kernel that follows such a
//! node starts when the node is reached, not while the kernel before it runs (programmatic
//! dependent launch needs a kernel-to-kernel edge), so it could not load its weights early.
//! Carved out of a workspace that outlives the graph, the buffers leave the graph kernels
//! alone. Every recorded step uses the same workspace: replays go through one stream, so no two
//! of them run at once.
//!
//! A buffer returned is reused by work queued after it, as the stream's allocator does: every
//! kernel waits for the one before it before it writes anything (`pdl_wait`), so a kernel
//! that takes over a buffer writes it only after the last one that read it has finished. Two
//! chains side by side ([`super::gpu::Gpu::join`]) do not order each other's work: what either
//! returns while both are queued is held back until they are joined.

use std::collections::BTreeMap;

/// Buffers start at multiples of this (the stream's allocator aligns as much).
pub const ALIGN: usize = 256;

/// The workspace's bookkeeping: offsets into it, never addresses.
#[derive(Debug)]
pub struct Arena {
    size: usize,
    /// Free ranges by offset (coalesced: no two touch).
    free: BTreeMap<usize, usize>,
    /// Buffers handed out and not yet returned.
    live: usize,
    /// Bytes in use, including those the workspace had no room for (allocated elsewhere), and
    /// the most at any time: the size the next workspace needs.
    used: usize,
    peak: usize,
    /// Ranges returned while two chains run side by side, free again once they are joined.
    held: Option<Vec<(usize, usize)>>,
}

impl Arena {
    /// An empty workspace of `size` bytes.
    pub fn new(size: usize) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Arena {
            size,
            free,
            live: 0,
            used: 0,
            peak: 0,
            held: None,
        }
    }

    /// The bytes a buffer of `bytes` takes.
    pub fn span(bytes: usize) -> usize {
        bytes.max(1).next_multiple_of(ALIGN)
    }

    /// The offset of `bytes` (first fit), or None where no free range holds them (the caller
    /// allocates them elsewhere and reports them by [`Arena::spilled`]).
    pub fn take(&mut self, bytes: usize) -> Option<usize> {
        let n = Self::span(bytes);
        let (&at, &len) = self.free.iter().find(|(_, &len)| len >= n)?;
        self.free.remove(&at);
        if len > n {
            self.free.insert(at + n, len - n);
        }
        self.live += 1;
        self.grew(n);
        Some(at)
    }

    /// Counts `bytes` allocated elsewhere for want of room.
    pub fn spilled(&mut self, bytes: usize) {
        self.grew(Self::span(bytes));
    }

    /// Uncounts what [`Arena::spilled`] counted, once freed.
    pub fn unspilled(&mut self, bytes: usize) {
        self.used -= Self::span(bytes);
    }

    fn grew(&mut self, n: usize) {
        self.used += n;
        self.peak = self.peak.max(self.used);
    }

    /// Returns the buffer of `bytes` at `at`.
    pub fn give(&mut self, at: usize, bytes: usize) {
        let n = Self::span(bytes);
        self.live -= 1;
        self.used -= n;
        match &mut self.held {
            Some(h) => h.push((at, n)),
            None => self.release(at, n),
        }
    }

    /// Two chains start side by side: returns are held until [`Arena::join`].
    pub fn fork(&mut self) {
        self.held.get_or_insert_with(Vec::new);
    }

    /// The chains are joined: what they returned is free.
    pub fn join(&mut self) {
        for (at, n) in self.held.take().unwrap_or_default() {
            self.release(at, n);
        }
    }

    fn release(&mut self, mut at: usize, mut n: usize) {
        debug_assert!(at + n <= self.size);
        if let Some((&p, &pn)) = self.free.range(..at).next_back() {
            if p + pn == at {
                self.free.remove(&p);
                at = p;
                n += pn;
            }
        }
        if let Some(&next) = self.free.get(&(at + n)) {
            self.free.remove(&(at + n));
            n += next;
        }
        self.free.insert(at, n);
    }

    /// Buffers handed out and not returned.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The most bytes in use at once, counting those that did not fit.
    pub fn peak(&self) -> usize {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_buffers_are_reused_and_coalesced() {
        let mut a = Arena::new(4 * ALIGN);
        let x = a.take(10).unwrap();
        let y = a.take(ALIGN + 1).unwrap();
        let z = a.take(ALIGN).unwrap();
        assert_eq!((x, y, z), (0, ALIGN, 3 * ALIGN));
        assert_eq!(a.take(1), None);
        a.give(x, 10);
        a.give(y, ALIGN + 1);
        // The first three ranges are one again.
        assert_eq!(a.take(3 * ALIGN), Some(0));
        assert_eq!(a.peak(), 4 * ALIGN);
        assert_eq!(a.live(), 2);
    }

    #[test]
    fn returns_inside_a_join_wait_for_it() {
        let mut a = Arena::new(2 * ALIGN);
        let x = a.take(ALIGN).unwrap();
        a.fork();
        a.give(x, ALIGN);
        // The other chain may still be reading x: not handed out again.
        let y = a.take(ALIGN).unwrap();
        assert_ne!(x, y);
        assert_eq!(a.take(ALIGN), None);
        a.join();
        assert_eq!(a.take(ALIGN), Some(x));
    }

    #[test]
    fn spills_count_toward_the_peak() {
        let mut a = Arena::new(ALIGN);
        let x = a.take(ALIGN).unwrap();
        assert_eq!(a.take(5), None);
        a.spilled(5);
        assert_eq!(a.peak(), 2 * ALIGN);
        a.unspilled(5);
        a.give(x, ALIGN);
        assert_eq!((a.live(), a.peak()), (0, 2 * ALIGN));
    }
}
