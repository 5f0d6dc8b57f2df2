//! Per-LU LBA range lock making COMPARE AND WRITE and ORWRITE atomic against every other
//! write to the same blocks.
//!
//! The LBA space is cut into stripes hashed onto a fixed table. Plain writes hold their
//! stripes shared (they never exclude each other: ordering among plain writes is the
//! initiator's business), read-modify-write commands hold them exclusive. All stripes of a
//! request are taken at once under one mutex, so there is no lock-ordering deadlock, and a
//! large write costs one mutex round trip however many stripes it covers.

use std::sync::{Condvar, Mutex, PoisonError};

/// Stripes in the table; ranges covering more than this take the whole table.
const STRIPES: usize = 64;
/// LBAs per stripe.
const STRIPE_BLOCKS: u64 = 2048;

#[derive(Debug, Clone, Copy, Default)]
struct Stripe {
    shared: u32,
    exclusive: bool,
}

/// The stripes and how many acquirers wait for one of them.
#[derive(Debug)]
struct Table {
    stripes: [Stripe; STRIPES],
    /// Waiting `lock` calls: a release only signals the condvar when there are some (a
    /// notify is a futex system call even with nobody waiting, once per plain write).
    waiting: u32,
}

#[derive(Debug)]
pub struct RangeLock {
    table: Mutex<Table>,
    released: Condvar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Held stripes; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    first: usize,
    count: usize,
    mode: Mode,
}

impl Default for RangeLock {
    fn default() -> Self {
        RangeLock {
            table: Mutex::new(Table {
                stripes: [Stripe::default(); STRIPES],
                waiting: 0,
            }),
            released: Condvar::new(),
        }
    }
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Table indices covered by `[lba, lba+blocks)`: (first index, count), wrapping.
    fn span(lba: u64, blocks: u64) -> (usize, usize) {
        let first = lba / STRIPE_BLOCKS;
        let last = lba.saturating_add(blocks.max(1) - 1) / STRIPE_BLOCKS;
        let n = last - first + 1;
        if n >= STRIPES as u64 {
            (0, STRIPES)
        } else {
            ((first % STRIPES as u64) as usize, n as usize)
        }
    }

    pub fn lock(&self, lba: u64, blocks: u64, mode: Mode) -> RangeGuard<'_> {
        self.acquire(lba, blocks, mode, true)
            .unwrap_or_else(|| unreachable!("a waiting acquire always succeeds"))
    }

    /// Like [`RangeLock::lock`] but None instead of waiting for a conflicting holder.
    pub fn try_lock(&self, lba: u64, blocks: u64, mode: Mode) -> Option<RangeGuard<'_>> {
        self.acquire(lba, blocks, mode, false)
    }

    fn acquire(&self, lba: u64, blocks: u64, mode: Mode, wait: bool) -> Option<RangeGuard<'_>> {
        let (first, count) = Self::span(lba, blocks);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let busy = (0..count).any(|i| {
                let s = &table.stripes[(first + i) % STRIPES];
                match mode {
                    Mode::Shared => s.exclusive,
                    Mode::Exclusive => s.exclusive || s.shared > 0,
                }
            });
            if !busy {
                break;
            }
            if !wait {
                return None;
            }
            table.waiting += 1;
            table = self
                .released
                .wait(table)
                .unwrap_or_else(PoisonError::into_inner);
            table.waiting -= 1;
        }
        for i in 0..count {
            let s = &mut table.stripes[(first + i) % STRIPES];
            match mode {
                Mode::Shared => s.shared += 1,
                Mode::Exclusive => s.exclusive = true,
            }
        }
        Some(RangeGuard {
            lock: self,
            first,
            count,
            mode,
        })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut table = self
            .lock
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for i in 0..self.count {
            let s = &mut table.stripes[(self.first + i) % STRIPES];
            match self.mode {
                Mode::Shared => s.shared = s.shared.saturating_sub(1),
                Mode::Exclusive => s.exclusive = false,
            }
        }
        let waiting = table.waiting > 0;
        drop(table);
        if waiting {
            self.lock.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn span_wraps_and_saturates() {
        assert_eq!(RangeLock::span(0, 1), (0, 1));
        assert_eq!(RangeLock::span(STRIPE_BLOCKS - 1, 2), (0, 2));
        assert_eq!(RangeLock::span(u64::MAX, 1).1, 1);
        assert_eq!(RangeLock::span(0, u64::MAX), (0, STRIPES));
        let (f, n) = RangeLock::span(STRIPE_BLOCKS * (STRIPES as u64 - 1), STRIPE_BLOCKS * 2);
        assert_eq!((f, n), (STRIPES - 1, 2));
    }

    #[test]
    fn shared_coexist_exclusive_waits() {
        let l = Arc::new(RangeLock::new());
        let a = l.lock(0, 10, Mode::Shared);
        let _b = l.lock(5, 10, Mode::Shared);
        let got = Arc::new(AtomicBool::new(false));
        let (l2, g2) = (l.clone(), got.clone());
        let t = std::thread::spawn(move || {
            let _x = l2.lock(3, 1, Mode::Exclusive);
            g2.store(true, Ordering::SeqCst);
        });
        // The waiter is counted, so the releases below signal it.
        while l.table.lock().unwrap().waiting == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!got.load(Ordering::SeqCst));
        drop(a);
        drop(_b);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert_eq!(l.table.lock().unwrap().waiting, 0);
    }

    #[test]
    fn try_lock_does_not_wait() {
        let l = RangeLock::new();
        let x = l.lock(0, 8, Mode::Exclusive);
        assert!(l.try_lock(4, 8, Mode::Shared).is_none());
        assert!(l.try_lock(STRIPE_BLOCKS * 3, 8, Mode::Shared).is_some());
        drop(x);
        assert!(l.try_lock(4, 8, Mode::Shared).is_some());
    }
}
