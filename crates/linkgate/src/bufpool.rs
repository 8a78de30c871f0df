//! Relay buffers that belong to a connection only while data flows.
//!
//! An idle connection holds no buffer; a busy one borrows a [`BUF_SIZE`]
//! buffer from a small per-thread cache and gives it back as soon as its
//! socket has nothing more to read. This keeps bulk copies large and idle
//! connections cheap (DESIGN §5, Relay).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Size of one relay buffer: large enough for bulk throughput on loopback.
pub const BUF_SIZE: usize = 256 * 1024;

/// Buffers kept per worker thread; beyond this, returned buffers are freed.
const CACHE_PER_THREAD: usize = 16;

thread_local! {
    static CACHE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A borrowed relay buffer; returns to the thread's cache when dropped.
pub struct PooledBuf(Option<Box<[u8]>>);

impl PooledBuf {
    /// Takes a buffer from this thread's cache, or allocates one.
    pub fn take() -> Self {
        let cached = CACHE.with(|c| c.borrow_mut().pop());
        PooledBuf(Some(
            cached.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()),
        ))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            // `try_with`: during thread teardown the cache may be gone; then just free.
            let _ = CACHE.try_with(|c| {
                let mut cache = c.borrow_mut();
                if cache.len() < CACHE_PER_THREAD {
                    cache.push(buf);
                }
            });
        }
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}
