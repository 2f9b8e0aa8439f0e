//! `bridge`: one binary, one subcommand per part of the pipeline.
//!
//! This crate wires configuration, logging and process lifetime around the
//! library crates; it holds no business rules of its own.

mod admin;
mod args;
mod audit;
mod config;
mod credentials;
mod demo;
mod local_postgres;
mod notify;
mod ops;
mod review;
mod schemas;
mod security;
mod serve;
mod sources;
mod submit;
mod telemetry;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use bridge_pipeline::runner::Part;
use bridge_pipeline::services::Services;
use bridge_pipeline::{kafka, Pipeline, StageName};

pub use args::{ApiArgs, Common, ServiceArgs, SettlementArgs};

/// jemalloc instead of the C library's allocator. A pipeline process
/// allocates and frees many short-lived buffers per message (decoded
/// events, rows, the producer's copies); in a profile of a backlog run its
/// processes spent about as much CPU in glibc's malloc and free as in their
/// own code. jemalloc took about a seventh off their CPU per transfer, where
/// mimalloc took a twentieth (it made the relay, which frees large claimed
/// batches, dearer).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The database a newcomer's machine most likely has.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/bridge";

#[derive(Parser)]
#[command(
    name = "bridge",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BRIDGE_BUILD_COMMIT"), ")"),
    about = "Moves money from investor bank accounts into investment funds, one Kafka stage at a time."
)]
struct Cli {
    /// A TOML file of settings, keyed by their long flag names
    /// (`database-url = "..."`). Flags and environment variables win over it.
    #[arg(long, env = "BRIDGE_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Create the database if missing and apply schema migrations.
    Migrate(MigrateArgs),
    /// Create the demo investors, funds and accounts (deterministic, idempotent).
    Seed(SeedArgs),
    /// Run pipeline stages and the outbox relay until SIGTERM or Ctrl-C.
    Run(RunArgs),
    /// Print the settings `bridge run` would use (flags, environment
    /// variables, `--config` file, defaults), where each came from, secrets
    /// redacted. The output is itself a valid configuration file.
    Config(RunArgs),
    /// Publish transfer requests to the request topic, as an upstream system would.
    Submit(submit::SubmitArgs),
    /// Seed, submit, run everything until every transfer is terminal, and check the books.
    Demo(demo::DemoArgs),
    /// Check invariants I1–I6 against the database; exit non-zero on a violation.
    Reconcile(ReconcileArgs),
    /// Serve the simulated bank and fund administrator over HTTP.
    Sim(SimArgs),
    /// Serve the HTTP API alone: settlement callbacks, health, metrics.
    Api(ApiCommandArgs),
    /// Read the status topic back into a fresh copy of the event log, compare
    /// it with the live one and the transfers' history; --apply feeds what
    /// the live log lacks through the notifier (logged and notified once).
    Rebuild(RebuildArgs),
    /// Store, list and rotate encrypted credentials.
    Credentials(credentials::CredentialsArgs),
    /// Create, list and revoke API keys.
    Keys(KeysArgs),
    /// Deliver status notifications (and manage subscriptions and dead
    /// letters: subscribe, list, enable, disable, redrive).
    Notify(notify::NotifyArgs),
    /// Read every fund's criteria, seats and capacity from the Fund Account
    /// Service now (the settlement runner also does it on a schedule).
    FundsSync(FundsSyncArgs),
    /// Read and set investors' attributes (residence, accreditation), which
    /// funds' rules read.
    Investors(admin::InvestorsArgs),
    /// Re-drive a range of a stage's input topic through the stage (safe for
    /// any range: repeats are no-ops). Never moves the live groups' offsets.
    Replay(ops::ReplayArgs),
    /// List, show and redrive dead-letter topics.
    Dlq(ops::DlqArgs),
    /// Register, list and revoke the upstream systems allowed to publish
    /// (signed) transfer requests.
    Sources(sources::SourcesArgs),
    /// The transfers waiting for a person, and their resolutions: retry,
    /// fail, refunded (outside Bridge), complete (confirmed outside Bridge),
    /// with four-eyes approval when configured.
    Review(review::ReviewArgs),
    /// Check Bridge's schemas against the schema registry, and register
    /// them: the deployment step for registries applications only read.
    Schemas(schemas::SchemasArgs),
    /// The audit log, newest first: admin and operator actions through the
    /// API and the command line, who did them, from where, and the outcome.
    Audit(audit::AuditArgs),
}

#[derive(Args)]
struct SimArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on.
    #[arg(long, env = "BRIDGE_SIM_LISTEN", default_value = "127.0.0.1:8081")]
    listen: String,
    /// Require this bearer token.
    #[arg(long, env = "BRIDGE_SIM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Failures to inject: `none`, `demo` (a few percent of every kind), or
    /// the path of a JSON fault plan.
    #[arg(long, default_value = "none")]
    faults: String,
    /// Seed of the failure injection.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Base URL of the API to send signed settlement callbacks to (e.g. a
    /// `bridge api`); without it, pending operations are found by polling.
    #[arg(long, env = "BRIDGE_SIM_CALLBACK_URL")]
    callback_url: Option<String>,
    /// Secret (`whsec_...`) the callbacks are signed with.
    #[arg(long, env = "BRIDGE_SIM_CALLBACK_SECRET", hide_env_values = true, requires = "callback_url")]
    callback_secret: Option<String>,
    /// Bridge API key (scope `callbacks`) the callbacks are sent with.
    #[arg(long, env = "BRIDGE_SIM_CALLBACK_API_KEY", hide_env_values = true)]
    callback_api_key: Option<String>,
    /// Where the simulated services keep their books: `database`, the
    /// `sim_*` tables of DATABASE_URL's database, or `memory`, this
    /// process's memory, for load runs that must not spend the database's
    /// time on the bank's bookkeeping (every account active, no consents,
    /// no funds' terms; nothing kept after the process ends).
    #[arg(long, value_enum, default_value_t = SimBooks::Database)]
    books: SimBooks,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SimBooks {
    Database,
    Memory,
}

#[derive(Args)]
struct RebuildArgs {
    #[command(flatten)]
    common: Common,
    /// Add the events the live log lacks (and queue their notifications).
    #[arg(long)]
    apply: bool,
    /// A partition quiet for this long counts as read to its end.
    #[arg(long, default_value_t = 2_000)]
    idle_ms: u64,
}

#[derive(Args)]
struct KeysArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(clap::Subcommand)]
enum KeysAction {
    /// Create a key; it is printed once and stored only as a hash.
    Create {
        /// What the key is for (shown in lists).
        #[arg(long)]
        name: String,
        /// Comma-separated: transfers:write, transfers:read, callbacks, admin,
        /// operator, viewer (the console, read-only).
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Bind the key to one investor account.
        #[arg(long)]
        investor: Option<String>,
    },
    /// List keys (prefix, name, scopes, binding, revoked or not).
    List,
    /// Revoke the key with this prefix (the 8 hex digits after `brk_`).
    Revoke { prefix: String },
}

#[derive(Args)]
struct FundsSyncArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    services: ServiceArgs,
}

#[derive(Args)]
struct ApiCommandArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    settlement: SettlementArgs,
    #[command(flatten)]
    services: ServiceArgs,
}

pub fn fault_plan(name: &str, seed: u64) -> Result<bridge_sim::FaultPlan> {
    Ok(match name {
        "none" => bridge_sim::FaultPlan { seed, ..bridge_sim::FaultPlan::none() },
        "demo" => bridge_sim::FaultPlan::demo(seed),
        path => {
            let text = std::fs::read_to_string(path).with_context(|| format!("Failed to read fault plan {path}"))?;
            serde_json::from_str(&text).with_context(|| format!("Fault plan {path} is not valid"))?
        }
    })
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    common: Common,
    /// Also create the Kafka topics.
    #[arg(long)]
    topics: bool,
}

#[derive(Args)]
struct SeedArgs {
    #[command(flatten)]
    common: Common,
    /// Namespace of the demo account ids.
    #[arg(long, default_value = "demo")]
    namespace: String,
    /// Number of investors.
    #[arg(long, default_value_t = 200)]
    investors: usize,
    /// Seed of the deterministic generator.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Run only these stages (validator, withdrawal, deposit, completion);
    /// repeatable. Without it every stage and the relay run.
    #[arg(long = "stage")]
    stages: Vec<String>,
    /// Run the outbox relay (implied when no --stage is given).
    #[arg(long)]
    relay: bool,
    /// Reject every request from Kafka that is not signed by a registered
    /// source allowed to make it (`bridge sources`); needs the master keys
    /// (BRIDGE_MASTER_KEYS) to open the sources' secrets.
    #[arg(long, env = "BRIDGE_REQUIRE_SIGNED_REQUESTS")]
    require_signed_requests: bool,
    /// Run the settlement runner, which finishes steps the account services
    /// accepted as pending (implied when no --stage is given).
    #[arg(long)]
    settlement: bool,
    /// Run the notifier (implied when no --stage is given).
    #[arg(long)]
    notify: bool,
    #[command(flatten)]
    notifier: notify::NotifierArgs,
    #[command(flatten)]
    services: ServiceArgs,
    #[command(flatten)]
    settlement_args: SettlementArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Args)]
struct ReconcileArgs {
    #[command(flatten)]
    common: Common,
    /// A transfer in flight that nothing has worked on for this long (no
    /// move, no pending step being asked about), or an operation at a
    /// service that no step of ours follows for this long, is reported.
    #[arg(long, env = "BRIDGE_RECONCILE_IDLE_AFTER_SECS", default_value_t = bridge_store::reconcile::IDLE_AFTER_SECS_DEFAULT)]
    idle_after_secs: i64,
    /// Print the report as one JSON object (`ok`, `checks` with their
    /// violations and examples, and the counts in flight).
    #[arg(long)]
    json: bool,
}

/// Logs to stderr, filtered by `RUST_LOG`. `BRIDGE_LOG_FORMAT=json` writes
/// one JSON object per line for log pipelines; lines logged while a message
/// is processed carry its `span`: stage, topic, partition, offset,
/// `transfer_id` and `trace_id`.
fn init_logging(default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Traces are an addition: a process that cannot build its exporter
    // still runs, and says why it exports nothing.
    let (traces, traces_error) = match telemetry::layer() {
        Ok(layer) => (layer, None),
        Err(error) => (None, Some(error)),
    };
    let registry = tracing_subscriber::registry().with(filter).with(traces);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let format = std::env::var("BRIDGE_LOG_FORMAT").unwrap_or_default();
    match format.as_str() {
        "json" => registry.with(fmt.json().flatten_event(true).with_current_span(true).with_span_list(false)).init(),
        _ => {
            registry.with(fmt).init();
            if !format.is_empty() && format != "text" {
                tracing::warn!(format = %format, "Unknown BRIDGE_LOG_FORMAT; logging as text (json or text)");
            }
        }
    }
    if let Some(error) = traces_error {
        tracing::error!(error = format!("{error:#}"), "Traces will not be exported");
    }
}

/// Cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("Shutdown requested");
        trigger.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> Result<()> {
    let result = run().await;
    // The batch exporter's thread sends what is still buffered; waiting for
    // it blocks, so not on a runtime thread.
    let _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
    result
}

async fn run() -> Result<()> {
    use clap::{CommandFactory, FromArgMatches};
    let resolved = config::resolve_args::<Cli>(std::env::args_os().collect())?;
    let command = Cli::command();
    // Parsed once: clap reports a bad command line and exits, as parse does.
    let matches = command.clone().get_matches_from(&resolved.args);
    let invocation = audit::Invocation::of(&command, &matches);
    bridge_store::set_application_name(&invocation.process_name());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let result = dispatch(cli, &resolved).await;
    invocation.record(&result).await;
    result
}

async fn dispatch(cli: Cli, resolved: &config::Resolved) -> Result<()> {
    match cli.command {
        Command::Config(_) => {
            print!("{}", config::render(&config::effective::<Cli>(resolved, "config")?));
        }
        Command::Migrate(args) => {
            init_logging("info");
            admin::migrate(args).await?;
        }
        Command::Seed(args) => {
            init_logging("info");
            admin::seed(args).await?;
        }
        Command::Run(args) => {
            init_logging("info");
            serve::run(args).await?;
        }
        Command::Submit(args) => {
            init_logging("warn");
            submit::run(args).await?;
        }
        Command::Demo(args) => {
            // The demo injects failures on purpose; the retries they cause
            // are logged at WARN and would bury the progress bar. RUST_LOG
            // shows them.
            init_logging("error");
            let ok = demo::run(args).await?;
            if !ok {
                std::process::exit(1);
            }
        }
        Command::Sim(args) => {
            init_logging("info");
            serve::sim(args).await?;
        }
        Command::Api(args) => {
            init_logging("info");
            serve::api(args).await?;
        }
        Command::Rebuild(args) => {
            init_logging("warn");
            admin::rebuild(args).await?;
        }
        Command::Credentials(args) => {
            init_logging("warn");
            credentials::run(args).await?;
        }
        Command::Keys(args) => {
            init_logging("warn");
            admin::keys(args).await?;
        }
        Command::Notify(args) => {
            init_logging("info");
            notify::run(args).await?;
        }
        Command::FundsSync(args) => {
            init_logging("warn");
            admin::funds_sync(args).await?;
        }
        Command::Investors(args) => {
            init_logging("warn");
            admin::investors(args).await?;
        }
        Command::Replay(args) => {
            init_logging("warn");
            ops::replay(args).await?;
        }
        Command::Dlq(args) => {
            init_logging("warn");
            ops::dlq(args).await?;
        }
        Command::Reconcile(args) => {
            init_logging("warn");
            admin::reconcile(args).await?;
        }
        Command::Sources(args) => {
            init_logging("warn");
            sources::run(args).await?;
        }
        Command::Review(args) => {
            init_logging("warn");
            review::run(args).await?;
        }
        Command::Schemas(args) => {
            init_logging("warn");
            schemas::run(args).await?;
        }
        Command::Audit(args) => {
            init_logging("warn");
            audit::list(args).await?;
        }
    }
    Ok(())
}
