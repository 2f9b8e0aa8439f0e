//! The console's transfer pages: the overview, the search, a transfer's
//! whole story on one timeline, the manual-review queue with its
//! resolutions, and the steps waiting at a service.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use bridge_domain::{ids, Resolution, Step, TransferState};
use bridge_pipeline::stages::resolve::{self, ResolutionRequest, ReviewError};
use bridge_store::console::{self as store, Search};
use bridge_store::reviews::{self, ActionStatus, ReviewAction};

use super::{
    at, layout, money, page, page_error, query_value, scrubbed, shown_target, state_badge, unavailable, ConsoleForm,
    ConsoleQuery, CsrfForm, Operator,
};
use crate::AppState;

/// The completion rate covers this many hours.
const RATE_HOURS: i64 = 3;
/// How long a dead-letter topic must stay quiet to count as read (the
/// overview reads every one).
const DEAD_LETTER_IDLE_MS: u64 = 250;

pub(crate) async fn overview(State(state): State<AppState>, operator: Operator) -> Response {
    let figures = async {
        let mut conn = state.ctx.pool.acquire().await?;
        store::overview(&mut conn, RATE_HOURS).await
    };
    let lag = stage_lag(&state);
    let dead_letters = bridge_pipeline::dead_letters::summary(&state.ctx.config, DEAD_LETTER_IDLE_MS);
    let (figures, lag, dead_letters) = tokio::join!(figures, lag, dead_letters);
    let Ok(figures) = figures else { return unavailable() };
    let content = html! {
        div class="cards" {
            section class="card" aria-labelledby="states" {
                h2 id="states" { "Transfers per state" }
                table {
                    thead { tr { th scope="col" { "State" } th scope="col" class="num" { "Transfers" } } }
                    tbody {
                        @for (name, count) in &figures.states {
                            tr {
                                td { a href={ "/console/transfers?state=" (name) } { (state_badge(name)) } }
                                td class="num" { (count) }
                            }
                        }
                        @if figures.states.is_empty() { tr { td colspan="2" { "No transfers yet." } } }
                    }
                }
            }
            section class="card" aria-labelledby="attention" {
                h2 id="attention" { "Needs attention" }
                dl {
                    dt { a href="/console/reviews" { "Manual reviews waiting" } }
                    dd { (figures.reviews_waiting) }
                    dt { a href="/console/pending" { "Steps pending at a service" } }
                    dd {
                        @for (bucket, count) in &figures.pending_by_deadline {
                            span class={ "bucket" @if bucket == "overdue" && *count > 0 { " warn" } } { (count) " " (bucket) } " "
                        }
                    }
                    dt { "Outbox backlog" }
                    dd { (figures.outbox_unpublished) " rows, oldest " (figures.outbox_oldest_age_secs) " s" }
                    dt { a href="/console/notifications?status=dead" { "Notification deliveries given up on" } }
                    dd { (figures.deliveries_dead) }
                }
            }
            section class="card" aria-labelledby="lag" {
                h2 id="lag" { "Consumer lag per stage" }
                @if !state.ctx.config.group_prefix.is_empty() { p class="help" { "Groups named after the prefix " code { (state.ctx.config.group_prefix) } } }
                @match &lag {
                    Ok(stages) => table {
                        thead { tr { th scope="col" { "Stage" } th scope="col" { "Group" } th scope="col" class="num" { "Messages behind" } } }
                        tbody {
                            @for stage in stages {
                                tr { td { (stage.stage) } td { code { (unprefixed(&stage.group, &state.ctx.config.group_prefix)) } } td class="num" { (stage.lag) } }
                            }
                        }
                    },
                    Err(error) => p class="notice error" { "The broker did not answer: " (error) },
                }
            }
            section class="card" aria-labelledby="dlq" {
                h2 id="dlq" { "Dead letters per topic" }
                @if !state.ctx.config.topics.prefix.is_empty() { p class="help" { "Topics named after the prefix " code { (state.ctx.config.topics.prefix) } } }
                @match &dead_letters {
                    Ok(topics) => table {
                        thead { tr { th scope="col" { "Topic" } th scope="col" class="num" { "Records" } } }
                        tbody {
                            @for topic in topics {
                                tr {
                                    td { a href={ "/console/dead-letters/" (topic.topic) } { (unprefixed(&topic.topic, &state.ctx.config.topics.prefix)) } }
                                    td class="num" { (topic.records) }
                                }
                            }
                        }
                    },
                    Err(error) => p class="notice error" { "The broker did not answer: " (format!("{error:#}")) },
                }
            }
            section class="card" aria-labelledby="targets" {
                h2 id="targets" { "Notification targets failing or disabled" }
                @if figures.troubled_targets.is_empty() {
                    p { "Every target is enabled and delivering." }
                } @else {
                    ul {
                        @for target in &figures.troubled_targets {
                            li {
                                a href="/console/notifications" { (target.channel) " " (shown_target(&target.channel, &target.target)) }
                                " — "
                                @if !target.enabled { strong { "disabled" } @if let Some(why) = &target.disabled_reason { " (" (scrubbed(why)) ")" } }
                                @if let Some(since) = target.failing_since { " failing since " (at(since)) }
                            }
                        }
                    }
                }
            }
        }
        section class="card wide" aria-labelledby="rate" {
            h2 id="rate" { "Completed per minute, last " (RATE_HOURS) " hours" }
            (rate_chart(&figures.completed_per_minute))
        }
    };
    page(StatusCode::OK, layout("Overview", Some(&operator), content))
}

/// A topic or group name without the deployment's prefix, which the
/// overview names once.
fn unprefixed<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

async fn stage_lag(state: &AppState) -> Result<Vec<bridge_pipeline::lag::StageLag>, String> {
    let reader = state.console_lag.get_or_init(|| {
        bridge_pipeline::lag::LagReader::new(&state.ctx.config)
            .map(std::sync::Arc::new)
            .map_err(|error| format!("{error:#}"))
    });
    let reader = reader.clone()?;
    tokio::task::spawn_blocking(move || reader.read(Duration::from_secs(3)).map_err(|error| format!("{error:#}")))
        .await
        .map_err(|error| error.to_string())?
}

/// Completions per minute as bars (an SVG drawn here: no script, no
/// inline style), with the same figures in words for screen readers.
fn rate_chart(per_minute: &[(DateTime<Utc>, i64)]) -> Markup {
    let minutes = (RATE_HOURS * 60) as usize;
    let now = Utc::now();
    let start = now - chrono::Duration::minutes(minutes as i64);
    let mut bars = vec![0i64; minutes];
    for (minute, count) in per_minute {
        let index = (*minute - start).num_minutes();
        if (0..minutes as i64).contains(&index) {
            bars[index as usize] += count;
        }
    }
    let peak = bars.iter().copied().max().unwrap_or(0);
    let total: i64 = bars.iter().sum();
    let last_minute = bars.last().copied().unwrap_or(0);
    let (width, height) = (minutes as i64 * 4, 120i64);
    let summary = format!(
        "{total} transfers completed in the last {RATE_HOURS} hours; at most {peak} in a minute; {last_minute} in the last minute."
    );
    html! {
        p id="rate-summary" { (summary) }
        svg class="chart" role="img" aria-labelledby="rate-summary" viewBox={ "0 0 " (width) " " (height + 16) }
            preserveAspectRatio="none" {
            @for (index, count) in bars.iter().enumerate() {
                @if *count > 0 {
                    @let bar = (count * height / peak.max(1)).max(1);
                    rect x=(index as i64 * 4) y=(height - bar) width="3" height=(bar) { title { (count) } }
                }
            }
            line x1="0" y1=(height) x2=(width) y2=(height) class="axis";
            text x="0" y=(height + 14) class="label" { (start.format("%H:%M")) }
            text x=(width) y=(height + 14) class="label end" { (now.format("%H:%M UTC")) }
        }
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct SearchQuery {
    #[serde(default)]
    id: String,
    #[serde(default)]
    investor: String,
    #[serde(default)]
    fund: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    reason: String,
    /// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (a datetime-local field), UTC.
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

fn when(text: &str) -> Result<Option<DateTime<Utc>>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(moment) = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M") {
        return Ok(Some(moment.and_utc()));
    }
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(Some(day.and_hms_opt(0, 0, 0).expect("midnight").and_utc()));
    }
    Err(format!("{text:?} is not a date (YYYY-MM-DD) or a time (YYYY-MM-DDTHH:MM)"))
}

fn filled(text: &str) -> Option<String> {
    Some(text.trim().to_owned()).filter(|text| !text.is_empty())
}

const SEARCH_LIMIT: i64 = 200;

pub(crate) async fn search(
    State(state): State<AppState>,
    operator: Operator,
    ConsoleQuery(query): ConsoleQuery<SearchQuery>,
) -> Response {
    let mut problems = Vec::new();
    let id = match filled(&query.id).map(|id| id.parse::<Uuid>()) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            problems.push(format!("{:?} is not a transfer id", query.id.trim()));
            None
        }
    };
    let state_filter = filled(&query.state);
    if let Some(name) = &state_filter {
        if TransferState::parse(name).is_err() {
            problems.push(format!("{name:?} is not a state"));
        }
    }
    let (from, to) = (when(&query.from), when(&query.to));
    for problem in [&from, &to].into_iter().filter_map(|parsed| parsed.as_ref().err()) {
        problems.push(problem.clone());
    }
    let filter = Search {
        id,
        investor: filled(&query.investor),
        fund: filled(&query.fund),
        state: state_filter,
        reason: filled(&query.reason).map(|reason| reason.to_ascii_uppercase()),
        from: from.ok().flatten(),
        to: to.ok().flatten(),
    };
    let found = if problems.is_empty() {
        let searched = async {
            let mut conn = state.ctx.pool.acquire().await?;
            store::search(&mut conn, &filter, SEARCH_LIMIT).await
        };
        match searched.await {
            Ok(found) => found,
            Err(_) => return unavailable(),
        }
    } else {
        Vec::new()
    };
    let content = html! {
        form method="get" action="/console/transfers" class="search" role="search" {
            label { "Transfer id" input name="id" value=(query.id) size="36"; }
            label { "Investor account" input name="investor" value=(query.investor); }
            label { "Fund or fund account" input name="fund" value=(query.fund); }
            label { "State"
                select name="state" {
                    option value="" { "any" }
                    @for candidate in TransferState::ALL {
                        option value=(candidate.as_str()) selected[query.state == candidate.as_str()] { (candidate.as_str()) }
                    }
                }
            }
            label { "Reason code" input name="reason" value=(query.reason); }
            label { "Created from (UTC)" input name="from" type="datetime-local" value=(query.from); }
            label { "Created before (UTC)" input name="to" type="datetime-local" value=(query.to); }
            button type="submit" { "Search" }
        }
        @for problem in &problems { p role="alert" class="notice error" { (problem) } }
        @if problems.is_empty() {
            p role="status" {
                (found.len()) " transfer" @if found.len() != 1 { "s" } ", newest first"
                @if found.len() as i64 == SEARCH_LIMIT { " (the first " (SEARCH_LIMIT) "; narrow the search)" } "."
            }
            (transfer_table(&found))
        }
    };
    page(StatusCode::OK, layout("Transfers", Some(&operator), content))
}

fn transfer_table(found: &[bridge_store::transfers::Transfer]) -> Markup {
    html! {
        table class="list" {
            thead {
                tr {
                    th scope="col" { "Transfer" } th scope="col" { "State" } th scope="col" { "Reason" }
                    th scope="col" { "Investor" } th scope="col" { "Fund account" } th scope="col" class="num" { "Amount" }
                    th scope="col" { "Requested" }
                }
            }
            tbody {
                @for transfer in found {
                    tr {
                        td { a href={ "/console/transfers/" (transfer.id) } { code { (transfer.id) } } }
                        td { (state_badge(transfer.state.as_str())) }
                        td { (transfer.reason_code.as_deref().unwrap_or("")) }
                        td { (transfer.investor_account_id) }
                        td { (transfer.fund_account_id) }
                        td class="num" { (money(transfer.amount_minor, &transfer.currency)) }
                        td { (at(transfer.requested_at)) }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct Notice {
    #[serde(default)]
    notice: Option<String>,
}

/// Fixed texts for what an action came to, named in the redirect (a
/// query parameter never puts its own words on the page).
fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "resolved" => "The resolution ran; the timeline shows what it did.",
        "awaiting-approval" => "The resolution waits for a second operator's approval.",
        "approved" => "Approved: the resolution ran.",
        "rejected" => "The resolution was turned down.",
        "not-applied" => "The resolution ran and changed nothing; the resolutions below say why.",
        _ => return None,
    })
}

/// One entry of a transfer's timeline.
struct Entry {
    at: DateTime<Utc>,
    kind: &'static str,
    markup: Markup,
}

pub(crate) async fn transfer(
    State(state): State<AppState>,
    operator: Operator,
    Path(id): Path<String>,
    ConsoleQuery(notice): ConsoleQuery<Notice>,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return page_error(StatusCode::NOT_FOUND, "Not found", "That is not a transfer id.");
    };
    let read = async {
        use bridge_store::{ledger, transfers};
        let mut conn = state.ctx.pool.acquire().await?;
        let Some(transfer) = transfers::get(&mut conn, id).await? else { return Ok(None) };
        let frozen_in = match transfer.state {
            TransferState::ManualReview => transfers::frozen_from(&mut conn, id).await?,
            _ => None,
        };
        let history = transfers::history(&mut conn, id).await?;
        let ledger = ledger::of_transfer(&mut conn, id).await?;
        let resolutions = reviews::of_transfer(&mut conn, id).await?;
        let pending = store::pending_steps_of(&mut conn, id).await?;
        let events = store::events_of(&mut conn, id).await?;
        let deliveries = store::deliveries_of(&mut conn, id).await?;
        Ok::<_, bridge_store::Error>(Some((
            transfer,
            frozen_in,
            history,
            ledger,
            resolutions,
            pending,
            events,
            deliveries,
        )))
    };
    let (transfer, frozen_in, history, ledger, resolutions, pending, events, deliveries) = match read.await {
        Ok(Some(found)) => found,
        Ok(None) => return page_error(StatusCode::NOT_FOUND, "Not found", "There is no such transfer."),
        Err(_) => return unavailable(),
    };

    let mut timeline: Vec<Entry> = Vec::new();
    for version in &history {
        let actor = match &version.actor {
            Some(actor) => html! { "by " strong { (actor.name) } @if !actor.note.is_empty() { ": “" (actor.note) "”" }
            @if let Some(reference) = &actor.external_reference { " (reference " code { (reference) } ")" } },
            None => {
                html! { "by the pipeline (" (stage_of(version.previous_state, version.state, version.reason_code.as_deref())) ")" }
            }
        };
        timeline.push(Entry {
            at: version.recorded_at,
            kind: "version",
            markup: html! {
                "Version " (version.version) ": "
                @if let Some(previous) = version.previous_state { (state_badge(previous.as_str())) " → " }
                (state_badge(version.state.as_str()))
                @if let Some(reason) = &version.reason_code { " " span class="reason" { (reason) } }
                " " (actor)
            },
        });
    }
    for line in &ledger {
        timeline.push(Entry {
            at: line.created_at,
            kind: "ledger",
            markup: html! { "Ledger, " (line.step) ": " (line.direction) " " code { (line.account) } " " (money(line.amount_minor, &line.currency)) },
        });
    }
    for step in &pending {
        timeline.push(Entry {
            at: step.created_at,
            kind: "pending",
            markup: html! {
                "The " (step.step) " is pending at the service: asked " (step.attempts) " times, last answer "
                (step.last_status) ", next ask " (at(step.next_run_at))
                @if let Some(deadline) = step.deadline_at { ", deadline " (at(deadline)) }
            },
        });
    }
    for action in &resolutions {
        timeline.push(Entry {
            at: action.requested_at,
            kind: "resolution",
            markup: html! {
                "Resolution " strong { (action.action.as_str()) } @if action.new_attempt { strong { " under a new idempotency key" } }
                " asked by " strong { (action.requested_by) }
                ": “" (action.reason) "”" @if let Some(reference) = &action.reference { " (reference " code { (reference) } ")" }
                " — " (action_status(action))
            },
        });
    }
    for event in &events {
        timeline.push(Entry {
            at: event.received_at,
            kind: "event",
            markup: html! { "Status event v" (event.version) " (" (event.state) ") received from the status topic" },
        });
    }
    for delivery in &deliveries {
        timeline.push(Entry {
            at: delivery.finished_at.unwrap_or(delivery.created_at),
            kind: "delivery",
            markup: html! {
                "Notification of v" (delivery.version) " (" (delivery.state) ") over " (delivery.channel) " to "
                code { (shown_target(&delivery.channel, &delivery.target)) } ": " strong { (delivery.status) } " after " (delivery.attempts) " attempt"
                @if delivery.attempts != 1 { "s" }
                @if let Some(error) = &delivery.last_error { " — last error: " (scrubbed(error)) }
            },
        });
    }
    timeline.sort_by_key(|entry| entry.at);

    let awaiting: Vec<&ReviewAction> =
        resolutions.iter().filter(|action| action.status == ActionStatus::AwaitingApproval).collect();
    let content = html! {
        @if let Some(text) = notice.notice.as_deref().and_then(notice_text) { p role="status" class="notice" { (text) } }
        dl class="facts" {
            dt { "Transfer" } dd { code { (transfer.id) } }
            dt { "State" } dd { (state_badge(transfer.state.as_str()))
                @if let Some(reason) = &transfer.reason_code { " " span class="reason" { (reason) } }
                @if let Some(frozen) = frozen_in { " (froze in " (frozen.as_str()) ")" } }
            dt { "Amount" } dd { (money(transfer.amount_minor, &transfer.currency)) }
            dt { "Investor account" } dd { a href={ "/console/transfers?investor=" (query_value(&transfer.investor_account_id)) } { (transfer.investor_account_id) } }
            dt { "Fund account" } dd { a href={ "/console/transfers?fund=" (query_value(&transfer.fund_account_id)) } { (transfer.fund_account_id) }
                @if let Some(fund) = &transfer.fund_id { " (fund " (fund) ")" } }
            dt { "Reference" } dd { (transfer.reference) }
            dt { "Source" } dd { (transfer.source_system) }
            dt { "Requested" } dd { (at(transfer.requested_at)) }
            dt { "Version" } dd { (transfer.version) }
        }
        @if transfer.state == TransferState::ManualReview {
            section aria-labelledby="resolve" {
                h2 id="resolve" { "Resolve" }
                @if !operator.may_resolve() {
                    p { "Resolving takes the operator scope." }
                } @else if !awaiting.is_empty() {
                    p { "A resolution waits for approval (below); another may be asked once it is decided." }
                } @else if frozen_in.is_none() {
                    p class="notice error" { "Its history does not say where it froze; resolve it with " code { "bridge review" } "." }
                } @else {
                    (resolve_form(&operator, transfer.id, frozen_in))
                }
            }
        }
        @if !awaiting.is_empty() {
            section aria-labelledby="approvals" {
                h2 id="approvals" { "Waiting for approval" }
                @for action in &awaiting {
                    div class="approval" {
                        p id={ "resolution-" (action.id) } {
                            strong { (action.action.as_str()) }
                            @if action.new_attempt {
                                strong class="warn" { " under a new idempotency key" }
                                " (the service is asked to cancel the first operation; if it had settled, nothing new is asked)"
                            }
                            " asked by " strong { (action.requested_by) } " at " (at(action.requested_at))
                            " against version " (action.review_version)
                            ": “" (action.reason) "”" @if let Some(reference) = &action.reference { " (reference " code { (reference) } ")" } }
                        @if operator.may_resolve() {
                            form method="post" action={ "/console/resolutions/" (action.id) "/approve" } class="inline" {
                                input type="hidden" name="csrf" value=(operator.csrf);
                                button type="submit" aria-describedby={ "resolution-" (action.id) } { "Approve and run" }
                            }
                            form method="post" action={ "/console/resolutions/" (action.id) "/reject" } class="inline" {
                                input type="hidden" name="csrf" value=(operator.csrf);
                                label { "Why turn it down" input name="reason" required maxlength="500"; }
                                button type="submit" aria-describedby={ "resolution-" (action.id) } { "Turn down" }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="timeline" {
            h2 id="timeline" { "Timeline" }
            ol class="timeline" {
                @for entry in &timeline {
                    li class={ "entry " (entry.kind) } {
                        time datetime=(entry.at.to_rfc3339()) { (at(entry.at)) }
                        span class="kind" { (entry.kind) }
                        span { (entry.markup) }
                    }
                }
            }
        }
        section aria-labelledby="operations" {
            h2 id="operations" { "Operations at the services" }
            p class="help" { "Each step is asked under an idempotency key made from the transfer, the step and the attempt; the same key always gets the same answer." }
            table {
                thead { tr { th scope="col" { "Step" } th scope="col" { "Idempotency keys" } th scope="col" { "Where it stands" } } }
                tbody {
                    @for step in Step::ALL {
                        @let posted = ledger.iter().any(|line| line.step == step.as_str());
                        @let waiting = pending.iter().find(|pending| pending.step == step.as_str());
                        @let asked = posted || waiting.is_some() || reached(&history, step);
                        @if asked {
                            tr {
                                td { (step.as_str()) }
                                td { @for attempt in 0..=transfer.step_attempt { code { (ids::idempotency_key(transfer.id, step, attempt)) } br; } }
                                td {
                                    @if posted { "settled (in the ledger)" }
                                    @else if let Some(waiting) = waiting { "pending, asked " (waiting.attempts) " times" }
                                    @else { "asked; not settled (see the timeline)" }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="events" {
            h2 id="events" { "Status events as published" }
            @if events.is_empty() { p { "The notifier has not received any yet." } }
            @for event in &events {
                details {
                    summary { "v" (event.version) " " (event.state) " — " code { (event.event_id) } }
                    pre { (serde_json::to_string_pretty(&event.event).unwrap_or_default()) }
                }
            }
        }
    };
    page(StatusCode::OK, layout(&format!("Transfer {}", short(transfer.id)), Some(&operator), content))
}

fn short(id: Uuid) -> String {
    id.to_string()[..8].to_owned()
}

/// Whether the transfer's history shows the step was asked for: a money
/// step is asked when the transfer enters the state before it.
fn reached(history: &[bridge_store::transfers::TransferVersion], step: Step) -> bool {
    let states: Vec<TransferState> = history.iter().map(|version| version.state).collect();
    match step {
        Step::Withdrawal => states.contains(&TransferState::Validated),
        Step::Deposit => states.contains(&TransferState::Withdrawn),
        Step::Refund => states.contains(&TransferState::Reversed),
    }
}

/// Which part of the pipeline made a version that names no actor (the
/// settlement runner, callbacks and operators name themselves): the stage
/// that makes that move, or the runner's deadline policy by its reason.
fn stage_of(previous: Option<TransferState>, state: TransferState, reason: Option<&str>) -> &'static str {
    use TransferState::*;
    if reason.is_some_and(|reason| reason.ends_with("_DEADLINE_PASSED") || reason.ends_with("_ATTEMPTS_EXHAUSTED")) {
        return "settlement runner, deadline policy";
    }
    match (previous, state) {
        (None, _) => "intake: the validator, or the API",
        (Some(Requested), _) => "validator",
        (Some(Validated), _) => "withdrawal stage",
        (Some(Withdrawn), _) => "deposit stage",
        (Some(Deposited), _) => "completion stage",
        _ => "pipeline",
    }
}

fn action_status(action: &ReviewAction) -> Markup {
    html! {
        @match action.status {
            ActionStatus::AwaitingApproval => strong { "waiting for approval" },
            ActionStatus::Running => strong { "running" },
            ActionStatus::Done => { strong { "done" } @if let Some(state) = &action.result_state { ", now " (state) } }
            ActionStatus::NotApplied => { strong { "changed nothing" } @if let Some(outcome) = &action.outcome { ": " (outcome) } }
            ActionStatus::Rejected => { strong { "turned down" } @if let Some(outcome) = &action.outcome { ": " (outcome) } }
        }
        @if let Some(approver) = &action.approved_by { "; approved by " strong { (approver) } }
    }
}

/// The resolutions that apply where the transfer froze, with what each
/// does.
fn resolve_form(operator: &Operator, id: Uuid, frozen_in: Option<TransferState>) -> Markup {
    let choices: &[(&str, &str)] = match frozen_in {
        Some(TransferState::Validated) => &[
            ("retry", "Retry the withdrawal (same key; or a new attempt below)"),
            ("fail", "Fail it: release the held funds and the reservation"),
        ],
        _ => &[
            ("retry", "Retry the deposit (same key; or a new attempt below)"),
            ("complete", "Complete: the fund administrator confirmed the deposit outside Bridge"),
            ("refunded", "Refunded outside Bridge: the investor got the money back"),
            ("fail", "Fail it: refund the investor through the bank"),
        ],
    };
    html! {
        form method="post" action={ "/console/transfers/" (id) "/resolve" } class="resolve" {
            input type="hidden" name="csrf" value=(operator.csrf);
            input type="hidden" name="form_key" value=(Uuid::new_v4());
            fieldset {
                legend { "Action" }
                @for (index, (value, text)) in choices.iter().enumerate() {
                    div { input type="radio" name="action" id={ "action-" (value) } value=(value) required checked[index == 0];
                        label for={ "action-" (value) } { (text) } }
                }
            }
            div { input type="checkbox" name="new_attempt" id="new_attempt" value="true";
                label for="new_attempt" { "Retry under a new idempotency key (the service voided the first operation)" } }
            label for="reason" { "Reason (kept in the history)" }
            textarea id="reason" name="reason" required maxlength="500" rows="2" {}
            label for="reference" { "Reference of the outside operation (required to complete or record a refund)" }
            input id="reference" name="reference" maxlength="500";
            button type="submit" { "Resolve" }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ResolveForm {
    csrf: String,
    form_key: String,
    action: String,
    reason: String,
    #[serde(default)]
    reference: String,
    #[serde(default)]
    new_attempt: Option<String>,
}

fn review_refused(error: ReviewError) -> Response {
    let detail = error.to_string();
    let status = match error {
        ReviewError::UnknownTransfer(_) | ReviewError::UnknownAction(_) => StatusCode::NOT_FOUND,
        ReviewError::Invalid(_) | ReviewError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        ReviewError::SameOperator(_) => StatusCode::FORBIDDEN,
        ReviewError::NotInReview(_)
        | ReviewError::NotApplicable { .. }
        | ReviewError::Conflict { .. }
        | ReviewError::NotAwaiting(_) => StatusCode::CONFLICT,
        ReviewError::Store(_) | ReviewError::Stage(_) => {
            tracing::warn!(error = %detail, "Console review request failed");
            return unavailable();
        }
    };
    page_error(status, "Not done", &detail)
}

fn after(action: &ReviewAction, done: &'static str) -> &'static str {
    match action.status {
        ActionStatus::AwaitingApproval => "awaiting-approval",
        ActionStatus::Done | ActionStatus::Running => done,
        ActionStatus::NotApplied => "not-applied",
        ActionStatus::Rejected => "rejected",
    }
}

pub(crate) async fn resolve(
    State(state): State<AppState>,
    operator: Operator,
    Path(id): Path<Uuid>,
    ConsoleForm(form): ConsoleForm<ResolveForm>,
) -> Response {
    let target = format!("transfer:{id}");
    let action = format!("resolve {}", form.action.chars().take(20).collect::<String>());
    if let Err(response) = operator.may(&state, &form.csrf, operator.may_resolve(), &action, &target).await {
        return response;
    }
    let Ok(form_key) = form.form_key.trim().parse::<Uuid>() else {
        return page_error(StatusCode::BAD_REQUEST, "Not done", "This form is damaged; reload the page.");
    };
    let Ok(resolution) = form.action.parse::<Resolution>() else {
        return page_error(StatusCode::UNPROCESSABLE_ENTITY, "Not done", "Choose retry, fail, refunded or complete.");
    };
    let texts = [form.reason.as_str(), form.reference.as_str()];
    if texts.iter().any(|text| text.chars().count() > 500 || !bridge_domain::text::is_visible(text.trim())) {
        return page_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not done",
            "Reason and reference must be at most 500 characters without control or invisible characters.",
        );
    }
    let asked = ResolutionRequest {
        resolution,
        reason: form.reason.trim().to_owned(),
        reference: filled(&form.reference),
        new_attempt: form.new_attempt.as_deref() == Some("true"),
        // One form, one resolution: sending it twice (a reload, a double
        // click) asks once.
        idempotency_key: Some(format!("{}:console:{form_key}", operator.caller.key_id)),
    };
    match resolve::request(&state.ctx, id, &asked, &operator.reviewer(), state.config.review_approvals).await {
        Ok(done) => {
            let notice = after(&done.action, "resolved");
            operator.audit(&state, &action, &target, notice).await;
            Redirect::to(&format!("/console/transfers/{id}?notice={notice}")).into_response()
        }
        Err(error) => {
            operator.audit(&state, &action, &target, &format!("refused: {error}")).await;
            review_refused(error)
        }
    }
}

pub(crate) async fn approve(
    State(state): State<AppState>,
    operator: Operator,
    Path(id): Path<Uuid>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Response {
    let target = format!("resolution:{id}");
    if let Err(response) = operator.may(&state, &form.csrf, operator.may_resolve(), "approve resolution", &target).await
    {
        return response;
    }
    match resolve::approve(&state.ctx, id, &operator.reviewer()).await {
        Ok(done) => {
            let notice = after(&done.action, "approved");
            let transfer = format!("transfer:{}", done.action.transfer_id);
            operator.audit(&state, &format!("approve resolution {id}"), &transfer, notice).await;
            Redirect::to(&format!("/console/transfers/{}?notice={notice}", done.action.transfer_id)).into_response()
        }
        Err(error) => {
            operator.audit(&state, "approve resolution", &target, &format!("refused: {error}")).await;
            review_refused(error)
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct RejectForm {
    csrf: String,
    reason: String,
}

pub(crate) async fn reject(
    State(state): State<AppState>,
    operator: Operator,
    Path(id): Path<Uuid>,
    ConsoleForm(form): ConsoleForm<RejectForm>,
) -> Response {
    let target = format!("resolution:{id}");
    if let Err(response) =
        operator.may(&state, &form.csrf, operator.may_resolve(), "turn down resolution", &target).await
    {
        return response;
    }
    let reason = form.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 || !bridge_domain::text::is_visible(reason) {
        return page_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not done",
            "Say why in at most 500 characters, without control or invisible characters.",
        );
    }
    match resolve::reject(&state.ctx, id, &operator.reviewer(), reason).await {
        Ok(action) => {
            let transfer = format!("transfer:{}", action.transfer_id);
            operator.audit(&state, &format!("turn down resolution {id}"), &transfer, "rejected").await;
            Redirect::to(&format!("/console/transfers/{}?notice=rejected", action.transfer_id)).into_response()
        }
        Err(error) => {
            operator.audit(&state, "turn down resolution", &target, &format!("refused: {error}")).await;
            review_refused(error)
        }
    }
}

pub(crate) async fn reviews(State(state): State<AppState>, operator: Operator) -> Response {
    let waiting = async { reviews::waiting(&mut *state.ctx.pool.acquire().await?, 1_000).await };
    let Ok(waiting) = waiting.await else { return unavailable() };
    let content = html! {
        p role="status" { (waiting.len()) " transfer" @if waiting.len() != 1 { "s" } " waiting for a person, oldest first." }
        table class="list" {
            thead {
                tr {
                    th scope="col" { "Transfer" } th scope="col" { "Why" } th scope="col" { "Froze in" }
                    th scope="col" { "Investor" } th scope="col" { "Fund account" } th scope="col" class="num" { "Amount" }
                    th scope="col" { "Waiting since" } th scope="col" { "Resolution" }
                }
            }
            tbody {
                @for review in &waiting {
                    tr {
                        td { a href={ "/console/transfers/" (review.transfer_id) } { code { (review.transfer_id) } } }
                        td { span class="reason" { (review.reason_code.as_deref().unwrap_or("")) } }
                        td { (review.frozen_in.as_deref().unwrap_or("")) }
                        td { (review.investor_account_id) }
                        td { (review.fund_account_id) }
                        td class="num" { (money(review.amount_minor, &review.currency)) }
                        td { (at(review.since)) }
                        td { @if review.open_action.is_some() { "under way or awaiting approval" } @else { "none yet" } }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, layout("Manual review", Some(&operator), content))
}

pub(crate) async fn pending(State(state): State<AppState>, operator: Operator) -> Response {
    let steps = async { store::pending_steps(&mut *state.ctx.pool.acquire().await?, 500).await };
    let Ok(steps) = steps.await else { return unavailable() };
    let now = Utc::now();
    let content = html! {
        p role="status" { (steps.len()) " step" @if steps.len() != 1 { "s" } " waiting at a service, nearest deadline first." }
        table class="list" {
            thead {
                tr {
                    th scope="col" { "Transfer" } th scope="col" { "Step" } th scope="col" class="num" { "Times asked" }
                    th scope="col" { "Last answer" } th scope="col" { "Next ask" } th scope="col" { "Deadline" }
                }
            }
            tbody {
                @for (transfer, step) in &steps {
                    tr {
                        td { a href={ "/console/transfers/" (transfer) } { code { (transfer) } } }
                        td { (step.step) }
                        td class="num" { (step.attempts) }
                        td { (step.last_status) }
                        td { (at(step.next_run_at)) }
                        td {
                            @match step.deadline_at {
                                Some(deadline) if deadline <= now => strong class="warn" { "overdue since " (at(deadline)) },
                                Some(deadline) => (at(deadline)),
                                None => "none",
                            }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, layout("Pending steps", Some(&operator), content))
}
