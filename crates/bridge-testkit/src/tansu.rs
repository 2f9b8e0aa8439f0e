//! A private standalone broker for a test that must stop and restart it.
//!
//! The suite's shared broker keeps its log in memory and serves every test,
//! so it can be neither stopped nor restarted. This one is tansu on a SQLite
//! file in its own directory, on its own port: killed and started again, it
//! comes back with every record it acknowledged and every committed offset.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct PrivateTansu {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    options: TansuOptions,
    child: Option<Child>,
}

/// How a private broker differs from a plain one.
#[derive(Clone, Debug, Default)]
pub struct TansuOptions {
    /// The port the broker tells clients to use (a TLS proxy in front of
    /// it); unset, its own.
    pub advertised_port: Option<u16>,
    /// Require SASL authentication, with this SCRAM user (name, password,
    /// `scram256` or `scram512`) created first.
    pub scram_user: Option<(String, String, String)>,
}

impl PrivateTansu {
    /// Starts a broker from the binary named by `BRIDGE_TEST_TANSU_BINARY`
    /// (set by `scripts/test.sh`).
    pub fn start() -> Result<Self> {
        Self::start_with(TansuOptions::default())
    }

    /// Starts a broker as `options` say.
    pub fn start_with(options: TansuOptions) -> Result<Self> {
        let binary = std::env::var_os("BRIDGE_TEST_TANSU_BINARY").context(
            "BRIDGE_TEST_TANSU_BINARY is not set: run the suite with scripts/test.sh, which builds the standalone broker",
        )?;
        let dir = std::env::temp_dir().join(format!("bridge-tansu-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        // Outside the range the kernel gives outgoing connections, so none
        // takes it before the broker binds it, nor while a test has the
        // broker killed (see `unused_port`).
        let port = bridge_store::local_cluster::unused_port()?;
        // First without authentication (see below), otherwise as asked.
        let first = TansuOptions { scram_user: None, ..options.clone() };
        let mut broker = Self { binary: binary.into(), dir, port, options: first, child: None };
        broker.resume()?;
        if let Some((user, password, mechanism)) = &options.scram_user {
            // Users are created over the Kafka protocol, which a broker that
            // requires authentication refuses before it; so the user is
            // created first and the broker restarted on the same log with
            // authentication on.
            let url = format!("tcp://127.0.0.1:{}", broker.port);
            let status = Command::new(&broker.binary)
                .args(["user", "create", "--broker", &url, "--mechanism", mechanism, user, password])
                .stdout(Stdio::null())
                .status()
                .context("Failed to run tansu user create")?;
            anyhow::ensure!(status.success(), "tansu user create failed: {status}");
            broker.kill()?;
        }
        broker.options = options;
        broker.resume()?;
        Ok(broker)
    }

    /// The broker's own port (behind any proxy).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL: no chance to flush or say goodbye).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port and the same log.
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.options.advertised_port.unwrap_or(self.port));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log"))?;
        let mut command = Command::new(&self.binary);
        command
            .current_dir(&self.dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "sqlite://tansu.db"]);
        if self.options.scram_user.is_some() {
            command.arg("--authentication");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("Failed to start {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
                bail!("tansu exited with {status}; its log:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("tansu did not listen on port {} within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
