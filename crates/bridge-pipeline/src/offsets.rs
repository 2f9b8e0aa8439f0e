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
//!
//! An assignment's first message must not lie beyond its start: a broker
//! may answer a fetch that begins inside a record batch with the next batch
//! (tansu 0.6 does), and the messages it passed over would never reach this
//! consumer while its offset moved past them. So when the first message
//! comes after the start, the consumer reads again from further back
//! (`Received::Rewind`, doubling the distance each time) until a message at
//! or before the start arrives; what it has finished is dropped on the way.
//! Where the skipped batch was the partition's last, no later message comes
//! to give it away, and tansu's high watermark cannot tell either (it
//! counts batches): an assignment that has received nothing from its start
//! for a while is read again from further back the same way
//! ([`Assignments::quiet`]). On Kafka, where a fetch inside a batch returns
//! that batch, a rewind happens only when the start is a transaction marker
//! or the partition is idle, and costs a seek and one message read again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;

/// Where an assignment's messages stand against its start.
#[derive(Debug, Default, PartialEq, Eq)]
enum Stream {
    /// No message at or before `start` yet; the next rewind goes `step`
    /// offsets back from it. `since`: when the assignment, or the last
    /// rewind, began.
    Unstarted { start: i64, step: i64, since: Instant },
    /// Reading on from the start (or from wherever librdkafka began, when
    /// the group had no committed offset).
    #[default]
    Started,
}

/// What to do with a message the consumer received.
#[derive(Debug)]
pub enum Received {
    /// Hand it to its lane.
    Ticket(Ticket),
    /// Not this consumer's to process: its partition is not assigned, or it
    /// lies below what is finished.
    Drop,
    /// It lies beyond its assignment's start: read the partition again from
    /// this offset (the message is dropped).
    Rewind { to: i64 },
}

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
    stream: Stream,
}

impl Window {
    /// The partition is assigned, starting at `start` when known (the
    /// group's committed offset): whatever lies below it was finished by
    /// whoever committed it.
    fn assign(&mut self, start: Option<i64>) {
        self.assigned = true;
        self.assignment += 1;
        self.stream = Stream::Started;
        if let Some(start) = start {
            self.unfinished.retain(|&offset| offset >= start);
            self.end = Some(self.end.map_or(start, |end| end.max(start)));
            self.stored = Some(start);
            self.stream = Stream::Unstarted { start, step: 1, since: Instant::now() };
        }
    }

    /// Where the assignment's stream stands once `offset` arrives: `None`
    /// when it may be taken, else the offset to read again from.
    fn admit(&mut self, offset: i64) -> Option<i64> {
        let Stream::Unstarted { start, step, .. } = self.stream else { return None };
        if offset <= start || start == 0 {
            self.stream = Stream::Started;
            return None;
        }
        if step >= start.saturating_mul(2) {
            // Read from the very beginning already: the log has nothing
            // between the start and this message.
            self.stream = Stream::Started;
            return None;
        }
        self.stream = Stream::Unstarted { start, step: step.saturating_mul(2), since: Instant::now() };
        Some((start - step).max(0))
    }

    /// Where to read again from, if nothing has arrived from the
    /// assignment's start for `after`: as if a message beyond the start had.
    fn quiet(&mut self, after: Duration) -> Option<i64> {
        match self.stream {
            Stream::Unstarted { start, since, .. } if self.assigned && since.elapsed() >= after => {
                self.admit(start + 1)
            }
            _ => None,
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
    /// received, and says what to do with it.
    pub fn receive(&self, topic: &str, partition: i32, offset: i64) -> Received {
        let partition_state = self.partition(topic, partition);
        let assignment = {
            let mut window = partition_state.window();
            if !window.assigned {
                return Received::Drop;
            }
            if let Some(to) = window.admit(offset) {
                tracing::info!(
                    topic,
                    partition,
                    offset,
                    to,
                    "The broker began past the assignment's start; reading again from further back"
                );
                return Received::Rewind { to };
            }
            if window.stored.is_some_and(|stored| offset < stored) {
                return Received::Drop;
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
        Received::Ticket(Ticket { partition: partition_state, offset, assignment })
    }

    /// The assigned partitions that have received nothing from their start
    /// for `after`, each with the offset to read it again from. A fetch
    /// begun inside the partition's last batch comes back empty on tansu.
    pub fn quiet(&self, after: Duration) -> Vec<(String, i32, i64)> {
        let partitions: Vec<Arc<Partition>> =
            self.partitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect();
        partitions
            .iter()
            .filter_map(|partition| {
                let to = partition.window().quiet(after)?;
                tracing::info!(topic = %partition.topic, partition = partition.partition, to, "Nothing came from the assignment's start; reading again from further back");
                Some((partition.topic.clone(), partition.partition, to))
            })
            .collect()
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

    fn take(received: Received) -> Ticket {
        match received {
            Received::Ticket(ticket) => ticket,
            other => panic!("expected a ticket, got {other:?}"),
        }
    }

    /// A broker that answers a fetch begun inside a batch with the next
    /// batch: the consumer reads again from further back, doubling, until a
    /// message at or before the start arrives, and only then takes any.
    #[test]
    fn a_stream_that_begins_past_its_start_is_read_again_from_further_back() {
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(12));
        let mut rewinds = Vec::new();
        for _ in 0..5 {
            match assignments.receive("t", 0, 40) {
                Received::Rewind { to } => rewinds.push(to),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(rewinds, [11, 10, 8, 4, 0]);
        // From the beginning the batch comes whole: below the start is
        // finished, from the start on is taken.
        assert!(matches!(assignments.receive("t", 0, 0), Received::Drop));
        assert!(matches!(assignments.receive("t", 0, 12), Received::Ticket(_)));
        assert!(matches!(assignments.receive("t", 0, 13), Received::Ticket(_)));
    }

    /// Where the log really has nothing at the start (a transaction marker,
    /// or nothing from the beginning), the stream is taken as it comes.
    #[test]
    fn a_start_with_nothing_at_it_is_taken_once_read_from_before_it() {
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(12));
        assert!(matches!(assignments.receive("t", 0, 13), Received::Rewind { to: 11 }));
        // From 11 on: 11 is finished, 12 is a marker, 13 is the next message.
        assert!(matches!(assignments.receive("t", 0, 11), Received::Drop));
        assert!(matches!(assignments.receive("t", 0, 13), Received::Ticket(_)));
        // A log whose earliest message lies past the start.
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(2));
        let rewinds: Vec<_> = (0..4).map(|_| assignments.receive("t", 0, 9)).collect();
        assert!(matches!(
            rewinds[..],
            [Received::Rewind { to: 1 }, Received::Rewind { to: 0 }, Received::Ticket(_), _]
        ));
    }

    /// A fetch begun inside the partition's last batch comes back empty:
    /// nothing arrives to give the skip away, so silence does.
    #[test]
    fn a_quiet_assignment_is_read_again_from_further_back() {
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(25));
        assert!(assignments.quiet(Duration::from_secs(60)).is_empty(), "not quiet yet");
        let rewinds: Vec<_> = (0..7).map(|_| assignments.quiet(Duration::ZERO).first().map(|(_, _, to)| *to)).collect();
        assert_eq!(rewinds, [Some(24), Some(23), Some(21), Some(17), Some(9), Some(0), None]);
        // A message at or before the start ends the silence.
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(25));
        assert_eq!(assignments.quiet(Duration::ZERO), [("t".to_owned(), 0, 24)]);
        assert!(matches!(assignments.receive("t", 0, 24), Received::Drop));
        assert!(matches!(assignments.receive("t", 0, 25), Received::Ticket(_)));
        assert_eq!(assignments.quiet(Duration::ZERO), []);
        // An assignment with nothing committed reads from where librdkafka
        // begins and is never quiet.
        let assignments = Assignments::default();
        assignments.assign("t", 0, None);
        assert_eq!(assignments.quiet(Duration::ZERO), []);
    }

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
        let early: Vec<Ticket> = (0..8).map(|offset| take(assignments.receive("t", 0, offset))).collect();
        let partition = early[0].partition.clone();
        for ticket in early.into_iter().take(6) {
            let offset = ticket.offset;
            partition.window().finish(offset);
        }
        assert_eq!(partition.window().stored, Some(6));
        assignments.revoke("t", 0);
        // Fetched before the revocation, handed over after it: not ours.
        assert!(matches!(assignments.receive("t", 0, 8), Received::Drop));
        assignments.assign("t", 0, Some(6));
        // Handed over after the new assignment began, ahead of 6 and 7: not
        // taken, and the partition is read again from before the start.
        assert!(matches!(assignments.receive("t", 0, 8), Received::Rewind { to: 5 }));
        assert!(matches!(assignments.receive("t", 0, 5), Received::Drop));
        for offset in [6, 7, 8] {
            let ticket = take(assignments.receive("t", 0, offset));
            partition.window().finish(ticket.offset);
        }
        assert_eq!(partition.window().stored, Some(9));
    }

    #[test]
    fn an_assignment_forgets_what_lies_below_its_start() {
        let assignments = Assignments::default();
        assignments.assign("t", 0, Some(0));
        let tickets: Vec<Ticket> = (0..4).map(|offset| take(assignments.receive("t", 0, offset))).collect();
        assignments.revoke("t", 0);
        assert!(tickets.iter().all(Ticket::revoked));
        // Another consumer finished up to 10 meanwhile.
        assignments.assign("t", 0, Some(10));
        let partition = tickets[0].partition.clone();
        assert!(partition.window().unfinished.is_empty());
        // A repeat from below the start is not handed to a lane.
        assert!(matches!(assignments.receive("t", 0, 3), Received::Drop));
        let next = take(assignments.receive("t", 0, 10));
        assert!(!next.revoked());
        assert_eq!(partition.window().finish(next.offset), Some(11));
    }
}
