//! Completion: the reserved allocation becomes a completed one.

use super::*;

/// Completion: the reserved allocation becomes a completed one.
pub(super) async fn complete(ctx: &StageContext, message: &Inbound) -> Result<Outcome, StageError> {
    let event: FundsDeposited = decode_payload(message)?;
    let transfer_id = parse_transfer_id(&event.transfer_id)?;
    let stage = StageName::Completion;
    let trace = TraceContext::continue_or_start(message.header("traceparent"));
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    let Some(current) =
        begin_step(&mut tx, stage, Some(&event.event_id), transfer_id, TransferState::Deposited).await?
    else {
        if transfers::get(&mut tx, transfer_id).await?.is_none() {
            return Err(permanent("unknown_transfer", format!("transfer {transfer_id} does not exist")));
        }
        return Ok(Outcome::Duplicate);
    };
    finish_step(
        ctx,
        tx,
        stage.as_str(),
        &TransferEvent::Completed,
        None,
        &[Advance { before: &current, trace, reference: String::new(), actor: None }],
    )
    .await?;
    Ok(Outcome::Applied)
}

/// Completion for several messages of one partition in one transaction,
/// set-based: one locking read with the inbox insert, one statement for the
/// transfers with their history and the outbox row, one pass over
/// allocations and funds, one commit, whatever the number of messages.
///
/// This is only the fast path for the usual case, taken by the messages
/// before the first that does not decode or names a transfer a message
/// before it named; that one and those after it go one by one. The batch
/// is not applied at all if a message was applied before, a transfer is not
/// (or no longer) deposited, or on any error: the transaction is then
/// rolled back whole, and `handle` decides each message with its full error
/// policy, so a bad message neither takes its neighbours down nor applies
/// twice.
pub async fn complete_batch(ctx: &StageContext, messages: &[Inbound]) -> Vec<bool> {
    let mut batch = Vec::with_capacity(messages.len());
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    for message in messages {
        let Ok(event) = decode_payload::<FundsDeposited>(message) else { break };
        let Ok(transfer_id) = parse_transfer_id(&event.transfer_id) else { break };
        if !seen.insert(transfer_id) {
            break;
        }
        batch.push((transfer_id, message.clone(), event));
    }
    if batch.is_empty() {
        return vec![false; messages.len()];
    }
    let transfer_of = |(transfer_id, _, _): &(Uuid, Inbound, FundsDeposited)| *transfer_id;
    let mut applied = shared(&ctx.groups.completion, batch, transfer_of, |batch| async move {
        let by_transfer: CompletionBatch<'_> =
            batch.iter().map(|(transfer_id, message, event)| (*transfer_id, (message, event))).collect();
        try_complete_batch(ctx, &by_transfer).await
    })
    .await;
    // The messages after the batch go one by one.
    applied.resize(messages.len(), false);
    applied
}

/// The messages of a batch by transfer (one each).
type CompletionBatch<'a> = std::collections::HashMap<Uuid, (&'a Inbound, &'a FundsDeposited)>;

async fn try_complete_batch(ctx: &StageContext, batch: &CompletionBatch<'_>) -> Result<bool, StageError> {
    let stage = StageName::Completion;
    let mut tx = bridge_store::begin_step_transaction(&ctx.pool).await?;
    let event_ids: Vec<String> = batch.values().map(|(_, event)| event.event_id.clone()).collect();
    let ids: Vec<Uuid> = batch.keys().copied().collect();
    let (current, recorded) = transfers::lock_for_messages(&mut tx, &ids, stage.as_str(), &event_ids).await?;
    if recorded != batch.len() as u64
        || current.len() != ids.len()
        || current.iter().any(|transfer| transfer.state != TransferState::Deposited)
    {
        return Ok(false);
    }
    let mut spans = Vec::with_capacity(current.len());
    let group = stage.group_id(&ctx.config);
    let steps: Vec<Advance<'_>> = current
        .iter()
        .map(|before| {
            // Each status event under the span of the message that caused
            // it, so a transfer's trace stays one tree.
            let (message, _) = batch[&before.id];
            let span = batch_message_span(stage, &group, message);
            let trace = span.in_scope(|| TraceContext::continue_or_start(message.header("traceparent")));
            spans.push(span);
            Advance { before, trace, reference: String::new(), actor: None }
        })
        .collect();
    finish_step(ctx, tx, stage.as_str(), &TransferEvent::Completed, None, &steps).await?;
    log_applied(&spans);
    Ok(true)
}
