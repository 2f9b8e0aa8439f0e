//! Postgres persistence for Bridge.
//!
//! This crate owns the schema (in `migrations/`) and every SQL statement. It
//! offers transaction-scoped building blocks (inbox insert, version-checked
//! updates, ledger postings, outbox rows) that the stages compose into one
//! database transaction per message. It knows nothing of Kafka or Avro: the
//! outbox stores opaque bytes that the relay publishes.
//!
//! Concurrency control: a transfer's advance is version-checked (`WHERE
//! version = $expected`); balances, holds, allocations and funds change by
//! atomic updates under their rows' locks, guarded where a decision rests
//! on them (a hold by the available balance, a reservation by the fund's
//! limits), and only through `books`, which takes those locks in one
//! order. A lost race or a failed guard surfaces as [`Error::Conflict`],
//! which callers retry from the start of the transaction.
//!
//! A pipeline step's statements run in a transaction begun by
//! [`begin_step_transaction`] and are prepared once per connection, and the
//! transaction has Postgres use one generic plan for each
//! (`plan_cache_mode = force_generic_plan`) instead of planning it at every
//! execution, which for a statement over a batch's arrays (`= ANY($1)`,
//! joins to `unnest(...)`) cost more than running it. Left to choose,
//! Postgres plans a statement afresh for its first five executions on each
//! connection, and after them whenever the generic plan's estimate (which
//! assumes a long array) exceeds the fresh plans' for the short batches of
//! a paced load: at 100 transfers/s it planned the batch advance at 1,075
//! of 1,876 executions. Every such statement finds its rows by key, and the
//! step's transaction rules out sequential scans, hash joins and merge
//! joins: a generic plan made while a table was
//! still nearly empty would otherwise keep a hash join over a sequential
//! scan, which read the whole `transfers` table for every completion batch
//! as it grew (2,547 buffers per call in a run of 100,000 transfers, where
//! an index lookup reads a few per row). Statements over arrays that also
//! run elsewhere (`transfers::get_many`, the console's search, the bank
//! access taken outside a transaction) are not prepared: Postgres plans them
//! for each execution.

pub mod accounts;
pub mod api;
pub mod audit;
pub mod bank_access;
pub mod books;
pub mod callbacks;
pub mod console;
pub mod credentials;
pub mod fund_terms;
pub mod gauges;
pub mod history;
pub mod inbox;
pub mod ledger;
pub mod local_cluster;
pub mod notifications;
pub mod outbox;
pub mod pending;
pub mod reconcile;
pub mod reviews;
pub mod simulator;
pub mod sources;
pub mod transfers;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

pub use sqlx::{PgConnection, Postgres, Transaction};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A version check failed or a concurrent insert won: another transaction
    /// changed the row first. Retry the whole transaction.
    #[error("optimistic concurrency conflict on {entity} {id}")]
    Conflict { entity: &'static str, id: String },
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A statement with its parameters, as the modules that share parts of
/// statements bind them.
pub(crate) type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl Error {
    /// Whether running the same transaction again may succeed. Only errors
    /// that say "this data can never be stored" are final: data exceptions
    /// and integrity violations other than a lost insert race. Everything
    /// else (lost races, deadlocks, timeouts, failover, a dropped connection,
    /// even a schema that is not there yet during a deploy) may pass, so the
    /// caller waits and retries rather than giving up on a payment.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Conflict { .. } => true,
            Error::Database(error) => !is_data_error(error),
            Error::Migrate(_) | Error::Corrupt(_) => false,
        }
    }

    /// A unique-constraint violation: usually a concurrent insert that won,
    /// but persistent if the same insert keeps failing.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, Error::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505"))
    }

    /// A lost race: retry the transaction at once.
    pub fn is_race(&self) -> bool {
        match self {
            Error::Conflict { .. } => true,
            Error::Database(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01"))
            }
            _ => false,
        }
    }
}

fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // Class 22: data exception. 23502 not-null, 23503 foreign key,
            // 23514 check (our I5 guards), 23P01 exclusion.
            code.starts_with("22") || matches!(code, "23502" | "23503" | "23514" | "23P01")
        }
        sqlx::Error::RowNotFound => true,
        _ => false,
    }
}

/// Connection pool settings, each with its unit in the name.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub connections_max: u32,
    pub acquire_timeout_ms: u64,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self { connections_max: 16, acquire_timeout_ms: 10_000 }
    }
}

/// The planner settings of a pipeline step's transaction (see the crate's
/// note), set in the same round trip as its `BEGIN` and only for it.
const STEP_BEGIN: &str = "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; \
     SET LOCAL enable_mergejoin = off; SET LOCAL plan_cache_mode = force_generic_plan";

/// Begins the transaction of a pipeline step: a stage's message or batch,
/// an operator's resolution. Its statements find rows by key, and plans
/// made in it stay right as the tables grow (see the crate's note).
pub async fn begin_step_transaction(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    Ok(pool.begin_with(STEP_BEGIN).await?)
}

/// Names who makes this transaction's changes in the models' history
/// (`model_history.actor`), in place of the process's name: an operator's
/// resolution, the fund-terms sync.
pub async fn set_actor(conn: &mut sqlx::PgConnection, actor: &str) -> Result<()> {
    sqlx::query("SELECT set_config('bridge.actor', $1, true)").bind(actor).execute(conn).await?;
    Ok(())
}

/// The name this process's connections give Postgres (`application_name`):
/// the history of accounts, funds and allocations names it as the actor of
/// a change that no transaction attributed otherwise. Set once, before the
/// first pool is made.
pub fn set_application_name(name: &str) {
    let _ = APPLICATION_NAME.set(name.to_owned());
}

static APPLICATION_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub async fn connect(url: &str, settings: &PoolSettings) -> Result<PgPool> {
    Ok(pool_options(settings).connect_with(connect_options(url)?).await?)
}

/// A pool like [`connect`]'s that opens its first connection when first
/// used, for callers that cannot wait here.
pub fn connect_lazy(url: &str, settings: &PoolSettings) -> Result<PgPool> {
    Ok(pool_options(settings).connect_lazy_with(connect_options(url)?))
}

fn pool_options(settings: &PoolSettings) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(settings.connections_max)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        // No ping before each use: at a paced load most transactions carry
        // one message, and the ping was one round trip (a wake-up of the
        // backend and of this process) in every eight. A connection that
        // died meanwhile fails its first statement instead, which every
        // caller already treats as retryable, and the pool drops it.
        .test_before_acquire(false)
}

fn connect_options(url: &str) -> Result<PgConnectOptions> {
    let mut options = PgConnectOptions::from_str(url)?;
    if let Some(name) = APPLICATION_NAME.get() {
        options = options.application_name(name);
    }
    let options = options
        // Statement logging at INFO would print every query of every stage.
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    Ok(options)
}

/// Runs `sql` (a DELETE of at most `$2` rows older than `$1` milliseconds)
/// until it deletes fewer than `batch`, so pruning never holds many locks or
/// a long transaction. Returns the rows deleted in all.
async fn delete_in_batches(conn: &mut sqlx::PgConnection, sql: &str, older_than_ms: u64, batch: i64) -> Result<u64> {
    let mut total = 0;
    loop {
        let deleted =
            sqlx::query(sql).bind(older_than_ms as i64).bind(batch).execute(&mut *conn).await?.rows_affected();
        total += deleted;
        if (deleted as i64) < batch {
            return Ok(total);
        }
    }
}

/// Creates the database named in `url` if it does not exist, by connecting to
/// the server's `postgres` maintenance database.
pub async fn ensure_database(url: &str) -> Result<()> {
    let options = PgConnectOptions::from_str(url)?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.database("postgres").connect().await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match admin.execute(statement.as_str()).await {
            Ok(_) => {}
            // Another process created it between our check and our create.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Drops the database `url` names, disconnecting its sessions (Postgres 13+).
pub async fn drop_database(url: &str) -> Result<()> {
    let options = PgConnectOptions::from_str(url)?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.database("postgres").connect().await?;
    let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", name.replace('"', "\"\""));
    admin.execute(statement.as_str()).await?;
    Ok(())
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
