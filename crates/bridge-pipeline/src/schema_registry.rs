//! A client of a schema registry speaking Confluent's REST API (Confluent
//! Schema Registry, Redpanda, Apicurio's compatibility API, Karapace).
//!
//! With `SCHEMA_REGISTRY_URL` set, the pipeline registers the newest schema
//! of each topic's event under the TopicNameStrategy subject
//! (`<topic>-value`) when it starts, and writes its events in Confluent's
//! wire format with the ids it was given. Consumers read both framings; the
//! schema of an id they have not seen (written by another producer) is
//! fetched once and kept, so the registry is asked once per id per process.
//!
//! Two endpoints are all this needs, over the HTTP client the account
//! services already use; a registry crate would bring a second Avro library
//! and HTTP stack beside ours.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bridge_codec::{
    schema_text_of, Event, FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated,
};
use serde::Deserialize;

use crate::Topics;

/// The media type of the registry's API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

pub struct SchemaRegistry {
    client: reqwest::Client,
    base_url: String,
    /// Topic → id of the schema we write to it, set once by `register`.
    ids: OnceLock<HashMap<String, u32>>,
}

/// Why the writer schema of a payload could not be made known.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The registry could not be asked (down, timed out, 5xx): try again.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct Registered {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaById {
    schema: String,
}

impl SchemaRegistry {
    pub fn new(base_url: &str, timeout_ms: u64) -> Self {
        // Building fails only if the TLS backend cannot start; the default
        // client then fails each call with that reason, which is reported.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self { client, base_url: base_url.trim_end_matches('/').to_owned(), ids: OnceLock::new() }
    }

    /// Registers the schema of every topic we write (idempotent at the
    /// registry: the same schema gets the same id) and teaches the codec
    /// those ids. A registry that refuses a schema as incompatible stops the
    /// process: writing events its consumers cannot read is worse.
    pub async fn register(&self, topics: &Topics) -> Result<()> {
        if self.ids.get().is_some() {
            return Ok(());
        }
        let mut ids = HashMap::new();
        for (topic, schema) in [
            (topics.requested(), schema_text_of::<TransferRequested>()),
            (topics.validated(), schema_text_of::<TransferValidated>()),
            (topics.withdrawn(), schema_text_of::<FundsWithdrawn>()),
            (topics.deposited(), schema_text_of::<FundsDeposited>()),
            (topics.status(), schema_text_of::<TransferStatusChanged>()),
        ] {
            let subject = format!("{topic}-value");
            let id = self.register_subject(&subject, schema).await?;
            bridge_codec::learn_schema(id, schema).map_err(anyhow::Error::msg)?;
            tracing::info!(subject = %subject, id, "Schema registered");
            ids.insert(topic, id);
        }
        let _ = self.ids.set(ids);
        Ok(())
    }

    async fn register_subject(&self, subject: &str, schema: &str) -> Result<u32> {
        let url = format!("{}/subjects/{}/versions", self.base_url, urlencode(subject));
        let response = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&serde_json::json!({ "schema": schema }))
            .send()
            .await
            .with_context(|| format!("Failed to reach the schema registry at {url}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("The schema registry refused the schema of {subject} ({status}): {body}");
        }
        Ok(response.json::<Registered>().await.context("The schema registry's answer has no id")?.id)
    }

    /// The id to frame events written to `topic` with, once registered.
    pub fn id_for(&self, topic: &str) -> Option<u32> {
        self.ids.get()?.get(topic).copied()
    }

    /// Makes sure the codec knows the writer schema of `payload` if it is
    /// in Confluent's wire format: fetched by id once, then kept. An id the
    /// registry does not have is left unknown, and the decoder then
    /// dead-letters the message as `unknown_schema_id`.
    pub async fn learn_writer(&self, payload: &[u8]) -> Result<(), LookupError> {
        let Some(id) = bridge_codec::confluent_schema_id(payload) else { return Ok(()) };
        if bridge_codec::knows_schema_id(id) {
            return Ok(());
        }
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let response = self
            .client
            .get(&url)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .send()
            .await
            .map_err(|error| LookupError::Unavailable(error.to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            tracing::warn!(id, "Schema id unknown to the registry");
            return Ok(());
        }
        if !status.is_success() {
            return Err(LookupError::Unavailable(format!("GET {url}: {status}")));
        }
        let body: SchemaById = response.json().await.map_err(|error| LookupError::Unavailable(error.to_string()))?;
        if let Err(error) = bridge_codec::learn_schema(id, &body.schema) {
            // Not an Avro record schema (a JSON or Protobuf subject): the
            // decoder will not find the id and dead-letters the message.
            tracing::warn!(id, error = %error, "Schema from the registry is not one we can read");
        }
        Ok(())
    }

    /// Encodes `event` for `topic`: Confluent's wire format under the id
    /// registered for the topic. `None` if the topic has no id (not
    /// registered yet).
    pub fn encode<T: Event>(&self, topic: &str, event: &T) -> Option<Result<Vec<u8>, bridge_codec::EncodeError>> {
        let id = self.id_for(topic)?;
        Some(bridge_codec::encode_confluent(event, id))
    }
}

/// Subjects are topic names plus `-value`: letters, digits, `.`, `_`, `-`,
/// which need no escaping; anything else is percent-encoded.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
