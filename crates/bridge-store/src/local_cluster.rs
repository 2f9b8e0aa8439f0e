//! A private, throw-away PostgreSQL cluster started from the locally
//! installed server binaries: for `bridge demo` when no server is running,
//! and for tests that must crash a server without touching anyone else's.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A private cluster in a temporary directory, stopped and removed on drop.
pub struct TemporaryCluster {
    pub url: String,
    directory: PathBuf,
    pg_ctl: PathBuf,
    as_postgres_user: bool,
    options: String,
}

impl Drop for TemporaryCluster {
    fn drop(&mut self) {
        let data = self.directory.join("data");
        let _ =
            command(&self.pg_ctl, self.as_postgres_user).args(["stop", "-m", "fast", "-w", "-D"]).arg(&data).output();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn command(program: &Path, as_postgres_user: bool) -> Command {
    if as_postgres_user {
        // initdb and postgres refuse to run as root.
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|entry| entry.path().join("bin").join(name)).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates.into_iter().find(|path| path.is_file())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|out| out.stdout.starts_with(b"0")).unwrap_or(false)
}

/// A port for a server this process is about to start on 127.0.0.1.
///
/// Not one the kernel hands out for port 0: those come from the ephemeral
/// range, which is also where every outgoing connection on the machine gets
/// its local port, so between picking such a port and the server binding it
/// (a second or more, while `initdb` runs) any client connecting anywhere
/// could take it, and the server fails with "Address already in use". Under
/// a test suite's hundreds of connections a second that happens. Ports below
/// the ephemeral range are only ever taken by a listener, and a listener that
/// holds one now is seen here; the start is random so that two servers
/// started at once do not try the same ports in the same order.
pub fn unused_port() -> Result<u16> {
    let ephemeral_low = ephemeral_ports_start();
    let (low, high) = (ephemeral_low / 2, ephemeral_low);
    let span = u32::from(high.saturating_sub(low)).max(1);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos()
        ^ std::process::id().rotate_left(16);
    for step in 0..span.min(1_000) {
        let port = low + ((seed.wrapping_add(step.wrapping_mul(7_919))) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("No unused port between {low} and {high}")
}

/// The first port of the kernel's ephemeral range (Linux's default when it
/// cannot be read).
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768)
}

impl TemporaryCluster {
    pub fn start() -> Result<Self> {
        let (Some(initdb), Some(pg_ctl)) = (find_binary("initdb"), find_binary("pg_ctl")) else {
            bail!("No PostgreSQL server binaries (initdb, pg_ctl) found on PATH or under /usr/lib/postgresql");
        };
        let as_postgres_user = is_root();
        let unique = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let directory = std::env::temp_dir().join(format!("bridge-pg-{}-{unique}", std::process::id()));
        let data = directory.join("data");
        std::fs::create_dir_all(&directory)?;
        if as_postgres_user {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&directory).status()?;
            if !status.success() {
                bail!("Failed to hand {} to the postgres user", directory.display());
            }
        }
        let port = unused_port()?;
        let options = format!("-p {port} -c listen_addresses=127.0.0.1 -k {}", directory.display());
        let cluster = TemporaryCluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/bridge"),
            directory: directory.clone(),
            pg_ctl: pg_ctl.clone(),
            as_postgres_user,
            options: options.clone(),
        };
        let output = command(&initdb, as_postgres_user)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .context("Failed to run initdb")?;
        if !output.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let output = command(&pg_ctl, as_postgres_user)
            .args(["start", "-w", "-t", "60", "-o", &options, "-l"])
            .arg(directory.join("postgres.log"))
            .arg("-D")
            .arg(&data)
            .output()
            .context("Failed to run pg_ctl")?;
        if !output.status.success() {
            bail!("pg_ctl start failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(cluster)
    }

    /// Restarts the server the way a crash would: `immediate` mode, no
    /// checkpoint, every session cut; it recovers from its WAL on start.
    pub fn restart_immediate(&self) -> Result<()> {
        let output = command(&self.pg_ctl, self.as_postgres_user)
            .args(["restart", "-m", "immediate", "-w", "-t", "60", "-o", &self.options, "-l"])
            .arg(self.directory.join("postgres.log"))
            .arg("-D")
            .arg(self.directory.join("data"))
            .output()
            .context("Failed to run pg_ctl")?;
        if !output.status.success() {
            bail!("pg_ctl restart failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_ports_are_free_and_below_the_range_outgoing_connections_use() {
        let ephemeral_low = ephemeral_ports_start();
        // A port some listener holds is never handed out.
        let held = std::net::TcpListener::bind(("127.0.0.1", unused_port().unwrap())).unwrap();
        let held_port = held.local_addr().unwrap().port();
        for _ in 0..50 {
            let port = unused_port().unwrap();
            assert!(port < ephemeral_low, "{port} is in the ephemeral range from {ephemeral_low}");
            assert_ne!(port, held_port);
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
