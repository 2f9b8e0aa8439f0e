//! The HTTP server loop, with the limits a server facing the internet
//! needs: a client gets `header_read_timeout` to send a request's headers
//! (the first and each next one on a kept-alive connection, so an idle
//! connection is closed after it too), a handler gets `request_timeout`
//! (which bounds reading the body as well), and at most `connections_max`
//! connections are open at once. Past that cap a new connection is answered
//! 503 and closed at once: the process never reaches its file limit, and
//! the connections it holds keep being served.
//!
//! axum's own `serve` has none of these limits; hyper has them, so this is
//! hyper's connection builder behind a counting semaphore.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long in-flight requests may finish after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The answer to a connection over the cap.
fn refusal() -> &'static [u8] {
    static REFUSAL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    REFUSAL.get_or_init(|| {
        let body = r#"{"type":"about:blank","title":"Too many connections","status":503,"detail":"try again shortly"}"#;
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// The server's limits (settings `--api-header-read-timeout-ms`,
/// `--api-request-timeout-ms`, `--api-connections-max`).
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub connections_max: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_millis(defaults::HEADER_READ_TIMEOUT_MS),
            request_timeout: Duration::from_millis(defaults::REQUEST_TIMEOUT_MS),
            connections_max: defaults::CONNECTIONS_MAX,
        }
    }
}

pub mod defaults {
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
    pub const CONNECTIONS_MAX: usize = 1_000;
}

/// Serves `router` on `listener` within `limits` until `shutdown`, then
/// lets in-flight requests finish (for up to ten seconds).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: ServerLimits,
) -> std::io::Result<()> {
    let router = router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        limits.request_timeout,
    ));
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or the like: the connections
                    // held are still served; try again shortly.
                    tracing::warn!(error = %error, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            bridge_pipeline::metrics::api_connection_refused();
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(refusal())).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(request)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            bridge_pipeline::metrics::api_connections(1);
            if let Err(error) = watched.await {
                tracing::debug!(error = %error, peer = %peer, "API connection ended");
            }
            bridge_pipeline::metrics::api_connections(-1);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("API connections still open after the shutdown grace period");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_is_a_complete_http_response() {
        let text = std::str::from_utf8(super::refusal()).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|length| length.parse().ok())
            .expect("content-length");
        assert_eq!(length, body.len());
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok(), "{body}");
    }
}
