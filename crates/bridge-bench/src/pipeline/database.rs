//! What the benchmark reads of Postgres: commits and rows written in
//! Bridge's database, the simulator's backends, and the simulator's
//! operations brought over for the reconcile check.

use super::*;

/// Rows of one table inserted, updated and deleted per transfer.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub(super) struct TableRows {
    pub(super) table: String,
    pub(super) inserted: f64,
    pub(super) updated: f64,
    /// Of the updates, those Postgres kept on the row's page without new
    /// index entries (heap-only tuples).
    pub(super) hot_updated: f64,
    pub(super) deleted: f64,
}

/// Committed transactions of the scratch database so far.
pub(super) async fn transactions(pool: &sqlx::PgPool) -> Result<i64> {
    // The statistics are sent at the end of each transaction by every
    // backend; clearing this backend's snapshot makes the read current.
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut *conn).await?;
    Ok(sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&mut *conn)
        .await?)
}

/// Rows inserted, updated (all, and heap-only) and deleted so far, per
/// table of the scratch database.
pub(super) async fn row_changes(pool: &sqlx::PgPool) -> Result<HashMap<String, [i64; 4]>> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()").execute(&mut *conn).await?;
    let rows: Vec<(String, i64, i64, i64, i64)> =
        // A value too large for its row goes to the table's TOAST table, in
        // chunks that are rows too: they are counted, under the table's name.
        sqlx::query_as(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables
             UNION ALL
             SELECT tables.relname || ' (TOAST)', toast.n_tup_ins, toast.n_tup_upd, toast.n_tup_hot_upd,
                    toast.n_tup_del
             FROM pg_stat_user_tables tables
             JOIN pg_class class ON class.oid = tables.relid
             JOIN pg_stat_all_tables toast ON toast.relid = class.reltoastrelid",
        )
            .fetch_all(&mut *conn)
            .await?;
    Ok(rows.into_iter().map(|(table, ins, upd, hot, del)| (table, [ins, upd, hot, del])).collect())
}

/// What changed between two readings of [`row_changes`], per transfer, for
/// the tables that changed, most rows first.
pub(super) fn rows_per_transfer(
    before: &HashMap<String, [i64; 4]>,
    after: &HashMap<String, [i64; 4]>,
    transfers: usize,
) -> Vec<TableRows> {
    let per = |count: i64| count as f64 / transfers.max(1) as f64;
    let mut tables: Vec<TableRows> = after
        .iter()
        .map(|(table, now)| {
            let was = before.get(table).copied().unwrap_or_default();
            TableRows {
                table: table.clone(),
                inserted: per(now[0] - was[0]),
                updated: per(now[1] - was[1]),
                hot_updated: per(now[2] - was[2]),
                deleted: per(now[3] - was[3]),
            }
        })
        .filter(|rows| rows.inserted + rows.updated + rows.deleted > 0.0)
        .collect();
    let total = |rows: &TableRows| rows.inserted + rows.updated + rows.deleted;
    tables.sort_by(|a, b| total(b).total_cmp(&total(a)).then_with(|| a.table.cmp(&b.table)));
    tables
}

/// Process ids of the server's backends connected to `pool`'s database.
pub(super) async fn backends(pool: &sqlx::PgPool) -> Result<std::collections::HashSet<u32>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?;
    Ok(pids.into_iter().map(|pid| pid as u32).collect())
}

/// Copies the simulator's operations from its own database into Bridge's.
pub(super) async fn copy_simulator_operations(simulator: &sqlx::PgPool, into: &mut sqlx::PgConnection) -> Result<()> {
    let mut from = simulator.acquire().await?;
    let operations = from.copy_out_raw("COPY sim_operations TO STDOUT (FORMAT binary)").await?;
    let bytes: Vec<u8> =
        futures_util::TryStreamExt::try_concat(futures_util::TryStreamExt::map_ok(operations, |chunk| chunk.to_vec()))
            .await?;
    let mut copy = into.copy_in_raw("COPY sim_operations FROM STDIN (FORMAT binary)").await?;
    copy.send(bytes).await?;
    copy.finish().await?;
    Ok(())
}

/// Every operation a `bridge sim` at `base_url` holds, both services', a
/// page at a time.
pub(super) async fn list_simulator_operations(base_url: &str) -> Result<Vec<bridge_sim::OperationRecord>> {
    #[derive(serde::Deserialize)]
    struct Page {
        operations: Vec<bridge_sim::OperationRecord>,
    }
    let client = reqwest::Client::new();
    let mut all = Vec::new();
    for service in ["investor", "fund"] {
        let mut after = String::new();
        loop {
            let page: Page = client
                .get(format!("{base_url}/{service}/v1/operations"))
                .query(&[("after", after.as_str()), ("limit", "1000")])
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let Some(last) = page.operations.last() else { break };
            after = last.idempotency_key.clone();
            all.extend(page.operations);
        }
    }
    Ok(all)
}

/// Writes operations listed by the simulator into Bridge's database, where
/// the reconcile check compares them with the ledger.
pub(super) async fn insert_simulator_operations(
    operations: &[bridge_sim::OperationRecord],
    into: &mut sqlx::PgConnection,
) -> Result<()> {
    for chunk in operations.chunks(5_000) {
        let column =
            |field: fn(&bridge_sim::OperationRecord) -> &str| -> Vec<&str> { chunk.iter().map(field).collect() };
        let transfer_ids: Vec<Option<Uuid>> = chunk
            .iter()
            .map(|record| {
                bridge_domain::ids::parse_idempotency_key(&record.idempotency_key).map(|(transfer_id, _)| transfer_id)
            })
            .collect();
        sqlx::query(
            "INSERT INTO sim_operations
                 (idempotency_key, operation, account_id, amount_minor, currency, outcome, reference, transfer_id)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                                  $7::text[], $8::uuid[])",
        )
        .bind(column(|record| &record.idempotency_key))
        .bind(column(|record| &record.operation))
        .bind(column(|record| &record.account_id))
        .bind(chunk.iter().map(|record| record.amount_minor).collect::<Vec<i64>>())
        .bind(column(|record| &record.currency))
        .bind(column(|record| &record.status))
        .bind(column(|record| &record.reference))
        .bind(transfer_ids)
        .execute(&mut *into)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_counted_per_transfer_for_the_tables_that_changed() {
        let before: HashMap<String, [i64; 4]> =
            [("outbox".to_owned(), [10, 0, 0, 10]), ("funds".to_owned(), [0, 5, 1, 0])].into_iter().collect();
        let after: HashMap<String, [i64; 4]> = [
            ("outbox".to_owned(), [30, 0, 0, 30]),
            ("funds".to_owned(), [0, 5, 1, 0]),
            ("inbox".to_owned(), [8, 0, 0, 0]),
            ("transfers".to_owned(), [0, 12, 9, 0]),
        ]
        .into_iter()
        .collect();
        let rows = rows_per_transfer(&before, &after, 4);
        let row = |table: &str, inserted, updated, hot_updated, deleted| TableRows {
            table: table.to_owned(),
            inserted,
            updated,
            hot_updated,
            deleted,
        };
        assert_eq!(
            rows,
            [
                row("outbox", 5.0, 0.0, 0.0, 5.0),
                row("transfers", 0.0, 3.0, 2.25, 0.0),
                row("inbox", 2.0, 0.0, 0.0, 0.0)
            ]
        );
    }
}
