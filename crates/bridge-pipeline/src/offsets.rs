//! The one place where a consumer's offsets are stored for commit.
//!
//! The rule: a partition's offset moves past a message only once that
//! message and every message before it in the partition are finished
//! (applied, found to be repeats, deferred to the settlement runner or
//! dead-lettered), and only while the partition is assigned to the consumer.
//!
//! Each partition the consumer ever held has one window, kept across its
//! assignments. The reader registers each message it hands to a lane and
//! gets a [`Ticket`] for it; finishing a ticket, in any order, stores the
//! partition's low-water mark: the oldest message received and not finished
//! (or one past the newest received, when all are). So messages may finish
//! in any order (a batch applies the steps it can and leaves the others to
//! the one-message path) and the stored offset still never passes an
//! unfinished one.
//!
//! The window outlives an assignment because a revoked partition's messages
//! do not all stop at once: the message a lane was working on, those queued
//! behind it, and messages librdkafka had fetched before the revocation and
//! hands over after it stay unfinished in the window. If the partition comes
//! back, the assignment starts where the group's committed offset says
//! (`kafka::ConsumerState` reads it and assigns from it explicitly): the
//! window forgets what lies below that start, which someone finished, and
//! keeps the rest unfinished until the new assignment delivers and finishes
//! it again. A window that began afresh at whatever message came first could
//! open on such a late message, finish it and store an offset past the ones
//! the new assignment had yet to deliver.
//!
//! While a partition is not assigned, its messages are not handed to lanes
//! (its next owner reads them) and nothing is stored for it; lanes skip
//! the messages of an earlier assignment they have not started and stop
//! retrying the one in hand.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::consumer::Consumer;

/// What the consumer knows of one partition's messages.
#[derive(Debug, Default)]
struct Window {
    /// Received and not finished yet.
    unfinished: BTreeSet<i64>,
    /// One past the newest offset received, or where the assignment starts.
    end: Option<i64>,
    /// The offset last stored (the next one to consume), if any.
    stored: Option<i64>,
    assigned: bool,
    /// Counts the assignments, so a ticket knows whether its own has ended.
    assignment: u64,
}

impl Window {
    /// The partition is assigned, starting at `start` when known (the
    /// group's committed offset): whatever lies below it was finished by
    /// whoever committed it.
    fn assign(&mut self, start: Option<i64>) {
        self.assigned = true;
        self.assignment += 1;
        if let Some(start) = start {
            self.unfinished.retain(|&offset| offset >= start);
            self.end = Some(self.end.map_or(start, |end| end.max(start)));
            self.stored = Some(start);
        }
    }

    fn revoke(&mut self) {
        self.assigned = false;
        self.assignment += 1;
    }

    /// Registers a message; returns the offsets the consumer was not handed
    /// since the previous one, if any.
    fn receive(&mut self, offset: i64) -> Option<std::ops::Range<i64>> {
        self.unfinished.insert(offset);
        let skipped = self.end.filter(|&end| offset > end).map(|end| end..offset);
        self.end = Some(self.end.map_or(offset + 1, |end| end.max(offset + 1)));
        skipped
    }

    /// Marks `offset` finished; returns the new low-water mark if it moved.
    fn finish(&mut self, offset: i64) -> Option<i64> {
        self.unfinished.remove(&offset);
        let low = match (self.unfinished.first(), self.end) {
            (Some(&oldest), _) => oldest,
            (None, Some(end)) => end,
            (None, None) => return None,
        };
        if self.stored.is_some_and(|stored| stored >= low) {
            return None;
        }
        self.stored = Some(low);
        Some(low)
    }
}

/// One partition the consumer has held.
#[derive(Debug)]
struct Partition {
    topic: String,
    partition: i32,
    window: Mutex<Window>,
}

impl Partition {
    fn window(&self) -> MutexGuard<'_, Window> {
        // Held only for a few set operations (and the store it decides),
        // never across an await.
        self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A consumer's partitions. Shared by the reader, which registers messages,
/// and the consumer's rebalance callback, which assigns and revokes.
#[derive(Debug, Default)]
pub struct Assignments {
    partitions: Mutex<HashMap<(String, i32), Arc<Partition>>>,
}

impl Assignments {
    fn partition(&self, topic: &str, partition: i32) -> Arc<Partition> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| {
                Arc::new(Partition { topic: topic.to_owned(), partition, window: Mutex::new(Window::default()) })
            })
            .clone()
    }

    /// The group assigned the partition, to be read from `start` (the
    /// group's committed offset) when known. Called before librdkafka
    /// starts fetching it.
    pub fn assign(&self, topic: &str, partition: i32, start: Option<i64>) {
        self.partition(topic, partition).window().assign(start);
        tracing::info!(topic, partition, start, "Partition assigned");
    }

    /// The group took the partition away. Called before librdkafka commits
    /// what was stored for it and lets it go, so nothing stores an offset
    /// for it afterwards.
    pub fn revoke(&self, topic: &str, partition: i32) {
        let partition_state = self.partition(topic, partition);
        let mut window = partition_state.window();
        window.revoke();
        tracing::info!(
            topic,
            partition,
            stored = window.stored,
            unfinished = window.unfinished.len(),
            oldest_unfinished = window.unfinished.first().copied(),
            "Partition revoked"
        );
    }

    /// Registers a message the consumer just received, in the order
    /// received. `None`: the partition is not assigned (the message was
    /// fetched before it was revoked), or the message lies below where its
    /// assignment starts; either way it is not this consumer's to process.
    pub fn receive(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        let partition_state = self.partition(topic, partition);
        let assignment = {
            let mut window = partition_state.window();
            if !window.assigned || window.stored.is_some_and(|stored| offset < stored) {
                return None;
            }
            if let Some(skipped) = window.receive(offset) {
                // Kafka leaves gaps where a log was compacted or a
                // transaction marker sits; the pipeline's own topics have
                // neither, so there a gap means the broker did not hand the
                // consumer those messages.
                tracing::warn!(topic, partition, from = skipped.start, to = skipped.end, "The broker skipped offsets");
            }
            window.assignment
        };
        Some(Ticket { partition: partition_state, offset, assignment })
    }
}

/// A message received under an assignment; finishing it may move the
/// partition's stored offset.
#[derive(Debug)]
pub struct Ticket {
    partition: Arc<Partition>,
    offset: i64,
    assignment: u64,
}

impl Ticket {
    /// Whether the assignment the message arrived under has ended: its next
    /// owner (perhaps this consumer again) reads the message again, so a
    /// lane need not start it.
    pub fn revoked(&self) -> bool {
        self.partition.window().assignment != self.assignment
    }

    /// The message is finished: stores the partition's low-water mark if it
    /// moved and the partition is still this consumer's.
    pub fn finish<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(self, consumer: &C) {
        let partition = &self.partition;
        let mut window = partition.window();
        let Some(low) = window.finish(self.offset) else { return };
        if !window.assigned {
            return;
        }
        // librdkafka stores the offset after the one it is given: the next
        // to consume is `low`.
        if let Err(error) = consumer.store_offset(&partition.topic, partition.partition, low - 1) {
            // Lost between the check and the store (librdkafka refuses
            // offsets for partitions it no longer holds): the next owner
            // reads from the committed offset, and the inbox absorbs the
            // repeats.
            tracing::warn!(error = %error, topic = %partition.topic, partition = partition.partition, "Could not store offset; the partition's next owner will see the message again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(start: Option<i64>) -> Window {
        let mut window = Window::default();
        window.assign(start);
        window
    }

    #[test]
    fn the_low_water_mark_never_passes_an_unfinished_message() {
        let mut window = assigned(None);
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
        let mut window = assigned(Some(3));
        assert_eq!(window.receive(3), None);
        assert_eq!(window.receive(7), Some(4..7));
        assert_eq!(window.finish(3), Some(7));
        assert_eq!(window.finish(7), Some(8));
    }

    /// The failure this design exists for: a partition is revoked while
    /// messages 6 and 7 are unfinished and assigned back to the same
    /// consumer from the committed offset 6, and librdkafka hands over
    /// message 8, fetched before the revocation, ahead of the new
    /// assignment's 6 and 7. Finishing 8 must not store 9.
    #[test]
    fn a_late_message_of_an_earlier_assignment_cannot_pass_the_new_ones() {
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(0));
        let early: Vec<Ticket> = (0..8).map(|offset| assignments.receive("t", 0, offset).unwrap()).collect();
        let partition = early[0].partition.clone();
        for ticket in early.into_iter().take(6) {
            let offset = ticket.offset;
            partition.window().finish(offset);
        }
        assert_eq!(partition.window().stored, Some(6));
        assignments.revoke("t", 0);
        // Fetched before the revocation, handed over after it: not ours.
        assert!(assignments.receive("t", 0, 8).is_none());
        assignments.assign("t", 0, Some(6));
        // Handed over after the new assignment began, ahead of 6 and 7.
        let late = assignments.receive("t", 0, 8).unwrap();
        assert_eq!(partition.window().finish(late.offset), None, "the mark stays at 6");
        for offset in [6, 7] {
            let ticket = assignments.receive("t", 0, offset).unwrap();
            partition.window().finish(ticket.offset);
        }
        assert_eq!(partition.window().stored, Some(9));
        // The new assignment's own copy of 8 is a repeat of a finished one.
        assert!(assignments.receive("t", 0, 8).is_none());
    }

    #[test]
    fn an_assignment_forgets_what_lies_below_its_start() {
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(0));
        let tickets: Vec<Ticket> = (0..4).map(|offset| assignments.receive("t", 0, offset).unwrap()).collect();
        assignments.revoke("t", 0);
        assert!(tickets.iter().all(Ticket::revoked));
        // Another consumer finished up to 10 meanwhile.
        assignments.assign("t", 0, Some(10));
        let partition = tickets[0].partition.clone();
        assert!(partition.window().unfinished.is_empty());
        // A repeat from below the start is not handed to a lane.
        assert!(assignments.receive("t", 0, 3).is_none());
        let next = assignments.receive("t", 0, 10).unwrap();
        assert!(!next.revoked());
        assert_eq!(partition.window().finish(next.offset), Some(11));
    }
}
