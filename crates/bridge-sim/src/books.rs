//! Where the simulated services keep their books: in a database (the
//! `sim_*` tables, which tests read to prove what happened at the "bank"),
//! or in the simulator's memory, for load runs in which the bank's own
//! bookkeeping must not take the machine's database and CPU from the
//! pipeline being measured, as a real bank's does not.
//!
//! Both keep an operation once per idempotency key with the same rules; the
//! books in memory know no account statuses, consents or fund terms (every
//! account is active and linked to no consent, no fund's terms are
//! published) and are gone when the process ends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use bridge_store::simulator::{self, AccessVerdict, SimFundTerms, SimOperation};

#[derive(Clone)]
pub(crate) enum Books {
    Database(PgPool),
    Memory(Arc<Mutex<MemoryBooks>>),
}

/// Operations by idempotency key, in key order so they list in pages.
#[derive(Default)]
pub(crate) struct MemoryBooks {
    operations: BTreeMap<String, Stored>,
}

struct Stored {
    operation: SimOperation,
    /// A pending operation's outcome, and when it takes it.
    settles: Option<(String, Instant)>,
}

impl Stored {
    /// Settles a pending operation whose time has come, as every read of it
    /// does in the database.
    fn settle_if_due(&mut self) -> &SimOperation {
        if let Some((_, at)) = &self.settles {
            if *at <= Instant::now() {
                let (outcome, _) = self.settles.take().expect("checked above");
                self.operation.outcome = outcome;
            }
        }
        &self.operation
    }
}

impl MemoryBooks {
    fn record_once(&mut self, operation: &SimOperation, settle_after_ms: u64) -> SimOperation {
        let stored = self.operations.entry(operation.idempotency_key.clone()).or_insert_with(|| {
            if settle_after_ms == 0 {
                return Stored { operation: operation.clone(), settles: None };
            }
            let pending = SimOperation { outcome: "pending".to_owned(), ..operation.clone() };
            let at = Instant::now() + Duration::from_millis(settle_after_ms);
            Stored { operation: pending, settles: Some((operation.outcome.clone(), at)) }
        });
        stored.settle_if_due().clone()
    }

    fn cancel(&mut self, tombstone: &SimOperation) -> SimOperation {
        match self.operations.get_mut(&tombstone.idempotency_key) {
            Some(stored) => {
                // A settlement that has already happened cannot be undone.
                stored.settle_if_due();
                if stored.operation.outcome == "pending" {
                    stored.settles = None;
                    stored.operation.outcome = "declined".to_owned();
                    stored.operation.reference = "CANCELLED".to_owned();
                }
                stored.operation.clone()
            }
            None => self.record_once(tombstone, 0),
        }
    }

    fn find(&mut self, key: &str) -> Option<SimOperation> {
        self.operations.get_mut(key).map(|stored| stored.settle_if_due().clone())
    }

    fn list(&mut self, operations: &[&str], after: &str, limit: usize) -> Vec<SimOperation> {
        let range = self.operations.range_mut::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
        range
            .filter(|(_, stored)| operations.contains(&stored.operation.operation.as_str()))
            .take(limit)
            .map(|(_, stored)| stored.settle_if_due().clone())
            .collect()
    }
}

impl Books {
    pub(crate) fn in_memory() -> Self {
        Self::Memory(Arc::default())
    }

    fn memory(books: &Mutex<MemoryBooks>) -> std::sync::MutexGuard<'_, MemoryBooks> {
        // A panic while holding the lock leaves every map consistent (each
        // change is one insert or one field set), so a poisoned lock is
        // still usable.
        books.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `active`, `frozen`, `closed`, `no_credits` or `unknown`.
    pub(crate) async fn account_status(&self, account_id: &str) -> bridge_store::Result<String> {
        match self {
            Self::Database(pool) => simulator::account_status(&mut *pool.acquire().await?, account_id).await,
            Self::Memory(_) => Ok("active".to_owned()),
        }
    }

    pub(crate) async fn check_bank_access(
        &self,
        key: &str,
        account_id: &str,
        token: Option<&str>,
    ) -> bridge_store::Result<AccessVerdict> {
        match self {
            Self::Database(pool) => {
                simulator::check_bank_access(&mut *pool.acquire().await?, key, account_id, token).await
            }
            Self::Memory(_) => Ok(AccessVerdict::NotRequired),
        }
    }

    pub(crate) async fn record_once(
        &self,
        operation: &SimOperation,
        settle_after_ms: u64,
    ) -> bridge_store::Result<SimOperation> {
        match self {
            Self::Database(pool) => {
                simulator::record_once(&mut *pool.acquire().await?, operation, settle_after_ms).await
            }
            Self::Memory(books) => Ok(Self::memory(books).record_once(operation, settle_after_ms)),
        }
    }

    pub(crate) async fn cancel(&self, tombstone: &SimOperation) -> bridge_store::Result<SimOperation> {
        match self {
            Self::Database(pool) => simulator::cancel(&mut *pool.acquire().await?, tombstone).await,
            Self::Memory(books) => Ok(Self::memory(books).cancel(tombstone)),
        }
    }

    pub(crate) async fn find(&self, key: &str) -> bridge_store::Result<Option<SimOperation>> {
        match self {
            Self::Database(pool) => simulator::find(&mut *pool.acquire().await?, key).await,
            Self::Memory(books) => Ok(Self::memory(books).find(key)),
        }
    }

    /// Up to `limit` operations of the kinds named, by idempotency key
    /// after `after`.
    pub(crate) async fn list(
        &self,
        operations: &[&str],
        after: &str,
        limit: usize,
    ) -> bridge_store::Result<Vec<SimOperation>> {
        match self {
            Self::Database(pool) => simulator::list(&mut *pool.acquire().await?, operations, after, limit).await,
            Self::Memory(books) => Ok(Self::memory(books).list(operations, after, limit)),
        }
    }

    pub(crate) async fn fund_terms(&self, fund_id: &str) -> bridge_store::Result<Option<SimFundTerms>> {
        match self {
            Self::Database(pool) => simulator::fund_terms(&mut *pool.acquire().await?, fund_id).await,
            Self::Memory(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operation(key: &str, amount_minor: i64) -> SimOperation {
        SimOperation {
            idempotency_key: key.to_owned(),
            operation: "withdrawal".to_owned(),
            account_id: "acc-1".to_owned(),
            amount_minor,
            currency: "EUR".to_owned(),
            outcome: "settled".to_owned(),
            reference: format!("sim-{key}"),
        }
    }

    #[test]
    fn an_operation_is_kept_once_per_key_and_a_repeat_reads_the_first() {
        let mut books = MemoryBooks::default();
        let first = books.record_once(&operation("k1", 100), 0);
        assert_eq!(first, operation("k1", 100));
        // A repeat with another body reads the first; the caller compares.
        let again = books.record_once(&operation("k1", 200), 0);
        assert_eq!(again, first);
        assert!(!again.same_request(&operation("k1", 200)));
        assert_eq!(books.find("k1"), Some(first));
        assert_eq!(books.find("k2"), None);
    }

    #[test]
    fn a_pending_operation_settles_when_its_time_comes_unless_cancelled_first() {
        let mut books = MemoryBooks::default();
        assert_eq!(books.record_once(&operation("late", 100), 60_000).outcome, "pending");
        assert_eq!(books.find("late").map(|found| found.outcome), Some("pending".to_owned()));
        let cancelled = books.cancel(&SimOperation {
            outcome: "declined".to_owned(),
            reference: "CANCELLED".to_owned(),
            ..operation("late", 100)
        });
        assert_eq!((cancelled.outcome.as_str(), cancelled.reference.as_str()), ("declined", "CANCELLED"));

        books.record_once(&operation("soon", 100), 1);
        std::thread::sleep(Duration::from_millis(5));
        let settled = books.find("soon").expect("stored");
        assert_eq!((settled.outcome.as_str(), settled.reference.as_str()), ("settled", "sim-soon"));
        // Settled first, so the cancellation finds it final and leaves it.
        assert_eq!(books.cancel(&operation("soon", 100)), settled);
        // A key never seen is kept as cancelled: a request arriving later
        // with it finds the cancellation and moves nothing.
        let tombstone = SimOperation {
            outcome: "declined".to_owned(),
            reference: "CANCELLED".to_owned(),
            ..operation("never", 100)
        };
        assert_eq!(books.cancel(&tombstone), tombstone);
        assert_eq!(books.record_once(&operation("never", 100), 0), tombstone);
    }

    #[test]
    fn operations_list_in_key_order_by_kind_in_pages() {
        let mut books = MemoryBooks::default();
        for key in ["c", "a", "b", "d"] {
            books.record_once(&operation(key, 1), 0);
        }
        books.record_once(&SimOperation { operation: "deposit".to_owned(), ..operation("bb", 1) }, 0);
        let keys = |found: Vec<SimOperation>| found.into_iter().map(|op| op.idempotency_key).collect::<Vec<_>>();
        assert_eq!(keys(books.list(&["withdrawal", "refund"], "", 3)), ["a", "b", "c"]);
        assert_eq!(keys(books.list(&["withdrawal", "refund"], "c", 3)), ["d"]);
        assert_eq!(keys(books.list(&["deposit"], "", 10)), ["bb"]);
    }
}
