//! Parts of Bridge a test runs in its own process: the simulator over
//! HTTP, the notifier, the API and the pipeline.

use super::*;

/// The account-service simulator served over HTTP from the test process.
pub struct RunningSimulator {
    pub url: String,
    /// The engine, for what only the simulator can see (calls in flight).
    pub bank: Arc<bridge_sim::Bank>,
    token: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
}

impl RunningSimulator {
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        Ok(self.handle.await??)
    }
}

impl TestKit {
    /// Serves the simulator with `plan` on `address` ("127.0.0.1:0" for any
    /// free port), keeping its books in this kit's database.
    pub async fn start_simulator_on(&self, address: &str, plan: bridge_sim::FaultPlan) -> Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind(address).await?;
        self.serve_simulator(listener, plan)
    }

    /// Serves the simulator on a socket the test bound earlier. Until then
    /// the kernel queues connections and nobody answers: a service that is
    /// up on the network but not responding.
    pub fn start_simulator_with(
        &self,
        listener: std::net::TcpListener,
        plan: bridge_sim::FaultPlan,
    ) -> Result<RunningSimulator> {
        listener.set_nonblocking(true)?;
        self.serve_simulator(tokio::net::TcpListener::from_std(listener)?, plan)
    }

    fn serve_simulator(
        &self,
        listener: tokio::net::TcpListener,
        plan: bridge_sim::FaultPlan,
    ) -> Result<RunningSimulator> {
        self.serve_bank(listener, bridge_sim::Bank::new(self.pool.clone(), plan))
    }

    /// Serves the simulator with `plan` on a socket bound earlier (so the
    /// API that it calls back can be told its address first), announcing
    /// settlements by signed callbacks to `target`.
    pub fn start_simulator_calling_back(
        &self,
        listener: std::net::TcpListener,
        plan: bridge_sim::FaultPlan,
        target: bridge_sim::CallbackTarget,
    ) -> Result<RunningSimulator> {
        listener.set_nonblocking(true)?;
        let bank = bridge_sim::Bank::new(self.pool.clone(), plan).with_callbacks(target);
        self.serve_bank(tokio::net::TcpListener::from_std(listener)?, bank)
    }

    fn serve_bank(&self, listener: tokio::net::TcpListener, bank: bridge_sim::Bank) -> Result<RunningSimulator> {
        let bank = Arc::new(bank);
        let url = format!("http://{}", listener.local_addr()?);
        let token = CancellationToken::new();
        let handle = tokio::spawn(bridge_sim::http::serve(
            listener,
            bridge_sim::http::router(bank.clone(), None),
            token.clone(),
        ));
        Ok(RunningSimulator { url, token, handle, bank })
    }

    /// Serves the simulator with `plan` on a free port, keeping its books in
    /// memory (see `bridge_sim::Bank::in_memory`).
    pub async fn start_simulator_in_memory(&self, plan: bridge_sim::FaultPlan) -> Result<RunningSimulator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        self.serve_bank(listener, bridge_sim::Bank::in_memory(plan))
    }

    pub async fn start_simulator(&self, plan: bridge_sim::FaultPlan) -> Result<RunningSimulator> {
        self.start_simulator_on("127.0.0.1:0", plan).await
    }

    /// The HTTP adapters pointed at `url` for both services.
    pub fn http_services(&self, url: &str, timeout_ms: u64) -> Result<Services> {
        bridge_pipeline::http_services::HttpAccountServices::services(
            bridge_pipeline::http_services::HttpServicesConfig {
                investor_base_url: url.to_owned(),
                fund_base_url: url.to_owned(),
                token: None,
                timeout_ms,
            },
        )
    }
}

/// The notifier running in the test process.
pub struct RunningNotifier {
    token: CancellationToken,
    handle: JoinHandle<Result<()>>,
}

impl RunningNotifier {
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .context("Notifier did not stop within 60 s")??
    }
}

impl TestKit {
    /// Runs the notifier (its consumer and its sender) on this runtime.
    pub fn spawn_notifier(&self, config: bridge_notify::NotifierConfig) -> Result<RunningNotifier> {
        let pipeline = Pipeline::new(self.pool.clone(), self.config.clone(), Services::none());
        let notifier = bridge_notify::Notifier::new(pipeline.runtime().clone(), config)?;
        let token = CancellationToken::new();
        let run_token = token.clone();
        let handle = tokio::spawn(async move { notifier.run(run_token).await });
        Ok(RunningNotifier { token, handle })
    }
}

/// Bridge's HTTP API served from the test process.
pub struct RunningApi {
    pub url: String,
    token: CancellationToken,
    handle: JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        Ok(self.handle.await??)
    }
}

impl TestKit {
    /// Serves the API (callbacks, health, metrics) on a free port, running
    /// steps against `services`.
    pub async fn start_api(&self, services: Services, config: bridge_api::ApiConfig) -> Result<RunningApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let pipeline = Pipeline::new(self.pool.clone(), self.config.clone(), services);
        let router = bridge_api::router(pipeline.context().clone(), config);
        let token = CancellationToken::new();
        let handle = tokio::spawn(bridge_api::serve(listener, router, token.clone()));
        Ok(RunningApi { url, token, handle })
    }
}

pub struct RunningPipeline {
    pub(crate) token: CancellationToken,
    pub(crate) handle: JoinHandle<Result<()>>,
}

impl RunningPipeline {
    /// Stops gracefully and returns the pipeline's own result.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .context("Pipeline did not stop within 60 s")??
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops at once, as a crash would: every task is dropped wherever it
    /// is (a transaction in progress rolls back with its connection), no
    /// offset is committed, no producer is flushed.
    pub async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}
