//! A schema registry for tests that speaks the part of Confluent's REST API
//! producers and consumers use, with its status codes and error bodies:
//! register a schema under a subject (the same schema gets the same id, in
//! any subject), fetch a schema by id, list subjects and versions. It can be
//! made unavailable (503) and made to refuse new versions of a subject as
//! incompatible (409), as a real registry does under BACKWARD compatibility.
//! Like a production registry it can be locked down: every request needs
//! HTTP basic credentials (401 without), and the application's user may be
//! read-only (403 on registration) while an admin user may write. It also
//! looks a schema up under a subject and checks a schema's compatibility
//! with a subject's latest version (BACKWARD: the new schema must read data
//! written with the latest).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
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
    /// Users (name → (password, may write)); empty: no authentication.
    users: Mutex<BTreeMap<String, (String, bool)>>,
}

/// The user a request authenticated as, and whether it may write; `Err`
/// is the 401 to answer.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<bool, Box<Response>> {
    let users = shared.users.lock().expect("registry lock");
    if users.is_empty() {
        return Ok(true);
    }
    let unauthorized = || Box::new(error(StatusCode::UNAUTHORIZED, 401, "Unauthorized".to_owned()));
    let Some(encoded) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Basic "))
    else {
        return Err(unauthorized());
    };
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| unauthorized())?;
    let text = String::from_utf8(decoded).map_err(|_| unauthorized())?;
    let (user, password) = text.split_once(':').ok_or_else(unauthorized)?;
    match users.get(user) {
        Some((expected, writer)) if expected == password => Ok(*writer),
        _ => Err(unauthorized()),
    }
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
            .route("/subjects/{subject}", post(look_up))
            .route("/subjects/{subject}/versions", post(register).get(versions))
            .route("/subjects/{subject}/versions/latest", get(latest))
            .route("/compatibility/subjects/{subject}/versions/latest", post(compatibility))
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

    /// Require basic authentication from now on; `writer` users may
    /// register schemas, the others only read.
    pub fn add_user(&self, name: &str, password: &str, writer: bool) {
        self.shared.users.lock().expect("registry lock").insert(name.to_owned(), (password.to_owned(), writer));
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

/// The common start of every handler: log the request, honour outages,
/// authenticate, and refuse writes by read-only users.
fn enter(shared: &Shared, headers: &HeaderMap, request: String, write: bool) -> Option<Response> {
    shared.store.lock().expect("registry lock").requests.push(request);
    if shared.unavailable.load(Ordering::SeqCst) {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            50003,
            "Error while forwarding the request to the leader".to_owned(),
        ));
    }
    match authenticate(shared, headers) {
        Err(response) => Some(*response),
        Ok(false) if write => {
            Some(error(StatusCode::FORBIDDEN, 40301, "User is denied operation Write on Subject".to_owned()))
        }
        Ok(_) => None,
    }
}

fn schema_of(body: &str) -> Result<String, Box<Response>> {
    let Some(schema) = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| value.get("schema").and_then(Value::as_str).map(str::to_owned))
    else {
        return Err(Box::new(error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema".to_owned())));
    };
    if serde_json::from_str::<Value>(&schema).is_err() {
        return Err(Box::new(error(StatusCode::UNPROCESSABLE_ENTITY, 42201, format!("Invalid schema {schema}"))));
    }
    Ok(schema)
}

async fn look_up(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    if let Some(refused) = enter(&shared, &headers, format!("POST /subjects/{subject}"), false) {
        return refused;
    }
    let schema = match schema_of(&body) {
        Ok(schema) => schema,
        Err(response) => return *response,
    };
    let store = shared.store.lock().expect("registry lock");
    let Some(ids) = store.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."));
    };
    match ids.iter().position(|id| same_schema(&store.schemas[*id as usize - 1], &schema)) {
        Some(index) => answer(
            StatusCode::OK,
            json!({ "subject": subject, "version": index + 1, "id": ids[index], "schema": schema }),
        ),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found".to_owned()),
    }
}

/// BACKWARD, as Confluent's default level: the new schema must read data
/// written with the subject's latest version.
async fn compatibility(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    if let Some(refused) =
        enter(&shared, &headers, format!("POST /compatibility/subjects/{subject}/versions/latest"), false)
    {
        return refused;
    }
    let schema = match schema_of(&body) {
        Ok(schema) => schema,
        Err(response) => return *response,
    };
    let store = shared.store.lock().expect("registry lock");
    let Some(latest) = store.subjects.get(&subject).and_then(|ids| ids.last()) else {
        return error(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found."));
    };
    let parsed =
        (apache_avro::Schema::parse_str(&store.schemas[*latest as usize - 1]), apache_avro::Schema::parse_str(&schema));
    let (Ok(writer), Ok(reader)) = parsed else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema".to_owned());
    };
    match apache_avro::schema_compatibility::SchemaCompatibility::can_read(&writer, &reader) {
        Ok(()) => answer(StatusCode::OK, json!({ "is_compatible": true })),
        Err(problem) => answer(StatusCode::OK, json!({ "is_compatible": false, "messages": [problem.to_string()] })),
    }
}

async fn register(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    if let Some(refused) = enter(&shared, &headers, format!("POST /subjects/{subject}/versions"), true) {
        return refused;
    }
    let schema = match schema_of(&body) {
        Ok(schema) => schema,
        Err(response) => return *response,
    };
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

async fn schema_by_id(State(shared): State<Arc<Shared>>, headers: HeaderMap, Path(id): Path<u32>) -> Response {
    if let Some(refused) = enter(&shared, &headers, format!("GET /schemas/ids/{id}"), false) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    match id.checked_sub(1).and_then(|index| store.schemas.get(index as usize)) {
        Some(schema) => answer(StatusCode::OK, json!({ "schema": schema })),
        None => error(StatusCode::NOT_FOUND, 40403, format!("Schema {id} not found")),
    }
}

async fn list_subjects(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(refused) = enter(&shared, &headers, "GET /subjects".to_owned(), false) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    answer(StatusCode::OK, json!(store.subjects.keys().collect::<Vec<_>>()))
}

async fn versions(State(shared): State<Arc<Shared>>, headers: HeaderMap, Path(subject): Path<String>) -> Response {
    if let Some(refused) = enter(&shared, &headers, format!("GET /subjects/{subject}/versions"), false) {
        return refused;
    }
    let store = shared.store.lock().expect("registry lock");
    match store.subjects.get(&subject) {
        Some(ids) => answer(StatusCode::OK, json!((1..=ids.len()).collect::<Vec<_>>())),
        None => error(StatusCode::NOT_FOUND, 40401, format!("Subject '{subject}' not found.")),
    }
}

async fn latest(State(shared): State<Arc<Shared>>, headers: HeaderMap, Path(subject): Path<String>) -> Response {
    if let Some(refused) = enter(&shared, &headers, format!("GET /subjects/{subject}/versions/latest"), false) {
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
