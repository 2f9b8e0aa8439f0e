//! OpenTelemetry traces, exported over OTLP/HTTP when configured with the
//! standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (`http/protobuf`, the default, or `http/json`), `OTEL_SERVICE_NAME`
//! (default `bridge`) and `OTEL_RESOURCE_ATTRIBUTES`.
//!
//! Every span of the process's logging becomes an OpenTelemetry span. A
//! consumer's `message` span takes the message's `traceparent` as its parent
//! and the events it writes carry its own span as theirs, so one trace holds
//! a transfer's whole journey: request, each stage, the notifier.

use std::sync::OnceLock;

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::WithHttpConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether traces are to be exported.
pub fn configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()))
}

/// The tracing layer that turns spans into exported OpenTelemetry spans, if
/// traces are configured.
pub fn layer<S>() -> Result<Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    if !configured() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingClient::default())
        .build()
        .context("Failed to build the OTLP span exporter")?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("bridge");
    }
    // The batch processor exports from a thread of its own, which is why
    // the HTTP client is a blocking one.
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    let tracer = provider.tracer("bridge");
    let _ = PROVIDER.set(provider);
    Ok(Some(tracing_opentelemetry::layer().with_tracer(tracer)))
}

/// Exports what is still buffered; called once before the process exits.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(error) = provider.shutdown() {
            eprintln!("Failed to flush traces: {error}");
        }
    }
}

/// The workspace's reqwest, blocking flavour, as the exporter's client. It
/// is made on first use, on the exporter's own thread: a blocking client
/// may be neither made nor dropped on an async runtime's thread.
#[derive(Debug, Default)]
struct BlockingClient(OnceLock<reqwest::blocking::Client>);

#[async_trait::async_trait]
impl HttpClient for BlockingClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.0.get_or_init(reqwest::blocking::Client::new);
        let (parts, body) = request.into_parts();
        let mut outgoing = client.request(parts.method, parts.uri.to_string()).body(body.to_vec());
        for (name, value) in &parts.headers {
            outgoing = outgoing.header(name, value);
        }
        let response = outgoing.send()?;
        let mut builder = Response::builder().status(response.status().as_u16());
        for (name, value) in response.headers() {
            builder = builder.header(name.as_str(), value.as_bytes());
        }
        Ok(builder.body(Bytes::from(response.bytes()?.to_vec()))?)
    }
}
