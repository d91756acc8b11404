//! Restart back-off for crashing containers, as kubelet's: 10 s after the first crash,
//! doubling each time up to 5 minutes; a container that ran for 10 minutes without
//! crashing starts again from 10 s. While a container waits out its back-off its state
//! is `Waiting` with reason `CrashLoopBackOff`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const INITIAL: Duration = Duration::from_secs(10);
pub const MAX: Duration = Duration::from_secs(300);
/// Running this long without a crash forgets the back-off.
pub const RESET_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug)]
struct Entry {
    delay: Duration,
    /// When the container last crashed.
    crashed_at: Instant,
}

/// Back-off per key (pod UID and container name).
#[derive(Debug)]
pub struct Backoff<K> {
    initial: Duration,
    max: Duration,
    entries: HashMap<K, Entry>,
}

impl<K: std::hash::Hash + Eq + Clone> Default for Backoff<K> {
    fn default() -> Self {
        Backoff::new(INITIAL, MAX)
    }
}

impl<K: std::hash::Hash + Eq + Clone> Backoff<K> {
    /// Tests use short delays.
    pub fn new(initial: Duration, max: Duration) -> Backoff<K> {
        Backoff {
            initial,
            max,
            entries: HashMap::new(),
        }
    }

    /// Records a crash of `key` at `now` (its run began at `started`) and returns how long
    /// to wait before the restart.
    pub fn crashed(&mut self, key: &K, started: Instant, now: Instant) -> Duration {
        let delay = match self.entries.get(key) {
            // A long healthy run forgets earlier crashes.
            Some(entry) if now.saturating_duration_since(started) < RESET_AFTER => (entry.delay * 2).min(self.max),
            _ => self.initial,
        };
        self.entries.insert(key.clone(), Entry { delay, crashed_at: now });
        delay
    }

    /// The time left before `key` may restart, if it is backing off at `now`.
    pub fn remaining(&self, key: &K, now: Instant) -> Option<Duration> {
        let entry = self.entries.get(key)?;
        let ready_at = entry.crashed_at + entry.delay;
        (now < ready_at).then(|| ready_at - now)
    }

    /// The current delay of `key` (for the CrashLoopBackOff message).
    pub fn delay(&self, key: &K) -> Option<Duration> {
        self.entries.get(key).map(|e| e.delay)
    }

    /// Forgets `key` (its pod is gone).
    pub fn forget(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_after_a_long_run() {
        let mut backoff = Backoff::default();
        let t0 = Instant::now();
        let key = ("uid", "app");
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..7 {
            let started = now;
            now += Duration::from_secs(1);
            delays.push(backoff.crashed(&key, started, now).as_secs());
            now += backoff.remaining(&key, now).unwrap();
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff.remaining(&key, now), None, "the wait is over");

        // Ten minutes of running: the next crash waits 10 s again.
        let started = now;
        now += RESET_AFTER;
        assert_eq!(backoff.crashed(&key, started, now), INITIAL);
        assert_eq!(
            backoff.remaining(&key, now + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        backoff.forget(&key);
        assert_eq!(backoff.delay(&key), None);
    }
}
