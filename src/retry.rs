//! The one retry policy of agentd, and its one source of randomness.
//!
//! Every loop that tries again after a failure (connecting, claiming, listening, writing a
//! run's lines, artifacts and outcome, the readiness check, a model request, restarting a
//! worker loop that ended) waits as [`Retry`] (or its [`Backoff`]) says: exponential backoff from a first delay, doubling, capped, with "equal
//! jitter" (half fixed, half random) so that replicas which failed together do not retry in
//! lockstep. Where a loop may only go on until some moment (a lease's end, a connection
//! deadline), it asks [`Retry::wait_before`], which refuses a wait that would end past it.

use std::time::Duration;

use tokio::time::Instant;

/// A random fraction in `[0, 1)`: every jitter of agentd comes from here.
pub fn random_fraction() -> f64 {
    rand::random::<f64>()
}

/// A random duration up to `max` (spreading periodic work of several replicas).
pub fn random_duration(max: Duration) -> Duration {
    max.mul_f64(random_fraction())
}

/// How long to wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure (before jitter).
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// From 100 ms up to `max` (`database.max_backoff` for the database's loops).
    pub fn up_to(max: Duration) -> Backoff {
        Backoff {
            first: Duration::from_millis(100),
            max,
        }
    }

    /// The wait after failure number `failures` (from 1): `first · 2^(failures-1)`, capped,
    /// of which half is fixed and half random.
    pub fn delay(&self, failures: u32) -> Duration {
        let exponential = self
            .first
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let capped = exponential.min(self.max);
        capped.mul_f64(0.5 + 0.5 * random_fraction())
    }
}

/// One loop's retries: how many failures in a row, and the waits they call for.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    failures: u32,
}

impl Retry {
    /// A loop retrying with `backoff`.
    pub fn new(backoff: Backoff) -> Retry {
        Retry {
            backoff,
            failures: 0,
        }
    }

    /// A loop retrying from 100 ms up to `max`.
    pub fn up_to(max: Duration) -> Retry {
        Retry::new(Backoff::up_to(max))
    }

    /// Counts a failure; the wait before the next attempt.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures)
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// An attempt succeeded: the next failure waits the shortest again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure and sleeps before the next attempt, unless the wait would end
    /// after `deadline`: then returns `None` at once (give up). Otherwise the wait slept.
    pub async fn wait_before(&mut self, deadline: Option<Instant>) -> Option<Duration> {
        let delay = self.failed();
        if deadline.is_some_and(|deadline| Instant::now() + delay > deadline) {
            return None;
        }
        tokio::time::sleep(delay).await;
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_are_capped_and_jittered_by_half() {
        let max = Duration::from_secs(30);
        let mut retry = Retry::up_to(max);
        for failures in 1..40u32 {
            let delay = retry.failed();
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1u32 << (failures - 1).min(20))
                .min(max);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{failures}: {delay:?}"
            );
        }
        retry.succeeded();
        assert!(retry.failed() <= Duration::from_millis(100));
    }

    #[test]
    fn random_fractions_are_fractions_and_vary() {
        let draws: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        assert!(draws.iter().any(|f| *f != draws[0]));
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_is_refused() {
        let mut retry = Retry::new(Backoff {
            first: Duration::from_secs(10),
            max: Duration::from_secs(10),
        });
        let deadline = Instant::now() + Duration::from_millis(100);
        assert_eq!(retry.wait_before(Some(deadline)).await, None);
    }
}
