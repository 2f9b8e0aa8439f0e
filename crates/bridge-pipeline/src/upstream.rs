//! What an upstream system does: publish a transfer request with the key and
//! header conventions of the request topic. Used by `bridge submit`, the demo,
//! the tests and the benchmark, so they all speak exactly as a client would.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{SecondsFormat, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use bridge_codec::{encode, Event, TransferRequested};

use crate::message::TraceContext;
use crate::Topics;

/// Publishes `request` to the request topic, key = transfer id, CloudEvents
/// headers in binary mode and a fresh `traceparent`, and waits for the
/// broker's acknowledgement.
pub async fn publish_request(producer: &FutureProducer, topics: &Topics, request: &TransferRequested) -> Result<()> {
    publish_signed_request(producer, topics, request, None).await
}

/// [`publish_request`], signed as `source` with its secret when given (see
/// `sources.rs`).
pub async fn publish_signed_request(
    producer: &FutureProducer,
    topics: &Topics,
    request: &TransferRequested,
    signer: Option<(&str, &bridge_webhooks::Secret)>,
) -> Result<()> {
    let payload = encode(request).context("Failed to encode request")?;
    let mut headers = request_headers(request);
    if let Some((source, secret)) = signer {
        let now = Utc::now().timestamp();
        headers.extend(crate::sources::signature_headers(source, secret, &request.transfer_id, &payload, now));
    }
    publish_raw(producer, &topics.requested(), Some(request.transfer_id.as_bytes()), &payload, &headers).await
}

pub fn request_headers(request: &TransferRequested) -> Vec<(String, Vec<u8>)> {
    let trace = TraceContext::continue_or_start(None);
    vec![
        ("ce_specversion".into(), b"1.0".to_vec()),
        ("ce_id".into(), Uuid::new_v4().to_string().into_bytes()),
        ("ce_type".into(), TransferRequested::CE_TYPE.as_bytes().to_vec()),
        ("ce_source".into(), format!("/upstream/{}", request.source_system).into_bytes()),
        ("ce_subject".into(), request.transfer_id.as_bytes().to_vec()),
        ("ce_time".into(), Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true).into_bytes()),
        ("content-type".into(), bridge_codec::CONTENT_TYPE.as_bytes().to_vec()),
        ("traceparent".into(), trace.child_traceparent().into_bytes()),
    ]
}

/// Publishes arbitrary bytes, for tools and tests that need to send what a
/// misbehaving client might.
pub async fn publish_raw(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &[(String, Vec<u8>)],
) -> Result<()> {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        owned = owned.insert(Header { key: name, value: Some(value) });
    }
    let mut record = FutureRecord::to(topic).payload(payload).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .with_context(|| format!("Failed to publish to {topic}"))?;
    Ok(())
}
