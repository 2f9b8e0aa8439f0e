//! A withdrawal carries the investor's own bank access, stored encrypted
//! per investor: the simulated bank (over HTTP) refuses a withdrawal from a
//! linked account without a valid consent of that account, the transfer
//! fails with a named reason and its hold is released, nothing is
//! dead-lettered, and the bank's record shows which consent it saw.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use chrono::Utc;

use bridge_domain::TransferState;
use bridge_pipeline::runner::Part;
use bridge_secrets::{Keyring, SecretString};
use bridge_sim::FaultPlan;
use bridge_store::bank_access::{self, NewBankAccess};
use bridge_store::simulator;
use bridge_testkit::{BrokerKind, TestKit};

const SETTLE: Duration = Duration::from_secs(120);

async fn give_bridge(kit: &TestKit, keyring: &Keyring, investor: &str, consent: &str, token: &str) -> Result<()> {
    let mut tx = kit.pool.begin().await?;
    let access =
        NewBankAccess { consent_id: consent, scopes: &["payments".to_owned()], expires_at: None, set_by: "test" };
    ensure!(bank_access::record(&mut tx, investor, &access).await?, "no investor {investor}");
    let name = bank_access::credential_name(investor);
    bridge_secrets::put(&mut tx, keyring, &name, &SecretString::from(token.to_owned())).await?;
    tx.commit().await?;
    Ok(())
}

async fn outcome(kit: &TestKit, id: uuid::Uuid) -> Result<String> {
    let transfer = kit.transfer(id).await?;
    Ok(match transfer.state {
        TransferState::Completed => "completed".to_owned(),
        state => format!("{state} {}", transfer.reason_code.unwrap_or_default()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn withdrawals_carry_the_investors_own_bank_access() -> Result<()> {
    let kit = TestKit::start(BrokerKind::InProcess).await?;
    for investor in ["ann", "ben", "cal", "dan", "eve"] {
        kit.seed_investor(investor, 10_000_00).await?;
    }
    let fund_account = kit.seed_fund("fund", 100_00, 10, 1_000_000_00).await?;
    let keyring = Arc::new(Keyring::parse(&Keyring::generate_entry("k1"))?);

    // The bank links four accounts with consents; eve's is not linked (the
    // service token is enough, as before).
    {
        let mut conn = kit.pool.acquire().await?;
        let month = Utc::now() + chrono::Duration::days(30);
        simulator::issue_consent(&mut conn, "ann", "consent-ann", "tok-ann-0f3a", month).await?;
        simulator::issue_consent(&mut conn, "ben", "consent-ben", "tok-ben-77c1", month).await?;
        simulator::issue_consent(&mut conn, "cal", "consent-cal", "tok-cal-19d2", month).await?;
        let past = Utc::now() - chrono::Duration::hours(1);
        simulator::issue_consent(&mut conn, "dan", "consent-dan", "tok-dan-5be8", past).await?;
    }
    // Bridge holds ann's own access, ann's token for cal (another account's),
    // dan's expired one, and nothing for ben.
    give_bridge(&kit, &keyring, "ann", "consent-ann", "tok-ann-0f3a").await?;
    give_bridge(&kit, &keyring, "cal", "consent-ann", "tok-ann-0f3a").await?;
    give_bridge(&kit, &keyring, "dan", "consent-dan", "tok-dan-5be8").await?;

    // At rest the token is not there in clear, and a ciphertext moved to
    // another investor's row does not open.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT ciphertext FROM credentials WHERE name = $1")
        .bind(bank_access::credential_name("ann"))
        .fetch_one(&kit.pool)
        .await?;
    ensure!(!stored.windows(7).any(|window| window == b"tok-ann"), "the token is stored in clear");
    let mut conn = kit.pool.acquire().await?;
    let mut moved = bridge_store::credentials::get(&mut conn, &bank_access::credential_name("ann"))
        .await?
        .context("ann's credential")?;
    moved.name = bank_access::credential_name("ben");
    ensure!(keyring.open(&moved).is_err(), "ann's sealed token opened as ben's");
    drop(conn);

    let simulator = kit.start_simulator(FaultPlan::none()).await?;
    let services = kit.http_services(&simulator.url, 2_000)?;
    let pipeline =
        bridge_pipeline::Pipeline::new(kit.pool.clone(), kit.config.clone(), services).with_keyring(keyring.clone());
    let token = tokio_util::sync::CancellationToken::new();
    let running = {
        let token = token.clone();
        tokio::spawn(async move { pipeline.run(&Part::all(), token).await })
    };
    let mut ids = Vec::new();
    for investor in ["ann", "ben", "cal", "dan", "eve"] {
        ids.push(kit.publish(&kit.request(investor, &fund_account, 1_000_00)).await?);
    }
    kit.wait_terminal(&ids, SETTLE).await?;
    let mut outcomes = Vec::new();
    for id in &ids {
        outcomes.push(outcome(&kit, *id).await?);
    }
    ensure!(
        outcomes
            == [
                "completed",
                "failed BANK_ACCESS_EXPIRED",
                "failed BANK_ACCESS_INVALID",
                "failed BANK_ACCESS_EXPIRED",
                "completed",
            ],
        "{outcomes:?}"
    );

    // What the bank saw on each account's withdrawal (a declined step is
    // asked again under its key by the one-message path, so a decline may
    // be seen twice, always the same).
    let mut conn = kit.pool.acquire().await?;
    for (account, consent, verdict) in [
        ("ann", Some("consent-ann"), "valid"),
        ("ben", None, "BANK_ACCESS_EXPIRED"),
        ("cal", Some("consent-ann"), "BANK_ACCESS_INVALID"),
        ("dan", Some("consent-dan"), "BANK_ACCESS_EXPIRED"),
    ] {
        let seen = simulator::bank_access_seen(&mut conn, account).await?;
        ensure!(!seen.is_empty(), "{account}: the bank saw no withdrawal");
        ensure!(
            seen.iter()
                .all(|(_, seen_consent, seen_verdict)| seen_consent.as_deref() == consent && seen_verdict == verdict),
            "{account}: {seen:?}"
        );
    }
    ensure!(simulator::bank_access_seen(&mut conn, "eve").await?.is_empty(), "eve's account is not linked");
    let ann = bank_access::metadata(&mut conn, "ann").await?.context("ann's access")?;
    ensure!(ann.last_used_at.is_some() && ann.revoked_at.is_none(), "{ann:?}");
    // The holds of the refused withdrawals are released.
    for investor in ["ben", "cal", "dan"] {
        let held: i64 = sqlx::query_scalar("SELECT held_minor FROM investor_accounts WHERE id = $1")
            .bind(investor)
            .fetch_one(&mut *conn)
            .await?;
        ensure!(held == 0, "{investor} still holds {held}");
    }

    // The bank revokes ann's consent: her next withdrawal is refused; Bridge
    // revoking its copy sends none at all.
    simulator::revoke_consent(&mut conn, "consent-ann").await?;
    let revoked = kit.publish(&kit.request("ann", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[revoked], SETTLE).await?;
    ensure!(outcome(&kit, revoked).await? == "failed BANK_ACCESS_EXPIRED");
    ensure!(bank_access::revoke(&mut conn, "ann").await?, "nothing to revoke");
    ensure!(bridge_store::credentials::get(&mut conn, &bank_access::credential_name("ann")).await?.is_none());
    let without = kit.publish(&kit.request("ann", &fund_account, 1_000_00)).await?;
    kit.wait_terminal(&[without], SETTLE).await?;
    ensure!(outcome(&kit, without).await? == "failed BANK_ACCESS_EXPIRED");
    let last = simulator::bank_access_seen(&mut conn, "ann").await?;
    ensure!(last.last().is_some_and(|(_, consent, _)| consent.is_none()), "{last:?}");
    drop(conn);

    token.cancel();
    running.await??;
    simulator.stop().await?;
    // Nothing was dead-lettered: every refusal is a transfer's outcome.
    let (_, _, dead, _) = kit.effect_counts().await?;
    ensure!(dead == 0, "{dead} dead letters");
    let report = kit.reconcile().await?;
    ensure!(report.ok(), "{:?}", report.violations());
    kit.assert_books_balance().await
}
