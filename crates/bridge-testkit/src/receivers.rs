//! Real local receivers for notification tests: an HTTP server that records
//! what it receives and fails on command, and an SMTP sink.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    /// What the receiver answered.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }
}

/// How the HTTP receiver behaves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Behaviour {
    /// Answer 503 to this many requests first.
    pub fail_first: u32,
    /// Answer 500 to everything.
    pub always_fail: bool,
    /// Wait this long before answering.
    pub delay_ms: u64,
}

pub struct HttpReceiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    token: CancellationToken,
}

impl HttpReceiver {
    pub async fn start(behaviour: Behaviour) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let failures = Arc::new(AtomicU32::new(0));
        let log = received.clone();
        let app = Router::new().route(
            "/{*path}",
            post(move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let (log, failures) = (log.clone(), failures.clone());
                async move {
                    if behaviour.delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(behaviour.delay_ms)).await;
                    }
                    let status = if behaviour.always_fail {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else if failures.fetch_add(1, Ordering::SeqCst) < behaviour.fail_first {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    log.lock().expect("receiver log").push(Received {
                        path: uri.path().to_owned(),
                        headers: headers
                            .iter()
                            .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or_default().to_owned()))
                            .collect(),
                        body: body.to_vec(),
                        at: Instant::now(),
                        status: status.as_u16(),
                    });
                    (status, "{}")
                }
            }),
        );
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await
        });
        Ok(Self { url, received, token })
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("receiver log").clone()
    }

    /// The requests answered 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.received().into_iter().filter(|request| request.status < 300).collect()
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A message the SMTP sink accepted.
#[derive(Clone, Debug)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

/// Speaks enough SMTP (RFC 5321) for a client to hand over messages, and
/// keeps them.
pub struct SmtpSink {
    pub port: u16,
    mails: Arc<Mutex<Vec<Mail>>>,
    token: CancellationToken,
}

impl SmtpSink {
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mails: Arc<Mutex<Vec<Mail>>> = Arc::default();
        let token = CancellationToken::new();
        let (store, stop) = (mails.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = session(stream, store).await;
                });
            }
        });
        Ok(Self { port, mails, token })
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().expect("mailbox").clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn session(stream: tokio::net::TcpStream, store: Arc<Mutex<Vec<Mail>>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 sink ESMTP\r\n").await?;
    let (mut from, mut to) = (String::new(), Vec::new());
    while let Some(line) = lines.next_line().await? {
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") || upper.starts_with("RSET") {
            b"250 OK\r\n"
        } else if let Some(address) = upper.strip_prefix("MAIL FROM:").map(|_| &line[10..]) {
            from = address.trim().trim_matches(['<', '>']).to_owned();
            to.clear();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            to.push(line[8..].trim().trim_matches(['<', '>']).to_owned());
            b"250 OK\r\n"
        } else if upper.starts_with("DATA") {
            write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
            let mut data = String::new();
            while let Some(line) = lines.next_line().await? {
                if line == "." {
                    break;
                }
                // Dot-stuffing (RFC 5321 4.5.2).
                data.push_str(line.strip_prefix('.').filter(|_| line.starts_with("..")).unwrap_or(&line));
                data.push('\n');
            }
            store.lock().expect("mailbox").push(Mail { from: from.clone(), to: to.clone(), data });
            b"250 OK queued\r\n"
        } else if upper.starts_with("QUIT") {
            write.write_all(b"221 Bye\r\n").await?;
            return Ok(());
        } else {
            b"502 Command not implemented\r\n"
        };
        write.write_all(reply).await?;
    }
    Ok(())
}
