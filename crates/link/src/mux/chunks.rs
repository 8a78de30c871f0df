//! [`ChunkQueue`]: a stream's queued bytes as a list of owned buffers.
//!
//! Buffers are handed in and out whole (a relay's read buffer goes into a
//! send queue, a received record's payload out to the relay that writes it
//! on) so that the bytes are not copied under the session's lock; only
//! the callers that need a copy (a partial read into a caller's slice, a
//! frame assembled for sealing) make one.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Bytes queued in order, as the buffers they arrived in.
#[derive(Default)]
pub struct ChunkQueue {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl ChunkQueue {
    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `chunk` (empty chunks are ignored).
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Takes the first buffer, or its first `max` bytes (no copy).
    pub fn pop(&mut self, max: usize) -> Option<Bytes> {
        let front = self.chunks.front_mut()?;
        let chunk = if front.len() <= max {
            self.chunks.pop_front().expect("front exists")
        } else {
            front.split_to(max)
        };
        self.len -= chunk.len();
        Some(chunk)
    }

    /// Moves the first `n` bytes (at most what is queued) to the end of
    /// `out`; returns how many.
    pub fn copy_out(&mut self, n: usize, out: &mut Vec<u8>) -> usize {
        let n = n.min(self.len);
        let mut left = n;
        while left > 0 {
            let front = self.chunks.front_mut().expect("len counts the chunks");
            let take = left.min(front.len());
            out.extend_from_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            left -= take;
        }
        self.len -= n;
        n
    }

    /// Copies queued bytes into `dst` until it is full or the queue empty;
    /// returns how many.
    pub fn copy_into(&mut self, dst: &mut [u8]) -> usize {
        let mut filled = 0;
        while filled < dst.len() {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let take = (dst.len() - filled).min(front.len());
            dst[filled..filled + take].copy_from_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            filled += take;
        }
        self.len -= filled;
        filled
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.chunks = VecDeque::new();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever mix of pops and copies takes the bytes out, they come
        /// out in the order they went in, and `len` stays exact.
        #[test]
        fn bytes_leave_in_order(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..20),
            takes in proptest::collection::vec((0u8..3, 0usize..80), 0..60),
        ) {
            let mut queue = ChunkQueue::default();
            let mut expected = Vec::new();
            for chunk in &chunks {
                expected.extend_from_slice(chunk);
                queue.push(Bytes::from(chunk.clone()));
            }
            prop_assert_eq!(queue.len(), expected.len());
            let mut got = Vec::new();
            for (how, n) in takes {
                match how {
                    0 => if let Some(chunk) = queue.pop(n.max(1)) {
                        prop_assert!(chunk.len() <= n.max(1));
                        got.extend_from_slice(&chunk);
                    },
                    1 => { queue.copy_out(n, &mut got); }
                    _ => {
                        let mut dst = vec![0; n];
                        let filled = queue.copy_into(&mut dst);
                        got.extend_from_slice(&dst[..filled]);
                    }
                }
                prop_assert_eq!(queue.len() + got.len(), expected.len());
            }
            queue.copy_out(usize::MAX, &mut got);
            prop_assert_eq!(got, expected);
            prop_assert!(queue.is_empty());
        }
    }
}
