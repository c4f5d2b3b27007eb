//! The launcher's process group: spawn one worker per local rank with torchrun's environment,
//! prefix and collect their output, watch them, and stop the group on the first failure.
//!
//! Workers run in their own process group, so a terminal's Ctrl-C reaches them once, through us,
//! and die with us (PR_SET_PDEATHSIG) if the launcher itself is killed.

use super::nodes::{NodeCoordinator, Remote, RemoteKind};
use crossbeam_channel::Receiver;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GroupOptions {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub nproc_per_node: usize,
    /// Nodes in the job, and this one's index (global rank = node_rank × nproc_per_node + local rank).
    pub nnodes: usize,
    pub node_rank: usize,
    /// The store is served by node 0's launcher, not by rank 0 (multi-node jobs).
    pub store_hosted: bool,
    /// Address peers should use for this node's workers (RINGTRAIN_LOCAL_ADDR).
    pub local_addr: Option<String>,
    pub master_addr: String,
    pub master_port: u16,
    pub threads_per_worker: usize,
    pub log_dir: Option<PathBuf>,
    pub job_token: String,
    pub restart_count: u32,
    /// After SIGTERM on a failure, how long workers get before SIGKILL.
    pub stop_grace: Duration,
    /// After forwarding a user's SIGINT/SIGTERM, how long workers get to finish their step and
    /// checkpoint before SIGKILL.
    pub graceful_stop: Duration,
}

/// How a worker ended, as people read it.
#[derive(Clone, Debug, PartialEq)]
pub enum WorkerExit {
    Code(i32),
    Signal(i32),
}

impl WorkerExit {
    fn from_status(s: ExitStatus) -> Self {
        match (s.code(), s.signal()) {
            (Some(c), _) => WorkerExit::Code(c),
            (None, Some(sig)) => WorkerExit::Signal(sig),
            _ => WorkerExit::Code(-1),
        }
    }
}

impl std::fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerExit::Code(c) => write!(f, "exited with code {c}"),
            WorkerExit::Signal(s) => write!(f, "was killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every worker exited 0.
    Success,
    /// The first worker to fail, and how.
    Failed { rank: usize, exit: WorkerExit },
    /// We were signalled; workers were forwarded the signal and have ended.
    Interrupted { signal: i32, exits: Vec<WorkerExit> },
    /// Another node failed (or was lost); this node's workers were stopped.
    RemoteFailed { reason: String },
    /// The store (node 0) is gone; this node's workers were stopped and the job cannot go on.
    StoreLost { reason: String },
    /// Nodes wait to join (elastic): the workers stopped at a checkpoint so the job re-forms.
    Reform { reason: String },
}

struct Worker {
    rank: usize,
    child: Child,
    exit: Option<WorkerExit>,
    pumps: Vec<JoinHandle<()>>,
}

/// Copies a worker's stream line by line, prefixed with its rank, to our stdout/stderr and to
/// its log file.
fn pump(src: impl Read + Send + 'static, rank: usize, to_stderr: bool, log: Option<Arc<Mutex<std::fs::File>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            // Status records feed the live status line (only asked for on a terminal).
            if !to_stderr && super::status::absorb(&line) {
                continue;
            }
            let prefix = format!("[rank{rank}] ");
            super::status::print(to_stderr, prefix.as_bytes(), &line);
            if let Some(f) = &log {
                let _ = f.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line);
            }
        }
    })
}

fn spawn_worker(opts: &GroupOptions, local_rank: usize) -> std::io::Result<Worker> {
    let rank = opts.node_rank * opts.nproc_per_node + local_rank;
    let mut cmd = Command::new(&opts.program);
    if opts.store_hosted {
        cmd.env("RINGTRAIN_STORE_HOSTED", "1");
    }
    if let Some(a) = &opts.local_addr {
        cmd.env("RINGTRAIN_LOCAL_ADDR", a);
    }
    cmd.args(&opts.args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", local_rank.to_string())
        .env("GROUP_RANK", opts.node_rank.to_string())
        .env("WORLD_SIZE", (opts.nnodes * opts.nproc_per_node).to_string())
        .env("LOCAL_WORLD_SIZE", opts.nproc_per_node.to_string())
        .env("MASTER_ADDR", &opts.master_addr)
        .env("MASTER_PORT", opts.master_port.to_string())
        .env("OMP_NUM_THREADS", opts.threads_per_worker.to_string())
        .env("TORCHELASTIC_RESTART_COUNT", opts.restart_count.to_string())
        // ringrun's workers use ringrun's store, even where ringrun itself was started under
        // torchrun's agent.
        .env_remove("TORCHELASTIC_USE_AGENT_STORE")
        .env("RINGTRAIN_JOB_TOKEN", &opts.job_token)
        .env("RINGTRAIN_STATUS", if super::status::enabled() { "1" } else { "" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let log = match &opts.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            // Appended with a header per start: a restart keeps the log of the start that failed.
            let path = d.join(format!("rank{rank}.log"));
            crate::telemetry::append_log_header(&path, &format!("ringrun: rank {rank}, restart {}", opts.restart_count))?;
            Some(Arc::new(Mutex::new(std::fs::OpenOptions::new().append(true).open(&path)?)))
        }
        None => None,
    };
    let pumps = vec![
        pump(child.stdout.take().expect("piped"), rank, false, log.clone()),
        pump(child.stderr.take().expect("piped"), rank, true, log),
    ];
    Ok(Worker { rank, child, exit: None, pumps })
}

fn send_signal(w: &Worker, sig: i32) {
    if w.exit.is_none() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(w.child.id() as libc::pid_t, sig);
        }
    }
}

/// Polls every worker once; records exits.
fn reap(workers: &mut [Worker]) {
    for w in workers.iter_mut().filter(|w| w.exit.is_none()) {
        if let Ok(Some(status)) = w.child.try_wait() {
            w.exit = Some(WorkerExit::from_status(status));
        }
    }
}

/// SIGTERM to the live workers, SIGKILL to any still alive after `grace`.
fn stop_all(workers: &mut [Worker], grace: Duration) {
    for w in workers.iter() {
        send_signal(w, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap(workers);
        if workers.iter().all(|w| w.exit.is_some()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in workers.iter() {
        send_signal(w, libc::SIGKILL);
    }
    for w in workers.iter_mut().filter(|w| w.exit.is_none()) {
        if let Ok(status) = w.child.wait() {
            w.exit = Some(WorkerExit::from_status(status));
        }
    }
}

/// Runs one generation of the group to its end. `signals` delivers SIGINT/SIGTERM received by
/// the launcher: the first is forwarded to the workers, a second kills them.
pub fn run_group(opts: &GroupOptions, signals: &Receiver<i32>, remote: &dyn Fn() -> Option<Remote>) -> std::io::Result<Outcome> {
    let mut workers = Vec::with_capacity(opts.nproc_per_node);
    for local_rank in 0..opts.nproc_per_node {
        match spawn_worker(opts, local_rank) {
            Ok(w) => workers.push(w),
            Err(e) => {
                stop_all(&mut workers, opts.stop_grace);
                return Err(std::io::Error::new(e.kind(), format!("starting {}: {e}", opts.program.display())));
            }
        }
    }
    let mut interrupted: Option<i32> = None;
    let mut interrupted_at = Instant::now();
    let outcome = loop {
        if interrupted.is_some() && interrupted_at.elapsed() > opts.graceful_stop {
            super::status::message(&format!("ringrun: workers did not stop within {:?} of the signal; killing them", opts.graceful_stop));
            for w in &workers {
                send_signal(w, libc::SIGKILL);
            }
            interrupted_at = Instant::now();
        }
        if let Ok(sig) = signals.try_recv() {
            if interrupted.is_some() {
                for w in &workers {
                    send_signal(w, libc::SIGKILL);
                }
            } else {
                interrupted = Some(sig);
                interrupted_at = Instant::now();
                for w in &workers {
                    send_signal(w, sig);
                }
            }
        }
        reap(&mut workers);
        if interrupted.is_none() {
            if let Some(Remote { reason, kind }) = remote() {
                if kind == RemoteKind::Reform {
                    // SIGTERM: the workers agree on a step, checkpoint there and exit.
                    stop_all(&mut workers, opts.graceful_stop);
                    break Outcome::Reform { reason };
                }
                stop_all(&mut workers, opts.stop_grace);
                break match kind {
                    RemoteKind::StoreLost => Outcome::StoreLost { reason },
                    _ => Outcome::RemoteFailed { reason },
                };
            }
        }
        if interrupted.is_none() {
            if let Some(w) = workers.iter().filter(|w| matches!(&w.exit, Some(e) if *e != WorkerExit::Code(0))).min_by_key(|w| w.rank) {
                let failed = Outcome::Failed { rank: w.rank, exit: w.exit.clone().unwrap() };
                stop_all(&mut workers, opts.stop_grace);
                break failed;
            }
        }
        if workers.iter().all(|w| w.exit.is_some()) {
            break match interrupted {
                Some(signal) => Outcome::Interrupted { signal, exits: workers.iter().map(|w| w.exit.clone().unwrap()).collect() },
                None => Outcome::Success,
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for w in workers.iter_mut() {
        for p in w.pumps.drain(..) {
            let _ = p.join();
        }
    }
    Ok(outcome)
}

/// A port that was free a moment ago on `addr` (the store binds it right after).
pub fn free_port(addr: &str) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((addr, 0))?.local_addr()?.port())
}

/// The end of a job run with restarts.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOutcome {
    pub last: Outcome,
    /// Each restart's cause, as people read it.
    pub restarts: Vec<String>,
}

/// What a generation's end means across nodes, where this node's view alone can mislead.
fn across_nodes(outcome: Outcome, n: &NodeCoordinator, j: &super::nodes::Joined, watch: &super::nodes::RemoteFailure) -> Outcome {
    match outcome {
        // When node 0 dies, this node's workers may fail before the watcher sees the store close:
        // the store's loss is the cause.
        Outcome::Failed { .. } => match watch.store_lost_within(Duration::from_secs(1)) {
            Some(reason) => Outcome::StoreLost { reason },
            None => outcome,
        },
        // Workers that stopped at a checkpoint for a re-formation exit 0, as at the end.
        Outcome::Success => match n.reform_asked(j) {
            Some(reason) => Outcome::Reform { reason },
            None => outcome,
        },
        _ => outcome,
    }
}

/// Runs the group; when a worker fails (on any node) and restarts remain, stops the rest and
/// starts the whole group again (TORCHELASTIC_RESTART_COUNT + 1; a new store port on a single
/// node), and the workers resume from the latest checkpoint. With elastic membership each
/// generation may have other nodes (and so another world size). A user's signal never restarts.
pub fn run_job(
    opts: &GroupOptions,
    max_restarts: u32,
    signals: &Receiver<i32>,
    nodes: Option<&NodeCoordinator>,
) -> Result<JobOutcome, String> {
    let mut opts = opts.clone();
    let mut restarts = Vec::new();
    let base = nodes.map_or(opts.restart_count, |n| n.base());
    loop {
        let joined = match nodes {
            Some(n) => match n.join(opts.restart_count, opts.nproc_per_node)? {
                Some(j) => Some(j),
                None => {
                    super::status::message("ringrun: the job finished while this node waited to join it");
                    return Ok(JobOutcome { last: Outcome::Success, restarts });
                }
            },
            None => None,
        };
        if let Some(j) = &joined {
            (opts.restart_count, opts.nnodes, opts.node_rank) = (j.gen, j.nnodes, j.node_rank);
        }
        // Restarts count per job, not per node: a node that joined late has the same budget left.
        let restarts_left = max_restarts.saturating_sub(opts.restart_count - base);
        let watch = nodes.zip(joined.as_ref()).map(|(n, j)| n.watch(j, restarts_left > 0));
        let remote = || watch.as_ref().and_then(|w| w.get());
        let outcome = run_group(&opts, signals, &remote).map_err(|e| e.to_string())?;
        let outcome = match (nodes.zip(joined.as_ref()), &watch) {
            (Some((n, j)), Some(w)) => across_nodes(outcome, n, j, w),
            _ => outcome,
        };
        if let Some(w) = &watch {
            w.stop_watching();
        }
        let cause = match &outcome {
            Outcome::Failed { rank, exit } => {
                let what = format!("rank {rank} {exit}");
                if let Some((n, j)) = nodes.zip(joined.as_ref()) {
                    n.report_failure(j, &what);
                }
                Some(what)
            }
            Outcome::RemoteFailed { reason } => Some(reason.clone()),
            Outcome::Reform { reason } => Some(format!("{reason}; stopped at a checkpoint to re-form the job")),
            Outcome::StoreLost { .. } => None,
            Outcome::Success => {
                if let Some((n, j)) = nodes.zip(joined.as_ref()) {
                    n.finish(j)?;
                }
                None
            }
            Outcome::Interrupted { .. } => {
                if let Some((n, j)) = nodes.zip(joined.as_ref()) {
                    n.report_failure(j, "interrupted by a signal");
                }
                None
            }
        };
        match cause {
            Some(cause) if restarts_left > 0 => {
                super::status::message(&format!(
                    "ringrun: {cause}; restarting the group ({} of {max_restarts}) from the latest checkpoint",
                    opts.restart_count - base + 1
                ));
                super::status::reset();
                restarts.push(cause);
                opts.restart_count += 1;
                if !opts.store_hosted {
                    opts.master_port = free_port(&opts.master_addr).map_err(|e| e.to_string())?;
                }
            }
            _ => return Ok(JobOutcome { last: outcome, restarts }),
        }
    }
}
