//! The brokers a test runs against: the in-process cluster on a thread of
//! its own, or the standalone broker.

use super::*;

/// Which Kafka-protocol broker a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// librdkafka's in-process mock cluster.
    InProcess,
    /// The standalone broker process started by `scripts/test.sh`.
    Standalone,
}

/// Runs a scenario once per broker: `both_brokers!(happy_path);` expects an
/// `async fn happy_path(kind: BrokerKind) -> anyhow::Result<()>` and makes the
/// tests `happy_path::in_process` and `happy_path::standalone`.
#[macro_export]
macro_rules! both_brokers {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn in_process() -> anyhow::Result<()> {
                super::$scenario($crate::BrokerKind::InProcess).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn standalone() -> anyhow::Result<()> {
                super::$scenario($crate::BrokerKind::Standalone).await
            }
        }
    )+};
}

/// What a test can do to the in-process cluster.
pub(crate) enum ClusterCommand {
    BrokerDown,
    BrokerUp,
    /// The next requests of this kind fail with these errors, in order.
    RequestErrors(rdkafka::types::RDKafkaApiKey, Vec<rdkafka::types::RDKafkaRespErr>),
}

/// librdkafka's in-process cluster of one broker, on a thread of its own
/// (it is not `Send`), reachable over TCP at the address `start` returns;
/// dropping the handle stops it.
pub struct InProcessCluster {
    commands: Option<mpsc::Sender<(ClusterCommand, mpsc::Sender<Result<(), String>>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessCluster {
    /// Starts the cluster with `topics` (it does not answer CreateTopics)
    /// and returns it with its bootstrap servers.
    pub fn start(topics: Vec<String>, partitions: i32) -> Result<(Self, String)> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (command_tx, command_rx) = mpsc::channel::<(ClusterCommand, mpsc::Sender<Result<(), String>>)>();
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
            // Serve commands until the kit is dropped. The cluster's only
            // broker has id 1.
            while let Ok((command, reply)) = command_rx.recv() {
                let result = match command {
                    ClusterCommand::BrokerDown => cluster.broker_down(1),
                    ClusterCommand::BrokerUp => cluster.broker_up(1),
                    ClusterCommand::RequestErrors(api, errors) => {
                        cluster.request_errors(api, &errors);
                        Ok(())
                    }
                };
                let _ = reply.send(result.map_err(|error| error.to_string()));
            }
        });
        let servers = ready_rx
            .recv()
            .context("In-process cluster thread died")?
            .map_err(|error| anyhow::anyhow!("Failed to start the in-process cluster: {error}"))?;
        Ok((Self { commands: Some(command_tx), thread: Some(thread) }, servers))
    }

    pub(crate) fn send(&self, command: ClusterCommand) -> Result<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.commands
            .as_ref()
            .context("cluster stopped")?
            .send((command, reply_tx))
            .ok()
            .context("cluster thread gone")?;
        reply_rx.recv().context("cluster thread gone")?.map_err(|error| anyhow::anyhow!(error))
    }
}

impl Drop for InProcessCluster {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
