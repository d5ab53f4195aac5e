//! A byte budget: bounds the plaintext in flight between the reader and the upload, so the
//! agent's memory stays bounded whatever the size of the source.
//!
//! The reader (a plain thread) blocks in `acquire`; any stage releases, from any thread.
//! `close` wakes a blocked reader when the pipeline is failing.

use std::sync::{Condvar, Mutex};

pub struct ByteBudget {
    capacity: usize,
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

impl ByteBudget {
    pub fn new(capacity: usize) -> Self {
        ByteBudget { capacity, state: Mutex::new((0, false)), freed: Condvar::new() }
    }

    /// Blocks until `n` bytes fit. A request larger than the capacity waits for an empty budget.
    pub fn acquire(&self, n: usize) -> Result<(), Closed> {
        let n = n.min(self.capacity);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.1 {
                return Err(Closed);
            }
            if st.0 + n <= self.capacity {
                st.0 += n;
                return Ok(());
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn release(&self, n: usize) {
        let n = n.min(self.capacity);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(n);
        self.freed.notify_all();
    }

    pub fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 = true;
        self.freed.notify_all();
    }

    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn acquire_blocks_until_release() {
        let b = Arc::new(ByteBudget::new(100));
        b.acquire(80).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.acquire(50));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "must wait for room");
        b.release(80);
        assert_eq!(t.join().unwrap(), Ok(()));
        assert_eq!(b.in_use(), 50);
    }

    #[test]
    fn close_wakes_a_blocked_acquire() {
        let b = Arc::new(ByteBudget::new(10));
        b.acquire(10).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.acquire(5));
        std::thread::sleep(Duration::from_millis(20));
        b.close();
        assert_eq!(t.join().unwrap(), Err(Closed));
    }

    #[test]
    fn oversized_requests_do_not_deadlock() {
        let b = ByteBudget::new(10);
        b.acquire(1000).unwrap();
        b.release(1000);
        assert_eq!(b.in_use(), 0);
    }
}
