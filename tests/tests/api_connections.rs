//! The API against clients that hold connections open: slow ones that
//! never finish their headers (slowloris), idle kept-alive ones, and more
//! of them than the server will hold. Slow and idle connections are cut at
//! the header-read timeout, connections over the cap are answered 503 at
//! once instead of exhausting file descriptors, and a real client is served
//! throughout. Figures are printed (run with --no-capture) for the record,
//! not asserted: timings belong in benchmarks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use bridge_api::server::ServerLimits;
use bridge_testkit::{BrokerKind, TestKit};

const SLOW: usize = 250;
const CAP: usize = 300;
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// A complete request on a fresh connection: its status code.
async fn get(address: SocketAddr, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await.context("no answer")??;
    status(&answer)
}

fn status(answer: &[u8]) -> Result<u16> {
    let text = String::from_utf8_lossy(answer);
    let code = text.split_whitespace().nth(1).context("no status line")?;
    Ok(code.parse()?)
}

/// A connection that sends the start of a request and never finishes it.
async fn slow(address: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n").await?;
    Ok(stream)
}

/// Whether the server closed `stream` within `wait` (end of stream or reset).
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buffer = [0u8; 512];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_and_capped_while_real_ones_are_served() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let router = bridge_api::router(kit.pipeline().context().clone(), bridge_api::ApiConfig::new());
    let limits = ServerLimits {
        header_read_timeout: HEADER_TIMEOUT,
        request_timeout: Duration::from_secs(5),
        connections_max: CAP,
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(bridge_api::server::serve(listener, router, shutdown.clone(), limits));
    let memory_before = resident_kib();

    let mut slow_clients = Vec::new();
    for _ in 0..SLOW {
        slow_clients.push(slow(address).await?);
    }
    let opened = Instant::now();
    // A real client is served while they hang.
    let started = Instant::now();
    ensure!(get(address, "/healthz").await? == 200, "the API did not answer beside slow clients");
    let latency = started.elapsed();

    // Over the cap, new connections are refused with a 503 straight away.
    let mut extra = Vec::new();
    for _ in 0..(CAP - SLOW + 20) {
        extra.push(slow(address).await?);
    }
    let mut refused = 0;
    for stream in &mut extra {
        let mut buffer = [0u8; 256];
        if let Ok(Ok(read)) = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer)).await {
            if read > 0 && status(&buffer[..read]).ok() == Some(503) {
                refused += 1;
            }
        }
    }
    ensure!(refused >= 20, "{refused} of {} connections over the cap were refused", CAP - SLOW + 20);
    let memory_held = resident_kib();

    // Every slow connection is cut once the header-read timeout has passed.
    let mut cut = 0;
    for stream in slow_clients.iter_mut().chain(extra.iter_mut()) {
        let left = (HEADER_TIMEOUT + Duration::from_secs(3)).saturating_sub(opened.elapsed());
        if closed_within(stream, left.max(Duration::from_millis(100))).await {
            cut += 1;
        }
    }
    let held_for = opened.elapsed();
    ensure!(
        cut == slow_clients.len() + extra.len(),
        "{cut} of {} slow connections were cut",
        slow_clients.len() + extra.len()
    );
    ensure!(held_for >= HEADER_TIMEOUT, "slow connections cut before the timeout ({held_for:?})");
    drop(slow_clients);
    drop(extra);

    // A kept-alive connection that goes quiet after a request is cut too.
    let mut idle = TcpStream::connect(address).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n").await?;
    let mut buffer = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buffer)).await??;
    ensure!(status(&buffer[..read])? == 200, "the kept-alive request was not answered");
    let quiet = Instant::now();
    ensure!(closed_within(&mut idle, HEADER_TIMEOUT + Duration::from_secs(3)).await, "an idle connection was kept");
    let idle_for = quiet.elapsed();

    ensure!(get(address, "/healthz").await? == 200, "the API did not answer after the attack");
    println!(
        "{SLOW} slow connections + {} over a cap of {CAP}: a real request answered in {latency:?}; {refused} refused \
         with 503 at once; all {cut} cut after {held_for:?} (header-read timeout {HEADER_TIMEOUT:?}); an idle \
         kept-alive connection cut after {idle_for:?}; resident memory {memory_before} KiB before, {memory_held} KiB \
         while held, {} KiB after",
        CAP - SLOW + 20,
        resident_kib()
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}
