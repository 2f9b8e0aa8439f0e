//! The console's operations pages: dead-letter topics (records decoded
//! where they can be, redrive of one record or a range after a
//! confirmation) and notifications (targets with their health, deliveries
//! per status, redrive of dead deliveries, enabling a target).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::{html, Markup};
use serde::Deserialize;

use bridge_pipeline::dead_letters;
use bridge_pipeline::reader::{Bound, Range};
use bridge_store::notifications;

use super::{
    at, layout, not_allowed, page, page_error, scrubbed, shown_target, unavailable, ConsoleForm, ConsoleQuery,
    CsrfForm, Operator,
};
use crate::AppState;

/// How long a partition must stay quiet to count as read to its end.
const IDLE_MS: u64 = 1_000;
/// At most this many records on a page.
const SHOW_MAX: usize = 200;

pub(crate) async fn dead_letter_topics(State(state): State<AppState>, operator: Operator) -> Response {
    let Ok(topics) = dead_letters::summary(&state.ctx.config, IDLE_MS).await else { return unavailable() };
    let content = html! {
        p { "Records a stage or the notifier could not take, kept with their bytes and why. A redrive publishes them back to the topic they came from, where they go through the normal path again." }
        table class="list" {
            thead { tr { th scope="col" { "Topic" } th scope="col" class="num" { "Records" } th scope="col" { "By error class" } } }
            tbody {
                @for topic in &topics {
                    tr {
                        td { a href={ "/console/dead-letters/" (topic.topic) } { (topic.topic) } }
                        td class="num" { (topic.records) }
                        td { @for (class, count) in &topic.by_error_class { (class) ": " (count) " " } }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, layout("Dead letters", Some(&operator), content))
}

#[derive(Deserialize, Default)]
pub(crate) struct RangeQuery {
    #[serde(default)]
    partition: String,
    #[serde(default)]
    from_offset: String,
    #[serde(default)]
    to_offset: String,
    #[serde(default)]
    notice: Option<String>,
}

/// A range as the forms give it (empty fields: all partitions, from the
/// start, to the end).
struct Asked {
    partition: Option<i32>,
    from: Option<i64>,
    to: Option<i64>,
}

fn asked(query: &RangeQuery) -> Result<Asked, String> {
    fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<Option<T>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| format!("{what} must be a whole number, not {text:?}"))
    }
    let asked = Asked {
        partition: number(&query.partition, "partition")?,
        from: number(&query.from_offset, "the first offset")?,
        to: number(&query.to_offset, "the last offset")?,
    };
    if asked.partition.is_some_and(|partition| partition < 0)
        || asked.from.is_some_and(|offset| offset < 0)
        || asked.to.is_some_and(|offset| offset < 0)
    {
        return Err("partitions and offsets are not negative".to_owned());
    }
    if let (Some(from), Some(to)) = (asked.from, asked.to) {
        if from > to {
            return Err("the first offset is after the last".to_owned());
        }
    }
    Ok(asked)
}

/// The range's records appended before `before`: what a confirmation
/// counted stays what the redrive sends, whatever arrives meanwhile.
fn range(topic: &str, asked: &Asked, before: chrono::DateTime<Utc>) -> Range {
    Range {
        topic: topic.to_owned(),
        partitions: asked.partition.into_iter().collect(),
        from: asked.from.map(Bound::Offset),
        to: asked.to.map(Bound::Offset),
        idle_ms: IDLE_MS,
        appended_before: Some(before),
    }
}

fn describe_range(asked: &Asked) -> String {
    let partitions = asked.partition.map_or("every partition".to_owned(), |partition| format!("partition {partition}"));
    let from = asked.from.map_or("the first record".to_owned(), |offset| format!("offset {offset}"));
    let to = asked.to.map_or("the last record".to_owned(), |offset| format!("offset {offset}"));
    format!("{partitions}, from {from} to {to}")
}

fn ours(state: &AppState, topic: &str) -> Result<String, Response> {
    dead_letters::original_topic(&state.ctx.config, topic).map_err(|_| {
        page_error(StatusCode::NOT_FOUND, "Not found", "That is not a dead-letter topic of this pipeline.")
    })
}

pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    operator: Operator,
    Path(topic): Path<String>,
    ConsoleQuery(query): ConsoleQuery<RangeQuery>,
) -> Response {
    let original = match ours(&state, &topic) {
        Ok(original) => original,
        Err(response) => return response,
    };
    let asked = match asked(&query) {
        Ok(asked) => asked,
        Err(problem) => return page_error(StatusCode::BAD_REQUEST, "Not a range", &problem),
    };
    let mut records = Vec::new();
    let shown = dead_letters::show(&state.ctx.config, &range(&topic, &asked, Utc::now()), |record| {
        if records.len() < SHOW_MAX {
            records.push(record);
        }
        Ok(())
    })
    .await;
    let Ok(total) = shown else { return unavailable() };
    let history = async {
        let mut conn = state.ctx.pool.acquire().await?;
        bridge_store::console::audit_of(&mut conn, &format!("dead-letters:{topic}"), 20).await
    };
    // The records were read; a history that cannot be read now is left out
    // rather than hiding them.
    let history = history.await.unwrap_or_else(|error| {
        tracing::warn!(error = %error, "Redrive history unavailable");
        Vec::new()
    });
    let notice = match query.notice.as_deref() {
        Some("redriven") => Some("The records were published back; the redrives below say how many."),
        _ => None,
    };
    let content = html! {
        @if let Some(notice) = notice { p role="status" class="notice" { (notice) } }
        p { "Records of " code { (topic) } ", which belong to " code { (original) } ": " (describe_range(&asked)) ". "
            (total) " record" @if total != 1 { "s" }
            @if total as usize > SHOW_MAX { ", the first " (SHOW_MAX) " shown" } "." }
        form method="get" action={ "/console/dead-letters/" (topic) } class="search" {
            label { "Partition" input name="partition" inputmode="numeric" value=(query.partition); }
            label { "From offset" input name="from_offset" inputmode="numeric" value=(query.from_offset); }
            label { "To offset" input name="to_offset" inputmode="numeric" value=(query.to_offset); }
            button type="submit" { "Show" }
        }
        @if operator.may_operate() && total > 0 {
            form method="get" action={ "/console/dead-letters/" (topic) "/redrive" } class="inline" {
                input type="hidden" name="partition" value=(query.partition);
                input type="hidden" name="from_offset" value=(query.from_offset);
                input type="hidden" name="to_offset" value=(query.to_offset);
                button type="submit" { @if total == 1 { "Redrive this record…" } @else { "Redrive these " (total) " records…" } }
            }
        }
        @for record in &records {
            article class="record" aria-labelledby={ "record-" (record.partition) "-" (record.offset) } {
                h2 id={ "record-" (record.partition) "-" (record.offset) } { "Partition " (record.partition) ", offset " (record.offset) }
                dl class="facts" {
                    dt { "Error class" } dd { (record.error_class.as_deref().unwrap_or("unknown")) }
                    dt { "Error" } dd { (record.error_message.as_deref().unwrap_or("")) }
                    dt { "Stage" } dd { (record.stage.as_deref().unwrap_or("")) }
                    dt { "Failed at" } dd { (record.failed_at.as_deref().unwrap_or("")) }
                    dt { "Key" } dd { code { (record.key.as_deref().unwrap_or("(none)")) } }
                    dt { "Came from" } dd { (record.original_topic.as_deref().unwrap_or("?")) " partition "
                        (record.original_partition.as_deref().unwrap_or("?")) " offset " (record.original_offset.as_deref().unwrap_or("?")) }
                }
                details {
                    summary { "Headers (" (record.headers.len()) ")" }
                    table {
                        thead { tr { th scope="col" { "Header" } th scope="col" { "Value" } } }
                        tbody { @for (name, value) in &record.headers { tr { td { code { (name) } } td { code { (value) } } } } }
                    }
                }
                @match &record.payload_json {
                    Some(json) => div { h3 { "Payload (" (record.payload_bytes) " bytes), decoded" }
                        pre { (serde_json::to_string_pretty(json).unwrap_or_default()) } },
                    None => div { h3 { "Payload (" (record.payload_bytes) " bytes), does not decode; hex" }
                        pre class="hex" { (record.payload_hex) @if record.payload_bytes > dead_letters::PAYLOAD_HEX_MAX { "…" } } },
                }
                @if operator.may_operate() {
                    form method="get" action={ "/console/dead-letters/" (topic) "/redrive" } class="inline" {
                        input type="hidden" name="partition" value=(record.partition);
                        input type="hidden" name="from_offset" value=(record.offset);
                        input type="hidden" name="to_offset" value=(record.offset);
                        button type="submit" aria-label={ "Redrive the record at partition " (record.partition) ", offset " (record.offset) "…" } { "Redrive this record…" }
                    }
                }
            }
        }
        (audit_table("Redrives of this topic", &history))
    };
    page(StatusCode::OK, layout(&format!("Dead letters: {topic}"), Some(&operator), content))
}

fn audit_table(caption: &str, records: &[bridge_store::audit::AuditRecord]) -> Markup {
    html! {
        @if !records.is_empty() {
            table class="list" {
                caption { (caption) }
                thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "What" } th scope="col" { "Outcome" } } }
                tbody {
                    @for record in records {
                        tr { td { (at(record.at)) } td { (record.actor) } td { (record.action) } td { (record.outcome) } }
                    }
                }
            }
        }
    }
}

/// What a redrive of the range would do, counted by a dry run, with the
/// form that does it.
pub(crate) async fn redrive_confirm(
    State(state): State<AppState>,
    operator: Operator,
    Path(topic): Path<String>,
    ConsoleQuery(query): ConsoleQuery<RangeQuery>,
) -> Response {
    if !operator.may_operate() {
        return not_allowed();
    }
    let original = match ours(&state, &topic) {
        Ok(original) => original,
        Err(response) => return response,
    };
    let asked = match asked(&query) {
        Ok(asked) => asked,
        Err(problem) => return page_error(StatusCode::BAD_REQUEST, "Not a range", &problem),
    };
    let before = Utc::now();
    let Ok(counted) = dead_letters::redrive(&state.ctx.config, &range(&topic, &asked, before), true).await else {
        return unavailable();
    };
    let content = html! {
        p class="confirm" {
            "This publishes " strong { (counted.redriven) " record" @if counted.redriven != 1 { "s" } }
            " of " code { (topic) } " (" (describe_range(&asked)) ") back to " code { (original) }
            ", with their key, bytes and headers (without the dead-letter headers). There they go through the normal path: "
            "a record that was already applied changes nothing, one that fails again comes back here. "
            "The records stay in this topic as well."
        }
        @if counted.redriven == 0 {
            p { "There is nothing to redrive in this range." }
        } @else {
            form method="post" action={ "/console/dead-letters/" (topic) "/redrive" } {
                input type="hidden" name="csrf" value=(operator.csrf);
                input type="hidden" name="partition" value=(query.partition);
                input type="hidden" name="from_offset" value=(query.from_offset);
                input type="hidden" name="to_offset" value=(query.to_offset);
                input type="hidden" name="expected" value=(counted.redriven);
                input type="hidden" name="before" value=(before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
                button type="submit" { "Redrive " (counted.redriven) " record" @if counted.redriven != 1 { "s" } }
                " "
                a href={ "/console/dead-letters/" (topic) } { "Cancel" }
            }
        }
    };
    page(StatusCode::OK, layout("Confirm the redrive", Some(&operator), content))
}

#[derive(Deserialize)]
pub(crate) struct RedriveForm {
    csrf: String,
    #[serde(default)]
    partition: String,
    #[serde(default)]
    from_offset: String,
    #[serde(default)]
    to_offset: String,
    /// What the confirmation counted, and when.
    expected: u64,
    before: String,
}

pub(crate) async fn redrive(
    State(state): State<AppState>,
    operator: Operator,
    Path(topic): Path<String>,
    ConsoleForm(form): ConsoleForm<RedriveForm>,
) -> Response {
    let target = format!("dead-letters:{topic}");
    if let Err(response) = operator.may(&state, &form.csrf, operator.may_operate(), "redrive", &target).await {
        return response;
    }
    if let Err(response) = ours(&state, &topic) {
        return response;
    }
    let Some(before) = chrono::DateTime::parse_from_rfc3339(&form.before)
        .ok()
        .map(|before| before.with_timezone(&Utc))
        .filter(|before| *before <= Utc::now())
    else {
        return page_error(StatusCode::BAD_REQUEST, "Not done", "This form is damaged; confirm the redrive again.");
    };
    let query = RangeQuery {
        partition: form.partition,
        from_offset: form.from_offset,
        to_offset: form.to_offset,
        notice: None,
    };
    let asked = match asked(&query) {
        Ok(asked) => asked,
        Err(problem) => return page_error(StatusCode::BAD_REQUEST, "Not a range", &problem),
    };
    let action = format!("redrive {}", describe_range(&asked));
    let range = range(&topic, &asked, before);
    // The records the confirmation counted are still there (retention may
    // have removed some): otherwise the operator confirms again.
    match dead_letters::redrive(&state.ctx.config, &range, true).await {
        Ok(counted) if counted.redriven == form.expected => {}
        Ok(counted) => {
            operator.audit(&state, &action, &target, "refused: the range changed since it was confirmed").await;
            return page_error(
                StatusCode::CONFLICT,
                "Not done",
                &format!(
                    "The range now holds {} records, not the {} you confirmed; nothing was redriven. Confirm again.",
                    counted.redriven, form.expected
                ),
            );
        }
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "Console redrive count failed");
            return unavailable();
        }
    }
    match dead_letters::redrive(&state.ctx.config, &range, false).await {
        Ok(done) => {
            operator.audit(&state, &action, &target, &format!("{} redriven", done.redriven)).await;
            Redirect::to(&format!("/console/dead-letters/{topic}?notice=redriven")).into_response()
        }
        Err(error) => {
            tracing::warn!(error = format!("{error:#}"), "Console redrive failed");
            operator.audit(&state, &action, &target, "failed").await;
            unavailable()
        }
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct DeliveriesQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    subscription: Option<i64>,
    #[serde(default)]
    notice: Option<String>,
}

pub(crate) async fn notifications(
    State(state): State<AppState>,
    operator: Operator,
    ConsoleQuery(query): ConsoleQuery<DeliveriesQuery>,
) -> Response {
    let status = query.status.as_deref().filter(|status| ["pending", "delivered", "dead"].contains(status));
    let read = async {
        let mut conn = state.ctx.pool.acquire().await?;
        let subscriptions = notifications::subscriptions(&mut conn).await?;
        let mut counts = Vec::new();
        for subscription in &subscriptions {
            counts.push(notifications::delivery_counts(&mut conn, Some(subscription.id)).await?);
        }
        let failing = bridge_store::console::failing_since(&mut conn).await?;
        let deliveries = match status {
            Some(status) => bridge_store::console::deliveries(&mut conn, status, query.subscription, 200).await?,
            None => Vec::new(),
        };
        let history = bridge_store::console::audit_of(&mut conn, "notifications", 20).await?;
        Ok::<_, bridge_store::Error>((subscriptions, counts, failing, deliveries, history))
    };
    let Ok((subscriptions, counts, failing, deliveries, history)) = read.await else { return unavailable() };
    let notice = match query.notice.as_deref() {
        Some("enabled") => Some("The target is enabled; its waiting deliveries go out now."),
        Some("redriven") => Some("The dead deliveries are back at the end of their queues."),
        _ => None,
    };
    let content = html! {
        @if let Some(notice) = notice { p role="status" class="notice" { (notice) } }
        table class="list" {
            caption { "Subscriptions" }
            thead {
                tr {
                    th scope="col" { "Id" } th scope="col" { "Subscriber" } th scope="col" { "Channel and target" }
                    th scope="col" { "States" } th scope="col" { "Health" } th scope="col" { "Deliveries" } th scope="col" { "Actions" }
                }
            }
            tbody {
                @for (subscription, counts) in subscriptions.iter().zip(&counts) {
                    @let failing_since = failing.iter().find(|(id, _)| *id == subscription.id).map(|(_, since)| *since);
                    @let dead = counts.iter().find(|(status, _)| status == "dead").map_or(0, |(_, count)| *count);
                    tr {
                        td { (subscription.id) }
                        td { (subscription.subscriber_kind) @if let Some(id) = &subscription.subscriber_id { " " (id) } }
                        td { (subscription.channel) " " code { (shown_target(&subscription.channel, &subscription.target)) } }
                        td { @if subscription.states.is_empty() { "all" } @else { (subscription.states.join(", ")) } }
                        td {
                            @if !subscription.enabled {
                                strong class="warn" { "disabled" }
                                @if let Some(why) = &subscription.disabled_reason { ": " (scrubbed(why)) }
                            } @else if let Some(since) = failing_since {
                                strong class="warn" { "failing" } " since " (at(since))
                            } @else {
                                "healthy"
                            }
                        }
                        td {
                            @for (status, count) in counts {
                                a href={ "/console/notifications?status=" (status) "&subscription=" (subscription.id) } { (count) " " (status) } " "
                            }
                        }
                        td {
                            @if operator.may_operate() {
                                @if !subscription.enabled {
                                    form method="post" action={ "/console/notifications/" (subscription.id) "/enable" } class="inline" {
                                        input type="hidden" name="csrf" value=(operator.csrf);
                                        button type="submit" aria-label={ "Enable subscription " (subscription.id) } { "Enable" }
                                    }
                                }
                                @if dead > 0 {
                                    form method="post" action="/console/notifications/redrive" class="inline" {
                                        input type="hidden" name="csrf" value=(operator.csrf);
                                        input type="hidden" name="subscription" value=(subscription.id);
                                        button type="submit" aria-label={ "Redrive the dead deliveries of subscription " (subscription.id) } { "Redrive " (dead) " dead" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(status) = status {
            table class="list" {
                caption { "Latest " (status) " deliveries" @if let Some(id) = query.subscription { " of subscription " (id) } }
                thead {
                    tr {
                        th scope="col" { "Delivery" } th scope="col" { "Transfer event" } th scope="col" { "Target" }
                        th scope="col" class="num" { "Attempts" } th scope="col" { "Last error" } th scope="col" { "Created" }
                    }
                }
                tbody {
                    @for delivery in &deliveries {
                        tr {
                            td { (delivery.id) }
                            td { "v" (delivery.version) " " (delivery.state) }
                            td { (delivery.channel) " " code { (shown_target(&delivery.channel, &delivery.target)) } }
                            td class="num" { (delivery.attempts) }
                            td { (scrubbed(delivery.last_error.as_deref().unwrap_or(""))) }
                            td { (at(delivery.created_at)) }
                        }
                    }
                }
            }
        }
        (audit_table("Changes to notifications", &history))
    };
    page(StatusCode::OK, layout("Notifications", Some(&operator), content))
}

pub(crate) async fn enable(
    State(state): State<AppState>,
    operator: Operator,
    Path(id): Path<i64>,
    ConsoleForm(form): ConsoleForm<CsrfForm>,
) -> Response {
    let action = format!("enable subscription {id}");
    if let Err(response) = operator.may(&state, &form.csrf, operator.may_operate(), &action, "notifications").await {
        return response;
    }
    let switched = async {
        let mut conn = state.ctx.pool.acquire().await?;
        notifications::set_enabled(&mut conn, id, true, None).await
    };
    match switched.await {
        Ok(true) => {
            operator.audit(&state, &action, "notifications", "enabled").await;
            Redirect::to("/console/notifications?notice=enabled").into_response()
        }
        Ok(false) => {
            operator.audit(&state, &action, "notifications", "no such subscription").await;
            page_error(StatusCode::NOT_FOUND, "Not found", "There is no such subscription.")
        }
        Err(_) => {
            operator.audit(&state, &action, "notifications", "failed").await;
            unavailable()
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct RedriveDeliveries {
    csrf: String,
    subscription: Option<i64>,
}

pub(crate) async fn redrive_deliveries(
    State(state): State<AppState>,
    operator: Operator,
    ConsoleForm(form): ConsoleForm<RedriveDeliveries>,
) -> Response {
    let which = form.subscription.map_or("every subscription".to_owned(), |id| format!("subscription {id}"));
    let action = format!("redrive dead deliveries of {which}");
    if let Err(response) = operator.may(&state, &form.csrf, operator.may_operate(), &action, "notifications").await {
        return response;
    }
    let redriven = async {
        let mut conn = state.ctx.pool.acquire().await?;
        notifications::redrive(&mut conn, form.subscription).await
    };
    match redriven.await {
        Ok(count) => {
            let which = form.subscription.map_or("every subscription".to_owned(), |id| format!("subscription {id}"));
            operator
                .audit(
                    &state,
                    &format!("redrive dead deliveries of {which}"),
                    "notifications",
                    &format!("{count} redriven"),
                )
                .await;
            Redirect::to("/console/notifications?notice=redriven").into_response()
        }
        Err(_) => unavailable(),
    }
}
