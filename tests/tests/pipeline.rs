//! The pipeline end to end: requests in on Kafka, state in Postgres, events
//! out on Kafka. Every scenario runs against both brokers.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use uuid::Uuid;

use bridge_codec::{decode, encode, TransferStatusChanged};
use bridge_domain::TransferState;
use bridge_pipeline::message::dead_letter_headers as dlq;
use bridge_pipeline::runner::Part;
use bridge_pipeline::{StageName, Topics};
use bridge_testkit::{both_brokers, BrokerKind, LosingFirstReplies, TestKit};

const SETTLE: Duration = Duration::from_secs(90);

async fn investor_balance(kit: &TestKit, id: &str) -> Result<(i64, i64)> {
    Ok(sqlx::query_as("SELECT balance_minor, held_minor FROM investor_accounts WHERE id = $1")
        .bind(id)
        .fetch_one(&kit.pool)
        .await?)
}

/// A fund's reserved and completed totals and seats taken, as the API and
/// the console read them; the fund's own allocated total must be their sum.
async fn fund_totals(kit: &TestKit, id: &str) -> Result<(i64, i64, i32)> {
    let mut conn = kit.pool.acquire().await?;
    let fund = bridge_store::api::fund(&mut conn, id).await?.context("fund")?;
    let allocated: i64 =
        sqlx::query_scalar("SELECT allocated_minor FROM funds WHERE id = $1").bind(id).fetch_one(&mut *conn).await?;
    ensure!(allocated == fund.reserved_minor + fund.completed_minor, "fund {id}: allocated {allocated}, {fund:?}");
    Ok((fund.reserved_minor, fund.completed_minor, fund.investors_count))
}

async fn fund_account_balance(kit: &TestKit, id: &str) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT balance_minor FROM fund_accounts WHERE id = $1")
        .bind(id)
        .fetch_one(&kit.pool)
        .await?)
}

/// Status events of one transfer as published, decoded, in topic order.
async fn status_events(kit: &TestKit, transfer: Uuid) -> Result<Vec<TransferStatusChanged>> {
    let key = transfer.to_string();
    kit.read_topic(&kit.topics().status())
        .await?
        .into_iter()
        .filter(|message| message.key.as_deref() == Some(key.as_bytes()))
        .map(|message| {
            decode::<TransferStatusChanged>(message.payload.as_deref().unwrap_or_default()).map_err(Into::into)
        })
        .collect()
}

both_brokers!(
    only_requests_signed_by_an_allowed_source_move_money,
    happy_path_moves_money_to_the_minor_unit,
    every_rejection_reason_is_reported,
    declined_steps_are_compensated,
    the_same_message_twice_moves_money_once,
    redelivery_after_commit_before_offset_commit_leaves_one_effect,
    concurrent_transfers_never_overspend,
    lost_replies_from_the_bank_move_money_once,
    a_standby_relay_takes_over_and_status_stays_in_order,
    undecodable_messages_go_to_the_dead_letter_topic_and_the_partition_flows,
);

async fn happy_path_moves_money_to_the_minor_unit(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("alice", 10_000_00).await?;
    let fund_account = kit.seed_fund("growth", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();

    let id = kit.publish(&kit.request("alice", &fund_account, 2_500_37)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;

    let transfer = kit.transfer(id).await?;
    ensure!(transfer.state == TransferState::Completed, "state {:?}", transfer.state);
    ensure!(transfer.version == 5);
    ensure!(investor_balance(&kit, "alice").await? == (10_000_00 - 2_500_37, 0));
    ensure!(fund_account_balance(&kit, &fund_account).await? == 2_500_37);
    ensure!(fund_totals(&kit, "growth").await? == (0, 2_500_37, 1));

    let history = {
        let mut conn = kit.pool.acquire().await?;
        bridge_store::transfers::history(&mut conn, id).await?
    };
    let states: Vec<&str> = history.iter().map(|version| version.state.as_str()).collect();
    ensure!(states == ["requested", "validated", "withdrawn", "deposited", "completed"], "{states:?}");

    // Downstream sees every state, in order, once or more, with stable ids.
    // At-least-once: a redelivered event may appear anywhere later in the
    // partition, so deduplicate on the event id, as subscribers are told to.
    let mut seen = std::collections::HashSet::new();
    let events: Vec<_> =
        status_events(&kit, id).await?.into_iter().filter(|event| seen.insert(event.event_id.clone())).collect();
    let versions: Vec<i64> = events.iter().map(|event| event.version).collect();
    ensure!(versions == [1, 2, 3, 4, 5], "status versions {versions:?}");
    ensure!(events.last().is_some_and(|event| event.terminal && event.state == "completed"));
    for (event, version) in events.iter().zip(&history) {
        ensure!(event.event_id == version.event_id.to_string());
    }
    let status = kit.read_topic(&kit.topics().status()).await?;
    let first = status.first().context("status topic is empty")?;
    for header in ["ce_id", "ce_type", "ce_source", "ce_specversion", "ce_time", "content-type", "traceparent"] {
        ensure!(first.header(header).is_some(), "status event lacks header {header}");
    }
    ensure!(first.header("ce_specversion") == Some("1.0"));

    pipeline.stop().await?;
    kit.assert_books_balance().await
}

async fn every_rejection_reason_is_reported(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("rich", 1_000_000_00).await?;
    kit.seed_investor("poor", 50_00).await?;
    kit.seed_investor("late", 1_000_000_00).await?;
    let open = kit.seed_fund("open", 100_00, 100, 1_000_000_00).await?;
    let one_seat = kit.seed_fund("one-seat", 100_00, 1, 1_000_000_00).await?;
    let small = kit.seed_fund("small", 100_00, 100, 1_000_00).await?;
    let pipeline = kit.spawn_all();

    // Take the only seat first, so the later request finds the fund full.
    let seat_holder = kit.publish(&kit.request("rich", &one_seat, 200_00)).await?;
    kit.wait_terminal(&[seat_holder], SETTLE).await?;

    let mut usd = kit.request("rich", &open, 200_00);
    usd.currency = "USD".into();
    let mut lower_case = kit.request("rich", &open, 200_00);
    lower_case.currency = "eur".into();
    let cases = [
        (kit.request("nobody", &open, 200_00), "UNKNOWN_INVESTOR_ACCOUNT"),
        (kit.request("rich", "no-such-fund-account", 200_00), "UNKNOWN_FUND_ACCOUNT"),
        (kit.request("rich", &open, 0), "NON_POSITIVE_AMOUNT"),
        (kit.request("rich", &open, -5), "NON_POSITIVE_AMOUNT"),
        (usd, "CURRENCY_MISMATCH"),
        (lower_case, "INVALID_CURRENCY"),
        (kit.request("rich", &open, 99_99), "BELOW_MINIMUM_INVESTMENT"),
        (kit.request("late", &one_seat, 200_00), "FUND_FULL"),
        (kit.request("rich", &small, 1_000_01), "FUND_CAPACITY_EXCEEDED"),
        (kit.request("poor", &open, 100_00), "INSUFFICIENT_FUNDS"),
    ];
    let mut ids = Vec::new();
    for (request, _) in &cases {
        ids.push(kit.publish(request).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;

    for ((_, reason), id) in cases.iter().zip(&ids) {
        let transfer = kit.transfer(*id).await?;
        ensure!(transfer.state == TransferState::Rejected, "{reason}: state {:?}", transfer.state);
        ensure!(transfer.reason_code.as_deref() == Some(*reason), "{reason}: got {:?}", transfer.reason_code);
        let events = status_events(&kit, *id).await?;
        let last = events.last().context("no status event")?;
        ensure!(last.state == "rejected" && last.terminal && last.reason_code.as_deref() == Some(*reason));
    }
    // Nothing was held for any rejected request.
    ensure!(investor_balance(&kit, "poor").await? == (50_00, 0));
    ensure!(investor_balance(&kit, "late").await? == (1_000_000_00, 0));
    ensure!(investor_balance(&kit, "rich").await? == (1_000_000_00 - 200_00, 0));

    pipeline.stop().await?;
    kit.assert_books_balance().await
}

async fn declined_steps_are_compensated(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("frozen", 5_000_00).await?;
    kit.seed_investor("bob", 5_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let closed_account = kit.seed_fund("closed", 100_00, 10, 1_000_000_00).await?;
    kit.seed_investor("closing", 5_000_00).await?;
    kit.set_simulated_account_status("frozen", "frozen").await?;
    kit.set_simulated_account_status(&closed_account, "closed").await?;
    // Being closed: debits still go through, money coming back does not.
    kit.set_simulated_account_status("closing", "no_credits").await?;
    let pipeline = kit.spawn_all();

    let failed = kit.publish(&kit.request("frozen", &fund_account, 1_000_00)).await?;
    let reversed = kit.publish(&kit.request("bob", &closed_account, 1_000_00)).await?;
    let stuck = kit.publish(&kit.request("closing", &closed_account, 400_00)).await?;
    kit.wait_terminal(&[failed, reversed, stuck], SETTLE).await?;

    let failed = kit.transfer(failed).await?;
    ensure!(failed.state == TransferState::Failed && failed.reason_code.as_deref() == Some("ACCOUNT_FROZEN"));
    ensure!(investor_balance(&kit, "frozen").await? == (5_000_00, 0), "hold released, nothing debited");
    ensure!(fund_totals(&kit, "fund").await? == (0, 0, 0), "reservation and seat released");

    let reversed = kit.transfer(reversed).await?;
    ensure!(reversed.state == TransferState::Reversed && reversed.reason_code.as_deref() == Some("ACCOUNT_CLOSED"));
    ensure!(investor_balance(&kit, "bob").await? == (5_000_00, 0), "investor refunded to the minor unit");
    ensure!(fund_account_balance(&kit, &closed_account).await? == 0);

    // Deposit and refund both declined: nothing automatic can fix it, so the
    // transfer waits for a person, visibly, with the money in transit and
    // the reservation kept.
    let stuck_transfer = kit.transfer(stuck).await?;
    ensure!(stuck_transfer.state == TransferState::ManualReview, "state {:?}", stuck_transfer.state);
    ensure!(stuck_transfer.reason_code.as_deref() == Some("DEPOSIT_ACCOUNT_CLOSED_REFUND_ACCOUNT_NO_CREDITS"));
    ensure!(investor_balance(&kit, "closing").await? == (5_000_00 - 400_00, 0));
    ensure!(fund_totals(&kit, "closed").await? == (400_00, 0, 1));
    let last = status_events(&kit, stuck).await?.pop().context("no status event")?;
    ensure!(last.state == "manual_review" && !last.terminal);
    let report = kit.reconcile().await?;
    ensure!((report.manual_review, report.in_flight) == (1, 0), "{report:?}");

    pipeline.stop().await?;
    kit.assert_books_balance().await
}

async fn the_same_message_twice_moves_money_once(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("carol", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();

    let request = kit.request("carol", &fund_account, 3_000_00);
    let id = kit.publish(&request).await?;
    kit.publish(&request).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    let before = kit.effect_counts().await?;

    // Re-deliver every stage event of the transfer, byte for byte.
    for topic in [kit.topics().validated(), kit.topics().withdrawn(), kit.topics().deposited()] {
        for message in kit.read_topic(&topic).await? {
            kit.publish_raw(
                &topic,
                message.key.as_deref(),
                message.payload.as_deref().unwrap_or_default(),
                &message.headers,
            )
            .await?;
        }
    }
    // A different request reusing the transfer id is refused as a conflict.
    let mut conflicting = request.clone();
    conflicting.amount_minor = 9_000_00;
    kit.publish(&conflicting).await?;

    for stage in StageName::ALL {
        kit.wait_caught_up(stage, SETTLE).await?;
    }
    kit.wait_terminal(&[id], SETTLE).await?;
    ensure!(kit.effect_counts().await? == (before.0, before.1, before.2 + 1, before.3), "only the dead letter is new");
    ensure!(investor_balance(&kit, "carol").await? == (7_000_00, 0));
    ensure!(kit.transfer(id).await?.amount_minor == 3_000_00, "the first request stands");

    let dead = wait_for_messages(&kit, &Topics::dead_letter(&kit.topics().requested()), 1).await?;
    ensure!(dead[0].header(dlq::ERROR_CLASS) == Some("conflicting_duplicate"));
    ensure!(dead[0].payload.as_deref() == Some(encode(&conflicting)?.as_slice()), "original bytes kept");

    pipeline.stop().await?;
    kit.assert_books_balance().await
}

async fn redelivery_after_commit_before_offset_commit_leaves_one_effect(kind: BrokerKind) -> Result<()> {
    let mut kit = TestKit::start(kind).await?;
    for investor in 0..5 {
        kit.seed_investor(&format!("inv-{investor}"), 10_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let closed_account = kit.seed_fund("closed", 100_00, 100, 1_000_000_00).await?;
    kit.set_simulated_account_status(&closed_account, "closed").await?;
    let pipeline = kit.spawn_all();
    let mut ids = Vec::new();
    for investor in 0..5 {
        ids.push(kit.publish(&kit.request(&format!("inv-{investor}"), &fund_account, 1_500_00)).await?);
        ids.push(kit.publish(&kit.request(&format!("inv-{investor}"), &closed_account, 700_00)).await?);
        ids.push(kit.publish(&kit.request(&format!("inv-{investor}"), &fund_account, 50_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    for stage in StageName::ALL {
        kit.wait_caught_up(stage, SETTLE).await?;
    }
    pipeline.stop().await?;
    let before = kit.effect_counts().await?;
    let balances_before = investor_balance(&kit, "inv-3").await?;

    // Every database commit stands but every offset commit is lost: the
    // restarted stages see every message again.
    kit.forget_committed_offsets();
    let pipeline = kit.spawn_all();
    for stage in StageName::ALL {
        kit.wait_caught_up(stage, SETTLE).await?;
    }
    pipeline.stop().await?;

    ensure!(
        kit.effect_counts().await? == before,
        "redelivery changed effects: {:?} vs {before:?}",
        kit.effect_counts().await?
    );
    ensure!(investor_balance(&kit, "inv-3").await? == balances_before);
    ensure!(balances_before == (10_000_00 - 1_500_00, 0));
    kit.assert_books_balance().await
}

async fn concurrent_transfers_never_overspend(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start_with(kind, |config| config.topic_partitions = 6).await?;
    kit.seed_investor("dave", 1_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;

    // Three validators in one group race for the same investor from
    // different partitions; the other stages and the relay run apart.
    let validators: Vec<_> = (0..3).map(|_| kit.spawn(&[Part::Stage(StageName::Validator)])).collect();
    let rest = kit.spawn(&[
        Part::Stage(StageName::Withdrawal),
        Part::Stage(StageName::Deposit),
        Part::Stage(StageName::Completion),
        Part::Relay,
    ]);
    let requests: Vec<_> = (0..25).map(|_| kit.request("dave", &fund_account, 100_00)).collect();
    let ids: Vec<Uuid> = futures::future::try_join_all(requests.iter().map(|request| kit.publish(request))).await?;
    kit.wait_terminal(&ids, SETTLE).await?;

    let mut completed = 0;
    let mut insufficient = 0;
    for id in &ids {
        let transfer = kit.transfer(*id).await?;
        match (transfer.state, transfer.reason_code.as_deref()) {
            (TransferState::Completed, _) => completed += 1,
            (TransferState::Rejected, Some("INSUFFICIENT_FUNDS")) => insufficient += 1,
            other => anyhow::bail!("unexpected outcome {other:?}"),
        }
    }
    ensure!((completed, insufficient) == (10, 15), "completed {completed}, insufficient {insufficient}");
    ensure!(investor_balance(&kit, "dave").await? == (0, 0));
    ensure!(fund_account_balance(&kit, &fund_account).await? == 1_000_00);

    for validator in validators {
        validator.stop().await?;
    }
    rest.stop().await?;
    kit.assert_books_balance().await
}

async fn wait_for_messages(kit: &TestKit, topic: &str, count: usize) -> Result<Vec<bridge_pipeline::message::Inbound>> {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let messages = kit.read_topic(topic).await?;
        if messages.len() >= count {
            return Ok(messages);
        }
        ensure!(std::time::Instant::now() < deadline, "{topic}: {} of {count} messages", messages.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn undecodable_messages_go_to_the_dead_letter_topic_and_the_partition_flows(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("erin", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();

    let good = kit.request("erin", &fund_account, 1_000_00);
    let valid = encode(&good)?;
    let mut unknown_fingerprint = valid.clone();
    unknown_fingerprint[5] ^= 0xff;
    let mut not_a_uuid = good.clone();
    not_a_uuid.transfer_id = "order-17".into();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("bad_magic", b"{\"transfer_id\": \"json is not our encoding\"}".to_vec()),
        ("truncated", valid[..6].to_vec()),
        ("schema_mismatch", valid[..valid.len() - 4].to_vec()),
        ("unknown_fingerprint", unknown_fingerprint),
        ("invalid_request", encode(&not_a_uuid)?),
    ];
    // Same key as the good request: same partition, published before it.
    let key = good.transfer_id.as_bytes();
    let headers = vec![("origin".to_owned(), b"fuzzer".to_vec())];
    let requested = kit.topics().requested();
    for (_, payload) in &bad {
        kit.publish_raw(&requested, Some(key), payload, &headers).await?;
    }
    let id = kit.publish(&good).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    ensure!(kit.transfer(id).await?.state == TransferState::Completed, "the partition kept flowing");
    kit.wait_caught_up(StageName::Validator, SETTLE).await?;

    // Exactly one dead-letter record was written per bad message (the topic
    // itself may hold relay duplicates, which at-least-once allows).
    let dead_letter_topic = Topics::dead_letter(&requested);
    let (_, _, written, _) = kit.effect_counts().await?;
    ensure!(written as usize == bad.len(), "each bad message dead-lettered once, got {written}");
    let mut seen = std::collections::HashSet::new();
    let dead: Vec<_> = wait_for_messages(&kit, &dead_letter_topic, bad.len())
        .await?
        .into_iter()
        .filter(|record| {
            seen.insert((
                record.header(dlq::ORIGINAL_PARTITION).map(str::to_owned),
                record.header(dlq::ORIGINAL_OFFSET).map(str::to_owned),
            ))
        })
        .collect();
    let originals = kit.read_topic(&requested).await?;
    for ((class, payload), record) in bad.iter().zip(&dead) {
        ensure!(
            record.header(dlq::ERROR_CLASS) == Some(*class),
            "expected {class}, got {:?}",
            record.header(dlq::ERROR_CLASS)
        );
        ensure!(record.payload.as_deref() == Some(payload.as_slice()), "{class}: original bytes kept");
        ensure!(record.key.as_deref() == Some(key), "{class}: original key kept");
        ensure!(record.header("origin") == Some("fuzzer"), "{class}: original headers kept");
        ensure!(record.header(dlq::ORIGINAL_TOPIC) == Some(requested.as_str()));
        let offset: i64 = record.header(dlq::ORIGINAL_OFFSET).context("offset header")?.parse()?;
        let partition: i32 = record.header(dlq::ORIGINAL_PARTITION).context("partition header")?.parse()?;
        let original = originals
            .iter()
            .find(|message| message.offset == offset && message.partition == partition)
            .context("original position")?;
        ensure!(original.payload == record.payload);
        ensure!(record.header(dlq::ERROR_MESSAGE).is_some_and(|message| !message.is_empty()));
    }

    // Stage topics dead-letter too: garbage, and a well-formed event about a
    // transfer that does not exist, on the deposit stage's input.
    let withdrawn = kit.topics().withdrawn();
    let orphan = bridge_codec::FundsWithdrawn {
        event_id: Uuid::new_v4().to_string(),
        transfer_id: Uuid::new_v4().to_string(),
        version: 3,
        investor_account_id: "erin".into(),
        fund_account_id: fund_account.clone(),
        fund_id: "fund".into(),
        amount_minor: 1,
        currency: "EUR".into(),
        occurred_at: 0,
        external_reference: String::new(),
    };
    kit.publish_raw(&withdrawn, Some(b"k"), &[0xde, 0xad, 0xbe, 0xef], &[]).await?;
    kit.publish_raw(&withdrawn, Some(b"k"), &encode(&orphan)?, &[]).await?;
    let mut seen = std::collections::HashSet::new();
    let stage_dead: Vec<_> = wait_for_messages(&kit, &Topics::dead_letter(&withdrawn), 2)
        .await?
        .into_iter()
        .filter(|record| seen.insert(record.header(dlq::ORIGINAL_OFFSET).map(str::to_owned)))
        .collect();
    let classes: Vec<Option<&str>> = stage_dead.iter().map(|record| record.header(dlq::ERROR_CLASS)).collect();
    ensure!(classes == [Some("bad_magic"), Some("unknown_transfer")], "{classes:?}");
    ensure!(stage_dead.iter().all(|record| record.header(dlq::STAGE) == Some("deposit")));

    pipeline.stop().await?;
    kit.assert_books_balance().await
}

async fn lost_replies_from_the_bank_move_money_once(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("frank", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let closed_account = kit.seed_fund("closed", 100_00, 10, 1_000_000_00).await?;
    kit.set_simulated_account_status(&closed_account, "closed").await?;
    // Every withdrawal, deposit and refund succeeds at the service but its
    // first reply is lost, so each step is attempted at least twice.
    let pipeline = kit.spawn_with_services(&Part::all(), LosingFirstReplies::services(kit.pool.clone()));

    let completed = kit.publish(&kit.request("frank", &fund_account, 1_200_00)).await?;
    let reversed = kit.publish(&kit.request("frank", &closed_account, 300_00)).await?;
    kit.wait_terminal(&[completed, reversed], SETTLE).await?;
    pipeline.stop().await?;

    ensure!(kit.transfer(completed).await?.state == TransferState::Completed);
    ensure!(kit.transfer(reversed).await?.state == TransferState::Reversed);
    ensure!(investor_balance(&kit, "frank").await? == (10_000_00 - 1_200_00, 0));
    ensure!(fund_account_balance(&kit, &fund_account).await? == 1_200_00);
    // The services' own books: one operation per (transfer, step).
    let operations: Vec<(String, String)> =
        sqlx::query_as("SELECT operation, outcome FROM sim_operations ORDER BY operation, outcome")
            .fetch_all(&kit.pool)
            .await?;
    let expected = [
        ("deposit", "declined"),
        ("deposit", "settled"),
        ("refund", "settled"),
        ("withdrawal", "settled"),
        ("withdrawal", "settled"),
    ];
    ensure!(
        operations.iter().map(|(op, outcome)| (op.as_str(), outcome.as_str())).collect::<Vec<_>>() == expected,
        "{operations:?}"
    );
    kit.assert_books_balance().await
}

async fn a_standby_relay_takes_over_and_status_stays_in_order(kind: BrokerKind) -> Result<()> {
    let kit = TestKit::start(kind).await?;
    kit.seed_investor("ivan", 1_000_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_000_00).await?;
    let stages: Vec<Part> = StageName::ALL.into_iter().map(Part::Stage).collect();
    let stage_runner = kit.spawn(&stages);
    let first_relay = kit.spawn(&[Part::Relay]);

    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(kit.publish(&kit.request("ivan", &fund_account, 100_00)).await?);
    }
    // Transfers completed, so the only relay running leads.
    kit.wait_terminal(&ids, SETTLE).await?;
    let second_relay = kit.spawn(&[Part::Relay]);
    for _ in 0..10 {
        ids.push(kit.publish(&kit.request("ivan", &fund_account, 100_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;

    // The leader goes away; the standby must publish what comes next.
    first_relay.stop().await?;
    for _ in 0..10 {
        ids.push(kit.publish(&kit.request("ivan", &fund_account, 100_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    stage_runner.stop().await?;
    second_relay.stop().await?;

    status_in_version_order(&kit, ids.len()).await?;
    kit.assert_books_balance().await
}

/// Each of the `transfers` completed transfers' status events first appear
/// on the status topic in version order (a relay may publish one again).
async fn status_in_version_order(kit: &TestKit, transfers: usize) -> Result<()> {
    let mut first_seen: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for message in kit.read_topic(&kit.topics().status()).await? {
        let event = decode::<TransferStatusChanged>(message.payload.as_deref().unwrap_or_default())?;
        if seen.insert(event.event_id.clone()) {
            first_seen.entry(event.transfer_id).or_default().push(event.version);
        }
    }
    ensure!(first_seen.len() == transfers, "{} transfers on the status topic, not {transfers}", first_seen.len());
    for (transfer, versions) in &first_seen {
        ensure!(versions == &[1, 2, 3, 4, 5], "transfer {transfer}: versions in topic order {versions:?}");
    }
    Ok(())
}

/// The relay claims and deletes on the session that holds its leadership.
/// When Postgres ends that session, the relay must notice at its next claim,
/// step down, connect again and lead again: transfers published after it
/// still complete, each transfer's status events still in order, and
/// nothing is left in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_whose_session_ends_steps_down_and_leads_again() -> Result<()> {
    use bridge_store::outbox;
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("ines", 1_000_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_000_00).await?;
    let stages: Vec<Part> = StageName::ALL.into_iter().map(Part::Stage).collect();
    let stage_runner = kit.spawn(&stages);
    let relay = kit.spawn(&[Part::Relay]);
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(kit.publish(&kit.request("ines", &fund_account, 100_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;

    // The session holding the relay's advisory lock, in this test's database.
    let leader_sessions = "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                           WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()";
    let ended: Vec<bool> = sqlx::query_scalar(&format!("SELECT pg_terminate_backend(pid) FROM ({leader_sessions}) s"))
        .fetch_all(&kit.pool)
        .await?;
    ensure!(ended == [true], "expected one leading session to end, ended {ended:?}");

    for _ in 0..10 {
        ids.push(kit.publish(&kit.request("ines", &fund_account, 100_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await.context("nothing published after the relay's session ended")?;
    let leaders: Vec<i32> = sqlx::query_scalar(leader_sessions).fetch_all(&kit.pool).await?;
    ensure!(leaders.len() == 1, "leading sessions afterwards: {leaders:?}");
    stage_runner.stop().await?;
    relay.stop().await?;
    let mut conn = kit.pool.acquire().await?;
    let left = outbox::unpublished_count(&mut conn).await?;
    ensure!(left == 0, "{left} messages left in the outbox");

    status_in_version_order(&kit, ids.len()).await?;
    kit.assert_books_balance().await
}

/// The broker goes away for longer than the producer's message timeout while
/// the relay holds committed outbox rows. Every produce times out ("maybe
/// published"), the rows stay unpublished, and once the broker is back they
/// are sent again; the stages absorb any duplicate. In-process cluster only:
/// it is the broker a test can switch off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_the_message_timeout_loses_nothing() -> Result<()> {
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.producer_message_timeout_ms = 1_500;
        config.retry_backoff_max_ms = 500;
    })
    .await?;
    kit.seed_investor("nina", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let stages: Vec<Part> = StageName::ALL.into_iter().map(Part::Stage).collect();
    let stage_runner = kit.spawn(&stages);
    let mut ids = Vec::new();
    for amount in [1_000_00, 1_500_00, 2_000_00] {
        ids.push(kit.publish(&kit.request("nina", &fund_account, amount)).await?);
    }
    // With no relay running, validation's outbox rows wait in Postgres.
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let validated: i64 =
            sqlx::query_scalar("SELECT count(*) FROM transfers WHERE id = ANY($1) AND state = 'validated'")
                .bind(&ids)
                .fetch_one(&kit.pool)
                .await?;
        if validated == 3 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "not validated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    kit.set_broker_up(false)?;
    let relay = kit.spawn(&[Part::Relay]);
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE last_error IS NOT NULL").fetch_one(&kit.pool).await?;
        if failed > 0 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "the relay never hit the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kit.set_broker_up(true)?;

    kit.wait_terminal(&ids, SETTLE).await?;
    relay.stop().await?;
    stage_runner.stop().await?;
    for id in &ids {
        ensure!(kit.transfer(*id).await?.state == TransferState::Completed);
    }
    ensure!(investor_balance(&kit, "nina").await? == (10_000_00 - 4_500_00, 0));
    kit.assert_books_balance().await
}

/// The broker answers with errors (in-process cluster, injected): produce
/// requests fail as if leadership moved or the request timed out, offset
/// commits fail as if the group coordinator were away. Clients retry; every
/// transfer completes once, and every status event is published under one
/// id however often it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_request_errors_delay_but_lose_nothing() -> Result<()> {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| config.retry_backoff_max_ms = 300).await?;
    kit.seed_investor("rex", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 100, 1_000_000_00).await?;
    let mut produce_errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 10];
    produce_errors.extend([RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 5]);
    kit.inject_request_errors(RDKafkaApiKey::Produce, produce_errors)?;
    kit.inject_request_errors(
        RDKafkaApiKey::OffsetCommit,
        vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10],
    )?;
    let pipeline = kit.spawn_all();
    let mut ids = Vec::new();
    for amount in 1..=10 {
        ids.push(kit.publish(&kit.request("rex", &fund_account, amount * 100_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    pipeline.stop().await?;
    for id in &ids {
        ensure!(kit.transfer(*id).await?.state == TransferState::Completed);
    }
    let status = kit.read_topic(&kit.topics().status()).await?;
    let distinct: std::collections::HashSet<_> =
        status.iter().filter_map(|m| m.header("ce_id").map(str::to_owned)).collect();
    ensure!(distinct.len() == 5 * ids.len(), "{} distinct status events", distinct.len());
    kit.assert_books_balance().await
}

/// Published outbox rows are deleted as they go, and with the inbox's
/// retention at zero the relay prunes inbox rows too. Dead-letter records
/// stay, and a
/// full redelivery of every topic afterwards (fresh consumer groups) still
/// moves no money twice: the transfer's state is the second guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pruned_outbox_and_inbox_leave_nothing_to_apply_twice() -> Result<()> {
    let mut kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.inbox_retention_ms = 0;
    })
    .await?;
    kit.seed_investor("paz", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();
    let mut ids = Vec::new();
    for amount in [1_000_00, 2_000_00, 3_000_00] {
        ids.push(kit.publish(&kit.request("paz", &fund_account, amount)).await?);
    }
    kit.publish_raw(&kit.topics().requested(), Some(b"poison"), b"not avro", &[]).await?;
    kit.wait_terminal(&ids, SETTLE).await?;
    wait_for_messages(&kit, &Topics::dead_letter(&kit.topics().requested()), 1).await?;
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let (outbox, inbox, dlq_records): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM inbox WHERE message_id NOT LIKE 'dlq:%'),
                    (SELECT count(*) FROM inbox WHERE message_id LIKE 'dlq:%')",
        )
        .fetch_one(&kit.pool)
        .await?;
        if outbox == 0 && inbox == 0 {
            ensure!(dlq_records == 1, "the dead-letter record must survive pruning, found {dlq_records}");
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "not pruned: {outbox} outbox rows, {inbox} inbox rows");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pipeline.stop().await?;
    let (ledger, versions, _, bank) = kit.effect_counts().await?;

    kit.forget_committed_offsets();
    let again = kit.spawn_all();
    for stage in StageName::ALL {
        kit.wait_caught_up(stage, SETTLE).await?;
    }
    kit.wait_outbox_drained(SETTLE).await?;
    again.stop().await?;
    let (ledger_after, versions_after, _, bank_after) = kit.effect_counts().await?;
    ensure!(
        (ledger, versions, bank) == (ledger_after, versions_after, bank_after),
        "redelivery after pruning changed the books"
    );
    let dead_letters = kit.read_topic(&Topics::dead_letter(&kit.topics().requested())).await?;
    ensure!(dead_letters.len() == 1, "the poison message was dead-lettered {} times", dead_letters.len());
    kit.assert_books_balance().await
}

/// Partitions proceed side by side: while one transfer's withdrawal keeps
/// failing transiently (its bank is down) and is retried in place, holding
/// its partition, the transfers on every other partition complete. Those
/// behind it on its own partition wait (that is per-transfer order), and
/// everything completes once the bank is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_partition_does_not_hold_up_the_others() -> Result<()> {
    use bridge_testkit::UnavailableForOneAccount;
    let kit = TestKit::start_with(BrokerKind::InProcess, |config| {
        config.topic_partitions = 4;
        config.retry_backoff_max_ms = 200;
    })
    .await?;
    kit.seed_investor("stuck", 10_000_00).await?;
    kit.seed_investor("free", 100_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let (services, bank) = UnavailableForOneAccount::services(kit.pool.clone(), "stuck");
    let pipeline = kit.spawn_with_services(&Part::all(), services);
    let stuck = kit.publish(&kit.request("stuck", &fund_account, 1_000_00)).await?;
    let mut others = Vec::new();
    for amount in 1..=16 {
        others.push(kit.publish(&kit.request("free", &fund_account, amount * 100_00)).await?);
    }
    // Which partition of the withdrawal stage's topic each transfer is on.
    let validated = wait_for_messages(&kit, &kit.topics().validated(), 17).await?;
    let partition_of =
        |id: Uuid| validated.iter().find(|m| m.key.as_deref() == Some(id.to_string().as_bytes())).map(|m| m.partition);
    let held = partition_of(stuck).context("the stuck transfer was validated")?;
    let (behind, free): (Vec<Uuid>, Vec<Uuid>) = others.iter().partition(|id| partition_of(**id) == Some(held));
    ensure!(!free.is_empty(), "every transfer landed on one partition; the test needs others");
    kit.wait_terminal(&free, SETTLE).await?;
    ensure!(kit.transfer(stuck).await?.state == TransferState::Validated, "the stuck withdrawal went through");
    for id in &free {
        ensure!(kit.transfer(*id).await?.state == TransferState::Completed);
    }
    bank.set_down(false);
    let mut all = others.clone();
    all.push(stuck);
    kit.wait_terminal(&all, SETTLE).await?;
    pipeline.stop().await?;
    for id in &all {
        ensure!(kit.transfer(*id).await?.state == TransferState::Completed);
    }
    eprintln!(
        "{} transfers on other partitions completed while one was stuck; {} waited behind it",
        free.len(),
        behind.len()
    );
    kit.assert_books_balance().await
}

/// Commits wake the relay (a NOTIFY after each commit that wrote outbox
/// rows): with the relay's poll a minute apart, a transfer still passes
/// all four stages, each hop an outbox row to publish, within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_wake_the_relay_between_its_polls() -> Result<()> {
    let mut kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.config.relay_poll_interval_ms = 60_000;
    kit.seed_investor("inv-wake", 1_000_00).await?;
    let fund = kit.seed_fund("wake", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();
    // The relay's first claim finds nothing; it then sleeps until woken.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let id = kit.publish(&kit.request("inv-wake", &fund, 500_00)).await?;
    kit.wait_terminal(&[id], Duration::from_secs(20)).await.context("not woken: the relay waited for its poll")?;
    let state = kit.transfer(id).await?.state;
    ensure!(state == TransferState::Completed, "{state:?}");
    pipeline.stop().await
}

/// The relay's claim starts from a cursor, not the start of the outbox, and
/// the cursor never passes a row it has not seen: a row written (with the
/// lower id) by a transaction still open during a claim, and committed
/// after it, is claimed by the next; so is a row whose publication failed,
/// and the row a full claim had no room for. A row holds one transaction's
/// messages, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_claim_cursor_passes_no_row_it_has_not_seen() -> Result<()> {
    use bridge_store::outbox::{self, OutboxMessage};
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let message = |topic: &str| OutboxMessage {
        event_id: Uuid::new_v4(),
        topic: topic.to_owned(),
        key: None,
        payload: b"payload".to_vec(),
        headers: Vec::new(),
    };
    let topics = |claim: &outbox::Claim| {
        claim.rows.iter().flat_map(|row| row.messages.iter().map(|message| message.topic.clone())).collect::<Vec<_>>()
    };
    async fn publish(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, claim: &outbox::Claim) -> Result<()> {
        let ids: Vec<i64> = claim.rows.iter().map(|row| row.id).collect();
        Ok(outbox::delete_published(tx, &ids).await?)
    }

    // "slow" is written first, so it has the lower id, but commits last.
    let mut slow = kit.pool.begin().await?;
    outbox::enqueue(&mut slow, &[message("slow")]).await?;
    let mut quick = kit.pool.begin().await?;
    outbox::enqueue(&mut quick, &[message("quick")]).await?;
    quick.commit().await?;

    let mut relay = kit.pool.begin().await?;
    let first = outbox::claim(&mut relay, 0, &[], 100).await?;
    ensure!(topics(&first) == ["quick"], "first claim: {:?}", topics(&first));
    // Acknowledged rows whose delete the relay has not made yet are left
    // out of its next claims, wherever the cursor is.
    let acknowledged: Vec<i64> = first.rows.iter().map(|row| row.id).collect();
    let again = outbox::claim(&mut relay, 0, &acknowledged, 100).await?;
    ensure!(again.rows.is_empty(), "an acknowledged row claimed again: {:?}", topics(&again));
    publish(&mut relay, &first).await?;
    relay.commit().await?;
    let start = first.next_start(&[]);
    ensure!(start > 0 && start <= first.rows[0].writer, "cursor {start} passed the open writer");

    slow.commit().await?;
    let mut relay = kit.pool.begin().await?;
    let second = outbox::claim(&mut relay, start, &[], 100).await?;
    ensure!(topics(&second) == ["slow"], "second claim: {:?}", topics(&second));
    // Its publication fails: the cursor stays at its row.
    relay.commit().await?;
    let start = second.next_start(&[second.rows[0].id]);
    ensure!(start <= second.rows[0].writer, "cursor {start} passed an unpublished row");

    // Two more transactions, the first with two messages (one row, in
    // order); a claim with room for two messages takes the row that
    // reaches the limit whole, and leaves the next.
    for messages in [&["third", "third-status"][..], &["fourth"]] {
        let mut tx = kit.pool.begin().await?;
        outbox::enqueue(&mut tx, &messages.iter().map(|topic| message(topic)).collect::<Vec<_>>()).await?;
        tx.commit().await?;
    }
    let mut relay = kit.pool.begin().await?;
    let third = outbox::claim(&mut relay, start, &[], 2).await?;
    ensure!(topics(&third) == ["slow", "third", "third-status"], "third claim: {:?}", topics(&third));
    publish(&mut relay, &third).await?;
    relay.commit().await?;
    let start = third.next_start(&[]);

    let mut relay = kit.pool.begin().await?;
    let fourth = outbox::claim(&mut relay, start, &[], 2).await?;
    ensure!(topics(&fourth) == ["fourth"], "fourth claim: {:?}", topics(&fourth));
    publish(&mut relay, &fourth).await?;
    relay.commit().await?;

    // Everything published, the cursor moves past every writer so far, as
    // soon as no transaction older than them runs anywhere in the cluster
    // (transaction ids are the cluster's, and other tests run beside this).
    let (mut start, deadline) = (fourth.next_start(&[]), std::time::Instant::now() + SETTLE);
    while start <= fourth.rows[0].writer {
        ensure!(std::time::Instant::now() < deadline, "cursor {start} did not move past the published rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut relay = kit.pool.begin().await?;
        let empty = outbox::claim(&mut relay, start, &[], 100).await?;
        relay.commit().await?;
        ensure!(empty.rows.is_empty(), "published rows claimed again: {:?}", topics(&empty));
        let next = empty.next_start(&[]);
        ensure!(next >= start, "the cursor moved back from {start} to {next}");
        start = next;
    }
    Ok(())
}

/// A message for `topic` whose key names it among a test's messages.
fn keyed_message(topic: &str, key: &str) -> bridge_store::outbox::OutboxMessage {
    bridge_store::outbox::OutboxMessage {
        event_id: Uuid::new_v4(),
        topic: topic.to_owned(),
        key: Some(key.as_bytes().to_vec()),
        payload: b"payload".to_vec(),
        headers: Vec::new(),
    }
}

/// The keys of every message on `topic`, in topic order.
async fn published_keys(kit: &TestKit, topic: &str) -> Result<Vec<String>> {
    Ok(kit
        .read_topic(topic)
        .await?
        .iter()
        .map(|message| String::from_utf8_lossy(message.key.as_deref().unwrap_or_default()).into_owned())
        .collect())
}

/// The relay deletes what the broker acknowledged a little later, several
/// claims' rows in one statement, and its claims leave those rows out
/// meanwhile. With a transaction left open, every claim starts before the
/// rows committed after it (the cursor cannot pass a writer that may still
/// commit), so a claim that did not leave them out would publish them
/// again. Rows committed one by one, each waking the relay, are each
/// published exactly once, and the outbox drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_publishes_each_row_once_while_its_deletes_wait() -> Result<()> {
    use bridge_store::outbox;
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let topic = kit.topics().status();
    let mut open = kit.pool.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *open).await?;
    let relay = kit.spawn(&[Part::Relay]);
    let keys: Vec<String> = (0..30).map(|n| format!("row-{n}")).collect();
    for key in &keys {
        let mut tx = kit.pool.begin().await?;
        outbox::enqueue(&mut tx, &[keyed_message(&topic, key)]).await?;
        tx.commit().await?;
        outbox::wake_relay(&mut *kit.pool.acquire().await?).await?;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    kit.wait_outbox_drained(SETTLE).await?;
    open.rollback().await?;
    relay.stop().await?;
    let mut published = published_keys(&kit, &topic).await?;
    published.sort_by_key(|key| key[4..].parse::<u32>().unwrap_or(u32::MAX));
    ensure!(published == keys, "published: {published:?}");
    Ok(())
}

/// A notification sent by a transaction that had ended before the relay's
/// last claim read is one that claim answered, and the relay does not
/// claim for it again. One that claim may not have answered must still
/// wake a claim: with the poll set beyond the test's deadline, rows
/// committed one by one, each announced by its writer, by two writers at
/// once, and by a writer whose notification says nothing of itself (an
/// earlier release's), are all published on their notifications alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_claims_for_every_notification_its_last_claim_did_not_answer() -> Result<()> {
    use bridge_store::outbox;
    let mut kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.config.relay_poll_interval_ms = 600_000;
    let topic = kit.topics().status();
    let relay = kit.spawn(&[Part::Relay]);
    let message = |key: &str| keyed_message(&topic, key);
    let mut keys = Vec::new();
    for round in 0..10 {
        // Two writers commit, then each announces itself.
        let (first, second) = (format!("{round}-a"), format!("{round}-b"));
        let mut a = kit.pool.begin().await?;
        outbox::enqueue(&mut a, &[message(&first)]).await?;
        let mut b = kit.pool.begin().await?;
        outbox::enqueue(&mut b, &[message(&second)]).await?;
        a.commit().await?;
        outbox::wake_relay(&mut *kit.pool.acquire().await?).await?;
        b.commit().await?;
        outbox::wake_relay(&mut *kit.pool.acquire().await?).await?;
        keys.extend([first, second]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    kit.wait_outbox_drained(SETTLE).await.context("a row announced by its writer was left for the poll")?;
    // A notification that does not name its sender always wakes a claim.
    let mut tx = kit.pool.begin().await?;
    outbox::enqueue(&mut tx, &[message("silent")]).await?;
    tx.commit().await?;
    sqlx::query("SELECT pg_notify($1, '')").bind(outbox::NOTIFY_CHANNEL).execute(&kit.pool).await?;
    keys.push("silent".to_owned());

    kit.wait_outbox_drained(SETTLE).await.context("a row announced without its writer's id was left for the poll")?;
    relay.stop().await?;
    let mut published = published_keys(&kit, &topic).await?;
    published.sort();
    keys.sort();
    ensure!(published == keys, "published: {published:?}");
    Ok(())
}

/// A broker reached over IPv6: the pipeline's bootstrap address is `[::1]`,
/// forwarded to the in-process cluster, which advertises its IPv4
/// addresses for the rest. No address family is pinned in the clients, so
/// the bootstrap works over either family (pinned to IPv4, librdkafka
/// would not even try `[::1]`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_bootstraps_from_a_broker_address_over_ipv6() -> Result<()> {
    let mut kit = TestKit::start(BrokerKind::InProcess).await?;
    let target = kit.config.brokers.split(',').next().context("a broker")?.to_owned();
    let listener = tokio::net::TcpListener::bind("[::1]:0").await?;
    let bootstrap = format!("[::1]:{}", listener.local_addr()?.port());
    let forwarded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = forwarded.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    kit.config.brokers = bootstrap;
    kit.seed_investor("inv", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();
    let id = kit.publish(&kit.request("inv", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[id], SETTLE).await?;
    pipeline.stop().await?;
    ensure!(kit.transfer(id).await?.state == TransferState::Completed, "{:?}", kit.transfer(id).await?.state);
    ensure!(forwarded.load(std::sync::atomic::Ordering::SeqCst) > 0, "nothing connected over IPv6");
    Ok(())
}

/// With signed requests required: a request signed by a registered source
/// allowed to move that investor's money into that fund completes; one
/// unsigned, signed with another secret, tampered with, signed too long
/// before it arrived, or from a source that is unknown or not allowed for
/// that investor is rejected with its own reason code, and none of those
/// reaches the bank.
async fn only_requests_signed_by_an_allowed_source_move_money(kind: BrokerKind) -> Result<()> {
    use bridge_pipeline::sources::signature_headers;
    use bridge_pipeline::upstream::request_headers;
    use bridge_webhooks::Secret;

    let kit = TestKit::start(kind).await?;
    kit.seed_investor("inv-a", 10_000_00).await?;
    kit.seed_investor("inv-b", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let keyring = bridge_testkit::keyring();
    let secret = Secret::from_bytes(*Uuid::new_v4().as_bytes().repeat(2).first_chunk::<32>().context("32 bytes")?);
    let reference = bridge_testkit::sealed_secret(&kit.pool, &keyring, &secret.expose()).await?;
    let source = bridge_store::sources::Source {
        name: "crm".to_owned(),
        investors: vec!["inv-a".to_owned()],
        funds: vec!["fund".to_owned()],
        secret_credential: reference,
        created_at: chrono::Utc::now(),
        revoked_at: None,
    };
    bridge_store::sources::put(&mut *kit.pool.acquire().await?, &source).await?;
    let pipeline = kit.pipeline().require_signed_requests(keyring);
    let stop = tokio_util::sync::CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { pipeline.run(&Part::all(), stop).await })
    };

    let other = Secret::from_bytes([7; 32]);
    let now = bridge_testkit::unix_now();
    let send = |investor: &str, source: &str, secret: Option<&Secret>, signed_at: i64, tamper: bool| {
        let mut request = kit.request(investor, &fund_account, 1_000_00);
        request.source_system = source.to_owned();
        let payload = bridge_codec::encode(&request).expect("encodes");
        let mut headers = request_headers(&request);
        if let Some(secret) = secret {
            headers.extend(signature_headers(source, secret, &request.transfer_id, &payload, signed_at));
        }
        let mut sent = payload.clone();
        if tamper {
            request.amount_minor = 9_000_00;
            sent = bridge_codec::encode(&request).expect("encodes");
        }
        let kit = &kit;
        async move {
            let topic = kit.topics().requested();
            kit.publish_raw(&topic, Some(request.transfer_id.as_bytes()), &sent, &headers).await?;
            anyhow::Ok(Uuid::parse_str(&request.transfer_id)?)
        }
    };
    let signed = send("inv-a", "crm", Some(&secret), now, false).await?;
    let cases = [
        (send("inv-a", "crm", None, now, false).await?, "REQUEST_UNSIGNED"),
        (send("inv-a", "crm", Some(&other), now, false).await?, "REQUEST_SIGNATURE_INVALID"),
        (send("inv-a", "crm", Some(&secret), now, true).await?, "REQUEST_SIGNATURE_INVALID"),
        (send("inv-a", "crm", Some(&secret), now - 3_600, false).await?, "REQUEST_SIGNATURE_STALE"),
        (send("inv-b", "crm", Some(&secret), now, false).await?, "SOURCE_NOT_ALLOWED"),
        (send("inv-a", "mallory", Some(&secret), now, false).await?, "SOURCE_NOT_ALLOWED"),
    ];
    let mut ids: Vec<Uuid> = cases.iter().map(|(id, _)| *id).collect();
    ids.push(signed);
    kit.wait_terminal(&ids, SETTLE).await?;
    stop.cancel();
    running.await??;

    ensure!(kit.transfer(signed).await?.state == TransferState::Completed, "{:?}", kit.transfer(signed).await?);
    for (id, code) in cases {
        let transfer = kit.transfer(id).await?;
        ensure!(
            transfer.state == TransferState::Rejected && transfer.reason_code.as_deref() == Some(code),
            "{code}: {:?} {:?}",
            transfer.state,
            transfer.reason_code
        );
    }
    let operations: Vec<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT transfer_id FROM sim_operations").fetch_all(&kit.pool).await?;
    ensure!(operations == [signed], "the bank was asked about {operations:?}");
    let (_, _, dead_letters, _) = kit.effect_counts().await?;
    ensure!(dead_letters == 0, "{dead_letters} dead letters");
    kit.assert_books_balance().await
}

/// The outbox refuses a row the relay could not read: arrays of messages
/// that do not line up, header counts that do not add up to the headers
/// (more or fewer), or a count that is not there fail the writer's
/// statement with a CHECK violation, and a row that adds up is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_refuses_rows_whose_messages_do_not_line_up() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    let insert = |event_ids: i32, counts: &'static str, headers: i32| {
        format!(
            "INSERT INTO outbox (event_ids, topics, message_keys, payloads, header_counts, header_names, header_values)
             SELECT array_agg(gen_random_uuid()) FILTER (WHERE i <= {event_ids}), ARRAY['a', 'b'],
                    ARRAY[NULL, NULL]::bytea[], ARRAY['\\x01', '\\x02']::bytea[], '{counts}'::int[],
                    coalesce(array_agg('h' || i) FILTER (WHERE i <= {headers}), '{{}}'),
                    coalesce(array_agg('\\x00'::bytea) FILTER (WHERE i <= {headers}), '{{}}')
             FROM generate_series(1, 3) i"
        )
    };
    for (event_ids, counts, headers, why) in [
        (2, "{1,1}", 3, "more headers than counted"),
        (2, "{2,1}", 2, "fewer headers than counted"),
        (2, "{1,-1}", 0, "a negative count"),
        (2, "{1,NULL}", 1, "a count that is NULL"),
        (1, "{1,1}", 2, "an event id missing"),
    ] {
        match sqlx::query(&insert(event_ids, counts, headers)).execute(&kit.pool).await {
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23514") => {}
            other => anyhow::bail!("a row with {why} was not refused as a CHECK violation: {other:?}"),
        }
    }
    sqlx::query(&insert(2, "{2,1}", 3)).execute(&kit.pool).await.context("a row that adds up was refused")?;
    let mut conn = kit.pool.acquire().await?;
    let claim = bridge_store::outbox::claim(&mut conn, 0, &[], 100).await?;
    let headers: Vec<usize> = claim.rows.iter().flat_map(|row| row.messages.iter().map(|m| m.headers.len())).collect();
    ensure!(headers == [2, 1], "headers per message: {headers:?}");
    Ok(())
}

/// Rows still to publish when the outbox became one row per transaction
/// (migration 0027) are published as they were written: each becomes a row
/// of one message with its topic, key, payload and headers, in its place in
/// the claim order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_rows_left_by_an_earlier_release_are_published_as_written() -> Result<()> {
    use bridge_store::outbox::{self, OutboxMessage};
    let (_, pool) = bridge_testkit::scratch_database(&bridge_testkit::database_server()).await?;

    // The schema as the release before 0027 left it.
    bridge_testkit::migrate_before(&pool, "0027").await?;
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, message_key, payload, header_names, header_values)
         VALUES ($1, 'bridge.transfers.validated.v1', 'transfer-1', '\\x0102', '{ce_id,traceparent}', '{\"\\\\x61\",\"\\\\x62\"}'),
                ($2, 'bridge.transfers.status.v1', NULL, '\\x03', '{}', '{}')",
    )
    .bind(first)
    .bind(second)
    .execute(&pool)
    .await?;

    bridge_store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    let claim = outbox::claim(&mut conn, 0, &[], 100).await?;
    let messages: Vec<Vec<OutboxMessage>> = claim.rows.into_iter().map(|row| row.messages).collect();
    let expected = vec![
        vec![OutboxMessage {
            event_id: first,
            topic: "bridge.transfers.validated.v1".to_owned(),
            key: Some(b"transfer-1".to_vec()),
            payload: vec![1, 2],
            headers: vec![("ce_id".to_owned(), b"a".to_vec()), ("traceparent".to_owned(), b"b".to_vec())],
        }],
        vec![OutboxMessage {
            event_id: second,
            topic: "bridge.transfers.status.v1".to_owned(),
            key: None,
            payload: vec![3],
            headers: Vec::new(),
        }],
    ];
    ensure!(messages == expected, "{messages:?}");
    Ok(())
}
