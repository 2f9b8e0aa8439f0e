//! The console's overview: the figures an operations team looks at first,
//! each linking to the list behind it where there is one.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use maud::{html, Markup};

use bridge_store::console as store;

use super::{at, layout, page, scrubbed, shown_target, state_badge, unavailable, Operator};
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
