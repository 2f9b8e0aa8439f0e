//! The operator console: server-rendered pages under `/console` for the
//! people who run money movement day to day. No script at all: links,
//! forms and redirects do every interaction, so the Content-Security-Policy
//! forbids script outright.
//!
//! **Sign-in.** An API key with the `viewer`, `operator` or `admin` scope,
//! not bound to an investor, checked like a bearer key (throttled per
//! address and key prefix). The session is a random token in an HttpOnly,
//! SameSite=Strict cookie, `__Host-` and Secure unless the request came
//! over plain HTTP straight from this machine (the demo, a port-forward),
//! of which only the SHA-256 is kept (`console_sessions`). It ends after 8 hours, after 30
//! minutes unused, on sign-out, or when its key is revoked; its scopes are
//! the key's as they are now.
//!
//! **Acting.** `viewer` sees every page and every figure and gets no
//! forms. `operator` resolves manual reviews (four-eyes when configured),
//! redrives dead letters and notification deliveries and enables targets;
//! `admin` may do the last three as well (operations teams redrive and
//! re-enable as part of the day's work; creating and changing
//! subscriptions stays with the API's `admin`). Every form carries the
//! session's CSRF token; every POST must also come from this origin
//! (`Sec-Fetch-Site`, `Origin`). Every action, and every refused one, is
//! written to the audit log with the operator's name and what it touched,
//! and a resolution to the transfer's own history. A redrive sends exactly
//! the records its confirmation counted.
//!
//! **Secrets.** No page renders an API key, a credential, a webhook secret,
//! an investor's bank access or a sealed notification target (those are
//! stored redacted, and webhook and Slack URLs, in targets and in error
//! texts, are redacted again when shown).

mod operations;
mod overview;
mod reviews;
mod transfers;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use maud::{html, Markup, DOCTYPE};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::{Caller, Refused};
use crate::AppState;

/// The session cookie: `__Host-` (Secure, whole host, no Domain: a sibling
/// subdomain cannot plant one) whenever the console is reached over TLS,
/// the plain name only over plain HTTP from this machine.
const COOKIE_SECURE: &str = "__Host-bridge_console";
const COOKIE_PLAIN: &str = "bridge_console";
const SESSION_LIFETIME_SECS: i64 = 8 * 3600;
const SESSION_IDLE_SECS: i64 = 30 * 60;

/// No script, no framing, styles and images from here only, forms posted
/// here only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const STYLESHEET: &str = include_str!("console.css");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(overview::overview))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/console.css", get(stylesheet))
        .route("/console/transfers", get(transfers::search))
        .route("/console/transfers/{id}", get(transfers::transfer))
        .route("/console/transfers/{id}/resolve", post(reviews::resolve))
        .route("/console/resolutions/{id}/approve", post(reviews::approve))
        .route("/console/resolutions/{id}/reject", post(reviews::reject))
        .route("/console/reviews", get(reviews::reviews))
        .route("/console/pending", get(reviews::pending))
        .route("/console/dead-letters", get(operations::dead_letter_topics))
        .route("/console/dead-letters/{topic}", get(operations::dead_letters))
        .route("/console/dead-letters/{topic}/redrive", get(operations::redrive_confirm).post(operations::redrive))
        .route("/console/notifications", get(operations::notifications))
        .route("/console/notifications/{id}/enable", post(operations::enable))
        .route("/console/notifications/redrive", post(operations::redrive_deliveries))
        // Forms are a few fields.
        .layer(axum::extract::DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::from_fn(guard))
}

/// Security headers on every console response, and the same-origin check
/// on every POST (before any handler reads the body).
async fn guard(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.method() == Method::POST && !same_origin(request.headers()) {
        return page_error(StatusCode::FORBIDDEN, "Refused", "This form was not sent from the console.");
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Not `no-referrer`: under it a browser sends `Origin: null` with a
    // form, and the same-origin check could not tell the console's own.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A browser says where a request comes from: `Sec-Fetch-Site` (every
/// current browser) and `Origin` (on every POST). Either, when present,
/// must say this site.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            origin_host.is_some_and(|origin_host| origin_host.eq_ignore_ascii_case(host))
        }
        (Some(_), None) => false,
        (None, _) => true,
    }
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLESHEET).into_response()
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The session token, from the cookie of this request's kind (see
/// [`cookie_secure`]).
fn session_cookie(headers: &HeaderMap, secure: bool) -> Option<String> {
    let wanted = if secure { COOKIE_SECURE } else { COOKIE_PLAIN };
    headers.get_all(header::COOKIE).iter().filter_map(|value| value.to_str().ok()).find_map(|cookies| {
        cookies.split(';').find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == wanted && !value.is_empty()).then(|| value.to_owned())
        })
    })
}

/// Whether the session cookie must be `Secure`: always, except for plain
/// HTTP straight from this machine (the demo, a port-forward), which a
/// browser would otherwise refuse. A request that came through a proxy
/// (`X-Forwarded-For`, `Forwarded`) is not taken for a local one; the
/// proxy's `X-Forwarded-Proto` (its first value) says how the browser
/// reached it.
fn cookie_secure(headers: &HeaderMap, extensions: &axum::http::Extensions) -> bool {
    if let Some(proto) = headers.get("x-forwarded-proto").and_then(|value| value.to_str().ok()) {
        return !proto.split(',').next().unwrap_or_default().trim().eq_ignore_ascii_case("http");
    }
    let proxied = headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED);
    let local = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .is_some_and(|info| info.0.ip().is_loopback());
    proxied || !local
}

fn set_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let cookie = if secure {
        format!("{COOKIE_SECURE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}; Secure")
    } else {
        format!("{COOKIE_PLAIN}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}")
    };
    HeaderValue::from_str(&cookie).expect("cookie characters are base64url")
}

/// A signed-in person: the key they signed in with, and their session's
/// CSRF token.
pub(crate) struct Operator {
    pub caller: Caller,
    pub csrf: String,
    token_hash: Vec<u8>,
    peer: String,
}

impl Operator {
    fn has(&self, scope: &str) -> bool {
        self.caller.scopes.iter().any(|held| held == scope)
    }

    /// Resolves manual reviews.
    pub fn may_resolve(&self) -> bool {
        self.has("operator")
    }

    /// Redrives dead letters and notifications, enables targets.
    pub fn may_operate(&self) -> bool {
        self.has("operator") || self.has("admin")
    }

    /// How the review store names this person (as the API does, so
    /// four-eyes tells the same key apart the same way).
    pub fn reviewer(&self) -> bridge_store::reviews::Operator {
        bridge_store::reviews::Operator { id: format!("key:{}", self.caller.key_id), name: self.caller.name.clone() }
    }

    /// The form's token matches the session's (constant time).
    fn csrf_matches(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(self.csrf.as_bytes()))
    }

    /// Lets an action through when the form carries the session's CSRF
    /// token and `allowed` (the person's scopes permit it); a refusal is
    /// audited like the action would have been.
    pub async fn may(
        &self,
        state: &AppState,
        presented_csrf: &str,
        allowed: bool,
        action: &str,
        target: &str,
    ) -> Result<(), Response> {
        if !self.csrf_matches(presented_csrf) {
            self.audit(state, action, target, "refused: wrong CSRF token").await;
            return Err(page_error(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form has expired; reload the page and try again.",
            ));
        }
        if !allowed {
            self.audit(state, action, target, "refused: scope").await;
            return Err(not_allowed());
        }
        Ok(())
    }

    /// Writes an action to the audit log, whatever its outcome.
    pub async fn audit(&self, state: &AppState, action: &str, target: &str, outcome: &str) {
        let recorded = match state.ctx.pool.acquire().await {
            Ok(mut conn) => {
                bridge_store::audit::record(
                    &mut conn,
                    &self.caller.name,
                    &format!("console {action}"),
                    target,
                    &self.peer,
                    outcome,
                )
                .await
            }
            Err(error) => Err(error.into()),
        };
        if let Err(error) = recorded {
            tracing::error!(error = %error, actor = self.caller.name, action, target, "Could not write the audit record");
        }
    }
}

fn may_sign_in(scopes: &[String], investor_account_id: Option<&str>) -> bool {
    investor_account_id.is_none()
        && scopes.iter().any(|scope| ["viewer", "operator", "admin"].contains(&scope.as_str()))
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let signed_out = || {
            if parts.method == Method::GET || parts.method == Method::HEAD {
                Redirect::to("/console/login").into_response()
            } else {
                page_error(StatusCode::FORBIDDEN, "Signed out", "Your session has ended; sign in again.")
            }
        };
        let secure = cookie_secure(&parts.headers, &parts.extensions);
        let Some(token) = session_cookie(&parts.headers, secure) else { return Err(signed_out()) };
        let hash = token_hash(&token);
        let found = match state.ctx.pool.acquire().await {
            Ok(mut conn) => bridge_store::console::session(&mut conn, &hash, SESSION_IDLE_SECS).await,
            Err(error) => Err(error.into()),
        };
        let session = match found {
            Ok(Some(session)) => session,
            Ok(None) => return Err(signed_out()),
            Err(error) => {
                tracing::warn!(error = %error, "Console session lookup failed");
                return Err(unavailable());
            }
        };
        if !may_sign_in(&session.key.scopes, session.key.investor_account_id.as_deref()) {
            return Err(signed_out());
        }
        crate::auth::limit(state, &session.key.id)
            .map_err(|_| page_error(StatusCode::TOO_MANY_REQUESTS, "Slow down", "Too many requests; wait a moment."))?;
        Ok(Operator {
            caller: Caller::of_key(session.key),
            csrf: session.csrf_token,
            token_hash: hash,
            peer: crate::peer_address(&parts.extensions),
        })
    }
}

/// A form body. One that does not decode (a field missing or malformed)
/// is refused with a console page rather than axum's plain-text rejection.
pub(crate) struct ConsoleForm<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ConsoleForm<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Form::<T>::from_request(request, state).await {
            Ok(Form(value)) => Ok(Self(value)),
            Err(rejection) => Err(page_error(
                rejection.status(),
                "Not done",
                "This form is damaged or incomplete; reload the page and try again.",
            )),
        }
    }
}

/// A query string, refused like a form when it does not decode.
pub(crate) struct ConsoleQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ConsoleQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(page_error(rejection.status(), "Not found", "This address is malformed.")),
        }
    }
}

/// A moment as operators read it: UTC to the second.
pub(crate) fn at(moment: chrono::DateTime<chrono::Utc>) -> String {
    moment.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An amount in major units with its currency.
pub(crate) fn money(amount_minor: i64, currency: &str) -> String {
    bridge_domain::format_major(amount_minor, currency)
}

/// A notification target as it may be shown: webhook and Slack URLs
/// redacted whatever is stored (rows from before they were sealed hold
/// the whole URL).
pub(crate) fn shown_target(channel: &str, target: &str) -> String {
    match channel {
        "webhook" | "slack" => bridge_notify::outbound::redacted(target),
        _ => target.to_owned(),
    }
}

/// An error text as it may be shown: any URL in it redacted.
pub(crate) fn scrubbed(text: &str) -> String {
    bridge_notify::outbound::redact_urls(text)
}

/// `value` as a query parameter's value.
pub(crate) fn query_value(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// A state as a badge: its name is the text, the colour only repeats it.
pub(crate) fn state_badge(state: &str) -> Markup {
    let known = bridge_domain::TransferState::parse(state).map(|state| state.as_str()).unwrap_or("unknown");
    html! { span class={ "state state-" (known) } { (state) } }
}

/// The whole page around `content`.
pub(crate) fn layout(title: &str, operator: Option<&Operator>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Bridge console" }
                link rel="stylesheet" href="/console/console.css";
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    span class="brand" { "Bridge" }
                    @if let Some(operator) = operator {
                        nav aria-label="Console" {
                            ul {
                                li { a href="/console" { "Overview" } }
                                li { a href="/console/transfers" { "Transfers" } }
                                li { a href="/console/reviews" { "Manual review" } }
                                li { a href="/console/pending" { "Pending steps" } }
                                li { a href="/console/dead-letters" { "Dead letters" } }
                                li { a href="/console/notifications" { "Notifications" } }
                            }
                        }
                        form class="signout" method="post" action="/console/logout" {
                            span { "Signed in as " strong { (operator.caller.name) } " (" (operator.caller.scopes.join(", ")) ")" }
                            input type="hidden" name="csrf" value=(operator.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (content)
                }
            }
        }
    }
}

pub(crate) fn page(status: StatusCode, markup: Markup) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], markup.into_string()).into_response()
}

pub(crate) fn page_error(status: StatusCode, title: &str, detail: &str) -> Response {
    page(
        status,
        layout(
            title,
            None,
            html! {
                p role="alert" class="notice error" { (detail) }
                p { a href="/console" { "Back to the console" } }
            },
        ),
    )
}

pub(crate) fn unavailable() -> Response {
    page_error(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "The database or the broker did not answer; try again.")
}

/// The refusal for a person whose scopes do not allow an action.
pub(crate) fn not_allowed() -> Response {
    page_error(StatusCode::FORBIDDEN, "Not allowed", "Your key's scopes do not allow this action.")
}

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    signed_out: Option<String>,
}

async fn login_page(ConsoleQuery(query): ConsoleQuery<LoginQuery>) -> Response {
    page(StatusCode::OK, login_form(query.signed_out.as_ref().map(|_| "You have signed out."), None))
}

fn login_form(notice: Option<&str>, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            @if let Some(notice) = notice { p role="status" class="notice" { (notice) } }
            @if let Some(error) = error { p role="alert" class="notice error" { (error) } }
            form method="post" action="/console/login" class="login" {
                label for="api_key" { "API key" }
                input id="api_key" name="api_key" type="password" autocomplete="off" required
                    aria-describedby="api_key_help";
                p id="api_key_help" class="help" {
                    "A key with the viewer, operator or admin scope, as "
                    code { "bridge keys create" } " printed it."
                }
                button type="submit" { "Sign in" }
            }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    api_key: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    ConsoleForm(form): ConsoleForm<LoginForm>,
) -> Response {
    let peer = crate::peer_address(&extensions);
    let refused = |status, error: &str| page(status, login_form(None, Some(error)));
    let key = match crate::auth::check_api_key(&state, &peer, form.api_key.trim()).await {
        Ok(key) => key,
        Err(Refused::Throttled(wait)) => {
            let mut response = refused(StatusCode::TOO_MANY_REQUESTS, "Too many failed sign-ins; wait a minute.");
            let seconds = HeaderValue::from_str(&wait.as_secs().max(1).to_string()).expect("digits");
            response.headers_mut().insert(header::RETRY_AFTER, seconds);
            return response;
        }
        Err(Refused::Invalid) => return refused(StatusCode::UNAUTHORIZED, "That key is not valid."),
        Err(Refused::Unavailable) => return unavailable(),
    };
    if !may_sign_in(&key.scopes, key.investor_account_id.as_deref()) {
        return refused(StatusCode::FORBIDDEN, "That key has none of the viewer, operator or admin scopes.");
    }
    let token = random_token();
    let csrf = random_token();
    let started = match state.ctx.pool.acquire().await {
        Ok(mut conn) => {
            let started = bridge_store::console::start_session(
                &mut conn,
                &token_hash(&token),
                key.id,
                &csrf,
                &peer,
                SESSION_LIFETIME_SECS,
            )
            .await;
            if started.is_ok() {
                let name = format!("{} (brk_{})", key.name, key.prefix);
                let _ = bridge_store::audit::record(&mut conn, &name, "console sign-in", "", &peer, "ok").await;
            }
            started
        }
        Err(error) => Err(error.into()),
    };
    if let Err(error) = started {
        tracing::warn!(error = %error, "Console session not stored");
        return unavailable();
    }
    let mut response = Redirect::to("/console").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&token, SESSION_LIFETIME_SECS, cookie_secure(&headers, &extensions)));
    response
}

/// A form that carries nothing but the session's CSRF token.
#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    pub csrf: String,
}

/// Signs out. A session that has already ended (expired, revoked) only
/// has its cookie cleared.
async fn logout(
    State(state): State<AppState>,
    operator: Result<Operator, Response>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Response {
    if let Ok(operator) = operator {
        if !operator.csrf_matches(&form.csrf) {
            return page_error(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form has expired; reload the page and try again.",
            );
        }
        let ended = match state.ctx.pool.acquire().await {
            Ok(mut conn) => bridge_store::console::end_session(&mut conn, &operator.token_hash).await,
            Err(error) => Err(error.into()),
        };
        if ended.is_err() {
            return unavailable();
        }
        operator.audit(&state, "sign-out", "", "ok").await;
    }
    let mut response = Redirect::to("/console/login?signed_out=1").into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0, cookie_secure(&headers, &extensions)));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn posts_from_other_sites_are_refused() {
        assert!(same_origin(&headers(&[("host", "ops.example.com"), ("origin", "https://ops.example.com")])));
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[("host", "ops.example.com"), ("origin", "https://evil.example")])));
        assert!(!same_origin(&headers(&[("host", "ops.example.com"), ("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("host", "ops.example.com"), ("sec-fetch-site", "same-site")])));
        assert!(!same_origin(&headers(&[("host", "ops.example.com"), ("origin", "null")])));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let found = session_cookie(&headers(&[("cookie", "a=1; bridge_console=tok-en_1; b=2")]), false);
        assert_eq!(found.as_deref(), Some("tok-en_1"));
        assert_eq!(session_cookie(&headers(&[("cookie", "bridge_console=")]), false), None);
        assert_eq!(session_cookie(&headers(&[("cookie", "xbridge_console=1")]), false), None);
        // Over TLS only the __Host- cookie counts: a plain one could have
        // been planted by a sibling subdomain.
        assert_eq!(session_cookie(&headers(&[("cookie", "bridge_console=planted")]), true), None);
        let found = session_cookie(&headers(&[("cookie", "__Host-bridge_console=real")]), true);
        assert_eq!(found.as_deref(), Some("real"));
    }

    #[test]
    fn the_cookie_is_secure_unless_plain_http_from_this_machine() {
        let from = |ip: [u8; 4]| {
            let mut extensions = axum::http::Extensions::new();
            extensions.insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((ip, 40_000))));
            extensions
        };
        let (local, remote) = (from([127, 0, 0, 1]), from([10, 1, 2, 3]));
        assert!(!cookie_secure(&headers(&[]), &local));
        assert!(cookie_secure(&headers(&[]), &remote));
        assert!(cookie_secure(&headers(&[("x-forwarded-for", "203.0.113.9")]), &local));
        assert!(cookie_secure(&headers(&[("x-forwarded-proto", "https")]), &local));
        assert!(cookie_secure(&headers(&[("x-forwarded-proto", "https, http")]), &local));
        assert!(!cookie_secure(&headers(&[("x-forwarded-proto", "http")]), &local));
        assert!(set_cookie("t", 60, true).to_str().unwrap().starts_with("__Host-bridge_console=t; Path=/;"));
    }

    #[test]
    fn only_people_who_may_read_everything_sign_in() {
        let scopes = |list: &[&str]| list.iter().map(|scope| (*scope).to_owned()).collect::<Vec<_>>();
        assert!(may_sign_in(&scopes(&["viewer"]), None));
        assert!(may_sign_in(&scopes(&["operator"]), None));
        assert!(!may_sign_in(&scopes(&["operator"]), Some("ana")));
        assert!(!may_sign_in(&scopes(&["transfers:read", "transfers:write"]), None));
    }
}
