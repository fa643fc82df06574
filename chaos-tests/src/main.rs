//! `chaos`: the command line of the fault-testing harness (the library in `lib.rs` does
//! the work).
//!
//! `chaos run` performs one seeded run and exits 0 on a passing verdict, 1 on a failing
//! one, 2 when the harness itself could not do the run; `chaos batch` runs several
//! nemeses over a range of seeds; `chaos cleanup` removes what an interrupted run left;
//! `chaos check DIR` re-checks a stored history; `chaos schedule` prints a seed's fault
//! schedule; `chaos nemeses` lists them. Only one run may be active on a machine at a time
//! (a lock file), and every run ends with a cleanup, on Ctrl-C too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use chaos_tests::cluster::Binaries;
use chaos_tests::nemesis;
use chaos_tests::net;
use chaos_tests::run::{self, RunOptions, Summary};

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Jepsen-style fault testing of a Warren cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run: start a cluster, run the workload under the nemesis, heal, drain, check.
    Run {
        /// Seed of the fault schedule and the workload (random if not given).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value = "partition")]
        nemesis: String,
        #[command(flatten)]
        common: Common,
    },
    /// Runs every nemesis in the list for every seed in the range, one after the other.
    Batch {
        /// Comma-separated nemeses.
        #[arg(long, value_delimiter = ',', default_value = "partition,kill,pause")]
        nemeses: Vec<String>,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many seeds per nemesis.
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Removes namespaces, links, tmpfs mounts and processes left by an interrupted run.
    Cleanup,
    /// Re-runs the checker over a stored run directory's history.
    Check { dir: PathBuf },
    /// Prints the fault schedule of a seed.
    Schedule {
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value = "partition")]
        nemesis: String,
        #[arg(long, default_value_t = 40)]
        duration: u64,
        #[arg(long, default_value_t = 4)]
        queues: usize,
    },
    /// Lists the nemeses and the named scenarios.
    Nemeses,
    /// Tabulates every run under a directory (its `*/summary.json`) by nemesis.
    Report { dir: PathBuf },
}

#[derive(Args, Clone)]
struct Common {
    /// Seconds of faults (then heal, quiet period, drain).
    #[arg(long, default_value_t = 40)]
    duration: u64,
    /// Cluster size (3 or 5).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 4)]
    queues: usize,
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Transactional producers (tx.select, a few publishes per tx.commit), beside the others.
    #[arg(long, default_value_t = 1)]
    tx_producers: u32,
    /// Consumers per queue.
    #[arg(long, default_value_t = 2)]
    consumers: u32,
    /// Publishes per second, all producers together.
    #[arg(long, default_value_t = 60.0)]
    rate: f64,
    /// Seconds of workload without faults after the heal.
    #[arg(long, default_value_t = 10)]
    quiet: u64,
    /// Upper bound in seconds for draining the queues.
    #[arg(long, default_value_t = 90)]
    drain_timeout: u64,
    /// Where run directories go.
    #[arg(long, default_value = "chaos-out", env = "CHAOS_OUT")]
    out: PathBuf,
    /// The warren binary (default: next to this one, or $CARGO_TARGET_DIR/debug).
    #[arg(long, env = "CHAOS_WARREN")]
    warren: Option<PathBuf>,
    #[arg(long, env = "CHAOS_WARRENCTL")]
    warrenctl: Option<PathBuf>,
    /// Keep the nodes' data directories of passing runs too.
    #[arg(long)]
    keep_data: bool,
}

fn find_binary(name: &str, given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    candidates.push(target.join("debug").join(name));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find {name}; build it (cargo build -p warren-server -p warrenctl) or pass --{name}"
            )
        })
}

impl Common {
    fn options(&self, seed: u64, nemesis: &str) -> anyhow::Result<RunOptions> {
        if !nemesis::known(nemesis) {
            anyhow::bail!("unknown nemesis {nemesis}; `chaos nemeses` lists them");
        }
        if !(3..=9).contains(&self.nodes) {
            anyhow::bail!("--nodes must be between 3 and 9");
        }
        Ok(RunOptions {
            seed,
            nemesis: nemesis.to_owned(),
            duration: Duration::from_secs(self.duration),
            nodes: self.nodes,
            queues: self.queues.clamp(2, 16),
            producers: self.producers.max(1),
            tx_producers: self.tx_producers,
            consumers_per_queue: self.consumers.max(1),
            rate: self.rate,
            quiet: Duration::from_secs(self.quiet),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            out: self.out.clone(),
            bins: Binaries {
                warren: find_binary("warren", self.warren.clone())?,
                warrenctl: find_binary("warrenctl", self.warrenctl.clone())?,
            },
            keep_data: self.keep_data,
        })
    }
}

/// Holds an exclusive lock on a file for the life of the run: the namespaces and the
/// bridge have fixed names, so two runs at once would tear each other down.
struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    fn take() -> anyhow::Result<RunLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/wchaos.lock")?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!("another chaos run is active on this machine (/tmp/wchaos.lock)");
        }
        Ok(RunLock { _file: f })
    }
}

/// Removes leftovers when dropped, whatever way the run ended.
struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        for r in net::cleanup() {
            eprintln!("chaos: cleaned up {r}");
        }
    }
}

/// Runs one run with Ctrl-C / SIGTERM handling; the run's future is dropped on a signal,
/// which kills its nodes and removes its network.
async fn guarded_run(opts: &RunOptions) -> anyhow::Result<Summary> {
    let _lock = RunLock::take()?;
    net::preflight()?;
    for r in net::cleanup() {
        eprintln!("chaos: removed leftover {r}");
    }
    let _guard = CleanupGuard;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run::run(opts) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

fn report(s: &Summary) {
    println!(
        "chaos: {} nemesis={} seed={} lost={} unexpected={} ok={} dups={} ({} flagged) dir={}",
        s.verdict.to_uppercase(),
        s.nemesis,
        s.seed,
        s.checker.lost,
        s.checker.unexpected,
        s.checker.publishes_ok,
        s.checker.duplicates,
        s.checker.duplicates_redelivered_flag,
        s.run_dir
    );
    for p in &s.problems {
        println!("chaos:   problem: {p}");
    }
    for w in &s.warnings {
        println!("chaos:   warning: {w}");
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Run {
            seed,
            nemesis,
            common,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64 % 1_000_000)
                    .unwrap_or(1)
            });
            let opts = common.options(seed, &nemesis)?;
            let s = guarded_run(&opts).await?;
            report(&s);
            Ok(if s.verdict == "pass" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Batch {
            nemeses,
            seed,
            count,
            common,
        } => {
            let mut failed = Vec::new();
            let mut passed = 0;
            std::fs::create_dir_all(&common.out)?;
            let index = common.out.join("batch.jsonl");
            for s in seed..seed + count {
                for n in &nemeses {
                    let opts = common.options(s, n)?;
                    let line = match guarded_run(&opts).await {
                        Ok(summary) => {
                            report(&summary);
                            if summary.verdict == "pass" {
                                passed += 1;
                            } else {
                                failed.push(format!("{n} seed {s}"));
                            }
                            serde_json::json!({
                                "nemesis": n, "seed": s, "verdict": summary.verdict,
                                "lost": summary.checker.lost,
                                "unexpected": summary.checker.unexpected,
                                "ok": summary.checker.publishes_ok,
                                "problems": summary.problems,
                                "dir": summary.run_dir,
                            })
                        }
                        Err(e) => {
                            let msg = format!("{e:#}");
                            println!("chaos: ERROR nemesis={n} seed={s}: {msg}");
                            if msg == "interrupted" || msg == "terminated" {
                                return Err(e);
                            }
                            failed.push(format!("{n} seed {s} (harness error)"));
                            serde_json::json!({ "nemesis": n, "seed": s, "verdict": "error", "error": msg })
                        }
                    };
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&index)?;
                    writeln!(f, "{line}")?;
                }
            }
            // The plain "N passed, N failed" line CI logs are read for.
            println!("chaos: {passed} passed, {} failed", failed.len());
            for f in &failed {
                println!("chaos:   failed: {f}");
            }
            Ok(if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Cleanup => {
            let _lock = RunLock::take()?;
            let removed = net::cleanup();
            if removed.is_empty() {
                println!("chaos: nothing to clean up");
            }
            for r in removed {
                println!("chaos: removed {r}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { dir } => {
            let r = run::recheck(&dir)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(if r.valid() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Schedule {
            seed,
            nemesis,
            duration,
            queues,
        } => {
            if !nemesis::known(&nemesis) {
                anyhow::bail!("unknown nemesis {nemesis}");
            }
            let q = chaos_tests::workload::topology(queues).queues;
            let events = nemesis::schedule(&nemesis, seed, Duration::from_secs(duration), &q);
            println!("{}", serde_json::to_string_pretty(&events)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { dir } => {
            print!("{}", report_table(&dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nemeses => {
            for (n, d) in nemesis::NEMESES {
                println!("{n:<22} {d}");
            }
            println!();
            println!("scenarios (fixed fault lists kept as regression tests):");
            for sc in nemesis::SCENARIOS {
                let about: String = sc.about.split_whitespace().collect::<Vec<_>>().join(" ");
                println!("{:<22} {about}", sc.name);
                if let Some(bug) = sc.known_bug {
                    let bug: String = bug.split_whitespace().collect::<Vec<_>>().join(" ");
                    println!("{:<22} known bug, expected to fail: {bug}", "");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Per nemesis and cluster size: runs, verdicts, confirmed publishes, lost, unexpected,
/// duplicates, and the failing seeds with their first problem.
fn report_table(dir: &std::path::Path) -> anyhow::Result<String> {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    #[derive(Default)]
    struct Row {
        runs: u64,
        pass: u64,
        ok: u64,
        lost: u64,
        unexpected: u64,
        dups: u64,
        unflagged_same: u64,
        seeds: Vec<u64>,
        failures: Vec<String>,
    }
    let mut rows: BTreeMap<(String, u64), Row> = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(text) = std::fs::read_to_string(e.path().join("summary.json")) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let n = |k: &str| v["checker"][k].as_u64().unwrap_or(0);
        let key = (
            v["nemesis"].as_str().unwrap_or("?").to_owned(),
            v["nodes"].as_u64().unwrap_or(0),
        );
        let row = rows.entry(key).or_default();
        row.runs += 1;
        let seed = v["seed"].as_u64().unwrap_or(0);
        row.seeds.push(seed);
        if v["verdict"] == "pass" {
            row.pass += 1;
        } else {
            let first = v["problems"][0].as_str().unwrap_or("").to_owned();
            row.failures.push(format!("seed {seed}: {first}"));
        }
        row.ok += n("publishes_ok");
        row.lost += n("lost");
        row.unexpected += n("unexpected");
        row.dups += n("duplicates");
        row.unflagged_same += n("duplicates_unflagged_same_session");
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| nemesis | nodes | runs | pass | confirmed | lost | unexpected | duplicates | unflagged on same connection | seeds |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    let mut total = Row::default();
    for ((nemesis, nodes), r) in &rows {
        let (lo, hi) = (
            r.seeds.iter().min().unwrap_or(&0),
            r.seeds.iter().max().unwrap_or(&0),
        );
        let _ = writeln!(
            t,
            "| {nemesis} | {nodes} | {} | {} | {} | {} | {} | {} | {} | {lo}–{hi} |",
            r.runs, r.pass, r.ok, r.lost, r.unexpected, r.dups, r.unflagged_same
        );
        total.runs += r.runs;
        total.pass += r.pass;
        total.ok += r.ok;
        total.lost += r.lost;
        total.unexpected += r.unexpected;
    }
    let _ = writeln!(
        t,
        "| **all** | | {} | {} | {} | {} | {} | | | |",
        total.runs, total.pass, total.ok, total.lost, total.unexpected
    );
    for ((nemesis, nodes), r) in &rows {
        for f in &r.failures {
            let _ = writeln!(t, "- {nemesis} ({nodes} nodes) {f}");
        }
    }
    Ok(t)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
