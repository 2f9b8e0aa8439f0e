//! The console's manual-review pages and actions: the queue, the
//! resolution form and what it runs (through `stages::resolve`, exactly as
//! the API), four-eyes approval, and the steps pending at a service.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use bridge_domain::{Resolution, TransferState};
use bridge_pipeline::stages::resolve::{self, ResolutionRequest, ReviewError};
use bridge_store::console as store;
use bridge_store::reviews::{self, ActionStatus, ReviewAction};

use super::transfers::filled;
use super::{at, layout, money, page, page_error, unavailable, ConsoleForm, CsrfForm, Operator};
use crate::AppState;

pub(super) fn action_status(action: &ReviewAction) -> Markup {
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
pub(super) fn resolve_form(operator: &Operator, id: Uuid, frozen_in: Option<TransferState>) -> Markup {
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
