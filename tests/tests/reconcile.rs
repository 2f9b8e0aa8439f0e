//! The books check must catch each kind of damage it claims to catch. Each
//! case tampers with a settled database inside a transaction, runs the check
//! there, and rolls back.

use std::time::Duration;

use anyhow::{ensure, Result};

use bridge_store::reconcile;
use bridge_testkit::{BrokerKind, TestKit};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_check_fails_on_the_damage_it_describes() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    kit.seed_investor("grace", 10_000_00).await?;
    kit.seed_investor("heidi", 10_000_00).await?;
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let pipeline = kit.spawn_all();
    let done = kit.publish(&kit.request("grace", &fund_account, 2_000_00)).await?;
    let rejected = kit.publish(&kit.request("heidi", &fund_account, 50_000_00)).await?;
    kit.wait_terminal(&[done, rejected], Duration::from_secs(90)).await?;
    pipeline.stop().await?;
    kit.assert_books_balance().await?;

    let cases: [(&str, &str, String); 15] = [
        ("I1", "investor balances", "UPDATE investor_accounts SET balance_minor = balance_minor + 1, version = version + 1 WHERE id = 'grace'".into()),
        ("I1", "one debit and one credit", "DELETE FROM ledger_entries WHERE id = (SELECT max(id) FROM ledger_entries)".into()),
        ("I1", "fund account balances", format!("UPDATE fund_accounts SET balance_minor = 0, version = version + 1 WHERE id = '{fund_account}'")),
        ("I2", "postings its state implies", format!("UPDATE transfers SET state = 'withdrawn' WHERE id = '{done}'")),
        ("I3", "list of open transfers", format!("INSERT INTO open_transfers SELECT created_at, id FROM transfers WHERE id = '{done}'")),
        ("I3", "list of open transfers", format!("UPDATE transfers SET state = 'manual_review' WHERE id = '{rejected}'")),
        ("I5", "held funds", "UPDATE investor_accounts SET held_minor = 1, version = version + 1 WHERE id = 'heidi'".into()),
        ("I5", "sum of their allocations", "UPDATE allocations SET completed_minor = completed_minor - 1, version = version + 1".into()),
        ("I5", "transfers reserved or completed", "UPDATE funds SET allocated_minor = allocated_minor - 1, version = version + 1".into()),
        ("I6", "previous state", format!("UPDATE transfer_versions SET previous_state = 'requested' WHERE transfer_id = '{done}' AND version = 4")),
        ("I6", "without gaps", format!("DELETE FROM transfer_versions WHERE transfer_id = '{rejected}' AND version = 2")),
        ("I6", "share a status event id", format!("UPDATE transfer_versions SET event_id = (SELECT event_id FROM transfer_versions WHERE transfer_id = '{done}' AND version = 1) WHERE transfer_id = '{rejected}' AND version = 2")),
        ("I6", "belongs to a transfer", "INSERT INTO transfer_versions (transfer_id, version, state, event_id) VALUES (gen_random_uuid(), 1, 'requested', gen_random_uuid())".into()),
        ("I6", "last entry of its history", format!("UPDATE fund_accounts SET version = version + 1 WHERE id = '{fund_account}'")),
        ("I6", "legal transition", format!("UPDATE transfer_versions SET state = 'completed', previous_state = 'requested' WHERE transfer_id = '{rejected}' AND version = 2")),
    ];
    for (invariant, name_part, damage) in cases {
        let mut tx = kit.pool.begin().await?;
        // History is append-only in the database; damaging it takes what
        // only a superuser has: switching triggers off.
        sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await?;
        sqlx::query(&damage).execute(&mut *tx).await?;
        let report = reconcile::run(&mut tx).await?;
        tx.rollback().await?;
        let caught =
            report.violations().iter().any(|check| check.invariant == invariant && check.name.contains(name_part));
        ensure!(caught, "{invariant} '{name_part}' missed damage {damage:?}; violations {:?}", report.violations());
    }

    // A transfer in flight that nothing works on is fine for a moment,
    // then named; a step pending at its service and being asked about
    // keeps it off the list, an abandoned one does not.
    let idle = |minutes: i64| format!("now() - interval '{minutes} minutes'");
    for (pending, named) in [
        (None, true),
        (Some((idle(-1), idle(-60 * 24))), false),
        (Some((idle(30), idle(-60 * 24))), true),
        (Some((idle(-1), idle(30))), true),
    ] {
        let mut tx = kit.pool.begin().await?;
        sqlx::query(&format!("UPDATE transfers SET state = 'deposited', updated_at = {} WHERE id = $1", idle(20)))
            .bind(done)
            .execute(&mut *tx)
            .await?;
        // Open again, so listed among the open transfers, as every writer of
        // a transfer's state keeps it.
        sqlx::query("INSERT INTO open_transfers SELECT created_at, id FROM transfers WHERE id = $1")
            .bind(done)
            .execute(&mut *tx)
            .await?;
        if let Some((next_run, deadline)) = &pending {
            sqlx::query(&format!(
                "INSERT INTO pending_steps (transfer_id, step, next_run_at, deadline_at) VALUES ($1, 'deposit', {next_run}, {deadline})"
            ))
            .bind(done)
            .execute(&mut *tx)
            .await?;
        }
        let quiet = reconcile::run_with(&mut tx, 3_600).await?;
        let report = reconcile::run_with(&mut tx, 600).await?;
        tx.rollback().await?;
        let early = quiet.violations().iter().any(|check| check.invariant == "I3");
        ensure!(!early, "idle for less than the window, yet reported: {:?}", quiet.violations());
        let reported =
            report.violations().iter().any(|check| check.invariant == "I3" && check.examples == [done.to_string()]);
        ensure!(
            reported == named,
            "pending {pending:?}: named {reported}, expected {named}: {:?}",
            report.violations()
        );
    }

    // An operation the bank holds for a transfer still waiting for that
    // step, with no pending step of ours following it: money moved (or may
    // move) that our books will never hear about.
    for (outcome, pending, named) in [("pending", false, true), ("declined", false, true), ("pending", true, false)] {
        let mut tx = kit.pool.begin().await?;
        sqlx::query("UPDATE transfers SET state = 'validated' WHERE id = $1").bind(done).execute(&mut *tx).await?;
        sqlx::query(&format!(
            "INSERT INTO sim_operations (idempotency_key, operation, account_id, amount_minor, currency, outcome, reference, created_at, transfer_id)
             VALUES ('bridge-{done}-withdrawal-again', 'withdrawal', 'grace', 1, 'EUR', $1, 'x', {}, '{done}')",
            idle(20)
        ))
        .bind(outcome)
        .execute(&mut *tx)
        .await?;
        if pending {
            sqlx::query("INSERT INTO pending_steps (transfer_id, step, next_run_at) VALUES ($1, 'withdrawal', now())")
                .bind(done)
                .execute(&mut *tx)
                .await?;
        }
        let report = reconcile::run_with(&mut tx, 600).await?;
        tx.rollback().await?;
        let reported = report.violations().iter().any(|check| check.name.contains("followed by a pending step"));
        ensure!(
            reported == named,
            "{outcome} operation, pending step {pending}: reported {reported}: {:?}",
            report.violations()
        );
    }

    // An outbox row that never reached Kafka is fine for a moment, not for long.
    let mut tx = kit.pool.begin().await?;
    sqlx::query(
        "INSERT INTO outbox (event_ids, topics, message_keys, payloads, header_counts, created_at)
         VALUES (ARRAY[gen_random_uuid()], '{bridge.transfers.status.v1}', '{NULL}', ARRAY['\\x00'::bytea], '{0}',
                 now() - interval '2 hours')",
    )
    .execute(&mut *tx)
    .await?;
    let report = reconcile::run_with(&mut tx, 3_600).await?;
    tx.rollback().await?;
    ensure!(report.violations().iter().any(|check| check.invariant == "I4"), "undelivered outbox row not reported");

    kit.assert_books_balance().await
}
