//! The validator: a request decided against the books, the transfer
//! recorded, funds held and the allocation reserved; one request or a
//! partition's queued ones set-based.

use super::*;
use bridge_domain::rules::FundRead;
use bridge_domain::RuleSet;

/// Validator: decides the request and, if it may proceed, holds the
/// investor's funds and reserves the fund allocation in the same transaction
/// that records the transfer.
pub(super) async fn validate(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let mut candidate = requested_transfer(message)?;
    let transfer_id = candidate.id;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));

    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    // A transfer created through the HTTP API is already recorded, in state
    // requested, with its status event; it is validated like any other.
    let recorded = match transfers::get(&mut tx, transfer_id).await? {
        Some(existing) if !existing.same_request_as(&candidate) => {
            return Err(permanent(
                "conflicting_duplicate",
                format!("transfer {transfer_id} already exists with a different request; the first request stands"),
            ));
        }
        Some(existing) if existing.state == TransferState::Requested => Some(existing),
        Some(_) => return Ok(Outcome::Duplicate),
        None => None,
    };

    let investor = accounts::investor(&mut tx, &candidate.investor_account_id).await?;
    let fund = accounts::fund_by_account(&mut tx, &candidate.fund_account_id).await?;
    let allocation = match (&investor, &fund) {
        (Some(_), Some(fund)) => accounts::allocation(&mut tx, &fund.fund_id, &candidate.investor_account_id).await?,
        _ => None,
    };
    candidate.fund_id = fund.as_ref().map(|view| view.fund_id.clone());
    // A request the API recorded was authenticated by the key that made it;
    // one from Kafka must be signed by a source allowed to make it, when
    // that is required.
    let authentic = match (&ctx.request_verifier, &recorded) {
        (Some(verifier), None) => verifier.check(message, &candidate).await?,
        _ => Ok(()),
    };
    let decision = authentic.and_then(|()| {
        check_request(&RequestFacts {
            amount_minor: candidate.amount_minor,
            currency: &candidate.currency,
            investor: investor.map(|row| row.value),
            fund: fund.as_ref().map(|view| view.fund.value),
            rules: fund.as_ref().map_or(RuleSet::none(), |view| &view.rules),
            investor_committed_minor: allocation.map_or(0, |row| row.value.total_minor()),
            now: Utc::now(),
        })
    });

    let (requested, newly_recorded) = match recorded {
        Some(existing) => {
            if existing.fund_id != candidate.fund_id {
                transfers::set_fund(&mut tx, transfer_id, candidate.fund_id.as_deref()).await?;
            }
            (Transfer { fund_id: candidate.fund_id.clone(), ..existing }, false)
        }
        None => (transfers::insert_requested(&mut tx, &candidate).await?, true),
    };
    let event = match decision {
        Ok(()) => TransferEvent::Validated,
        Err(reason) => TransferEvent::Rejected(reason),
    };
    let next = transfers::advance(&mut tx, &requested, &event).await?;
    let messages = validation_messages(ctx, &requested, newly_recorded, &next, &trace)?;
    outbox::enqueue(&mut tx, &messages).await?;
    // The hold and the reservation, guarded by the balance and the fund's
    // limits as they are now: books that changed since the read above are a
    // lost race, and the request is decided again.
    books::apply(&mut tx, &[(&requested, event.effect(requested.amount_minor))]).await?;
    if let (TransferEvent::Validated, Some(view)) = (&event, &fund) {
        if let Some(maximum) = view.rules.maximum_per_investor() {
            let limit = [(view.fund_id.as_str(), requested.investor_account_id.as_str(), maximum)];
            accounts::check_investor_limits(&mut tx, &limit).await?;
        }
    }
    crate::failpoint::hit("stage.inside_tx");
    commit(ctx, tx).await?;
    Ok(Outcome::Applied)
}

/// The transfer a request asks for, in state `requested` at version 1.
fn requested_transfer(message: &Inbound) -> Result<Transfer, StageError> {
    let request: TransferRequested = decode_payload(message)?;
    let requested_at = DateTime::from_timestamp_millis(request.requested_at).ok_or_else(|| {
        permanent("invalid_request", format!("requested_at {} is out of range", request.requested_at))
    })?;
    Ok(Transfer {
        id: parse_transfer_id(&request.transfer_id)?,
        investor_account_id: request.investor_account_id,
        fund_account_id: request.fund_account_id,
        fund_id: None,
        amount_minor: request.amount_minor,
        currency: request.currency,
        reference: request.reference,
        source_system: request.source_system,
        requested_at,
        state: TransferState::Requested,
        reason_code: None,
        version: 1,
        traceparent: message.header("traceparent").map(str::to_owned),
        step_attempt: 0,
    })
}

/// What a validation emits, in this order: the status event of the new
/// transfer (unless it was recorded before, by the API), the validated
/// event if it was accepted, and the status event of the decision.
fn validation_messages(
    ctx: &StageContext,
    requested: &Transfer,
    newly_recorded: bool,
    decided: &Transfer,
    trace: &TraceContext,
) -> Result<Vec<OutboxMessage>, StageError> {
    let origin = StageName::Validator.as_str();
    let mut messages = Vec::with_capacity(3);
    if newly_recorded {
        messages.push(status_message(ctx, origin, requested, None, trace)?);
    }
    if decided.state == TransferState::Validated {
        let event_id = ids::stage_event_id(decided.id, "validated");
        let now = Utc::now();
        let event = stage_event!(TransferValidated, decided, event_id, now);
        messages.push(envelope(ctx, origin, event_id, decided, trace, now, ctx.topics.validated(), &event)?);
    }
    messages.push(status_message(ctx, origin, decided, Some(requested.state), trace)?);
    Ok(messages)
}

/// The validator for several requests of one partition in one transaction,
/// set-based: one read each of the transfers, the investors, the funds and
/// the seats; the requests are then decided one after another in the
/// partition's order, each against the books the ones before it left
/// (`RunningBooks`), so the batch decides exactly as one message at a time
/// would; then one insert of the transfers with their history and the
/// outbox row, the holds (investors locked in key order, each hold guarded
/// by the available balance), and the allocations and funds (locked in
/// key order, each fund's update guarded by its limits), whatever the
/// number of requests. Rows are locked only for the transaction's tail,
/// and a guard that finds the books changed since they were read refuses
/// the batch.
///
/// Like `complete_batch`, only the fast path for the usual case, and for
/// the messages before the first that does not decode, is not a valid
/// request or names a transfer a message before it named: the decisions
/// depend on the order, so the batch stops there and that message and those
/// after it go one by one. The batch as a whole is not applied (the
/// transaction is rolled back and `handle` decides each message with its
/// full error policy) if a transfer was recorded before (a repeat, or one
/// created through the API), a fund filled up since it was read, or on any
/// error.
pub async fn validate_batch(ctx: &StageContext, messages: &[Inbound]) -> Vec<bool> {
    let mut requests = Vec::with_capacity(messages.len());
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    for message in messages {
        let Ok(requested) = requested_transfer(message) else { break };
        if !seen.insert(requested.id) {
            break;
        }
        requests.push((message.clone(), requested));
    }
    if requests.is_empty() {
        return vec![false; messages.len()];
    }
    let transfer_of = |(_, requested): &(Inbound, Transfer)| requested.id;
    let mut applied = shared(&ctx.groups.validator, requests, transfer_of, |requests| async move {
        try_validate_batch(ctx, &requests).await
    })
    .await;
    // The messages after the batch go one by one.
    applied.resize(messages.len(), false);
    applied
}

async fn try_validate_batch(ctx: &StageContext, requests: &[(Inbound, Transfer)]) -> Result<bool, StageError> {
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    let ids: Vec<Uuid> = requests.iter().map(|(_, requested)| requested.id).collect();
    if !transfers::get_many(&mut tx, &ids).await?.is_empty() {
        return Ok(false);
    }
    let investor_ids: Vec<&str> =
        requests.iter().map(|(_, requested)| requested.investor_account_id.as_str()).collect();
    let investors = accounts::investors_by_id(&mut tx, &investor_ids).await?;
    let account_ids: Vec<&str> = requests.iter().map(|(_, requested)| requested.fund_account_id.as_str()).collect();
    let funds = accounts::funds_by_accounts(&mut tx, &account_ids).await?;
    let pairs: Vec<(&str, &str)> = requests
        .iter()
        .filter_map(|(_, requested)| {
            let fund = funds.get(&requested.fund_account_id)?;
            Some((fund.fund_id.as_str(), requested.investor_account_id.as_str()))
        })
        .collect();
    let held = accounts::allocations_held(&mut tx, &pairs).await?;

    // Only requests that are all authentic take the batch; a rejected one
    // is decided one by one.
    if let Some(verifier) = &ctx.request_verifier {
        for (message, requested) in requests {
            let fund_id = funds.get(&requested.fund_account_id).map(|view| view.fund_id.clone());
            let candidate = Transfer { fund_id, ..requested.clone() };
            if verifier.check(message, &candidate).await?.is_err() {
                return Ok(false);
            }
        }
    }
    let mut books = bridge_domain::RunningBooks::new(investors, held);
    let mut decided = Vec::with_capacity(requests.len());
    let mut limits = Vec::new();
    let now = Utc::now();
    for (_, requested) in requests {
        let fund = funds.get(&requested.fund_account_id);
        let decision = books.decide(
            &requested.investor_account_id,
            fund.map(|view| FundRead { id: &view.fund_id, snapshot: view.fund.value, rules: &view.rules }),
            requested.amount_minor,
            &requested.currency,
            now,
        );
        if let (Ok(()), Some(view)) = (decision, fund) {
            if let Some(maximum) = view.rules.maximum_per_investor() {
                limits.push((view.fund_id.as_str(), requested.investor_account_id.as_str(), maximum));
            }
        }
        let event = match decision {
            Ok(()) => TransferEvent::Validated,
            Err(reason) => TransferEvent::Rejected(reason),
        };
        decided.push((Transfer { fund_id: fund.map(|view| view.fund_id.clone()), ..requested.clone() }, event));
    }
    let next = transfers::decided_versions(&decided)?;
    let mut messages = Vec::with_capacity(3 * requests.len());
    let mut spans = Vec::with_capacity(requests.len());
    let group = StageName::Validator.group_id(&ctx.config);
    for (((message, _), (requested, _)), after) in requests.iter().zip(&decided).zip(&next) {
        // Each transfer's events under the span of the message that
        // caused them, so its trace stays one tree.
        let span = batch_message_span(StageName::Validator, &group, message);
        let trace = span.in_scope(|| TraceContext::continue_or_start(message.header("traceparent")));
        messages.extend(validation_messages(ctx, requested, true, after, &trace)?);
        spans.push(span);
    }
    transfers::insert_decided(&mut tx, &next, &messages).await?;
    let changes: Vec<_> =
        decided.iter().map(|(requested, event)| (requested, event.effect(requested.amount_minor))).collect();
    books::apply(&mut tx, &changes).await?;
    accounts::check_investor_limits(&mut tx, &limits).await?;
    crate::failpoint::hit("stage.inside_tx");
    commit(ctx, tx).await?;
    log_applied(&spans);
    Ok(true)
}

/// Records a transfer requested through the HTTP API, in the caller's
/// transaction: the transfer in state `requested` (version 1), its status
/// event, and the request event the validator consumes, as an upstream
/// system would have published it. The validator then finds the transfer
/// recorded and validates it.
pub async fn record_api_request(
    ctx: &StageContext,
    conn: &mut PgConnection,
    request: &TransferRequested,
    traceparent: Option<&str>,
) -> Result<Transfer, StageError> {
    const ORIGIN: &str = "api";
    let transfer_id = parse_transfer_id(&request.transfer_id)?;
    let requested_at = DateTime::from_timestamp_millis(request.requested_at)
        .ok_or_else(|| permanent("invalid_request", "requested_at is out of range"))?;
    let trace = TraceContext::continue_or_start(traceparent);
    let fund_id = accounts::fund_by_account(&mut *conn, &request.fund_account_id).await?.map(|view| view.fund_id);
    let candidate = Transfer {
        id: transfer_id,
        investor_account_id: request.investor_account_id.clone(),
        fund_account_id: request.fund_account_id.clone(),
        fund_id,
        amount_minor: request.amount_minor,
        currency: request.currency.clone(),
        reference: request.reference.clone(),
        source_system: request.source_system.clone(),
        requested_at,
        state: TransferState::Requested,
        reason_code: None,
        version: 1,
        traceparent: Some(trace.child_traceparent()),
        step_attempt: 0,
    };
    let requested = transfers::insert_requested(&mut *conn, &candidate).await?;
    let now = Utc::now();
    let event_id = ids::stage_event_id(transfer_id, "requested");
    let messages = [
        status_message(ctx, ORIGIN, &requested, None, &trace)?,
        envelope(ctx, ORIGIN, event_id, &requested, &trace, now, ctx.topics.requested(), request)?,
    ];
    outbox::enqueue(conn, &messages).await?;
    Ok(requested)
}
