//! Group commit of a stage's set-based transactions across its partitions.
//!
//! Each partition's lane batches only what it has queued, and at a moderate
//! load that is a few messages: with six partitions at 500 transfers/s a
//! validator lane found about seven, so every transfer paid its share of a
//! transaction's fixed statements, and six small transactions at a time
//! queued for the same funds' rows. Here a lane hands its batch to its
//! stage's `GroupCommit` instead of running the transaction itself. While a
//! stage's transactions are all in flight, the batches of other lanes wait;
//! the next transaction takes all of them at once (whole batches, up to
//! `BRIDGE_BATCH_SIZE_MAX` messages), in the order they came. Nothing waits for more to arrive: a lone batch finds a
//! free slot and runs at once, so this adds no latency at low load, and the
//! busier the stage, the larger its transactions. A lane's lone message
//! comes here too, so a paced load's messages, one per lane, share
//! transactions as well.
//!
//! A lane keeps its own order: it waits for its batch's answer before it
//! takes its next messages, and one lane's messages stay together and in
//! order inside a shared transaction. Lanes' batches are independent of
//! each other (their transfers differ), so their order within a
//! transaction is free.
//!
//! The transaction runs in the task of the lane that found a slot free (the
//! leader); the lanes whose batches it took wait for their answers. If the
//! leader stops before answering (its task is cancelled, or it panics), the
//! others read that as "not applied" and take their messages one by one,
//! which is always safe: the one-message path is idempotent.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;

use tokio::sync::{oneshot, Semaphore};

/// One stage's shared transactions, over items of type `T` (what a lane's
/// batch hands over, one per message it offers).
pub struct GroupCommit<T> {
    /// The stage, for the batch size metric.
    stage: &'static str,
    waiting: Mutex<VecDeque<Waiting<T>>>,
    /// One permit per transaction that may be in flight at once.
    slots: Semaphore,
    /// A transaction takes lanes' whole batches while it holds no more than
    /// this many items (a first batch larger than this goes alone).
    size_max: usize,
}

/// A lane's batch, waiting for a transaction.
struct Waiting<T> {
    items: Vec<T>,
    answer: oneshot::Sender<Vec<bool>>,
}

/// What a transaction did with its items.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Per item, in order, whether it was applied.
    Done(Vec<bool>),
    /// Nothing was applied because of something one of its batches holds (a
    /// repeat, a transfer that moved on, a row changed since it was read).
    /// A transaction of several lanes' batches is then tried again batch by
    /// batch, so one lane's repeat does not send the others one by one.
    Refused,
}

impl<T: Send + Clone> GroupCommit<T> {
    pub fn new(stage: &'static str, in_flight_max: usize, size_max: usize) -> Self {
        Self { stage, waiting: Mutex::new(VecDeque::new()), slots: Semaphore::new(in_flight_max.max(1)), size_max }
    }

    /// Applies `items` with `apply`, in one transaction with the batches of
    /// other lanes that are waiting too. `apply` gets every item of the
    /// transaction; this returns, per item of `items` and in order, whether
    /// it was applied.
    pub async fn apply<F, Fut>(&self, items: Vec<T>, apply: F) -> Vec<bool>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Verdict>,
    {
        let count = items.len();
        let not_applied = || vec![false; count];
        let (sender, mut answer) = oneshot::channel();
        self.lock().push_back(Waiting { items, answer: sender });
        loop {
            let permit = tokio::select! {
                // An answer that is already there is taken before a slot,
                // so a lane whose batch went with another's does not lead
                // a transaction of its own.
                biased;
                answered = &mut answer => return answered.unwrap_or_else(|_| not_applied()),
                permit = self.slots.acquire() => permit.expect("the slots are never closed"),
            };
            let taken = self.take();
            if taken.is_empty() {
                // Another leader took this batch and has not answered yet.
                drop(permit);
                return answer.await.unwrap_or_else(|_| not_applied());
            }
            let (batches, answers): (Vec<Vec<T>>, Vec<_>) =
                taken.into_iter().map(|waiting| (waiting.items, waiting.answer)).unzip();
            let applied = self.run(batches, &apply).await;
            // Answers first, then the slot: a lane that was answered reads
            // its answer before it could lead someone else's transaction.
            for (applied, answer) in applied.into_iter().zip(answers) {
                // A lane that has gone away no longer needs its answer.
                let _ = answer.send(applied);
            }
            drop(permit);
            // This lane's batch was in that transaction (it answered
            // itself above), or is still waiting behind it: loop.
        }
    }

    /// Runs one transaction over `batches`, and, if it is refused, each of
    /// them alone. Returns the answers per batch.
    async fn run<F, Fut>(&self, mut batches: Vec<Vec<T>>, apply: &F) -> Vec<Vec<bool>>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Verdict>,
    {
        if batches.len() == 1 {
            let batch = batches.pop().expect("one batch");
            let size = batch.len();
            return vec![self.answer(apply(batch).await, size)];
        }
        // Kept for the batch-by-batch attempts if the shared one is refused;
        // the copy is small next to a transaction.
        let all: Vec<T> = batches.iter().flatten().cloned().collect();
        let total = all.len();
        match apply(all).await {
            Verdict::Refused => {
                let mut answers = Vec::with_capacity(batches.len());
                for batch in batches {
                    let size = batch.len();
                    answers.push(self.answer(apply(batch).await, size));
                }
                answers
            }
            verdict => {
                let mut applied = self.answer(verdict, total).into_iter();
                batches.iter().map(|batch| applied.by_ref().take(batch.len()).collect()).collect()
            }
        }
    }

    /// A transaction's answers for its `size` items.
    fn answer(&self, verdict: Verdict, size: usize) -> Vec<bool> {
        let mut applied = match verdict {
            Verdict::Done(applied) => applied,
            Verdict::Refused => Vec::new(),
        };
        applied.resize(size, false);
        let count = applied.iter().filter(|&&done| done).count();
        if count > 0 {
            crate::metrics::batch_applied(self.stage, count);
        }
        applied
    }

    /// The batches the next transaction takes: the oldest, then more while
    /// they fit within the size.
    fn take(&self) -> Vec<Waiting<T>> {
        let mut waiting = self.lock();
        let mut taken = Vec::new();
        let mut size = 0;
        while let Some(next) = waiting.front() {
            if !taken.is_empty() && size + next.items.len() > self.size_max {
                break;
            }
            size += next.items.len();
            taken.extend(waiting.pop_front());
        }
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting<T>>> {
        // The lock is held only to move batches in and out, never across an
        // await, so a poisoned lock still guards a consistent queue.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// While the only slot is busy, batches of several lanes wait, and the
    /// next transaction takes them together, in order, each lane getting
    /// back the answers for its own items.
    #[tokio::test]
    async fn batches_that_wait_share_the_next_transaction() {
        let group = Arc::new(GroupCommit::<u32>::new("test", 1, 64));
        let transactions = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let (release, released) = tokio::sync::watch::channel(false);
        let apply = {
            let transactions = transactions.clone();
            move |items: Vec<u32>| {
                let transactions = transactions.clone();
                let mut released = released.clone();
                async move {
                    transactions.lock().unwrap().push(items.clone());
                    // The first transaction holds the slot until released.
                    if items == [1] {
                        released.wait_for(|released| *released).await.unwrap();
                    }
                    // Odd items are applied, even ones are not.
                    Verdict::Done(items.iter().map(|item| item % 2 == 1).collect())
                }
            }
        };
        let first = tokio::spawn({
            let (group, apply) = (group.clone(), apply.clone());
            async move { group.apply(vec![1], apply).await }
        });
        while transactions.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let (group, apply) = (group.clone(), apply.clone());
            async move { group.apply(vec![2, 3], apply).await }
        });
        let third = tokio::spawn({
            let (group, apply) = (group.clone(), apply.clone());
            async move { group.apply(vec![5, 6, 7], apply).await }
        });
        while group.lock().len() < 2 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        assert_eq!(first.await.unwrap(), [true]);
        assert_eq!(second.await.unwrap(), [false, true]);
        assert_eq!(third.await.unwrap(), [true, false, true]);
        assert_eq!(*transactions.lock().unwrap(), [vec![1], vec![2, 3, 5, 6, 7]]);
    }

    /// A shared transaction refused because of one lane's batch is tried
    /// again batch by batch: the other lanes' batches are applied, and only
    /// the lane with the repeat goes one by one.
    #[tokio::test]
    async fn a_refused_shared_transaction_is_tried_batch_by_batch() {
        let group = Arc::new(GroupCommit::<u32>::new("test", 1, 64));
        let transactions = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let apply = {
            let transactions = transactions.clone();
            move |items: Vec<u32>| {
                let transactions = transactions.clone();
                async move {
                    transactions.lock().unwrap().push(items.clone());
                    // 0 stands for a repeat: it refuses its transaction.
                    if items.contains(&0) {
                        Verdict::Refused
                    } else {
                        Verdict::Done(vec![true; items.len()])
                    }
                }
            }
        };
        // The slot is busy while the three lanes queue, so one transaction
        // takes all three batches.
        let busy = group.slots.acquire().await.unwrap();
        let lanes: Vec<_> = [vec![1, 2], vec![3, 0, 4], vec![5]]
            .into_iter()
            .map(|items| {
                let (group, apply) = (group.clone(), apply.clone());
                let lane = tokio::spawn(async move { group.apply(items, apply).await });
                lane
            })
            .collect();
        while group.lock().len() < 3 {
            tokio::task::yield_now().await;
        }
        drop(busy);
        let mut answers = Vec::new();
        for lane in lanes {
            answers.push(lane.await.unwrap());
        }
        assert_eq!(answers, [vec![true, true], vec![false, false, false], vec![true]]);
        let mut transactions = transactions.lock().unwrap().clone();
        // The queue's order decides which lane's batch comes first in the
        // shared transaction; the three alone follow it.
        let shared = transactions.remove(0);
        assert_eq!(shared.len(), 6, "{shared:?}");
        transactions.sort();
        assert_eq!(transactions, [vec![1, 2], vec![3, 0, 4], vec![5]]);
    }

    /// A transaction takes whole batches up to its size, so a batch that
    /// would overflow it goes into the next one.
    #[tokio::test]
    async fn a_transaction_takes_whole_batches_up_to_its_size() {
        let group = GroupCommit::<u32>::new("test", 1, 3);
        let (first, _) = oneshot::channel();
        let (second, _) = oneshot::channel();
        let (third, _) = oneshot::channel();
        group.lock().extend([
            Waiting { items: vec![1, 2], answer: first },
            Waiting { items: vec![3, 4], answer: second },
            Waiting { items: vec![5], answer: third },
        ]);
        let taken: Vec<Vec<u32>> = group.take().into_iter().map(|waiting| waiting.items).collect();
        assert_eq!(taken, [vec![1, 2]]);
        let taken: Vec<Vec<u32>> = group.take().into_iter().map(|waiting| waiting.items).collect();
        assert_eq!(taken, [vec![3, 4], vec![5]]);
    }

    /// A lone batch with a free slot runs at once, and no more
    /// transactions run at a time than there are slots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transactions_in_flight_never_exceed_the_slots() {
        let group = Arc::new(GroupCommit::<u32>::new("test", 2, 1));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let lanes: Vec<_> = (0..16)
            .map(|lane| {
                let (group, running, most) = (group.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    group
                        .apply(vec![lane], |items| {
                            let (running, most) = (running.clone(), most.clone());
                            async move {
                                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                                most.fetch_max(now, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(2)).await;
                                running.fetch_sub(1, Ordering::SeqCst);
                                Verdict::Done(vec![true; items.len()])
                            }
                        })
                        .await
                })
            })
            .collect();
        for lane in lanes {
            assert_eq!(lane.await.unwrap(), [true]);
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    /// A leader that stops before answering leaves the lanes whose batches
    /// it took with "not applied", never waiting forever.
    #[tokio::test]
    async fn a_leader_that_stops_answers_not_applied() {
        let group = Arc::new(GroupCommit::<u32>::new("test", 1, 64));
        // The slot is busy while both lanes queue, so one transaction takes
        // both batches; its leader says who it is and never finishes.
        let busy = group.slots.acquire().await.unwrap();
        let (leading, mut leader) = tokio::sync::mpsc::channel(2);
        let lanes: Vec<_> = (1..=2)
            .map(|lane| {
                let (group, leading) = (group.clone(), leading.clone());
                tokio::spawn(async move {
                    group
                        .apply(vec![lane], move |_| {
                            let leading = leading.clone();
                            async move {
                                leading.send(lane).await.unwrap();
                                std::future::pending::<Verdict>().await
                            }
                        })
                        .await
                })
            })
            .collect();
        while group.lock().len() < 2 {
            tokio::task::yield_now().await;
        }
        drop(busy);
        let lead = leader.recv().await.unwrap();
        let [first, second]: [_; 2] = lanes.try_into().unwrap();
        let (stopped, follower) = if lead == 1 { (first, second) } else { (second, first) };
        stopped.abort();
        assert_eq!(follower.await.unwrap(), [false]);
        assert!(group.lock().is_empty(), "both batches went into the leader's transaction");
    }
}
