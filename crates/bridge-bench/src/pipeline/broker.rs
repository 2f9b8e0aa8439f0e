//! librdkafka's in-process cluster, served over TCP from the benchmark's
//! own process, as a broker whose cost does not grow with its log the way
//! tansu's in-memory engine does: it keeps at most 5 MB or 100,000 batches
//! per partition and drops the oldest beyond that, so a run on it must be
//! paced at a rate the pipeline keeps up with, or messages are lost to that
//! retention before they are read.

use std::sync::mpsc;

use anyhow::{Context, Result};
use rdkafka::mocking::MockCluster;

/// The cluster's thread; dropping it stops the cluster.
pub(super) struct InProcessBroker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessBroker {
    /// Starts a one-broker cluster with `topics` (it does not answer
    /// CreateTopics) and returns it with its bootstrap servers.
    pub(super) fn start(topics: Vec<String>, partitions: i32) -> Result<(Self, String)> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        // The cluster lives and dies on one thread of its own.
        let thread = std::thread::spawn(move || {
            let cluster = match MockCluster::new(1) {
                Ok(cluster) => cluster,
                Err(error) => {
                    let _ = ready_tx.send(Err(error.to_string()));
                    return;
                }
            };
            for topic in &topics {
                if let Err(error) = cluster.create_topic(topic, partitions, 1) {
                    let _ = ready_tx.send(Err(format!("create {topic}: {error}")));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
            let _ = stop_rx.recv();
        });
        let servers = ready_rx
            .recv()
            .context("The in-process cluster's thread died")?
            .map_err(|error| anyhow::anyhow!("Failed to start the in-process cluster: {error}"))?;
        Ok((Self { stop: Some(stop_tx), thread: Some(thread) }, servers))
    }
}

impl Drop for InProcessBroker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
