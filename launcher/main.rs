//! `ringrun`: starts one `ringtrain` worker per local slot with torchrun's environment, prefixes
//! their output, and stops the group when one fails.

use anyhow::{Context, Result};
use clap::Parser;
use ringtrain::supervise::{self, GroupOptions, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ringrun",
    version,
    about = "Launch data-parallel ringtrain workers (torchrun's environment contract)",
    after_help = "Examples:\n  ringrun --nproc-per-node 2 ringtrain --config configs/fashion_mnist_cnn.yaml\n  ringrun --nproc-per-node 2 --config configs/fashion_mnist_cnn.yaml   (worker omitted: the ringtrain beside ringrun)"
)]
struct Args {
    /// Workers on this node.
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Address of rank 0's store.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of rank 0's store (default: a free port).
    #[arg(long)]
    master_port: Option<u16>,
    /// Also write each worker's output to DIR/rank<N>.log.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Compute threads per worker (OMP_NUM_THREADS); default: cores / nproc-per-node.
    #[arg(long)]
    threads_per_worker: Option<usize>,
    /// Restart the whole group up to N times when a worker fails; workers resume from the latest
    /// checkpoint.
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_restarts: u32,
    /// After SIGINT/SIGTERM, seconds workers get to finish the step and checkpoint before they
    /// are killed (a second signal kills them at once).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    stop_timeout_secs: u64,
    /// Worker program and its arguments; if it starts with an option, the `ringtrain` beside
    /// this launcher is run with them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "WORKER ARGS")]
    command: Vec<String>,
}

/// Resolves the worker: a bare name that exists beside ringrun (the matching build) wins over
/// PATH; no program at all means that sibling `ringtrain`.
fn worker_command(command: &[String]) -> Result<(PathBuf, Vec<String>)> {
    let here = std::env::current_exe().context("locating ringrun")?;
    let dir = here.parent().map(PathBuf::from).unwrap_or_default();
    match command.first() {
        Some(first) if !first.starts_with('-') => {
            let sibling = dir.join(first);
            let program = if !first.contains('/') && sibling.is_file() { sibling } else { PathBuf::from(first) };
            Ok((program, command[1..].to_vec()))
        }
        _ => Ok((dir.join("ringtrain"), command.to_vec())),
    }
}

fn try_main() -> Result<ExitCode> {
    let args = Args::parse();
    anyhow::ensure!(args.nproc_per_node >= 1, "--nproc-per-node must be at least 1");
    let (program, worker_args) = worker_command(&args.command)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = args
        .threads_per_worker
        .or_else(|| std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse().ok()))
        .unwrap_or((cores / args.nproc_per_node).max(1));
    let master_port = match args.master_port {
        Some(p) if p != 0 => p,
        _ => supervise::free_port(&args.master_addr).with_context(|| format!("finding a free port on {}", args.master_addr))?,
    };
    let job_token = match std::env::var("RINGTRAIN_JOB_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        _ => supervise::new_job_token().context("making a job token")?,
    };
    let opts = GroupOptions {
        program,
        args: worker_args,
        nproc_per_node: args.nproc_per_node,
        master_addr: args.master_addr,
        master_port,
        threads_per_worker: threads,
        log_dir: args.log_dir,
        job_token,
        restart_count: 0,
        stop_grace: Duration::from_secs(2),
        graceful_stop: Duration::from_secs(args.stop_timeout_secs),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM]).context("installing signal handlers")?;
    std::thread::spawn(move || {
        for s in signals.forever() {
            let _ = tx.send(s);
        }
    });
    eprintln!(
        "ringrun: starting {} worker(s): {} (store {}:{}, {threads} thread(s) each)",
        opts.nproc_per_node,
        opts.program.display(),
        opts.master_addr,
        opts.master_port
    );
    let job = supervise::run_job(&opts, args.max_restarts, &rx)?;
    let restarts = match job.restarts.len() {
        0 => String::new(),
        n => format!(
            " after {n} restart(s) ({})",
            job.restarts.iter().map(|(r, e)| format!("rank {r} {e}")).collect::<Vec<_>>().join("; ")
        ),
    };
    match job.last {
        Outcome::Success => {
            if !restarts.is_empty() {
                eprintln!("ringrun: finished{restarts}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Failed { rank, exit } => {
            eprintln!("ringrun: error: rank {rank} {exit}; stopped the other worker(s){restarts}");
            Ok(ExitCode::FAILURE)
        }
        Outcome::Interrupted { signal, exits } => {
            let clean = exits.iter().all(|e| *e == supervise::WorkerExit::Code(0));
            eprintln!("ringrun: received {}; workers ended: {exits:?}", supervise::signal_name(signal));
            Ok(if clean { ExitCode::SUCCESS } else { ExitCode::from(128 + signal as u8) })
        }
    }
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringrun: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
