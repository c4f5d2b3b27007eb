//! The worker's job, from command line and environment to a finished run: read the config, find
//! out who we are, join the group (store, then ring), train, write outputs.
//!
//! `main` is the `ringtrain` worker whole: a program that registers its own model or data format
//! (`models::MODELS.register`, `data::FORMATS.register`) and then calls it is a worker that
//! ringrun, mpirun or srun start like `ringtrain` (examples/own_model/).

use crate::config::Config;
use crate::launch::LaunchInfo;
use crate::train::fault::Fault;
use crate::{telemetry, train};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Parser)]
#[command(about = "A data-parallel training worker (one per GPU or CPU slot)")]
pub struct WorkerArgs {
    /// YAML config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value: --set train.epochs=2 (repeatable; the value is YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Where outputs go (default: runs/<config name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// `auto` (newest usable checkpoint in the run directory, else start fresh) or a checkpoint
    /// folder; `None`: fresh, unless the launcher restarted the group (then `auto`).
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<train::Resume>,
}

/// The worker as a program's `main`: arguments from the command line, the run, rank 0's final
/// line on stdout, and an error as one line on stderr with a failing exit status.
pub fn main() -> std::process::ExitCode {
    let program = std::env::args().next().map(|a| Path::new(&a).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or(a));
    let program: &'static str = program.unwrap_or_else(|| "ringtrain".into()).leak();
    telemetry::one_line_panics(program);
    let args = <WorkerArgs as clap::Parser>::parse();
    match run(args) {
        Ok(summary) => {
            print_summary(&summary);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{program}: error: {}", telemetry::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Rank 0's last words: the task's metrics (test_acc for classification, test_loss and
/// perplexity for language models), throughput, and a language model's sample.
pub fn print_summary(summary: &train::Summary) {
    if summary.rank != 0 {
        return;
    }
    if summary.stopped {
        println!("stopped after {} steps on request; resume with --resume auto", summary.global_steps);
    } else if let Some(last) = summary.epochs.last() {
        let shown: String = last
            .test
            .iter()
            .flat_map(|t| t.metrics.iter().filter(|(k, _)| *k != "loss" || t.get("acc").is_none()))
            .map(|(k, v)| if *k == "acc" { format!("test_acc {:.2}%, ", v * 100.0) } else { format!("test_{k} {v:.4}, ") })
            .collect();
        println!("final: {shown}{:.0} samples/s, {} steps", last.samples_per_s, summary.global_steps);
    }
    if let Some(text) = &summary.sample {
        println!("sample:\n{text}");
    }
}

/// First SIGTERM/SIGINT: finish the step, checkpoint, exit 0. Second: exit at once.
fn install_stop_handlers() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone()).context("installing signal handlers")?;
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    Ok(stop)
}

/// Default run directory: `runs/<config file stem>`, then `-2`, `-3`, … for later runs of the same
/// config, so rerunning a config never mixes two runs and `--resume auto` finds the newest.
/// A fresh start takes the newest of these unless it holds checkpoints (then the next one); a
/// restart by the launcher takes the newest, which its first start created; a resume takes the
/// newest that holds checkpoints. (An explicit `--run-dir` is used as given: a fresh start there
/// is refused when another run has checkpoints in it.)
pub fn default_run_dir(config: &Path, start: Start) -> PathBuf {
    let stem = config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let nth = |k: usize| Path::new("runs").join(if k == 1 { stem.clone() } else { format!("{stem}-{k}") });
    let existing: Vec<PathBuf> = (1..).map(nth).take_while(|d| d.is_dir()).collect();
    let holds = |d: &Path| crate::checkpoint::newest_folder(&d.join("checkpoints")).is_some();
    match (start, existing.last()) {
        (_, None) => nth(1),
        (Start::Fresh, Some(last)) if holds(last) => nth(existing.len() + 1),
        (Start::Fresh | Start::Restart, Some(last)) => last.clone(),
        (Start::Resume, Some(last)) => existing.iter().rev().find(|d| holds(d)).unwrap_or(last).clone(),
    }
}

/// How a worker starts, for `default_run_dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Fresh,
    /// The launcher restarted the group (its first start chose the directory).
    Restart,
    /// `--resume`.
    Resume,
}

pub fn run(args: WorkerArgs) -> Result<train::Summary> {
    // Before the first large tensor: the step's temporaries are then mapped once, not per step.
    crate::host_memory::install_from_env();
    let cfg = Config::load(&args.config, &args.overrides)?;
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let launch = LaunchInfo::from_env(&env)?;
    let fault = Fault::from_env().map_err(anyhow::Error::msg)?;
    let start = match (launch.restart_count, &args.resume) {
        (1.., _) => Start::Restart,
        (0, None | Some(train::Resume::No)) => Start::Fresh,
        (0, Some(_)) => Start::Resume,
    };
    let run_dir = args.run_dir.clone().unwrap_or_else(|| default_run_dir(&args.config, start));
    let rank = launch.rank;

    std::fs::create_dir_all(run_dir.join("logs")).with_context(|| format!("creating run directory {}", run_dir.display()))?;
    let log = run_dir.join("logs").join(format!("rank{rank}.log"));
    let resume = match &args.resume {
        None | Some(train::Resume::No) => "no".to_string(),
        Some(train::Resume::Auto) => "auto".to_string(),
        Some(train::Resume::Path(p)) => p.display().to_string(),
    };
    let what = format!("rank {rank} start (restart {}, resume {resume})", launch.restart_count);
    telemetry::append_log_header(&log, &what).with_context(|| format!("opening the log file {}", log.display()))?;
    telemetry::init_tracing(rank, Some(&log)).with_context(|| format!("opening the log file {}", log.display()))?;
    let _span = tracing::info_span!("rank", rank).entered();
    tracing::info!(
        "rank {rank} of {} (local {} of {}), launched by {}",
        launch.world_size,
        launch.local_rank,
        launch.local_world_size,
        launch.source.describe()
    );
    if rank == 0 {
        tracing::info!("run directory {}", run_dir.display());
    }

    let threads = cfg.train.threads.or_else(|| env.get("OMP_NUM_THREADS").and_then(|v| v.parse().ok())).unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / launch.local_world_size).max(1)
    });
    tch::set_num_threads(threads as i32);

    // A restarted group continues from its own newest checkpoint, whatever --resume named for
    // the first start (that checkpoint is older than what the group has written since).
    let resume = if launch.restart_count > 0 {
        let why = if env.contains_key("TORCHELASTIC_RESTART_COUNT") { "" } else { " (requeued by Slurm)" };
        tracing::info!("restart {} of the group{why}: resuming from the latest checkpoint", launch.restart_count);
        train::Resume::Auto
    } else {
        args.resume.unwrap_or(train::Resume::No)
    };
    // In a directory that holds a run's checkpoints, config.yaml is that run's: it is replaced
    // only once a resume has been accepted (train::setup); a fresh start there is refused.
    let used = crate::checkpoint::newest_folder(&run_dir.join("checkpoints")).is_some();
    if rank == 0 && !used {
        // Written before anything can fail later, so a failed run still says what it ran.
        let resolved = run_dir.join("config.yaml");
        std::fs::write(&resolved, cfg.to_yaml()).with_context(|| format!("writing {}", resolved.display()))?;
    }

    let stop = install_stop_handlers()?;
    // Faults fire in the first generation only, so a restarted group can finish.
    let fault = fault.filter(|_| launch.restart_count == 0);
    // Joins through the library's face (the device is chosen before anyone is joined, so a rank
    // without its GPU stops there with the reason); logging is already set up above.
    let opts = crate::InitOptions {
        backend: cfg.comm.backend,
        device: cfg.device,
        timeout_secs: cfg.comm.timeout_secs,
        local_transport: cfg.comm.local_transport,
        hierarchical: cfg.comm.hierarchical,
        logging: false,
        log_file: None,
    };
    let pg = crate::init_from_env(&env, opts)?;
    let device = pg.device();
    tracing::info!("device {device:?}");
    let comm = pg.handle();
    let (backend, world) = {
        let c = comm.lock();
        (c.backend_name(), c.world_size())
    };
    tracing::info!("joined: backend {backend}, {world} rank(s), {threads} compute thread(s)");
    let sample_log = std::env::var_os("RINGTRAIN_SAMPLE_LOG").is_some();
    match train::run(train::TrainContext { cfg: &cfg, comm, run_dir: &run_dir, fault, resume, stop, sample_log, device }) {
        Ok(summary) => {
            pg.finish();
            Ok(summary)
        }
        Err(e) => {
            pg.abandon();
            Err(e.into())
        }
    }
}
