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
//! Production registries are often read-only to applications: with
//! auto-registration off, a process only looks its schemas up (and refuses
//! to start while one is missing), and the deployment registers them first
//! with `bridge schemas check` and `bridge schemas register`, which check
//! compatibility both ways (old readers of new data, new readers of old).
//!
//! A handful of endpoints are all this needs, over the HTTP client the account
//! services already use; a registry crate would bring a second Avro library
//! and HTTP stack beside ours.

use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use bridge_codec::{
    schema_text_of, Event, FundsDeposited, FundsWithdrawn, TransferRequested, TransferStatusChanged, TransferValidated,
};
use serde::Deserialize;

use crate::security::RegistryAuth;
use crate::Topics;

/// The media type of the registry's API.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

pub struct SchemaRegistry {
    /// The client, or why it could not be built (a CA file that does not
    /// read), reported by the first call.
    client: Result<reqwest::Client, String>,
    base_url: String,
    auth: RegistryAuth,
    /// Register our schemas (`true`) or only look them up.
    auto_register: bool,
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

#[derive(Deserialize)]
struct Compatibility {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
}

/// What `check` found for one subject.
#[derive(Debug)]
pub struct SubjectCheck {
    pub subject: String,
    /// The registry has no version of it yet (any schema is compatible).
    pub new_subject: bool,
    /// Incompatibilities: the registry's verdict under the subject's own
    /// compatibility level, and ours in both directions against its latest
    /// version (old readers must read new data, new readers old data).
    pub problems: Vec<String>,
}

/// The topics Bridge writes, each with the schema of its events.
fn our_subjects(topics: &Topics) -> [(String, &'static str); 5] {
    [
        (topics.requested(), schema_text_of::<TransferRequested>()),
        (topics.validated(), schema_text_of::<TransferValidated>()),
        (topics.withdrawn(), schema_text_of::<FundsWithdrawn>()),
        (topics.deposited(), schema_text_of::<FundsDeposited>()),
        (topics.status(), schema_text_of::<TransferStatusChanged>()),
    ]
}

impl SchemaRegistry {
    pub fn new(base_url: &str, timeout_ms: u64, auth: RegistryAuth, auto_register: bool) -> Self {
        let client = auth.client(timeout_ms).map_err(|error| format!("{error:#}"));
        Self { client, base_url: base_url.trim_end_matches('/').to_owned(), auth, auto_register, ids: OnceLock::new() }
    }

    fn request(&self, method: reqwest::Method, url: &str) -> Result<reqwest::RequestBuilder> {
        let client = self.client.as_ref().map_err(|error| anyhow::anyhow!("{error}"))?;
        self.auth.authorize(client.request(method, url).header(reqwest::header::ACCEPT, CONTENT_TYPE))
    }

    /// Learns the id of the schema of every topic we write and teaches the
    /// codec those ids: registering each (idempotent at the registry: the
    /// same schema gets the same id) or, in lookup-only mode, finding it
    /// among the subject's versions, where a deployment step put it with
    /// `bridge schemas register`. A registry that refuses a schema as
    /// incompatible, or lacks one in lookup-only mode, stops the process:
    /// writing events its consumers cannot read is worse.
    pub async fn register(&self, topics: &Topics) -> Result<()> {
        if self.ids.get().is_some() {
            return Ok(());
        }
        let mut ids = HashMap::new();
        for (topic, schema) in our_subjects(topics) {
            let subject = format!("{topic}-value");
            let id = if self.auto_register {
                self.register_subject(&subject, schema).await?
            } else {
                self.look_up(&subject, schema).await?
            };
            bridge_codec::learn_schema(id, schema).map_err(anyhow::Error::msg)?;
            tracing::info!(subject = %subject, id, "Schema id known");
            ids.insert(topic, id);
        }
        let _ = self.ids.set(ids);
        Ok(())
    }

    /// Registers every schema we write, whatever the mode (for
    /// `bridge schemas register`); the ids by subject.
    pub async fn register_all(&self, topics: &Topics) -> Result<Vec<(String, u32)>> {
        let mut registered = Vec::new();
        for (topic, schema) in our_subjects(topics) {
            let subject = format!("{topic}-value");
            registered.push((subject.clone(), self.register_subject(&subject, schema).await?));
        }
        Ok(registered)
    }

    /// POSTs `{"schema": ...}` to `url`.
    async fn post_schema(&self, url: &str, schema: &str) -> Result<reqwest::Response> {
        self.request(reqwest::Method::POST, url)?
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&serde_json::json!({ "schema": schema }))
            .send()
            .await
            .with_context(|| format!("Failed to reach the schema registry at {url}"))
    }

    async fn register_subject(&self, subject: &str, schema: &str) -> Result<u32> {
        let url = format!("{}/subjects/{}/versions", self.base_url, urlencode(subject));
        let response = self.post_schema(&url, schema).await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("The schema registry refused the schema of {subject} ({status}): {body}");
        }
        Ok(response.json::<Registered>().await.context("The schema registry's answer has no id")?.id)
    }

    /// The id of `schema` under `subject`, which must be registered already.
    async fn look_up(&self, subject: &str, schema: &str) -> Result<u32> {
        let url = format!("{}/subjects/{}", self.base_url, urlencode(subject));
        let response = self.post_schema(&url, schema).await?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            bail!(
                "The schema Bridge writes to {subject} is not registered, and this process may only look schemas up: \
                 register it first with `bridge schemas register` (after `bridge schemas check`)"
            );
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("The schema registry could not look up {subject} ({status}): {body}");
        }
        Ok(response.json::<Registered>().await.context("The schema registry's answer has no id")?.id)
    }

    /// Checks every schema we write against what the registry holds: its
    /// own verdict under each subject's compatibility level, and both
    /// directions against the latest version, whatever that level is.
    pub async fn check(&self, topics: &Topics) -> Result<Vec<SubjectCheck>> {
        let mut checks = Vec::new();
        for (topic, schema) in our_subjects(topics) {
            let subject = format!("{topic}-value");
            let latest_url = format!("{}/subjects/{}/versions/latest", self.base_url, urlencode(&subject));
            let latest = self
                .request(reqwest::Method::GET, &latest_url)?
                .send()
                .await
                .with_context(|| format!("Failed to reach the schema registry at {latest_url}"))?;
            if latest.status() == reqwest::StatusCode::NOT_FOUND {
                checks.push(SubjectCheck { subject, new_subject: true, problems: Vec::new() });
                continue;
            }
            if !latest.status().is_success() {
                let status = latest.status();
                bail!(
                    "The schema registry could not give {subject}'s latest version ({status}): {}",
                    latest.text().await.unwrap_or_default()
                );
            }
            let registered: SchemaById = latest.json().await.context("The registry's latest version has no schema")?;
            let mut problems = bridge_codec::compatibility_problems(&registered.schema, schema);
            let url = format!("{latest_url}?verbose=true").replace("/subjects/", "/compatibility/subjects/");
            let response = self.post_schema(&url, schema).await?;
            let status = response.status();
            if !status.is_success() {
                bail!(
                    "The schema registry could not check {subject} ({status}): {}",
                    response.text().await.unwrap_or_default()
                );
            }
            let verdict: Compatibility =
                response.json().await.context("The registry's compatibility answer is not valid")?;
            if !verdict.is_compatible {
                let detail = if verdict.messages.is_empty() {
                    String::new()
                } else {
                    format!(": {}", verdict.messages.join("; "))
                };
                problems.insert(
                    0,
                    format!("the registry finds it incompatible under the subject's compatibility level{detail}"),
                );
            }
            checks.push(SubjectCheck { subject, new_subject: false, problems });
        }
        Ok(checks)
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
            .request(reqwest::Method::GET, &url)
            .map_err(|error| LookupError::Unavailable(format!("{error:#}")))?
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
