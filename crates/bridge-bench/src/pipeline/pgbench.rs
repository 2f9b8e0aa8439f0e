//! This machine's Postgres ceiling: pgbench running one stage-shaped
//! transaction at several client counts.

use super::*;

/// pgbench with the stage-shaped transaction at 1 to 32 clients.
pub(super) async fn pgbench(server_base: &str, seconds: u32) -> Result<Vec<PgbenchPoint>> {
    let url = format!("{server_base}/bridge_pgbench_{}", &Uuid::new_v4().simple().to_string()[..10]);
    bridge_store::ensure_database(&url).await?;
    let dir = std::env::temp_dir().join(format!("bridge-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (setup, script) = (dir.join("setup.sql"), dir.join("stage.sql"));
    std::fs::write(&setup, PGBENCH_SETUP)?;
    std::fs::write(&script, PGBENCH_STAGE)?;
    let result = (|| -> Result<Vec<PgbenchPoint>> {
        let status =
            Command::new("psql").args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &url, "-f"]).arg(&setup).status()?;
        ensure!(status.success(), "psql could not set up the pgbench tables");
        let mut points = Vec::new();
        for clients in [1u32, 2, 4, 8, 16, 32] {
            eprintln!("pgbench: {clients} clients for {seconds} s");
            let output = Command::new("pgbench")
                .args(["-n", "-j", "2", "-c", &clients.to_string(), "-T", &seconds.to_string(), "-f"])
                .arg(&script)
                .arg(&url)
                .output()
                .context("Failed to run pgbench (Debian package postgresql-client)")?;
            let text = String::from_utf8_lossy(&output.stdout);
            ensure!(output.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&output.stderr));
            let tps = text
                .lines()
                .find_map(|line| line.strip_prefix("tps = "))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .context("pgbench printed no tps")?;
            points.push(PgbenchPoint { clients, tps });
        }
        Ok(points)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    bridge_store::drop_database(&url).await?;
    result
}
