//! The login limiter: slows password guessing down without letting anyone lock a user out.
//!
//! - **Growing delay per (user, client address).** After the n-th failure in a row of one user
//!   from one address, the next attempt of that pair waits 2^(n-1) × `auth.login_delay` (at most
//!   30 s). Guesses from one address never delay the user at another.
//! - **A ceiling per user**, against guessing spread over many addresses: once a user has had
//!   `auth.login_user_limit` failures (default 100) in the last hour from all addresses together,
//!   attempts of that user wait until the oldest of them is an hour old. One per address too
//!   (`auth.login_address_limit` failures of all users), against one address trying many users.
//! - **An address that succeeded is trusted.** For [`TRUST_FOR`] after a successful login of a
//!   user from an address, that pair is never delayed — not by the ceilings, nor by its own
//!   failures — until it has failed [`TRUST_SPENT`] times in a row (a guesser behind the same
//!   address), when it is treated like any other.
//!
//! An attempt counts as a failure from the moment it is let through ([`LoginLimiter::attempt`]),
//! so parallel guesses cannot all pass before the first is judged; a success takes it back, and
//! so does an attempt abandoned without an answer (dropped: a store error, a client gone).
//! Delays, not a lockout: everything is in memory, per server, and forgotten after an hour.

use crate::jobs::clock::Clock;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest delay of one (user, address) pair.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// The window of the per-user and per-address ceilings.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// How long a successful login trusts its (user, address) pair.
pub const TRUST_FOR: Duration = Duration::from_secs(30 * 86_400);
/// Failures in a row after which a trusted pair is trusted no more.
pub const TRUST_SPENT: u32 = 10;
/// Above this many entries, stale ones are dropped.
const PRUNE_ABOVE: usize = 100_000;

/// The limiter's settings (from `[auth]`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The first delay of a pair, doubling with each further failure.
    pub base: Duration,
    /// Failures of one user per [`WINDOW`], from all addresses.
    pub per_user: u32,
    /// Failures from one address per [`WINDOW`], of all users.
    pub per_address: u32,
}

type Pair = (String, Option<IpAddr>);

#[derive(Default)]
struct State {
    /// Failures in a row of each pair, and when the last began.
    pairs: HashMap<Pair, (u32, Instant)>,
    /// The recent failures of each user, oldest first (at most `per_user` kept).
    users: HashMap<String, VecDeque<Instant>>,
    /// The recent failures from each address, oldest first (at most `per_address` kept).
    addrs: HashMap<Option<IpAddr>, VecDeque<Instant>>,
    /// When each pair last logged in.
    trusted: HashMap<Pair, Instant>,
}

pub struct LoginLimiter {
    limits: Limits,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

/// A login attempt let through, counted as a failure until [`Attempt::succeeded`]; dropping it
/// without [`Attempt::failed`] takes it back.
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    pair: Pair,
    at: Instant,
    judged: bool,
}

impl Attempt<'_> {
    /// The password was wrong (or the user unknown): the failure stays counted.
    pub fn failed(mut self) {
        self.judged = true;
    }

    /// The login succeeded: the pair's failures are cleared, this attempt is taken back from the
    /// ceilings, and the pair is trusted from now on.
    pub fn succeeded(mut self) {
        self.judged = true;
        let now = self.limiter.clock.instant();
        let mut g = self.limiter.lock();
        g.pairs.remove(&self.pair);
        g.take_back(&self.pair, self.at);
        g.trusted.insert(self.pair.clone(), now);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.judged {
            let mut g = self.limiter.lock();
            if let Some((n, _)) = g.pairs.get_mut(&self.pair) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    g.pairs.remove(&self.pair);
                }
            }
            g.take_back(&self.pair, self.at);
        }
    }
}

impl State {
    /// Removes one failure begun at `at` from the pair's user and address windows.
    fn take_back(&mut self, pair: &Pair, at: Instant) {
        if let Some(q) = self.users.get_mut(&pair.0) {
            if let Some(i) = q.iter().rposition(|t| *t == at) {
                q.remove(i);
            }
        }
        if let Some(q) = self.addrs.get_mut(&pair.1) {
            if let Some(i) = q.iter().rposition(|t| *t == at) {
                q.remove(i);
            }
        }
    }

    fn prune(&mut self, now: Instant) {
        let len = self.pairs.len() + self.users.len() + self.addrs.len() + self.trusted.len();
        if len <= PRUNE_ABOVE {
            return;
        }
        let age = |t: &Instant| now.saturating_duration_since(*t);
        self.pairs.retain(|_, (_, last)| age(last) < WINDOW);
        self.users
            .retain(|_, q| q.back().is_some_and(|t| age(t) < WINDOW));
        self.addrs
            .retain(|_, q| q.back().is_some_and(|t| age(t) < WINDOW));
        self.trusted.retain(|_, t| age(t) < TRUST_FOR);
    }
}

/// How long until a window of at most `limit` failures has room again, if it is full.
fn ceiling_wait(q: Option<&VecDeque<Instant>>, limit: u32, now: Instant) -> Option<Duration> {
    let q = q?;
    let in_window = q
        .iter()
        .filter(|t| now.saturating_duration_since(**t) < WINDOW)
        .count();
    if in_window < limit as usize {
        return None;
    }
    // The oldest failure that must leave the window for the count to drop below the limit.
    let oldest = q.iter().rev().nth(limit as usize - 1)?;
    WINDOW.checked_sub(now.saturating_duration_since(*oldest))
}

fn push_capped(q: &mut VecDeque<Instant>, at: Instant, cap: u32) {
    q.push_back(at);
    while q.len() > cap.max(1) as usize {
        q.pop_front();
    }
}

impl LoginLimiter {
    pub fn new(limits: Limits, clock: Arc<dyn Clock>) -> LoginLimiter {
        LoginLimiter {
            limits: Limits {
                per_user: limits.per_user.max(1),
                per_address: limits.per_address.max(1),
                ..limits
            },
            clock,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn delay(&self, n: u32) -> Duration {
        if n == 0 {
            Duration::ZERO
        } else {
            (self.limits.base * 2u32.saturating_pow(n.min(16) - 1)).min(MAX_DELAY)
        }
    }

    /// Lets a login attempt of `user` from `addr` through, or says how long it must still wait.
    pub fn attempt(&self, user: &str, addr: Option<IpAddr>) -> Result<Attempt<'_>, Duration> {
        // A name longer than any user's is still one user to the limiter, without its bulk.
        let user: String = user.chars().take(64).collect();
        let pair = (user, addr);
        let now = self.clock.instant();
        let mut g = self.lock();
        g.prune(now);
        let failures = g.pairs.get(&pair).map_or(0, |(n, _)| *n);
        let trusted = g
            .trusted
            .get(&pair)
            .is_some_and(|t| now.saturating_duration_since(*t) < TRUST_FOR)
            && failures < TRUST_SPENT;
        if !trusted {
            let own = g.pairs.get(&pair).and_then(|(n, last)| {
                self.delay(*n)
                    .checked_sub(now.saturating_duration_since(*last))
            });
            let wait = [
                own,
                ceiling_wait(g.users.get(&pair.0), self.limits.per_user, now),
                ceiling_wait(g.addrs.get(&pair.1), self.limits.per_address, now),
            ]
            .into_iter()
            .flatten()
            .filter(|d| !d.is_zero())
            .max();
            if let Some(wait) = wait {
                return Err(wait);
            }
        }
        let e = g.pairs.entry(pair.clone()).or_insert((0, now));
        e.0 += 1;
        e.1 = now;
        let (per_user, per_address) = (self.limits.per_user, self.limits.per_address);
        push_capped(g.users.entry(pair.0.clone()).or_default(), now, per_user);
        push_capped(g.addrs.entry(pair.1).or_default(), now, per_address);
        Ok(Attempt {
            limiter: self,
            pair,
            at: now,
            judged: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::clock::FakeClock;

    const MS: Duration = Duration::from_millis(1);

    fn limiter(per_user: u32, per_address: u32) -> (LoginLimiter, FakeClock) {
        let clock = FakeClock::default();
        let l = LoginLimiter::new(
            Limits {
                base: 250 * MS,
                per_user,
                per_address,
            },
            Arc::new(clock.clone()),
        );
        (l, clock)
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([127, 0, 0, last]))
    }

    fn fail(l: &LoginLimiter, user: &str, addr: Option<IpAddr>) {
        l.attempt(user, addr).expect("let through").failed();
    }

    fn wait(l: &LoginLimiter, user: &str, addr: Option<IpAddr>) -> Option<Duration> {
        l.attempt(user, addr).err()
    }

    #[test]
    fn delays_grow_per_user_and_address_and_a_success_clears_them() {
        let (l, clock) = limiter(100, 100);
        fail(&l, "ann", ip(2));
        assert_eq!(wait(&l, "ann", ip(2)), Some(250 * MS));
        clock.advance(100 * MS);
        assert_eq!(wait(&l, "ann", ip(2)), Some(150 * MS));
        clock.advance(150 * MS);
        fail(&l, "ann", ip(2));
        assert_eq!(wait(&l, "ann", ip(2)), Some(500 * MS), "doubled");
        clock.advance(500 * MS);
        fail(&l, "ann", ip(2));
        assert_eq!(wait(&l, "ann", ip(2)), Some(1000 * MS));
        for _ in 0..20 {
            clock.advance(MAX_DELAY);
            fail(&l, "ann", ip(2));
        }
        assert_eq!(wait(&l, "ann", ip(2)), Some(MAX_DELAY), "capped");
        // The same user from elsewhere, and another user from there, are not slowed.
        assert!(l.attempt("ann", ip(3)).is_ok());
        assert!(l.attempt("bob", ip(2)).is_ok());
        // A delay, not a lockout: once it has passed, the right password gets in and clears it.
        clock.advance(MAX_DELAY);
        l.attempt("ann", ip(2)).unwrap().succeeded();
        l.attempt("ann", ip(2)).unwrap().failed();
        assert_eq!(wait(&l, "ann", ip(2)), None, "trusted after the success");
    }

    #[test]
    fn a_guess_every_30_s_from_one_address_never_keeps_the_user_out_of_another() {
        let (l, clock) = limiter(100, 100);
        for _ in 0..80 {
            // Just under the ceiling's rate: 80 an hour from one address.
            fail(&l, "ann", ip(9));
            clock.advance(Duration::from_secs(45));
            assert!(
                l.attempt("ann", ip(2)).is_ok(),
                "ann is let in from her own address"
            );
        }
    }

    #[test]
    fn a_ceiling_per_user_stops_guessing_from_many_addresses() {
        let (l, clock) = limiter(100, 1000);
        l.attempt("ann", ip(1)).unwrap().succeeded();
        for i in 0..100u32 {
            let addr = Some(IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]));
            fail(&l, "ann", addr);
            clock.advance(Duration::from_secs(1));
        }
        // The 101st address waits until the first failure is an hour old.
        assert_eq!(
            wait(&l, "ann", ip(200)),
            Some(WINDOW - Duration::from_secs(100))
        );
        // Other users are not held back by ann's ceiling.
        assert!(l.attempt("bob", ip(200)).is_ok());
        // The address ann logged in from is never delayed, ceiling or not.
        assert!(l.attempt("ann", ip(1)).is_ok());
        clock.advance(WINDOW - Duration::from_secs(100));
        assert_eq!(wait(&l, "ann", ip(200)), None, "room again after the hour");
    }

    #[test]
    fn a_ceiling_per_address_stops_one_address_trying_many_users() {
        let (l, clock) = limiter(100, 50);
        for i in 0..50 {
            fail(&l, &format!("user{i}"), ip(7));
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(
            wait(&l, "user99", ip(7)),
            Some(WINDOW - Duration::from_secs(50))
        );
        assert!(l.attempt("user99", ip(8)).is_ok(), "other addresses go on");
    }

    #[test]
    fn a_trusted_address_is_never_delayed_until_it_fails_too_often() {
        let (l, clock) = limiter(100, 100);
        l.attempt("ann", ip(2)).unwrap().succeeded();
        // A typo or nine from where ann works: no delay at all.
        for _ in 0..TRUST_SPENT {
            fail(&l, "ann", ip(2));
        }
        // Then she (or someone behind her address) is slowed like anyone else.
        assert!(wait(&l, "ann", ip(2)).is_some());
        // Trust lasts TRUST_FOR.
        l.attempt("bob", ip(3)).unwrap().succeeded();
        clock.advance(TRUST_FOR);
        fail(&l, "bob", ip(3));
        assert!(wait(&l, "bob", ip(3)).is_some());
    }

    #[test]
    fn parallel_attempts_count_before_they_are_judged_and_abandoned_ones_are_taken_back() {
        let (l, _clock) = limiter(100, 100);
        let first = l.attempt("ann", ip(2)).unwrap();
        assert!(wait(&l, "ann", ip(2)).is_some(), "a second guess in flight");
        drop(first);
        assert_eq!(
            wait(&l, "ann", ip(2)),
            None,
            "an abandoned attempt is no failure"
        );
        let (l, _clock) = limiter(2, 100);
        let a = l.attempt("ann", ip(2)).unwrap();
        let b = l.attempt("ann", ip(3)).unwrap();
        assert!(
            wait(&l, "ann", ip(4)).is_some(),
            "two in flight fill a ceiling of 2"
        );
        a.succeeded();
        assert!(
            l.attempt("ann", ip(4)).is_ok(),
            "a success takes its attempt back"
        );
        b.failed();
    }

    #[test]
    fn a_huge_user_name_is_kept_short() {
        let (l, _clock) = limiter(100, 100);
        let name = "x".repeat(1 << 20);
        fail(&l, &name, ip(2));
        let g = l.lock();
        assert!(g.users.keys().all(|k| k.len() <= 64));
    }
}
