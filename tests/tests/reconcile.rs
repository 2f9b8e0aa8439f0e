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

    let cases: [(&str, &str, String); 10] = [
        ("I1", "investor balances", "UPDATE investor_accounts SET balance_minor = balance_minor + 1 WHERE id = 'grace'".into()),
        ("I1", "one debit and one credit", "DELETE FROM ledger_entries WHERE id = (SELECT max(id) FROM ledger_entries)".into()),
        ("I1", "fund account balances", format!("UPDATE fund_accounts SET balance_minor = 0 WHERE id = '{fund_account}'")),
        ("I2", "postings its state implies", format!("UPDATE transfers SET state = 'withdrawn' WHERE id = '{done}'")),
        ("I5", "held funds", "UPDATE investor_accounts SET held_minor = 1 WHERE id = 'heidi'".into()),
        ("I5", "sum of their allocations", "UPDATE allocations SET completed_minor = completed_minor - 1".into()),
        ("I5", "transfers in those phases", "UPDATE funds SET completed_minor = completed_minor - 1, investors_count = investors_count".into()),
        ("I6", "previous state", format!("UPDATE transfer_versions SET previous_state = 'requested' WHERE transfer_id = '{done}' AND version = 4")),
        ("I6", "without gaps", format!("DELETE FROM transfer_versions WHERE transfer_id = '{rejected}' AND version = 2")),
        ("I6", "legal transition", format!("UPDATE transfer_versions SET state = 'completed', previous_state = 'requested' WHERE transfer_id = '{rejected}' AND version = 2")),
    ];
    for (invariant, name_part, damage) in cases {
        let mut tx = kit.pool.begin().await?;
        sqlx::query(&damage).execute(&mut *tx).await?;
        let report = reconcile::run(&mut tx).await?;
        tx.rollback().await?;
        let caught =
            report.violations().iter().any(|check| check.invariant == invariant && check.name.contains(name_part));
        ensure!(caught, "{invariant} '{name_part}' missed damage {damage:?}; violations {:?}", report.violations());
    }

    // A transfer left in flight is fine until its deadline, then a violation.
    let mut tx = kit.pool.begin().await?;
    sqlx::query("UPDATE transfers SET state = 'deposited', updated_at = now() - interval '2 hours' WHERE id = $1")
        .bind(done)
        .execute(&mut *tx)
        .await?;
    let report = reconcile::run_with(&mut tx, 3_600).await?;
    tx.rollback().await?;
    ensure!(report.violations().iter().any(|check| check.invariant == "I3"), "stuck transfer not reported");

    // An outbox row that never reached Kafka is fine for a moment, not for long.
    let mut tx = kit.pool.begin().await?;
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, payload, created_at)
         VALUES (gen_random_uuid(), 'bridge.transfers.status.v1', '\\x00', now() - interval '2 hours')",
    )
    .execute(&mut *tx)
    .await?;
    let report = reconcile::run_with(&mut tx, 3_600).await?;
    tx.rollback().await?;
    ensure!(report.violations().iter().any(|check| check.invariant == "I4"), "undelivered outbox row not reported");

    kit.assert_books_balance().await
}
