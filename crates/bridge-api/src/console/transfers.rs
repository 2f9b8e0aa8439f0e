//! The console's transfer pages: the search, and a transfer's whole story
//! on one timeline.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use bridge_domain::{ids, Step, TransferState};
use bridge_store::console::{self as store, Search};
use bridge_store::reviews::{self, ActionStatus, ReviewAction};

use super::reviews::{action_status, resolve_form};
use super::{
    at, layout, money, page, page_error, query_value, scrubbed, shown_target, state_badge, unavailable, ConsoleQuery,
    Operator,
};
use crate::AppState;

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

pub(super) fn filled(text: &str) -> Option<String> {
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
