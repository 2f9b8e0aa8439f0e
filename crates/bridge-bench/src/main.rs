//! `bridge-bench`: measurements of Bridge against this machine's own limits,
//! kept out of the production binary. `scripts/bench.sh` builds both and
//! runs `bridge-bench pipeline`.

mod notify;
mod pipeline;
mod plot;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Where the scratch databases are created, unless `DATABASE_URL` says.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/bridge";

#[derive(Parser)]
#[command(name = "bridge-bench", version, about = "Measure Bridge against this machine's limits")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// The whole pipeline (`bridge run` processes) under an open-loop load,
    /// with the Postgres ceiling.
    Pipeline(pipeline::PipelineBenchArgs),
    /// Notification deliveries per second to local webhook receivers.
    Notify(notify::NotifyBenchArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match Cli::parse().what {
        // Stopped by a signal, the run is dropped where it is, and with it
        // the pipeline's processes, which would otherwise run on.
        What::Pipeline(args) => tokio::select! {
            result = pipeline::run(args) => result,
            signal = stop_signal() => {
                signal?;
                anyhow::bail!("Stopped by a signal: the pipeline's processes were stopped; its scratch databases (bridge_bench_*) are left")
            }
        },
        What::Notify(args) => notify::run(args).await,
    }
}

/// SIGINT or SIGTERM.
async fn stop_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        interrupt = tokio::signal::ctrl_c() => interrupt?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
