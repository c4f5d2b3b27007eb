//! Running the cases on one backend: ranks as threads here, or as processes of this test binary
//! (the backend's test runs itself under the launcher, with `RINGTRAIN_CONFORMANCE_JOB` saying
//! which job each copy is a rank of).

use super::cases::{LARGE, ORDINARY};
use super::failures::{Failure, FAILURES};
use super::{on_threads, Absent, Backend, Ctx, Failures, Joiner, Launch, Seen, FAILURE_TIMEOUT, SLACK, TIMEOUT};
use crate::common;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const JOB: &str = "RINGTRAIN_CONFORMANCE_JOB";
/// How long a whole group may take before the test calls it hung.
const GROUP_LIMIT: Duration = Duration::from_secs(240);

/// The suite on `backend`, whose test is named `test` (for running itself in other processes).
pub fn run(backend: &'static Backend, test: &str) {
    if let Ok(job) = std::env::var(JOB) {
        return as_job(backend, &job);
    }
    let label = format!("conformance {}", backend.name);
    match (backend.available)() {
        Ok(()) => {}
        Err(Absent::Tool(why)) => return common::skip(&label, &why),
        Err(Absent::Hardware(why)) => return absent_hardware(&label, &why),
    }
    let worlds = worlds(backend);
    if worlds.is_empty() {
        return absent_hardware(&label, &format!("no room for world sizes {:?} here", backend.worlds));
    }
    let started = Instant::now();
    let problems = match &backend.launch {
        Launch::Threads(group) => on_thread_ranks(backend, *group, &worlds),
        Launch::ThreadsInOwnProcess { .. } => in_own_process(test),
        Launch::Processes { launcher, .. } => on_process_ranks(backend, *launcher, &worlds, test),
    };
    super::note(&format!(
        "{label}: {} ordinary cases at world sizes {worlds:?}, {} at world {}, {} failure cases: {} in {:.1}s",
        ORDINARY.len(),
        LARGE.name,
        large_world(&worlds).map_or("-".to_string(), |w| w.to_string()),
        failure_cases(backend).count(),
        if problems.is_empty() { "ok".to_string() } else { format!("{} problem(s)", problems.len()) },
        started.elapsed().as_secs_f64()
    ));
    assert!(problems.is_empty(), "{label}:\n{}", problems.join("\n"));
}

/// A GPU this machine lacks: said, and a failure only where RINGTRAIN_REQUIRE_GPU=1 asks for one.
fn absent_hardware(label: &str, why: &str) {
    if std::env::var("RINGTRAIN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{label} cannot run: {why} (RINGTRAIN_REQUIRE_GPU=1 makes that a failure)");
    }
    super::note(&format!("SKIPPED {label}: {why}"));
}

fn worlds(backend: &Backend) -> Vec<usize> {
    let most = (backend.max_world)();
    backend.worlds.iter().copied().filter(|&w| w <= most).collect()
}

fn large_world(worlds: &[usize]) -> Option<usize> {
    worlds.iter().copied().find(|&w| w >= 2)
}

/// A backend whose failures end the process runs the first case of each kind only: the rest
/// would end the same way.
fn failure_cases(backend: &Backend) -> impl Iterator<Item = &'static Failure> + '_ {
    FAILURES
        .iter()
        .enumerate()
        .filter(move |(i, f)| {
            backend.caps.failures == Failures::Returned || !FAILURES[..*i].iter().any(|g| g.is_mismatch() == f.is_mismatch())
        })
        .map(|(_, f)| f)
}

/// Every ordinary case in order on one group (the 100 MB one too if `large`); each case's
/// outcome. A rank whose case fails leaves the group, so the others fail at once too.
fn ordinary(ctx: &mut Ctx, large: bool) -> Vec<(&'static str, Result<(), String>)> {
    let mut done = Vec::new();
    for case in ORDINARY.iter().chain(large.then_some(&LARGE)) {
        let r = (case.run)(ctx);
        let failed = r.is_err();
        done.push((case.name, r));
        if failed {
            ctx.leave();
            break;
        }
    }
    done
}

/// The first failed case of each rank, named.
fn ordinary_problems(world: usize, results: Vec<Result<Vec<(&'static str, Result<(), String>)>, String>>) -> Vec<String> {
    let mut problems = Vec::new();
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Err(e) => problems.push(format!("world {world}, rank {rank}: {e}")),
            Ok(cases) => {
                if let Some((name, Err(e))) = cases.iter().find(|(_, r)| r.is_err()) {
                    problems.push(format!("world {world}, {name}, rank {rank}: {e}"));
                }
            }
        }
    }
    problems
}

fn on_thread_ranks(backend: &'static Backend, group: fn(usize, Duration) -> Result<Joiner, String>, worlds: &[usize]) -> Vec<String> {
    let mut problems = Vec::new();
    for &world in worlds {
        let large = large_world(worlds) == Some(world);
        let results = on_threads(group, &backend.caps, world, TIMEOUT, GROUP_LIMIT, Arc::new(move |ctx| ordinary(ctx, large)));
        problems.extend(ordinary_problems(world, results));
    }
    for &world in worlds.iter().filter(|&&w| w >= 2) {
        for f in failure_cases(backend) {
            let limit = FAILURE_TIMEOUT * 4 + Duration::from_secs(30);
            let results = on_threads(group, &backend.caps, world, FAILURE_TIMEOUT, limit, Arc::new(move |ctx| f.run(ctx)));
            let seen: Result<Vec<Seen>, String> =
                results.into_iter().enumerate().map(|(rank, r)| r.and_then(|s| s).map_err(|e| format!("rank {rank}: {e}"))).collect();
            if let Err(e) = seen.and_then(|s| f.judge(&s, &backend.caps, FAILURE_TIMEOUT).map_err(|e| format!("{e}\n  saw: {s:#?}"))) {
                problems.push(format!("world {world}, {}: {e}", f.name()));
            }
        }
    }
    problems
}

/// This test again, alone in a fresh process (which runs the backend's `prepare` first).
fn in_own_process(test: &str) -> Vec<String> {
    let mut c = Command::new(std::env::current_exe().expect("the test binary's path"));
    c.args(["--exact", test, "--nocapture", "--test-threads=1"]).env(JOB, "all");
    let out = common::run(c, GROUP_LIMIT * 2);
    if out.status.success() {
        super::note(&out.stderr);
        vec![]
    } else {
        vec![format!("the suite in its own process failed:\n{}", out.report())]
    }
}

fn on_process_ranks(backend: &'static Backend, launcher: fn(usize) -> Command, worlds: &[usize], test: &str) -> Vec<String> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let job = |np: usize, name: &str| {
        let mut c = launcher(np);
        c.arg(&exe).args(["--exact", test, "--nocapture", "--test-threads=1"]).env(JOB, name);
        c
    };
    let mut problems = Vec::new();
    for &world in worlds {
        let large = large_world(worlds) == Some(world);
        let out = common::run(job(world, if large { "ordinary+large" } else { "ordinary" }), GROUP_LIMIT);
        let cases = ORDINARY.iter().chain(large.then_some(&LARGE));
        let missing: Vec<String> = cases
            .flat_map(|c| (0..world).map(move |r| (c.name, r)))
            .filter(|(name, r)| !out.stdout.lines().any(|l| l.ends_with(&format!("CASE ok {name} rank={r}"))))
            .map(|(name, r)| format!("{name} on rank {r}"))
            .collect();
        if !out.status.success() || !missing.is_empty() {
            problems.push(format!("world {world}: not passed: {missing:?}\n{}", out.report()));
        }
    }
    let Some(world) = large_world(worlds) else { return problems };
    for f in failure_cases(backend) {
        let out = common::run(job(world, &format!("failure:{}", f.name())), GROUP_LIMIT);
        let text = format!("{}\n{}", out.stdout, out.stderr);
        let verdict = match backend.caps.failures {
            Failures::EndProcess => {
                let limit = FAILURE_TIMEOUT + SLACK + Duration::from_secs(10);
                if out.status.success() {
                    Err("the job succeeded".to_string())
                } else if out.elapsed > limit {
                    Err(format!("the job ended after {:?}, more than {limit:?}", out.elapsed))
                } else if !f.ops().iter().any(|op| text.contains(op)) {
                    Err(format!("no line names {:?}", f.ops()))
                } else {
                    Ok(())
                }
            }
            Failures::Returned => {
                let seen: Vec<Seen> = out.stdout.lines().filter_map(Seen::decode).collect();
                if seen.len() == world {
                    f.judge(&seen, &backend.caps, FAILURE_TIMEOUT)
                } else {
                    Err(format!("{} of {world} ranks reported", seen.len()))
                }
            }
        };
        if let Err(e) = verdict {
            problems.push(format!("world {world}, {}: {e}\n{}", f.name(), out.report()));
        }
    }
    problems
}

/// This process is one rank of a job (`JOB`), or the whole suite in a process of its own.
fn as_job(backend: &'static Backend, job: &str) {
    match &backend.launch {
        Launch::ThreadsInOwnProcess { group, prepare } => {
            prepare().unwrap_or_else(|e| panic!("preparing {}: {e}", backend.name));
            let problems = on_thread_ranks(backend, *group, &worlds(backend));
            assert!(problems.is_empty(), "{}:\n{}", backend.name, problems.join("\n"));
        }
        Launch::Processes { join, .. } => {
            if let Some(name) = job.strip_prefix("failure:") {
                let f = FAILURES.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("no failure case {name}"));
                let comm = join(FAILURE_TIMEOUT).unwrap_or_else(|e| panic!("joining: {e}"));
                let mut ctx = Ctx::new(comm, &backend.caps);
                let seen = f.run(&mut ctx).unwrap_or_else(|e| panic!("rank {}: {e}", ctx.rank));
                println!("{}", seen.encode());
                // Without leaving cleanly (MPI_Finalize would wait for the ranks in trouble): the
                // launcher ends the job.
                std::process::exit(if seen.error.is_some() { 3 } else { 0 });
            }
            let comm = join(TIMEOUT).unwrap_or_else(|e| panic!("joining: {e}"));
            let mut ctx = Ctx::new(comm, &backend.caps);
            let rank = ctx.rank;
            for (name, r) in ordinary(&mut ctx, job == "ordinary+large") {
                match r {
                    Ok(()) => println!("CASE ok {name} rank={rank}"),
                    Err(e) => {
                        println!("CASE FAIL {name} rank={rank}: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
        Launch::Threads(_) => panic!("{JOB} is set, but {} runs its ranks as threads", backend.name),
    }
}

impl Seen {
    /// The line `encode` wrote.
    pub fn decode(line: &str) -> Option<Seen> {
        let rest = line.strip_prefix("SEEN ")?;
        let (head, error) = rest.split_once(" error=")?;
        let field = |k: &str| head.split(' ').find_map(|p| p.strip_prefix(k)?.strip_prefix('='));
        let op = ["all_reduce", "broadcast", "all_gather", "barrier", ""].into_iter().find(|o| field("op") == Some(o))?;
        Some(Seen {
            rank: field("rank")?.parse().ok()?,
            op,
            error: (!error.is_empty()).then(|| (error.to_string(), field("mismatch") == Some("true"))),
            elapsed: Duration::from_millis(field("ms")?.parse().ok()?),
            left: field("left") == Some("true"),
        })
    }
}
