//! A schema registry for tests that speaks the part of Confluent's REST API
//! producers and consumers use, with its status codes and error bodies:
//! register a schema under a subject (the same schema gets the same id, in
//! any subject), fetch a schema by id, list subjects and versions. It can be
//! made unavailable (503) and made to refuse new versions of a subject as
//! incompatible (409), as a real registry does under BACKWARD compatibility.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Store {
    /// Schema text by id (ids from 1, in registration order).
    schemas: Vec<String>,
    /// Subject → ids of its versions, oldest first.
    subjects: BTreeMap<String, Vec<u32>>,
    /// Every request, as "METHOD path".
    requests: Vec<String>,
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    unavailable: AtomicBool,
    refuse_new_versions: AtomicBool,
}

pub struct SchemaRegistryServer {
    pub url: String,
    shared: Arc<Shared>,
    token: CancellationToken,
}

const MEDIA_TYPE: &str = "application/vnd.schemaregistry.v1+json";

fn answer(status: StatusCode, body: Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, MEDIA_TYPE)], body.to_string()).into_response()
}

fn error(status: StatusCode, code: u32, message: String) -> Response {
    answer(status, json!({ "error_code": code, "message": message }))
}

/// Schemas are the same if they are the same JSON (Confluent compares a
/// normalised form; whitespace and key order must not make a new id).
fn same_schema(a: &str, b: &str) -> bool {
    match (serde_json::from_str::<Value>(a), serde_json::from_str::<Value>(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl SchemaRegistryServer {
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/subjects", get(list_subjects))
            .route("/subjects/{subject}/versions", post(register).get(versions))
            .route("/subjects/{subject}/versions/latest", get(latest))
            .route("/schemas/ids/{id}", get(schema_by_id))
            .with_state(shared.clone());
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        });
        Ok(Self { url, shared, token })
    }

    /// Answer 503 to everything while `unavailable`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Refuse a schema that would be a new version of an existing subject.
    pub fn refuse_new_versions(&self, refuse: bool) {
        self.shared.refuse_new_versions.store(refuse, Ordering::SeqCst);
    }

    /// Registers a schema as another producer would; returns its id.
    pub fn register_directly(&self, subject: &str, schema: &str) -> u32 {
        let mut store = self.shared.store.lock().expect("registry lock");
        add(&mut store, subject, schema)
    }

    /// Subjects and the ids of their versions.
    pub fn subjects(&self) -> BTreeMap<String, Vec<u32>> {
        self.shared.store.lock().expect("registry lock").subjects.clone()
    }

    /// Every request received so far, as "METHOD path".
    pub fn requests(&self) -> Vec<String> {
        self.shared.store.lock().expect("registry lock").requests.clone()
    }
}

impl Drop for SchemaRegistryServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn add(store: &mut Store, subject: &str, schema: &str) -> u32 {
    let id = match store.schemas.iter().position(|known| same_schema(known, schema)) {
        Some(index) => index as u32 + 1,
        None => {
            store.schemas.push(schema.to_owned());
            store.schemas.len() as u32
        }
    };
    let versions = store.subjects.entry(subject.to_owned()).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    id
}

/// The common start of every handler: log the request, honour outages.
fn enter(shared: &Shared, request: String) -> Option<Response> {
    shared.store.lock().expect("registry lock").requests.push(request);
    shared.unavailable.load(Ordering::SeqCst).then(|| {
        error(StatusCode::SERVICE_UNAVAILABLE, 50003, "Error while forwarding the request to the leader".to_owned())
    })
}

async fn register(State(shared): State<Arc<Shared>>, Path(subject): Path<String>, body: String) -> Response {
    if let Some(refused) = enter(&shared, format!("POST /subjects/{subject}/versions")) {
        return refused;
    }
    let Some(schema) = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|value| value.get("schema").and_then(Value::as_str).map(str::to_owned))
    else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema".to_owned());
    };
    if serde_json::from_str::<Value>(&schema).is_err() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, format!("Invalid schema {schema}"));
    }
    let mut store = shared.store.lock().expect("registry lock");
    let existing = store.subjects.get(&subject).cloned().unwrap_or_default();
    let already = existing.iter().any(|id| same_schema(&store.schemas[*id as usize - 1], &schema));
    if !existing.is_empty() && !already && shared.refuse_new_versions.load(Ordering::SeqCst) {
        return error(
            StatusCode::CONFLICT,
            409,
            "Schema being registered is incompatible with an earlier schema for subject".to_owned(),
        );
    }
    let id = add(&mut store, &subject, &schema);
    answer(StatusCode::OK, json!({ "id": id }))
}

async fn schema_by_id(State(shared): State<Arc<Shared>>, Path(id): Path<u32>) -> Response {
    if let Some(refused) = enter(&shared, format!("GET /schemas/ids/{id}")) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    match id.checked_sub(1).and_then(|index| store.schemas.get(index as usize)) {
        Some(schema) => answer(StatusCode::OK, json!({ "schema": schema })),
        None => error(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")),
    }
}

async fn list_subjects(State(shared): State<Arc<Shared>>) -> Response {
    if let Some(refused) = enter(&shared, "GET /subjects".to_owned()) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    answer(StatusCode::OK, json!(store.subjects.keys().collect::<Vec<_>>()))
}

async fn versions(State(shared): State<Arc<Shared>>, Path(subject): Path<String>) -> Response {
    if let Some(refused) = enter(&shared, format!("GET /subjects/{subject}/versions")) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    match store.subjects.get(&subject) {
        Some(ids) => answer(StatusCode::OK, json!((1..=ids.len()).collect::<Vec<_>>())),
        None => error(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found.")),
    }
}

async fn latest(State(shared): State<Arc<Shared>>, Path(subject): Path<String>) -> Response {
    if let Some(refused) = enter(&shared, format!("GET /subjects/{subject}/versions/latest")) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    match store.subjects.get(&subject).and_then(|ids| ids.last().map(|id| (ids.len(), *id))) {
        Some((version, id)) => answer(
            StatusCode::OK,
            json!({ "subject": subject, "version": version, "id": id, "schema": store.schemas[id as usize - 1] }),
        ),
        None => error(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found.")),
    }
}
