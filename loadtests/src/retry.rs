//! The game client's retry policy: whether a bid is tried again, and after
//! how long. `Retry-After` is honoured (with jitter, up to a longest wait),
//! otherwise a jittered exponential backoff; and a retry budget shared by
//! the clients ([`RetryBudget`], after Finagle's and gRPC's) caps retries
//! at a share of first attempts, so that retries cannot bury an overloaded
//! server (loadtests/README.md, "Retries").

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use crate::record::Withheld;
use crate::scenario::Client;

/// The share of a `Retry-After` added at random, at most.
pub const RETRY_AFTER_JITTER: f64 = 0.25;

/// Slots the budget's window is counted in: it slides by a tenth of itself.
const SLOTS: usize = 10;

/// What a client does after an attempt that may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this wait.
    Retry(Duration),
    /// Every attempt is spent: the bid ends with its last answer.
    Exhausted,
    /// A retry that would have been made was not: the bid ends with its
    /// last answer.
    Withheld(Withheld),
}

/// When retries are made and how long they wait (without the budget).
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    max_wait: Duration,
}

impl RetryPolicy {
    /// The policy of the scenario's clients.
    pub fn new(client: &Client) -> Self {
        RetryPolicy {
            max_attempts: client.max_attempts,
            backoff_base: Duration::from_millis(client.backoff_base_ms),
            backoff_max: Duration::from_millis(client.backoff_max_ms),
            max_wait: Duration::from_millis(client.max_retry_wait_ms),
        }
    }

    /// The wait before retry `retry` (1: the first retry) when the server
    /// named none: a random time in `[d/2, d]`, where `d` is the base
    /// doubled for every retry before this one, at most the backoff's cap.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        let d = self
            .backoff_base
            .saturating_mul(1 << doublings)
            .min(self.backoff_max);
        rng.gen_range(d / 2..=d)
    }

    /// The wait before retry `retry` after an answer with `Retry-After:
    /// retry_after` (if any): never less than `retry_after`, plus up to
    /// [`RETRY_AFTER_JITTER`] of it, and never less than the backoff; at
    /// most the longest wait allowed. `None` when `retry_after` itself is
    /// longer than that: the client does not retry.
    pub fn wait(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let backoff = self.backoff(retry, rng);
        let Some(floor) = retry_after else {
            return Some(backoff.min(self.max_wait));
        };
        if floor > self.max_wait {
            return None;
        }
        let jitter = floor.mul_f64(RETRY_AFTER_JITTER * rng.gen::<f64>());
        Some((floor + jitter).max(backoff).min(self.max_wait))
    }

    /// The longest one bid can take: every attempt waiting a client
    /// timeout for a slot and another for its answer, and every retry the
    /// longest wait.
    pub fn longest(&self, timeout: Duration) -> Duration {
        timeout * 2 * self.max_attempts + self.max_wait * self.max_attempts.saturating_sub(1)
    }
}

/// A retry budget over a sliding window: retries may be at most a share of
/// the first attempts made in the window, plus a floor per second.
///
/// Time is given explicitly (since any fixed origin, such as the run's
/// second 0); a time earlier than one already seen counts as that one.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Retries allowed per first attempt.
    share: f64,
    /// Retries always allowed within one window.
    reserve: f64,
    /// One slot of the window.
    slot: Duration,
    /// First attempts and retries by slot (a ring).
    slots: [(u64, u64); SLOTS],
    /// The number of the newest slot, counted from the origin.
    newest: u64,
    allowed: u64,
    denied: u64,
}

impl RetryBudget {
    /// Retries at most `pct` percent of the first attempts over the last
    /// `window`, plus `min_per_s` retries per second of it.
    pub fn new(pct: u32, min_per_s: u32, window: Duration) -> Self {
        RetryBudget {
            share: f64::from(pct) / 100.0,
            reserve: f64::from(min_per_s) * window.as_secs_f64(),
            slot: (window / SLOTS as u32).max(Duration::from_millis(1)),
            slots: [(0, 0); SLOTS],
            newest: 0,
            allowed: 0,
            denied: 0,
        }
    }

    /// Moves the window to `now`; returns the index of the current slot.
    fn advance(&mut self, now: Duration) -> usize {
        let at = (now.as_nanos() / self.slot.as_nanos()) as u64;
        if at > self.newest {
            for k in 1..=(at - self.newest).min(SLOTS as u64) {
                self.slots[((self.newest + k) % SLOTS as u64) as usize] = (0, 0);
            }
            self.newest = at;
        }
        (self.newest % SLOTS as u64) as usize
    }

    /// A first attempt was made at `now`: it adds to what may be retried.
    pub fn first_attempt(&mut self, now: Duration) {
        let slot = self.advance(now);
        self.slots[slot].0 += 1;
    }

    /// Takes one retry from the budget at `now`, if it has one left.
    pub fn try_retry(&mut self, now: Duration) -> bool {
        let slot = self.advance(now);
        let firsts: u64 = self.slots.iter().map(|s| s.0).sum();
        let retries: u64 = self.slots.iter().map(|s| s.1).sum();
        let allowance = self.reserve + self.share * firsts as f64;
        if (retries + 1) as f64 <= allowance + 1e-9 {
            self.slots[slot].1 += 1;
            self.allowed += 1;
            true
        } else {
            self.denied += 1;
            false
        }
    }

    /// Retries allowed so far.
    pub fn allowed(&self) -> u64 {
        self.allowed
    }

    /// Retries denied so far.
    pub fn denied(&self) -> u64 {
        self.denied
    }
}

/// The policy and the budget the generator's clients share.
#[derive(Debug)]
pub struct Retries {
    policy: RetryPolicy,
    budget: Mutex<RetryBudget>,
}

impl Retries {
    /// The retries of the scenario's clients.
    pub fn new(client: &Client) -> Self {
        Retries {
            policy: RetryPolicy::new(client),
            budget: Mutex::new(RetryBudget::new(
                client.retry_budget_pct,
                client.retry_budget_min_per_s,
                Duration::from_secs(u64::from(client.retry_budget_window_s)),
            )),
        }
    }

    /// The policy, without the budget.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// A bid's first attempt is made at `now`.
    pub fn first_attempt(&self, now: Duration) {
        self.budget.lock().expect("retry budget").first_attempt(now);
    }

    /// Whether a bid that has made `attempts` attempts, the last answered
    /// with `Retry-After: retry_after` (if any), is tried again at `now`,
    /// and after how long. The budget is asked last: it counts only
    /// retries that would otherwise have been made.
    pub fn decide(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        now: Duration,
        rng: &mut impl Rng,
    ) -> Decision {
        if attempts >= self.policy.max_attempts {
            return Decision::Exhausted;
        }
        let Some(wait) = self.policy.wait(attempts, retry_after, rng) else {
            return Decision::Withheld(Withheld::RetryAfterOverCap);
        };
        if !self.budget.lock().expect("retry budget").try_retry(now) {
            return Decision::Withheld(Withheld::Budget);
        }
        Decision::Retry(wait)
    }

    /// Retries the budget allowed and denied so far.
    pub fn budget_counts(&self) -> (u64, u64) {
        let budget = self.budget.lock().expect("retry budget");
        (budget.allowed(), budget.denied())
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::SeedableRng as _;

    use super::*;

    fn client(toml_text: &str) -> Client {
        let client: Client = toml::from_str(toml_text).unwrap();
        client.check().unwrap();
        client
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn the_backoff_doubles_per_retry_within_its_jitter_and_its_cap() {
        let policy = RetryPolicy::new(&client(
            "backoff_base_ms = 100\nbackoff_max_ms = 1000\nmax_attempts = 10",
        ));
        let mut rng = SmallRng::seed_from_u64(7);
        for (retry, d) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)] {
            let waits: Vec<Duration> = (0..2_000)
                .map(|_| policy.backoff(retry, &mut rng))
                .collect();
            let (low, high) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
            assert!(
                *low >= ms(d / 2) && *high <= ms(d),
                "retry {retry}: {low:?}..{high:?}"
            );
            // The jitter spreads the waits over the range.
            assert!(
                *low < ms(d * 6 / 10) && *high > ms(d * 9 / 10),
                "retry {retry}: {low:?}..{high:?}"
            );
            // Without Retry-After, a retry waits the backoff.
            let wait = policy.wait(retry, None, &mut rng).unwrap();
            assert!(wait >= ms(d / 2) && wait <= ms(d), "{wait:?}");
        }
        // Far past any cap, the doubling saturates instead of overflowing.
        assert!(policy.backoff(u32::MAX, &mut rng) <= ms(1000));
    }

    #[test]
    fn a_retry_after_above_the_backoff_cap_is_honoured_with_jitter_up_to_the_longest_wait() {
        // The old client capped every wait at the backoff's top (1 s).
        let policy = RetryPolicy::new(&client(
            "backoff_base_ms = 50\nbackoff_max_ms = 1000\nmax_retry_wait_ms = 10000",
        ));
        let mut rng = SmallRng::seed_from_u64(11);
        let waits: Vec<Duration> = (0..2_000)
            .map(|_| {
                policy
                    .wait(1, Some(Duration::from_secs(5)), &mut rng)
                    .unwrap()
            })
            .collect();
        assert!(
            waits.iter().all(|w| *w >= ms(5_000) && *w <= ms(6_250)),
            "{waits:?}"
        );
        assert!(
            waits.iter().any(|w| *w > ms(6_000)),
            "some are jittered well past it"
        );
        // Near the longest wait, the jitter stops at it, never below Retry-After.
        for _ in 0..200 {
            let wait = policy.wait(2, Some(ms(9_000)), &mut rng).unwrap();
            assert!(wait >= ms(9_000) && wait <= ms(10_000), "{wait:?}");
        }
        assert_eq!(policy.wait(1, Some(ms(10_000)), &mut rng), Some(ms(10_000)));
        // Beyond it, the client does not retry.
        assert_eq!(
            policy.wait(1, Some(Duration::from_secs(11)), &mut rng),
            None
        );
        // Retry-After: 0 still backs off.
        let wait = policy.wait(3, Some(Duration::ZERO), &mut rng).unwrap();
        assert!(wait >= ms(100) && wait <= ms(200), "{wait:?}");
    }

    #[test]
    fn a_retry_is_made_until_the_attempts_are_spent_unless_the_wait_is_too_long() {
        let retries = Retries::new(&client("max_attempts = 3\nmax_retry_wait_ms = 3000"));
        let mut rng = SmallRng::seed_from_u64(3);
        let now = Duration::from_secs(1);
        let decide = |attempts, retry_after, rng: &mut SmallRng| {
            retries.decide(attempts, retry_after, now, rng)
        };
        let Decision::Retry(wait) = decide(1, Some(Duration::from_secs(2)), &mut rng) else {
            panic!("a 2 s Retry-After is waited out");
        };
        assert!(
            wait >= Duration::from_secs(2) && wait <= ms(2_500),
            "{wait:?}"
        );
        assert!(matches!(decide(2, None, &mut rng), Decision::Retry(_)));
        assert_eq!(decide(3, None, &mut rng), Decision::Exhausted);
        assert_eq!(
            decide(1, Some(Duration::from_secs(4)), &mut rng),
            Decision::Withheld(Withheld::RetryAfterOverCap)
        );
        // Only the two retries made were taken from the budget.
        assert_eq!(retries.budget_counts(), (2, 0));
        assert_eq!(
            retries.policy().longest(Duration::from_secs(2)),
            Duration::from_secs(3 * 4 + 2 * 3)
        );
    }

    #[test]
    fn the_budget_denies_retries_beyond_its_share_and_refills_as_first_attempts_arrive() {
        // 20% of the first attempts over 10 s, no floor.
        let mut budget = RetryBudget::new(20, 0, Duration::from_secs(10));
        let t = Duration::from_secs;
        assert!(!budget.try_retry(t(0)), "nothing to retry against yet");
        for _ in 0..10 {
            budget.first_attempt(t(0));
        }
        assert!(budget.try_retry(t(1)) && budget.try_retry(t(1)));
        assert!(!budget.try_retry(t(1)), "2 retries for 10 first attempts");
        for _ in 0..5 {
            budget.first_attempt(t(2));
        }
        assert!(
            budget.try_retry(t(2)),
            "5 more first attempts: one more retry"
        );
        assert!(!budget.try_retry(t(2)));
        // Ten seconds on, the 10 first attempts of second 0 have left the
        // window, but not the 3 retries they paid for: the 5 first
        // attempts of second 2 do not cover them.
        assert!(!budget.try_retry(t(10)));
        assert!(!budget.try_retry(t(11)));
        // New first attempts refill it.
        for _ in 0..10 {
            budget.first_attempt(t(12));
        }
        assert!(budget.try_retry(t(12)));
        // A late timestamp counts in the newest slot: 15 first attempts.
        for _ in 0..5 {
            budget.first_attempt(t(5));
        }
        assert!(budget.try_retry(t(12)) && budget.try_retry(t(12)));
        assert!(!budget.try_retry(t(12)), "3 retries for 15 first attempts");
        // A long quiet spell empties the window.
        assert!(!budget.try_retry(t(1_000)));
        assert_eq!((budget.allowed(), budget.denied()), (6, 7));
    }

    #[test]
    fn the_budgets_floor_allows_some_retries_per_second_without_first_attempts() {
        let mut budget = RetryBudget::new(20, 10, Duration::from_secs(10));
        let t = Duration::from_millis;
        for i in 0..100 {
            assert!(budget.try_retry(t(i * 10)), "retry {i} within the floor");
        }
        assert!(!budget.try_retry(t(1_000)), "10/s over 10 s is 100");
        // 50 first attempts add 10 retries to the floor.
        for _ in 0..50 {
            budget.first_attempt(t(1_500));
        }
        for _ in 0..10 {
            assert!(budget.try_retry(t(1_500)));
        }
        assert!(!budget.try_retry(t(1_500)));
        // Once the window has slid past them, the floor is whole again.
        assert!(budget.try_retry(t(12_000)));
    }
}
