//! `ringrun`: starts one `ringtrain` worker per local slot with torchrun's environment, prefixes
//! their output, and stops the group when one fails.

use anyhow::{Context, Result};
use clap::Parser;
use ringtrain::internal::elastic::ElasticOptions;
use ringtrain::internal::nodes::{Membership, NodeCoordinator};
use ringtrain::internal::pet;
use ringtrain::internal::supervise::{self, GroupOptions, Outcome};
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
    /// Workers on this node: a count, or `auto` (one per visible GPU, else 1). Also
    /// PET_NPROC_PER_NODE, as torchrun.
    #[arg(long, env = "PET_NPROC_PER_NODE", default_value = "1", value_parser = pet::parse_nproc_per_node)]
    nproc_per_node: usize,
    /// Nodes in the job (one ringrun per node): a count, or MIN:MAX for an elastic job that
    /// goes on while at least MIN nodes remain and admits nodes up to MAX. Also PET_NNODES.
    #[arg(long, env = "PET_NNODES", default_value = "1", value_parser = pet::parse_nnodes)]
    nnodes: pet::NodeCount,
    /// This node's index, 0..nnodes; node 0 serves the job's store. Also PET_NODE_RANK. Not used
    /// by an elastic job: the node whose address is --master-addr is node 0, the others are
    /// numbered in the order they arrive.
    #[arg(long, env = "PET_NODE_RANK", default_value_t = 0)]
    node_rank: usize,
    /// How nodes meet: `static` (a fixed --node-rank per node) or `c10d` (numbered as they
    /// arrive, as with --nnodes MIN:MAX). Also PET_RDZV_BACKEND.
    #[arg(long, env = "PET_RDZV_BACKEND", default_value = "static", value_parser = pet::parse_rdzv_backend)]
    rdzv_backend: pet::RdzvBackend,
    /// HOST[:PORT] of the job's store, torchrun's form (default port 29400); used when
    /// --master-addr is not given. Also PET_RDZV_ENDPOINT (Kubernetes' elastic policy sets it).
    #[arg(long, env = "PET_RDZV_ENDPOINT", value_parser = pet::parse_endpoint, value_name = "HOST[:PORT]")]
    rdzv_endpoint: Option<(String, u16)>,
    /// torchrun's rendezvous id: part of the job token derived when RINGTRAIN_JOB_TOKEN is unset.
    /// Also PET_RDZV_ID.
    #[arg(long, env = "PET_RDZV_ID")]
    rdzv_id: Option<String>,
    /// torchrun's rendezvous settings: join_timeout, last_call_timeout (as --join-timeout-secs and
    /// --rdzv-settle-secs) and is_host (whether this node serves the store); others are ignored
    /// with a note. Also PET_RDZV_CONF.
    #[arg(long, env = "PET_RDZV_CONF", value_parser = pet::parse_rdzv_conf, value_name = "KEY=VALUE,…")]
    rdzv_conf: Option<pet::RdzvConf>,
    /// Elastic: once MIN nodes are in, how long others may still join before a generation starts.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    rdzv_settle_secs: u64,
    /// Elastic: a node whose launcher sends no heartbeat through the store this long is lost.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    node_timeout_secs: u64,
    /// Address other nodes should use to reach this node's workers (default: the address this
    /// node reaches the master from). Also RINGTRAIN_LOCAL_ADDR.
    #[arg(long, env = "RINGTRAIN_LOCAL_ADDR")]
    local_addr: Option<String>,
    /// Multi-node: how long to wait for every node to join (and node 0 to come up).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    join_timeout_secs: u64,
    /// Address of rank 0's store (default 127.0.0.1). Also PET_MASTER_ADDR, or in a pod of
    /// Kubernetes' v1 PyTorchJob operator its MASTER_ADDR.
    #[arg(long, env = "PET_MASTER_ADDR")]
    master_addr: Option<String>,
    /// Port of the job's store (default on one node: a free port; required with --nnodes > 1).
    /// Also PET_MASTER_PORT, or in a v1 PyTorchJob pod its MASTER_PORT.
    #[arg(long, env = "PET_MASTER_PORT")]
    master_port: Option<u16>,
    /// Also write each worker's output to DIR/rank<N>.log.
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Compute threads per worker (OMP_NUM_THREADS); default: cores / nproc-per-node.
    #[arg(long)]
    threads_per_worker: Option<usize>,
    /// Restart the whole group up to N times when a worker fails; workers resume from the latest
    /// checkpoint.
    /// Also PET_MAX_RESTARTS.
    #[arg(long, env = "PET_MAX_RESTARTS", default_value_t = 0, value_name = "N")]
    max_restarts: u32,
    /// After SIGINT/SIGTERM, seconds workers get to finish the step and checkpoint before they
    /// are killed (a second signal kills them at once).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    stop_timeout_secs: u64,
    /// Plain per-rank log lines even on a terminal (instead of one live status line).
    #[arg(long)]
    no_status: bool,
    /// Worker program and its arguments; if it starts with an option, the `ringtrain` beside
    /// this launcher is run with them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "WORKER ARGS")]
    command: Vec<String>,
}

impl Args {
    /// Rank 0's store address: the flag, PET_MASTER_ADDR, the operator's MASTER_ADDR, or loopback.
    fn master(&self) -> &str {
        self.master_addr.as_deref().unwrap_or("127.0.0.1")
    }

    /// Nodes numbered by the store as they arrive (else each has its --node-rank).
    fn elastic(&self) -> bool {
        self.nnodes.is_elastic() || self.rdzv_backend == pet::RdzvBackend::C10d
    }
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

/// The arguments clap cannot check alone.
fn check(args: &Args) -> Result<()> {
    anyhow::ensure!(args.nproc_per_node >= 1, "--nproc-per-node must be at least 1");
    anyhow::ensure!(args.nnodes.min >= 1, "--nnodes must be at least 1");
    anyhow::ensure!(
        args.elastic() || args.node_rank < args.nnodes.min,
        "--node-rank {} must be below --nnodes {}",
        args.node_rank,
        args.nnodes
    );
    anyhow::ensure!(
        args.nnodes.max == 1 || args.master_port.is_some_and(|p| p != 0),
        "--nnodes {} needs --master-port (the same on every node)",
        args.nnodes
    );
    Ok(())
}

/// How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 outside Slurm).
fn slurm_restart_count() -> Result<u32> {
    match std::env::var("SLURM_RESTART_COUNT") {
        Ok(v) => v.trim().parse().map_err(|_| anyhow::anyhow!("SLURM_RESTART_COUNT={v:?} is not a count")),
        Err(_) => Ok(0),
    }
}

/// With several nodes: this node's launcher joined with the others.
fn join_nodes(args: &Args, master_port: u16, job_token: &str, gen: u32) -> Result<Option<NodeCoordinator>> {
    if args.nnodes.max == 1 {
        return Ok(None);
    }
    let membership = if args.elastic() {
        Membership::Elastic(ElasticOptions {
            min: args.nnodes.min,
            max: args.nnodes.max,
            settle: Duration::from_secs(args.rdzv_settle_secs),
            node_timeout: Duration::from_secs(args.node_timeout_secs),
            host: args.rdzv_conf.as_ref().and_then(|c| c.is_host),
        })
    } else {
        Membership::Static { nnodes: args.nnodes.min, node_rank: args.node_rank }
    };
    let mut n = NodeCoordinator::start(args.master(), master_port, job_token, membership, Duration::from_secs(args.join_timeout_secs), gen)
        .map_err(anyhow::Error::msg)?;
    let reach = args.local_addr.clone().unwrap_or_else(|| n.local_ip().to_string());
    if args.elastic() {
        n.name_as(&reach);
        let role = if n.is_host() { "serves the job's store (node 0)" } else { "joins the job" };
        eprintln!("ringrun: elastic job of {} nodes; this node {role}; peers reach it at {reach}", args.nnodes);
    } else {
        eprintln!("ringrun: node {} of {}; peers reach this node at {reach}", args.node_rank, args.nnodes);
    }
    Ok(Some(n))
}

/// The job's end as one line, and ringrun's exit status.
fn report(job: supervise::JobOutcome) -> ExitCode {
    let restarts = match job.restarts.len() {
        0 => String::new(),
        n => format!(" after {n} restart(s) ({})", job.restarts.join("; ")),
    };
    match job.last {
        Outcome::Success => {
            if !restarts.is_empty() {
                eprintln!("ringrun: finished{restarts}");
            }
            ExitCode::SUCCESS
        }
        Outcome::Failed { rank, exit } => {
            eprintln!("ringrun: error: rank {rank} {exit}; stopped the other worker(s){restarts}");
            ExitCode::FAILURE
        }
        Outcome::RemoteFailed { reason } | Outcome::Reform { reason } | Outcome::StoreLost { reason } => {
            eprintln!("ringrun: error: {reason}; stopped this node's worker(s){restarts}");
            ExitCode::FAILURE
        }
        Outcome::Interrupted { signal, exits } => {
            let clean = exits.iter().all(|e| *e == supervise::WorkerExit::Code(0));
            eprintln!("ringrun: received {}; workers ended: {exits:?}", supervise::signal_name(signal));
            if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(128 + signal as u8)
            }
        }
    }
}

fn try_main() -> Result<ExitCode> {
    let mut args = Args::parse();
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    if let (None, Some((host, port))) = (&args.master_addr, &args.rdzv_endpoint) {
        args.master_addr = Some(host.clone());
        args.master_port = args.master_port.or(Some(*port));
    }
    if let Some(c) = &args.rdzv_conf {
        args.join_timeout_secs = c.join_timeout.unwrap_or(args.join_timeout_secs);
        args.rdzv_settle_secs = c.last_call_timeout.unwrap_or(args.rdzv_settle_secs);
        if !c.ignored.is_empty() {
            eprintln!("ringrun: --rdzv-conf: ignoring {} (not used by ringrun's rendezvous)", c.ignored.join(", "));
        }
    }
    if args.master_addr.is_none() {
        args.master_addr = pet::operator_fallback(&env, "MASTER_ADDR");
    }
    if args.master_port.is_none() {
        if let Some(p) = pet::operator_fallback(&env, "MASTER_PORT") {
            args.master_port = Some(p.trim().parse().map_err(|_| anyhow::anyhow!("MASTER_PORT={p:?} is not a port number"))?);
        }
    }
    check(&args)?;
    let multi_node = args.nnodes.max > 1;
    let (program, worker_args) = worker_command(&args.command)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = args
        .threads_per_worker
        .or_else(|| std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse().ok()))
        .unwrap_or((cores / args.nproc_per_node).max(1));
    let master_port = match args.master_port {
        Some(p) if p != 0 => p,
        _ => supervise::free_port(args.master()).with_context(|| format!("finding a free port on {}", args.master()))?,
    };
    let job_token = match std::env::var("RINGTRAIN_JOB_TOKEN") {
        Ok(t) if !t.is_empty() => t,
        // Nodes must agree on the token; export RINGTRAIN_JOB_TOKEN on every node for a secret one.
        _ if multi_node => format!("ringrun-{}-{master_port}-{}", args.master(), args.rdzv_id.as_deref().unwrap_or("")),
        _ => ringtrain::auth::new_job_token().context("making a job token")?,
    };
    // In a requeued Slurm job the workers start as a restart: they resume.
    let restart_count = slurm_restart_count()?;
    let nodes = join_nodes(&args, master_port, &job_token, restart_count)?;
    // The log folder is ours to make: a failure here names --log-dir, not the worker program.
    if let Some(d) = &args.log_dir {
        std::fs::create_dir_all(d).map_err(|e| anyhow::anyhow!("--log-dir {}: {e}", d.display()))?;
    }
    let master_addr = args.master().to_string();
    let opts = GroupOptions {
        program,
        args: worker_args,
        nproc_per_node: args.nproc_per_node,
        // Set per generation by the membership.
        nnodes: args.nnodes.min,
        node_rank: args.node_rank,
        store_hosted: multi_node,
        local_addr: args.local_addr,
        master_addr,
        master_port,
        threads_per_worker: threads,
        log_dir: args.log_dir,
        job_token,
        restart_count,
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
    // On a terminal: one live status line for the job instead of interleaved per-rank logs.
    // Both streams: with stdout piped (`| tee`, `> file`) the plain lines are what is wanted.
    if !args.no_status && std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        ringtrain::internal::status::enable();
    }
    let job = supervise::run_job(&opts, args.max_restarts, &rx, nodes.as_ref()).map_err(anyhow::Error::msg);
    ringtrain::internal::status::finish();
    Ok(report(job?))
}

fn main() -> ExitCode {
    ringtrain::telemetry::one_line_panics("ringrun");
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringrun: error: {}", ringtrain::telemetry::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
