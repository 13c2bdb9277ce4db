//! The job manager's clock: wall time for the records and a monotonic one for timeouts, behind
//! one trait so the manager's placement and liveness decisions are tested with a clock the test
//! moves (no sleeping).

use muster_core::Ts;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the manager reads the time.
pub trait Clock: Send + Sync {
    /// The wall time, stamped on records.
    fn now(&self) -> Ts;
    /// A monotonic instant, for silences and grace periods.
    fn instant(&self) -> Instant;
    /// How long since `earlier` (never negative).
    fn since(&self, earlier: Instant) -> Duration {
        self.instant().saturating_duration_since(earlier)
    }
}

/// The real clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Ts {
        muster_wire::util::now()
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told ([`FakeClock::advance`]): both of its times move together.
#[derive(Clone)]
pub struct FakeClock {
    wall: i64,
    base: Instant,
    offset_ms: Arc<AtomicU64>,
}

impl Default for FakeClock {
    fn default() -> FakeClock {
        FakeClock {
            wall: muster_wire::util::now().0,
            base: Instant::now(),
            offset_ms: Arc::default(),
        }
    }
}

impl FakeClock {
    /// Moves both times on by `d`.
    pub fn advance(&self, d: Duration) {
        self.offset_ms
            .fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }

    fn offset(&self) -> u64 {
        self.offset_ms.load(Ordering::SeqCst)
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Ts {
        Ts(self.wall + self.offset() as i64)
    }
    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.offset())
    }
}
