//! Waits between attempts to reach a peer: exponential, capped, with jitter so that
//! many clients cut off together do not retry in lockstep. Sans-IO: the caller sleeps
//! and supplies the randomness. (The `backoff` crate is unmaintained; this is all a
//! retry loop here needs.)

use std::time::Duration;

/// Doubling waits from `first` up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first.min(cap),
        }
    }

    /// The wait before the next attempt: a point in the upper half of the current step
    /// ("equal jitter"), chosen by `unit` in [0, 1). The step then doubles, up to the cap.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.cap);
        step / 2 + step.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
    }

    /// After a success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.next = self.first.min(self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(MS(100), MS(1000));
        let lows: Vec<_> = (0..6).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(lows, [MS(50), MS(100), MS(200), MS(400), MS(500), MS(500)]);
        let mut b = Backoff::new(MS(100), MS(1000));
        let highs: Vec<_> = (0..6).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(
            highs,
            [MS(100), MS(200), MS(400), MS(800), MS(1000), MS(1000)]
        );
        b.reset();
        assert_eq!(b.next_delay(0.5), MS(75));
    }
}
