//! The composition root: which parts a process runs (stages, relay,
//! settlement runner) and how a stage's messages reach the workflow.

use std::sync::Arc;

use anyhow::{Context, Result};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::batches::Groups;
pub use crate::consumer::{consume, consume_batched, BatchHandler, Handler};
use crate::context::RelayWaker;
pub use crate::context::{Runtime, StageContext, StageName};
use crate::schema_registry::SchemaRegistry;
use crate::services::Services;
use crate::settlement::run_settlement;
use crate::stages;
use crate::{relay, PipelineConfig};

/// A part of the pipeline that can run in a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Stage(StageName),
    Relay,
    /// Asks outside services about steps they accepted as pending.
    Settlement,
}

impl Part {
    pub fn all() -> Vec<Part> {
        StageName::ALL.into_iter().map(Part::Stage).chain([Part::Relay, Part::Settlement]).collect()
    }
}

#[derive(Clone)]
pub struct Pipeline {
    ctx: Arc<StageContext>,
}

impl Pipeline {
    pub fn new(pool: PgPool, config: PipelineConfig, services: Services) -> Self {
        let topics = config.topics.clone();
        let registry = config.schema_registry_url.as_deref().map(|url| {
            Arc::new(SchemaRegistry::new(
                url,
                config.schema_registry_timeout_ms,
                config.schema_registry_auth.clone(),
                config.schema_registry_auto_register,
            ))
        });
        let relay_waker = RelayWaker::new(pool.clone());
        let groups = Groups::new(&config);
        let runtime = Arc::new(Runtime { pool, topics, config, source: "/bridge".to_owned(), registry, relay_waker });
        Self {
            ctx: Arc::new(StageContext {
                runtime,
                services,
                groups,
                answered: Default::default(),
                request_verifier: None,
                keyring: None,
            }),
        }
    }

    /// Requires every request from Kafka to be signed by a registered
    /// source (see `sources.rs`), whose secrets `keyring` opens.
    pub fn require_signed_requests(mut self, keyring: Arc<bridge_secrets::Keyring>) -> Self {
        let verifier = Arc::new(crate::sources::RequestVerifier::new(self.ctx.pool.clone(), keyring));
        match Arc::get_mut(&mut self.ctx) {
            Some(ctx) => ctx.request_verifier = Some(verifier),
            None => unreachable!("the context is shared only once the pipeline runs"),
        }
        self
    }

    /// Opens investors' bank access with `keyring`, so each withdrawal
    /// carries the access of the investor whose money moves.
    pub fn with_keyring(mut self, keyring: Arc<bridge_secrets::Keyring>) -> Self {
        match Arc::get_mut(&mut self.ctx) {
            Some(ctx) => ctx.keyring = Some(keyring),
            None => unreachable!("the context is shared only once the pipeline runs"),
        }
        self
    }

    /// What must happen before the pipeline writes an event: registering
    /// its schemas when a registry is configured. `run` does it; a process
    /// that only serves the API calls it itself.
    pub async fn prepare(&self) -> Result<()> {
        if let Some(registry) = &self.ctx.registry {
            registry.register(&self.ctx.topics).await.context("Failed to register schemas")?;
        }
        Ok(())
    }

    /// The stages' context: the runtime, the services and the stages'
    /// shared transactions (for the API's callbacks and fund terms).
    pub fn context(&self) -> &Arc<StageContext> {
        &self.ctx
    }

    /// What consumers other than the stages need (the notifier, the event
    /// log's rebuild).
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.ctx.runtime
    }

    /// Runs `parts` until `shutdown` is cancelled or one of them fails. Each
    /// stage finishes the message in hand, stores its offset and commits
    /// offsets synchronously before returning.
    pub async fn run(&self, parts: &[Part], shutdown: CancellationToken) -> Result<()> {
        self.prepare().await?;
        let mut tasks = JoinSet::new();
        for part in parts {
            let ctx = self.ctx.clone();
            let token = shutdown.clone();
            match *part {
                Part::Stage(stage) => tasks.spawn(async move {
                    run_stage(ctx, stage, token).await.with_context(|| format!("Stage {} failed", stage.as_str()))
                }),
                Part::Relay => {
                    tasks.spawn(async move { relay::run(ctx.runtime.clone(), token).await.context("Relay failed") })
                }
                Part::Settlement => {
                    tasks.spawn(async move { run_settlement(ctx, token).await.context("Settlement runner failed") })
                }
            };
        }
        let mut first_error = None;
        while let Some(result) = tasks.join_next().await {
            let result = result.map_err(anyhow::Error::from).and_then(|inner| inner);
            if let Err(error) = result {
                tracing::error!(error = format!("{error:#}"), "Pipeline part stopped with an error");
                // One part down means the process is unhealthy: stop the rest
                // cleanly so a supervisor restarts the whole process.
                shutdown.cancel();
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

async fn run_stage(ctx: Arc<StageContext>, stage: StageName, shutdown: CancellationToken) -> Result<()> {
    let handler_ctx = ctx.clone();
    let handler: Handler = Arc::new(move |message| {
        let ctx = handler_ctx.clone();
        Box::pin(async move { stages::handle(&ctx, stage, message).await })
    });
    // Every stage applies a partition's queued messages set-based; the
    // money stages first ask their service about them concurrently.
    let batch = (ctx.config.batch_size_max > 1).then(|| {
        let batch_ctx = ctx.clone();
        let batch: BatchHandler = Arc::new(move |messages| {
            let ctx = batch_ctx.clone();
            Box::pin(async move {
                match stage {
                    StageName::Validator => stages::validate_batch(&ctx, messages).await,
                    StageName::Withdrawal => stages::withdraw_batch(&ctx, messages).await,
                    StageName::Deposit => stages::deposit_batch(&ctx, messages).await,
                    StageName::Completion => stages::complete_batch(&ctx, messages).await,
                }
            })
        });
        batch
    });
    let topic = stage.input_topic(&ctx.topics);
    consume_batched(&ctx, stage.as_str(), &stage.group_id(&ctx.config), &topic, handler, batch, shutdown).await
}
