//! The books check: invariants I1–I6 of the brief, expressed as queries that
//! must all return zero offending rows. `bridge demo`, `bridge reconcile` and
//! the tests use this one implementation.

use serde::Serialize;
use sqlx::PgConnection;

use bridge_domain::TransferState;

use crate::Result;

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub invariant: &'static str,
    pub name: &'static str,
    /// Offending rows; zero when the check holds.
    pub violations: i64,
    /// The first few offenders by id, where the check names them (the
    /// transfers nobody is working on), so an operator knows where to look.
    pub examples: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Transfers not yet in a terminal state or manual review. Not a violation by itself:
    /// callers that expect a quiet system also require this to be zero.
    pub in_flight: i64,
    /// Outbox rows not yet acknowledged by the broker.
    pub outbox_unpublished: i64,
    /// Transfers waiting for a person (deposit and refund both declined).
    pub manual_review: i64,
    /// Steps an outside service accepted and has not settled yet.
    pub pending_steps: i64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|check| check.violations == 0)
    }

    pub fn violations(&self) -> Vec<&Check> {
        self.checks.iter().filter(|check| check.violations != 0).collect()
    }
}

/// Each check: (invariant, name, query returning the number of offending rows).
const CHECKS: &[(&str, &str, &str)] = &[
    (
        "I1",
        "every posting is one debit and one credit of equal amount and currency",
        "SELECT count(*) FROM (
           SELECT posting_id FROM ledger_entries GROUP BY posting_id
           HAVING count(*) <> 2
               OR sum(CASE WHEN direction = 'debit' THEN amount_minor ELSE 0 END)
                  <> sum(CASE WHEN direction = 'credit' THEN amount_minor ELSE 0 END)
               OR count(DISTINCT currency) <> 1) AS unbalanced",
    ),
    (
        "I1",
        "investor balances equal their ledger balances",
        "SELECT count(*) FROM investor_accounts a
         LEFT JOIN (SELECT account, sum(CASE WHEN direction = 'credit' THEN amount_minor ELSE -amount_minor END) AS balance
                    FROM ledger_entries WHERE account LIKE 'investor:%' GROUP BY account) l
           ON l.account = 'investor:' || a.id
         WHERE coalesce(l.balance, 0) <> a.balance_minor",
    ),
    (
        "I1",
        "fund account balances equal their ledger balances",
        "SELECT count(*) FROM fund_accounts a
         LEFT JOIN (SELECT account, sum(CASE WHEN direction = 'credit' THEN amount_minor ELSE -amount_minor END) AS balance
                    FROM ledger_entries WHERE account LIKE 'fund:%' GROUP BY account) l
           ON l.account = 'fund:' || a.id
         WHERE coalesce(l.balance, 0) <> a.balance_minor",
    ),
    (
        "I1",
        "money in transit equals the transfers withdrawn and not yet deposited or refunded (manual review from withdrawn included)",
        "SELECT count(*) FROM (
           SELECT currency, sum(CASE WHEN direction = 'credit' THEN amount_minor ELSE -amount_minor END) AS balance
           FROM ledger_entries WHERE account = 'clearing:in_transit' GROUP BY currency) l
         FULL JOIN (SELECT currency, sum(amount_minor) AS amount FROM transfer_phases WHERE phase = 'withdrawn' GROUP BY currency) t
           ON t.currency = l.currency
         WHERE coalesce(l.balance, 0) <> coalesce(t.amount, 0)",
    ),
    (
        "I2",
        "each transfer has exactly the postings its state implies, once each",
        "SELECT count(*) FROM transfer_phases t
         LEFT JOIN (SELECT transfer_id, string_agg(step, ',' ORDER BY step) AS steps, count(*) AS entries
                    FROM ledger_entries WHERE transfer_id IS NOT NULL GROUP BY transfer_id) l
           ON l.transfer_id = t.id
         WHERE coalesce(l.steps, '') <> CASE t.phase
             WHEN 'withdrawn' THEN 'withdrawal,withdrawal'
             WHEN 'deposited' THEN 'deposit,deposit,withdrawal,withdrawal'
             WHEN 'completed' THEN 'deposit,deposit,withdrawal,withdrawal'
             WHEN 'reversed'  THEN 'refund,refund,withdrawal,withdrawal'
             ELSE '' END",
    ),
    (
        "I2",
        "every debit at the simulated services is recorded once in our ledger, or its transfer is in flight (simulator only)",
        "SELECT count(*) FROM sim_operations s
         LEFT JOIN transfer_phases t ON t.id = s.transfer_id
         WHERE s.outcome = 'settled' AND s.operation IN ('withdrawal', 'deposit', 'refund')
           AND NOT EXISTS (SELECT 1 FROM ledger_entries l
                           WHERE l.transfer_id = t.id AND l.step = s.operation AND l.direction = 'debit')
           -- In flight, or frozen in manual review before its ledger caught up.
           AND coalesce(t.phase, '') NOT IN ('validated', 'withdrawn')",
    ),
    (
        "I2",
        "every posting of ours was settled at the simulated service, or recorded by an operator as done outside Bridge (simulator only)",
        "SELECT count(*) FROM ledger_entries l
         WHERE l.transfer_id IS NOT NULL AND l.direction = 'debit'
           AND EXISTS (SELECT 1 FROM sim_operations)
           AND NOT EXISTS (SELECT 1 FROM sim_operations s
                           WHERE s.transfer_id = l.transfer_id AND s.operation = l.step AND s.outcome = 'settled')
           AND NOT EXISTS (SELECT 1 FROM transfer_versions v
                           WHERE v.transfer_id = l.transfer_id AND v.actor IS NOT NULL
                             AND v.reason_code = CASE l.step WHEN 'refund' THEN 'REFUNDED_OUTSIDE_BRIDGE'
                                                             WHEN 'deposit' THEN 'DEPOSIT_CONFIRMED_OUTSIDE_BRIDGE' END)",
    ),
    (
        "I3",
        "the list of open transfers holds exactly the transfers not in a final state",
        // The sweeps, the idle check and the gauges find open transfers
        // through this list (migration 0029): a transfer missing from it
        // would escape them.
        "SELECT count(*) FROM transfers t
         FULL JOIN open_transfers o ON o.transfer_id = t.id AND o.created_at = t.created_at
         WHERE t.id IS NULL
            OR (o.transfer_id IS NOT NULL) <> (t.state NOT IN ('completed', 'rejected', 'failed', 'reversed'))",
    ),
    (
        "I5",
        "no negative balance or available balance",
        "SELECT count(*) FROM investor_accounts WHERE balance_minor < 0 OR held_minor < 0 OR held_minor > balance_minor",
    ),
    (
        "I5",
        "held funds equal the transfers awaiting withdrawal (manual review from validated included)",
        "SELECT count(*) FROM investor_accounts a
         LEFT JOIN (SELECT investor_account_id, sum(amount_minor) AS amount FROM transfer_phases
                    WHERE phase = 'validated' GROUP BY investor_account_id) t
           ON t.investor_account_id = a.id
         WHERE a.held_minor <> coalesce(t.amount, 0)",
    ),
    (
        "I5",
        "no fund over its capacity or seat count",
        "SELECT count(*) FROM funds
         WHERE allocated_minor > capacity_minor OR investors_count > seats_max OR allocated_minor < 0",
    ),
    (
        "I5",
        "fund totals and seats equal the sum of their allocations",
        "SELECT count(*) FROM funds f
         LEFT JOIN (SELECT fund_id, sum(reserved_minor + completed_minor) AS allocated,
                           count(*) FILTER (WHERE reserved_minor + completed_minor > 0) AS seats
                    FROM allocations GROUP BY fund_id) a ON a.fund_id = f.id
         WHERE f.allocated_minor <> coalesce(a.allocated, 0) OR f.investors_count <> coalesce(a.seats, 0)",
    ),
    (
        "I5",
        "fund totals equal the transfers reserved or completed in them",
        "SELECT count(*) FROM funds f
         LEFT JOIN (SELECT fund_id, sum(amount_minor) AS allocated FROM transfers
                    WHERE fund_id IS NOT NULL
                      AND state IN ('validated', 'withdrawn', 'deposited', 'manual_review', 'completed')
                    GROUP BY fund_id) t ON t.fund_id = f.id
         WHERE f.allocated_minor <> coalesce(t.allocated, 0)",
    ),
    (
        "I5",
        "each investor's allocation in a fund equals their transfers in those phases",
        "SELECT count(*) FROM (
           SELECT coalesce(a.fund_id, t.fund_id) AS fund_id FROM allocations a
           FULL JOIN (SELECT fund_id, investor_account_id,
                             coalesce(sum(amount_minor) FILTER (WHERE state IN ('validated', 'withdrawn', 'deposited', 'manual_review')), 0) AS reserved,
                             coalesce(sum(amount_minor) FILTER (WHERE state = 'completed'), 0) AS completed
                      FROM transfers WHERE fund_id IS NOT NULL
                        AND state IN ('validated', 'withdrawn', 'deposited', 'manual_review', 'completed')
                      GROUP BY fund_id, investor_account_id) t
             ON t.fund_id = a.fund_id AND t.investor_account_id = a.investor_account_id
           WHERE coalesce(a.reserved_minor, 0) <> coalesce(t.reserved, 0)
              OR coalesce(a.completed_minor, 0) <> coalesce(t.completed, 0)) AS mismatched",
    ),
    (
        "I6",
        "each version's previous state is the state of the version before it, and version 1 is requested",
        "SELECT count(*) FROM transfer_versions v
         LEFT JOIN transfer_versions p ON p.transfer_id = v.transfer_id AND p.version = v.version - 1
         WHERE (v.version = 1 AND (v.state <> 'requested' OR v.previous_state IS NOT NULL))
            OR (v.version > 1 AND (p.state IS NULL OR v.previous_state IS DISTINCT FROM p.state))",
    ),
    (
        "I6",
        "every transfer's history is versions 1..n without gaps, ending in its current state, and every version belongs to a transfer",
        "SELECT count(*) FROM transfers t
         FULL JOIN (SELECT transfer_id, count(*) AS versions, max(version) AS newest, min(version) AS oldest
                    FROM transfer_versions GROUP BY transfer_id) v ON v.transfer_id = t.id
         WHERE t.id IS NULL OR v.transfer_id IS NULL
            OR v.versions <> t.version OR v.newest <> t.version OR v.oldest <> 1
            OR NOT EXISTS (SELECT 1 FROM transfer_versions c
                           WHERE c.transfer_id = t.id AND c.version = t.version AND c.state = t.state)",
    ),
    (
        "I6",
        "no two transfer versions share a status event id",
        "SELECT count(*) FROM (SELECT event_id FROM transfer_versions GROUP BY event_id HAVING count(*) > 1) AS shared",
    ),
    (
        "I6",
        "every investor account, fund, fund account and allocation equals the last entry of its history",
        "SELECT count(*) FROM (
           SELECT 'investor_accounts' AS model, id AS key, to_jsonb(a) AS row FROM investor_accounts a
           UNION ALL SELECT 'funds', id, to_jsonb(f) FROM funds f
           UNION ALL SELECT 'fund_accounts', id, to_jsonb(f) FROM fund_accounts f
           UNION ALL SELECT 'allocations', fund_id || '/' || investor_account_id, to_jsonb(a) FROM allocations a
         ) m
         LEFT JOIN LATERAL (SELECT h.after FROM model_history h WHERE h.model = m.model AND h.key = m.key
                            ORDER BY h.id DESC LIMIT 1) h ON true
         WHERE h.after IS DISTINCT FROM m.row",
    ),
];

/// How long a transfer in flight may go without moving, with no step
/// pending at a service and being asked about, before the check reports
/// that nothing is working on it. A stage takes a message within seconds
/// of its arrival; a backlog large enough to take longer is itself worth a
/// look, and `bridge reconcile --idle-after-secs` widens the window.
pub const IDLE_AFTER_SECS_DEFAULT: i64 = 600;

pub async fn run(conn: &mut PgConnection) -> Result<Report> {
    run_with(conn, IDLE_AFTER_SECS_DEFAULT).await
}

/// The transfers in flight that nothing is working on: unchanged for
/// `idle_after_secs` and without a pending step that the settlement runner
/// asks about (one due longer ago than that, or past its deadline by that
/// much, counts as abandoned). A message whose offset was committed without
/// its step being applied leaves exactly this behind.
fn idle_in_flight() -> String {
    format!(
        "SELECT count(*), coalesce((array_agg(t.id::text ORDER BY t.updated_at))[1:10], '{{}}')
    FROM transfers t
    WHERE t.id = {}
      AND t.state IN ('requested', 'validated', 'withdrawn', 'deposited')
      AND t.updated_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM pending_steps p
                      WHERE p.transfer_id = t.id
                        AND p.next_run_at > now() - make_interval(secs => $1)
                        AND (p.deadline_at IS NULL OR p.deadline_at > now() - make_interval(secs => $1)))",
        crate::transfers::OPEN_IDS
    )
}

/// Operations a service holds (pending, settled or declined) for a transfer
/// still waiting for that step, with no pending step of ours following it,
/// for longer than `idle_after_secs`: the service moved (or may move) money
/// that our books will never hear about. A refund belongs to the deposit
/// step. Simulator only: `sim_operations` is empty otherwise.
const UNFOLLOWED_OPERATIONS: &str = "
    SELECT count(*), coalesce((array_agg(t.id::text ORDER BY s.created_at))[1:10], '{}')
    FROM sim_operations s
    JOIN transfers t ON t.id = s.transfer_id
    WHERE ((s.operation = 'withdrawal' AND t.state = 'validated')
        OR (s.operation IN ('deposit', 'refund') AND t.state = 'withdrawn'))
      AND s.created_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (SELECT 1 FROM pending_steps p
                      WHERE p.transfer_id = t.id
                        AND p.step = CASE s.operation WHEN 'withdrawal' THEN 'withdrawal' ELSE 'deposit' END)";

/// Runs every check. A transfer in flight that nothing has worked on for
/// `idle_after_secs` violates I3, as does an operation at a service that no
/// step of ours follows for that long; an outbox row unpublished for as
/// long violates I4.
pub async fn run_with(conn: &mut PgConnection, idle_after_secs: i64) -> Result<Report> {
    let mut checks = Vec::with_capacity(CHECKS.len() + 4);
    for (invariant, name, query) in CHECKS {
        let violations: i64 = sqlx::query_scalar(query).fetch_one(&mut *conn).await?;
        checks.push(Check { invariant, name, violations, examples: Vec::new() });
    }
    let window = idle_after_secs as f64;
    for (name, query) in [
        (
            "every transfer in flight is being worked on (moved recently, or a step pending and asked about)",
            idle_in_flight(),
        ),
        (
            "every operation a service holds for a transfer in flight is followed by a pending step (simulator only)",
            UNFOLLOWED_OPERATIONS.to_owned(),
        ),
    ] {
        let (violations, examples): (i64, Vec<String>) =
            sqlx::query_as(&query).bind(window).fetch_one(&mut *conn).await?;
        checks.push(Check { invariant: "I3", name, violations, examples });
    }
    let undelivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE created_at < now() - make_interval(secs => $1)")
            .bind(window)
            .fetch_one(&mut *conn)
            .await?;
    checks.push(Check {
        invariant: "I4",
        name: "no committed outbox row left unpublished beyond the deadline",
        violations: undelivered,
        examples: Vec::new(),
    });
    checks.push(Check {
        invariant: "I6",
        name: "every recorded step is a legal transition of the state machine",
        violations: illegal_transitions(conn).await?,
        examples: Vec::new(),
    });
    let (in_flight, manual_review): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state NOT IN ('completed', 'rejected', 'failed', 'reversed', 'manual_review')),
                count(*) FILTER (WHERE state = 'manual_review')
         FROM transfers",
    )
    .fetch_one(&mut *conn)
    .await?;
    let outbox_unpublished = crate::outbox::unpublished_count(&mut *conn).await?;
    let pending_steps = crate::pending::count(conn).await?;
    Ok(Report { checks, in_flight, outbox_unpublished, manual_review, pending_steps })
}

/// The state machine lives in the domain crate, so the transitions found in
/// the history are checked against it in Rust rather than restated in SQL.
async fn illegal_transitions(conn: &mut PgConnection) -> Result<i64> {
    let pairs: Vec<(Option<String>, String, i64)> =
        sqlx::query_as("SELECT previous_state, state, count(*) FROM transfer_versions GROUP BY previous_state, state")
            .fetch_all(conn)
            .await?;
    let mut illegal = 0;
    for (previous, state, count) in pairs {
        // Whether a first version sits at version 1 is checked in SQL.
        let legal = match (previous.as_deref().map(TransferState::parse), TransferState::parse(&state)) {
            (None, Ok(TransferState::Requested)) => true,
            (Some(Ok(from)), Ok(to)) => from.can_become(to),
            _ => false,
        };
        if !legal {
            illegal += count;
        }
    }
    Ok(illegal)
}
