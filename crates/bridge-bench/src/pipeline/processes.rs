//! The pipeline's `bridge run` processes, and the CPU and memory each
//! process (and Postgres and the broker beside them) used, from `/proc`.

use super::*;

/// The pipeline's processes, and what they used.
pub(super) struct Children {
    processes: Vec<(String, Child)>,
    usage: HashMap<String, (f64, f64)>,
    /// CPU seconds of every counted process (see [`Children::readings`])
    /// when the measured run started. CPU is counted from there, so that the
    /// set-up and the warm-up do not weigh on a short run's figures; peak
    /// RSS is the lifetime's.
    cpu_at_start: HashMap<String, f64>,
    /// When the measured run started.
    started: Instant,
    /// Postgres backends serving the simulator's own database, counted
    /// apart from the rest of Postgres.
    pub(super) simulator_backends: std::collections::HashSet<u32>,
    /// The `bridge sim` process's base URL, with `--account-services http`.
    pub(super) simulator_url: Option<String>,
}

/// The `bridge` binary to run the pipeline with: `BRIDGE_BINARY`, or the
/// one built beside this benchmark.
pub(super) fn bridge_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BRIDGE_BINARY") {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()?.with_file_name("bridge");
    ensure!(
        beside.exists(),
        "no bridge binary at {}; build it (cargo build --release -p bridge) or set BRIDGE_BINARY",
        beside.display()
    );
    Ok(beside)
}

impl Children {
    pub(super) fn spawn(
        args: &PipelineBenchArgs,
        url: &str,
        simulator_url: Option<&str>,
        prefix: &str,
    ) -> Result<Self> {
        let exe = bridge_binary()?;
        let logs = args.out_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut processes = Vec::new();
        // Where the stages find the account services over HTTP, if they do.
        let services_url = match args.account_services {
            AccountServices::InProcess => None,
            AccountServices::Http => {
                let books = match args.simulator_books {
                    SimulatorBooks::Memory => "memory",
                    SimulatorBooks::Own | SimulatorBooks::Shared => "database",
                };
                let (child, address) = spawn_simulator(&exe, &logs, simulator_url.unwrap_or(url), books)?;
                processes.push((SIMULATOR_PROCESS.to_owned(), child));
                Some(format!("http://{address}"))
            }
        };
        for copy in 0..args.processes_per_stage {
            let mut parts: Vec<(String, Vec<&str>)> = StageName::ALL
                .iter()
                .map(|stage| (format!("{}-{copy}", stage.as_str()), vec!["--stage", stage.as_str()]))
                .collect();
            parts.push((format!("relay-{copy}"), vec!["--relay"]));
            for (name, flags) in parts {
                let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
                let mut command = Command::new(&exe);
                command.arg("run").args(&flags);
                match &services_url {
                    Some(services_url) => {
                        command.env("BRIDGE_ACCOUNT_SERVICES_URL", services_url);
                    }
                    None => {
                        command.arg("--simulated-services");
                        if let Some(simulator_url) = simulator_url {
                            command.env("BRIDGE_SIMULATOR_DATABASE_URL", simulator_url);
                        }
                    }
                }
                let child = command
                    .env("DATABASE_URL", url)
                    .env("KAFKA_BROKERS", &args.brokers)
                    .env("BRIDGE_TOPIC_PREFIX", prefix)
                    .env("BRIDGE_GROUP_PREFIX", prefix)
                    .env("BRIDGE_TOPIC_PARTITIONS", args.partitions.to_string())
                    .env("BRIDGE_FETCH_WAIT_MAX_MS", args.fetch_wait_max_ms.to_string())
                    .env("BRIDGE_FETCH_MIN_BYTES", args.fetch_min_bytes.to_string())
                    .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("Failed to start {name}"))?;
                processes.push((name, child));
            }
        }
        Ok(Self {
            processes,
            usage: HashMap::new(),
            cpu_at_start: HashMap::new(),
            started: Instant::now(),
            simulator_backends: Default::default(),
            simulator_url: services_url,
        })
    }

    /// Marks the start of the measured run.
    pub(super) fn start_measuring(&mut self) {
        self.cpu_at_start = self.readings().into_iter().map(|(name, cpu, _)| (name, cpu)).collect();
        self.started = Instant::now();
    }

    /// (name, CPU seconds so far, peak RSS MiB) of every process the run
    /// counts: the pipeline's, this one, and all of the database's and the
    /// broker's (their RSS is not summed: 0).
    pub(super) fn readings(&mut self) -> Vec<(String, f64, f64)> {
        self.sample();
        let mut readings: Vec<(String, f64, f64)> = self
            .processes
            .iter()
            .filter_map(|(name, _)| self.usage.get(name).map(|(cpu, rss)| (name.clone(), *cpu, *rss)))
            .collect();
        if let Some((cpu, rss)) = proc_usage(std::process::id()) {
            readings.push((BENCH_PROCESS.to_owned(), cpu, rss));
        }
        readings
            .extend(outside_cpu(&self.simulator_backends).into_iter().map(|(name, cpu)| (name.to_owned(), cpu, 0.0)));
        readings
    }

    pub(super) fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.processes {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited with {status}; see its log");
            }
        }
        Ok(())
    }

    /// Records each process's CPU time and peak RSS while it is alive.
    pub(super) fn sample(&mut self) {
        for (name, child) in &self.processes {
            if let Some(usage) = proc_usage(child.id()) {
                self.usage.insert(name.clone(), usage);
            }
        }
    }

    /// What each counted process used since the measured run started.
    pub(super) fn measured(&mut self) -> Vec<ProcessUsage> {
        let readings = self.readings();
        let wall = self.started.elapsed().as_secs_f64();
        readings
            .into_iter()
            .map(|(name, cpu, rss)| {
                let cpu = cpu - self.cpu_at_start.get(&name).copied().unwrap_or(0.0);
                ProcessUsage { name, cpu_seconds: cpu, cpu_share_of_run: cpu / wall, peak_rss_mib: rss }
            })
            .collect()
    }

    pub(super) fn stop(mut self) {
        for (_, child) in &mut self.processes {
            // SIGTERM: each finishes its message, commits offsets and exits.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        for (_, child) in &mut self.processes {
            let _ = child.wait();
        }
    }
}

/// Starts `bridge sim` on a free local port with its books in `books_url`
/// (`books` = `database`) or in its memory (`memory`), and waits until it
/// listens (it migrates its database first).
fn spawn_simulator(exe: &Path, logs: &Path, books_url: &str, books: &str) -> Result<(Child, std::net::SocketAddr)> {
    let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::File::create(logs.join("simulator.log"))?;
    let mut child = Command::new(exe)
        .arg("sim")
        .args(["--books", books])
        .env("DATABASE_URL", books_url)
        .env("BRIDGE_SIM_LISTEN", address.to_string())
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("Failed to start the simulator")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(address).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the simulator exited with {status}; see its log");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the simulator did not listen on {address} within a minute; see its log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((child, address))
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The name this process's usage is reported under.
pub(super) const BENCH_PROCESS: &str = "bench (load generator and status follower)";
/// The names the database's and the broker's usage is reported under.
pub(super) const POSTGRES: &str = "postgres (all processes)";
pub(super) const SIMULATOR_BOOKS: &str = "postgres (the simulator's backends)";
/// The name the account services' process (`--account-services http`) is
/// reported under.
pub(super) const SIMULATOR_PROCESS: &str = "simulator (bridge sim)";
pub(super) const BROKER: &str = "tansu (all processes)";

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
pub(super) const TICKS_PER_SEC: f64 = 100.0;

/// (CPU seconds, peak RSS MiB) of a process, from /proc.
pub(super) fn proc_usage(pid: u32) -> Option<(f64, f64)> {
    let cpu = proc_cpu(Path::new(&format!("/proc/{pid}/stat")), false)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((cpu, peak_kib / 1024.0))
}

/// CPU seconds of a process from its `stat` file; with `reaped_children`,
/// also those of the children it has waited for.
pub(super) fn proc_cpu(stat: &Path, reaped_children: bool) -> Option<f64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name (which may hold spaces) start at ")":
    // utime, stime, cutime, cstime are the 12th to 15th of them.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let last = if reaped_children { 14 } else { 12 };
    let ticks: Option<f64> = fields.get(11..=last)?.iter().map(|field| field.parse::<f64>().ok()).sum();
    Some(ticks? / TICKS_PER_SEC)
}

/// CPU seconds used so far by every postgres and tansu process on the
/// machine (the database and the broker the run shares the cores with).
/// A Postgres backend that ends during the run (a pool replacing a
/// connection past its lifetime, 30 minutes in sqlx) leaves the live
/// processes, and its time would be lost from the sum; once the postmaster
/// has waited for it, that time is in the postmaster's children's times,
/// which are counted too.
/// Backends in `simulator_backends` are counted apart.
pub(super) fn outside_cpu(simulator_backends: &std::collections::HashSet<u32>) -> HashMap<&'static str, f64> {
    let mut totals: HashMap<&'static str, f64> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return totals };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else { continue };
        let comm = comm.trim();
        let pid: Option<u32> = entry.file_name().to_str().and_then(|name| name.parse().ok());
        let name = if comm.starts_with("postgres") {
            if pid.is_some_and(|pid| simulator_backends.contains(&pid)) {
                SIMULATOR_BOOKS
            } else {
                POSTGRES
            }
        } else if comm.starts_with("tansu") {
            BROKER
        } else {
            continue;
        };
        if let Some(cpu) = proc_cpu(&path.join("stat"), true) {
            *totals.entry(name).or_default() += cpu;
        }
    }
    totals
}

/// CPU by who spent it: milliseconds per measured transfer, or, with
/// nothing to do, the share of one core.
#[derive(Serialize, Default, Clone)]
pub(super) struct CpuBy {
    /// Every Postgres process but the simulator's backends: Bridge's
    /// database, plus the server's shared work (WAL writer, checkpoints).
    pub(super) postgres: f64,
    /// The `bridge run` processes.
    pub(super) pipeline: f64,
    pub(super) broker: f64,
    /// The backends serving the simulator's own database (0 when it shares
    /// Bridge's: its statements are then in `postgres`).
    pub(super) simulator_books: f64,
    /// The simulator's own process, when the stages call it over HTTP (0
    /// when it runs inside them: its work is then in `pipeline`).
    pub(super) simulator: f64,
    pub(super) load_generator: f64,
}

/// CPU seconds by process name, summed by part and multiplied by `scale`.
pub(super) fn cpu_by(usage: &[(String, f64)], scale: f64) -> CpuBy {
    let part = |filter: &dyn Fn(&str) -> bool| {
        usage.iter().filter(|(name, _)| filter(name)).map(|(_, seconds)| seconds).sum::<f64>() * scale
    };
    // Every process not named otherwise is one of the pipeline's.
    let outside = [POSTGRES, SIMULATOR_BOOKS, SIMULATOR_PROCESS, BROKER, BENCH_PROCESS];
    CpuBy {
        postgres: part(&|name| name == POSTGRES),
        pipeline: part(&|name| !outside.contains(&name)),
        broker: part(&|name| name == BROKER),
        simulator_books: part(&|name| name == SIMULATOR_BOOKS),
        simulator: part(&|name| name == SIMULATOR_PROCESS),
        load_generator: part(&|name| name == BENCH_PROCESS),
    }
}

/// Seconds the idle pipeline is watched for.
const IDLE_SECS: u64 = 5;

/// The share of a core each part uses while nothing is in flight.
pub(super) async fn idle_cpu(children: &mut Children) -> CpuBy {
    let before: HashMap<String, f64> = children.readings().into_iter().map(|(name, cpu, _)| (name, cpu)).collect();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(IDLE_SECS)).await;
    let wall = started.elapsed().as_secs_f64();
    let used: Vec<(String, f64)> = children
        .readings()
        .into_iter()
        .map(|(name, cpu, _)| {
            let spent = cpu - before.get(&name).copied().unwrap_or(cpu);
            (name, spent)
        })
        .collect();
    cpu_by(&used, 1.0 / wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each process's CPU goes to its part once: the stages and the relay
    /// to the pipeline, the simulator's backends apart from Postgres, its
    /// own process apart from the pipeline.
    #[test]
    fn cpu_is_summed_by_part() {
        let usage: Vec<(String, f64)> = [
            ("validator-0", 1.0),
            ("withdrawal-0", 2.0),
            ("deposit-1", 3.0),
            ("completion-0", 4.0),
            ("relay-0", 5.0),
            (POSTGRES, 10.0),
            (SIMULATOR_BOOKS, 20.0),
            (BROKER, 40.0),
            (BENCH_PROCESS, 80.0),
            (SIMULATOR_PROCESS, 160.0),
        ]
        .into_iter()
        .map(|(name, seconds)| (name.to_owned(), seconds))
        .collect();
        let cpu = cpu_by(&usage, 0.5);
        assert_eq!(
            (cpu.pipeline, cpu.postgres, cpu.simulator_books, cpu.broker, cpu.load_generator, cpu.simulator),
            (7.5, 5.0, 10.0, 20.0, 40.0, 80.0)
        );
    }

    #[test]
    fn reads_cpu_time_of_a_process() {
        let (cpu, rss) = proc_usage(std::process::id()).expect("this process is in /proc");
        assert!(cpu >= 0.0 && rss > 0.0);
    }

    /// The time of a child that has ended and been waited for stays in the
    /// count with `reaped_children`, and only then.
    #[test]
    fn counts_the_time_of_children_that_have_ended() {
        let stat = Path::new("/proc/self/stat");
        let (own, all) = (proc_cpu(stat, false).unwrap(), proc_cpu(stat, true).unwrap());
        // About a second of CPU in a child shell.
        let status = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let (own_after, all_after) = (proc_cpu(stat, false).unwrap(), proc_cpu(stat, true).unwrap());
        let children = (all_after - own_after) - (all - own);
        assert!(children >= 0.2, "children's time grew by {children} s");
        assert!(own_after - own < 0.2, "this process's own time grew by {} s", own_after - own);
    }
}
