//! The one place where a consumer's offsets are stored for commit.
//!
//! The rule: a partition's offset moves past a message only once that
//! message and every message before it in the partition are finished
//! (applied, found to be repeats, deferred to the settlement runner or
//! dead-lettered), and only while the partition is still assigned to the
//! consumer that received them.
//!
//! The reader registers each message it hands to a lane, in partition order,
//! and gets a [`Ticket`] for it. Finishing a ticket stores the partition's
//! low-water mark: the oldest message of the assignment not finished yet
//! (or one past the newest received, when all are). So messages may finish
//! in any order (a batch applies the steps it can and leaves the others to
//! the one-message path; a lane may work on several transfers at once) and
//! the stored offset still never passes an unfinished one.
//!
//! Each assignment of a partition has its own window. When the group takes
//! a partition away, its window is closed before librdkafka commits what
//! was stored and lets go of it: later finishes of messages received under
//! that assignment store nothing, and lanes skip what they had not started
//! (the partition's next owner reads it again from the committed offset).
//! If the partition comes back, the messages of the new assignment open a
//! new window, so nothing finished under an old one can move the new one's
//! offset.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::Consumer;

/// The messages of one assignment of one partition.
#[derive(Debug, Default)]
struct Window {
    /// Received and not finished yet.
    unfinished: BTreeSet<i64>,
    /// One past the newest offset received.
    end: i64,
    /// The offset last stored (the next one to consume), if any.
    stored: Option<i64>,
}

impl Window {
    fn receive(&mut self, offset: i64) {
        self.unfinished.insert(offset);
        self.end = self.end.max(offset + 1);
    }

    /// Marks `offset` finished; returns the new low-water mark if it moved.
    fn finish(&mut self, offset: i64) -> Option<i64> {
        self.unfinished.remove(&offset);
        let low = self.unfinished.first().copied().unwrap_or(self.end);
        if self.stored.is_some_and(|stored| stored >= low) {
            return None;
        }
        self.stored = Some(low);
        Some(low)
    }
}

/// One assignment of one partition.
#[derive(Debug)]
struct Assignment {
    topic: String,
    partition: i32,
    /// Set when the group took the partition away.
    closed: AtomicBool,
    window: Mutex<Window>,
}

impl Assignment {
    fn window(&self) -> MutexGuard<'_, Window> {
        // Held only for a few set operations, never across an await.
        self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A consumer's open windows, one per partition it holds. Shared by the
/// reader, which opens windows and registers messages, and the consumer's
/// rebalance callback, which closes them.
#[derive(Debug, Default)]
pub struct Assignments {
    open: Mutex<HashMap<(String, i32), Arc<Assignment>>>,
}

impl Assignments {
    fn open(&self) -> MutexGuard<'_, HashMap<(String, i32), Arc<Assignment>>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a message the consumer just received, in partition order.
    pub fn receive(&self, topic: &str, partition: i32, offset: i64) -> Ticket {
        let assignment = self
            .open()
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| {
                Arc::new(Assignment {
                    topic: topic.to_owned(),
                    partition,
                    closed: AtomicBool::new(false),
                    window: Mutex::new(Window::default()),
                })
            })
            .clone();
        assignment.window().receive(offset);
        Ticket { assignment, offset }
    }

    /// The group took these partitions away: their windows close, before
    /// librdkafka commits what was stored for them and lets them go.
    pub fn revoke<'a>(&self, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut open = self.open();
        for (topic, partition) in partitions {
            if let Some(assignment) = open.remove(&(topic.to_owned(), partition)) {
                // Under the window's lock, so a finish that is storing right
                // now completes before the commit that follows, and any later
                // one sees the window closed.
                let _window = assignment.window();
                assignment.closed.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// A message received under an assignment; finishing it may move the
/// partition's stored offset.
#[derive(Debug)]
pub struct Ticket {
    assignment: Arc<Assignment>,
    offset: i64,
}

impl Ticket {
    /// Whether the partition was taken away since the message arrived: its
    /// next owner reads the message again, so a lane need not start it.
    pub fn revoked(&self) -> bool {
        self.assignment.closed.load(Ordering::SeqCst)
    }

    /// The message is finished: stores the partition's low-water mark if it
    /// moved and the partition is still this consumer's.
    pub fn finish<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(self, consumer: &C) {
        let assignment = &self.assignment;
        let mut window = assignment.window();
        let Some(low) = window.finish(self.offset) else { return };
        if assignment.closed.load(Ordering::SeqCst) {
            return;
        }
        // librdkafka stores the offset after the one it is given: the next
        // to consume is `low`.
        if let Err(error) = consumer.store_offset(&assignment.topic, assignment.partition, low - 1) {
            // Lost between the check and the store (librdkafka refuses
            // offsets for partitions it no longer holds): the next owner
            // reads from the committed offset, and the inbox absorbs the
            // repeats.
            tracing::warn!(error = %error, topic = %assignment.topic, partition = assignment.partition, "Could not store offset; the partition's next owner will see the message again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_low_water_mark_never_passes_an_unfinished_message() {
        let mut window = Window::default();
        for offset in 10..15 {
            window.receive(offset);
        }
        // Later messages finish first: nothing moves past 10.
        assert_eq!(window.finish(12), Some(10));
        assert_eq!(window.finish(13), None);
        assert_eq!(window.finish(11), None);
        // 10 finishes: everything up to the unfinished 14 is done.
        assert_eq!(window.finish(10), Some(14));
        assert_eq!(window.finish(14), Some(15));
    }

    #[test]
    fn gaps_in_the_offsets_do_not_hold_the_mark() {
        // Transaction markers and compaction leave offsets no message has.
        let mut window = Window::default();
        window.receive(3);
        window.receive(7);
        assert_eq!(window.finish(3), Some(7));
        assert_eq!(window.finish(7), Some(8));
    }

    #[test]
    fn a_revoked_window_is_closed_and_a_new_assignment_starts_afresh() {
        let assignments = Assignments::default();
        let old = assignments.receive("t", 0, 5);
        assert!(!old.revoked());
        assignments.revoke([("t", 0)]);
        assert!(old.revoked());
        // The partition comes back: a new window, which the old ticket
        // cannot move.
        let new = assignments.receive("t", 0, 3);
        assert!(!new.revoked());
        assert!(!Arc::ptr_eq(&old.assignment, &new.assignment));
        assert_eq!(new.assignment.window().unfinished.iter().copied().collect::<Vec<_>>(), [3]);
    }
}
