//! Multi-node jobs on emulated nodes: network namespaces joined by veth pairs to a bridge
//! (scripts/netns_nodes.sh). Needs root and `ip netns`; skipped with a message elsewhere.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Emulated nodes for one test (its own id, so tests can run in parallel); removed on drop.
struct Nodes {
    id: u32,
}

impl Nodes {
    fn up(id: u32, n: usize) -> Option<Nodes> {
        let ok = Command::new(script("netns_nodes.sh")).args(["up", &n.to_string()]).env("RT_NETNS_ID", id.to_string()).output();
        match ok {
            Ok(o) if o.status.success() => Some(Nodes { id }),
            Ok(o) => {
                let _ = Command::new(script("netns_nodes.sh")).arg("down").env("RT_NETNS_ID", id.to_string()).status();
                skip(&format!("cannot create network namespaces: {}", String::from_utf8_lossy(&o.stderr).trim()));
                None
            }
            Err(e) => {
                skip(&format!("cannot run netns_nodes.sh: {e}"));
                None
            }
        }
    }

    fn addr(&self, k: usize) -> String {
        format!("10.77.{}.{}", self.id, k + 1)
    }

    /// `cmd` run inside node k.
    fn exec(&self, k: usize, cmd: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("rt{}n{k}", self.id)]).args(cmd);
        c
    }

    /// Bytes through node k's link (both directions), read on the bridge side.
    fn link_bytes(&self, k: usize) -> u64 {
        ["rx_bytes", "tx_bytes"]
            .iter()
            .map(|f| {
                std::fs::read_to_string(format!("/sys/class/net/rt{}v{k}/statistics/{f}", self.id)).unwrap().trim().parse::<u64>().unwrap()
            })
            .sum()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = Command::new(script("netns_nodes.sh")).arg("down").env("RT_NETNS_ID", self.id.to_string()).status();
    }
}

fn skip(why: &str) {
    // A failure under RINGTRAIN_NO_SKIP=1 (CI), else a SKIPPED line.
    common::skip("multi-node", why);
}

fn ringrun_node(nodes: &Nodes, k: usize, port: u16, cfg: &Path, run_dir: &Path, extra: &[&str]) -> Command {
    let mut launcher = ["--nnodes", "2", "--node-rank", &k.to_string(), "--nproc-per-node", "2"].map(String::from).to_vec();
    launcher.extend(extra.iter().map(|s| s.to_string()));
    node_command(nodes, k, port, &launcher, cfg, run_dir)
}

/// ringrun on node k with `launcher` options, node 0's address as the master's.
fn node_command(nodes: &Nodes, k: usize, port: u16, launcher: &[String], cfg: &Path, run_dir: &Path) -> Command {
    let mut args: Vec<String> = vec![RINGRUN.into(), "--master-addr".into(), nodes.addr(0), "--master-port".into(), port.to_string()];
    args.extend(launcher.iter().cloned());
    args.extend([RINGTRAIN.into(), "--config".into(), cfg.display().to_string(), "--run-dir".into(), run_dir.display().to_string()]);
    let mut c = nodes.exec(k, &args);
    c.env_remove("RINGTRAIN_FAULT");
    c
}

fn job(dir: &Path, backend: &str) -> PathBuf {
    write_config(dir, "job.yaml", &mlp_config(10, "").replace("timeout_secs: 20", &format!("timeout_secs: 8, backend: {backend}")))
}

#[test]
fn two_nodes_by_two_workers_match_four_workers_on_one_node() {
    let Some(nodes) = Nodes::up(31, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let one_node = dir.path().join("one-node");
    run(ringrun(4, &cfg, &one_node, &[]), Duration::from_secs(120)).assert_success();

    let before = nodes.link_bytes(1);
    for out in run_together((0..2).map(|k| ringrun_node(&nodes, k, 29631, &cfg, &dir.path().join(format!("node{k}")), &[]))) {
        out.assert_success();
    }
    let crossed = nodes.link_bytes(1) - before;
    let expected = rank_hashes(&one_node, 4);
    let got: Vec<String> = (0..4).map(|r| rank_hash(&dir.path().join(format!("node{}", r / 2)), r)).collect();
    // Same ring order, same sums: bitwise equal; only the transport differs.
    assert_eq!(got, expected);
    // 30 steps; the MLP has 995 parameters; each all-reduce moves 2·(3/4)·3,980 bytes over each
    // of the two links that cross nodes, both through node 1's veth.
    let gradient_bytes = 30 * 2 * (2 * 3 * 3980 / 4);
    assert!(crossed >= gradient_bytes as u64, "only {crossed} bytes crossed the link (expected ≥ {gradient_bytes})");
}

#[test]
fn mpirun_across_two_nodes_with_the_mpi_backend() {
    if !Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success()) || !ringtrain::comm::mpi::BUILT {
        skip("mpirun or the mpi feature missing");
        return;
    }
    let Some(nodes) = Nodes::up(32, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let one_node = dir.path().join("one-node");
    run(ringrun(4, &job(dir.path(), "ring"), &one_node, &[]), Duration::from_secs(120)).assert_success();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, format!("rt{0}n0 slots=2\nrt{0}n1 slots=2\n", nodes.id)).unwrap();
    let run_dir = dir.path().join("mpi");
    let cmd: Vec<String> = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "4",
        "--hostfile",
        &hosts.display().to_string(),
        "--mca",
        "plm_rsh_agent",
        &script("netns_rsh.sh").display().to_string(),
        // Emulated nodes share one kernel: Open MPI's shared-memory paths (hwloc topology in
        // shared memory, the vader transport) crash there, so TCP carries everything.
        "--mca",
        "rtc",
        "^hwloc",
        "--mca",
        "btl",
        "self,tcp",
        "--mca",
        "btl_tcp_if_include",
        "eth0",
        "--mca",
        "oob_tcp_if_include",
        "eth0",
        "-x",
        "OMP_NUM_THREADS=1",
        RINGTRAIN,
        "--config",
        &job(dir.path(), "mpi").display().to_string(),
        "--run-dir",
        &run_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let before = nodes.link_bytes(1);
    let out = run(nodes.exec(0, &cmd), Duration::from_secs(120));
    out.assert_success();
    assert!(nodes.link_bytes(1) - before > 30 * 3980, "no MPI traffic crossed the link");
    let hashes = rank_hashes(&run_dir, 4);
    assert!(hashes.iter().all(|h| h == &hashes[0]), "{hashes:?}");
    // Four addends: Open MPI sums in another order than the ring; a tight tolerance instead.
    let rel = max_relative_difference(&load_params(&run_dir), &load_params(&one_node));
    assert!(rel < 1e-5, "relative difference {rel:e}");
}

#[test]
fn killing_one_nodes_launcher_stops_the_other_naming_the_lost_ranks() {
    let Some(nodes) = Nodes::up(33, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "job.yaml",
        &mlp_config(2, "").replace("epochs: 1", "epochs: 100").replace("timeout_secs: 20", "timeout_secs: 8"),
    );
    let node0_dir = dir.path().join("node0");
    let node0 = ringrun_node(&nodes, 0, 29633, &cfg, &node0_dir, &[]);
    let survivor = std::thread::spawn(move || run(node0, Duration::from_secs(120)));
    let mut node1 =
        ringrun_node(&nodes, 1, 29633, &cfg, &dir.path().join("node1"), &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let metrics = node0_dir.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    node1.kill().unwrap(); // SIGKILL to node 1's ringrun; its workers die with it
    let killed = Instant::now();
    node1.wait().unwrap();
    let out = survivor.join().unwrap();
    out.assert_failure();
    assert!(killed.elapsed() < Duration::from_secs(8 + 5), "node 0 took {:?} to stop\n{}", killed.elapsed(), out.report());
    let named = out
        .stderr
        .lines()
        .any(|l| l.contains("ringtrain: error") && (l.contains("rank 2") || l.contains("rank 3") || l.contains("[2") || l.contains("3]")));
    assert!(named, "no worker named a lost rank (2 or 3)\n{}", out.report());
}

#[test]
fn a_node_that_never_joins_is_named() {
    let Some(nodes) = Nodes::up(34, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let out = run(ringrun_node(&nodes, 0, 29634, &cfg, &dir.path().join("run"), &["--join-timeout-secs", "3"]), Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("node(s) [1] did not join within 3s"), "{}", out.report());
    assert!(out.elapsed < Duration::from_secs(10), "{:?}", out.elapsed);
}

#[test]
fn a_failure_on_one_node_restarts_the_whole_job_together() {
    let Some(nodes) = Nodes::up(35, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "job.yaml",
        &mlp_config(10, "checkpoint: {every_steps: 4}").replace("timeout_secs: 20", "timeout_secs: 8, backend: ring"),
    );
    let one_node = dir.path().join("one-node");
    run(ringrun(4, &cfg, &one_node, &[]), Duration::from_secs(120)).assert_success();
    let outs = run_together((0..2).map(|k| {
        let mut c = ringrun_node(&nodes, k, 29635, &cfg, &dir.path().join(format!("node{k}")), &["--max-restarts", "1"]);
        // Rank 3 (on node 1) is killed before step 10; both nodes must restart from step 8.
        c.env("RINGTRAIN_FAULT", "rank=3,step=10,action=kill");
        c
    }));
    for (k, out) in outs.iter().enumerate() {
        out.assert_success();
        assert!(out.stderr.contains("finished after 1 restart(s)"), "node {k}\n{}", out.report());
    }
    // Node 1 saw its worker killed; node 0 saw it as a lost peer or as node 1's report, whichever
    // came first.
    assert!(outs[1].stderr.contains("rank 3 was killed by signal 9"), "{}", outs[1].report());
    let expected = rank_hash(&one_node, 0);
    assert_eq!(rank_hash(&dir.path().join("node1"), 3), expected);
    assert_eq!(rank_hash(&dir.path().join("node0"), 0), expected);
}

#[test]
fn hierarchical_all_reduce_across_two_nodes_matches_the_flat_ring_with_less_traffic_and_zero1_keeps_its_bits() {
    let Some(nodes) = Nodes::up(36, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let train = |name: &str, port: u16, extra: &[&str]| -> (u64, Vec<Output>) {
        let before = nodes.link_bytes(1);
        let outs = run_together((0..2).map(|k| {
            let mut c = ringrun_node(&nodes, k, port, &cfg, &dir.path().join(format!("{name}{k}")), &[]);
            c.args(extra);
            c
        }));
        for o in &outs {
            o.assert_success();
        }
        (nodes.link_bytes(1) - before, outs)
    };
    let (flat_bytes, _) = train("flat", 29636, &[]);
    let (hier_bytes, outs) = train("hier", 29637, &["--set", "comm.hierarchical=true"]);
    assert!(outs[0].stderr.contains("hierarchical all-reduce: 2 nodes × 2 ranks"), "{}", outs[0].report());
    let hier: Vec<String> = (0..4).map(|r| rank_hash(&dir.path().join(format!("hier{}", r / 2)), r)).collect();
    assert!(hier.iter().all(|h| h == &hier[0]), "replicas differ: {hier:?}");
    // Other sums' order: equal to float rounding, not bitwise.
    let rel = max_relative_difference(&load_params(&dir.path().join("hier0")), &load_params(&dir.path().join("flat0")));
    assert!(rel <= 1e-6, "relative difference to the flat ring {rel:e}");
    // The flat ring sends 2·(3/4) of each gradient over both links that cross nodes; the two
    // cross-node rings (2 ranks each, half the gradient each) send 2 · 2·(1/2)·(1/2) of it: 2/3.
    assert!((hier_bytes as f64) < 0.8 * flat_bytes as f64, "hierarchical sent {hier_bytes} bytes across nodes, the flat ring {flat_bytes}");
    // ZeRO-1 there: each rank's parameters in its node's shared buffers, gathered in place across
    // nodes (not one node-wide copy, which only a single-node ring has): the same bits.
    let (_, outs) = train("hierz", 29638, &["--set", "comm.hierarchical=true", "--set", "optimizer.shard=true"]);
    assert!(outs[0].stderr.contains("optimizer sharded (ZeRO-1)"), "{}", outs[0].report());
    assert!(!outs[0].stderr.contains("node-shared memory"), "{}", outs[0].report());
    let hierz: Vec<String> = (0..4).map(|r| rank_hash(&dir.path().join(format!("hierz{}", r / 2)), r)).collect();
    assert_eq!(hierz, hier, "ZeRO-1 over the hierarchical communicator against its DDP");
}

#[test]
fn torchrun_with_c10d_rendezvous_across_two_nodes_matches_ringrun() {
    let Some(py) = python_with_torch("multi-node torchrun") else { return };
    let Some(nodes) = Nodes::up(37, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let one_node = dir.path().join("one-node");
    run(ringrun(4, &cfg, &one_node, &[]), Duration::from_secs(120)).assert_success();
    let endpoint = format!("{}:29637", nodes.addr(0));
    let handles: Vec<_> = (0..2)
        .map(|k| {
            let mut args: Vec<String> = [py.as_str(), "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            // Namespaces share the host's name, so torchrun cannot tell which node hosts the
            // rendezvous, nor what address the others reach it at: both are said.
            args.extend(["--rdzv-backend", "c10d", "--rdzv-id", "mn37", "--rdzv-endpoint", &endpoint].map(String::from));
            args.extend(["--rdzv-conf".into(), format!("is_host={}", k == 0), "--local-addr".into(), nodes.addr(k)]);
            let run_dir = dir.path().join(format!("node{k}"));
            args.extend(["--no-python".into(), RINGTRAIN.into(), "--config".into(), cfg.display().to_string()]);
            args.extend(["--run-dir".into(), run_dir.display().to_string()]);
            let mut c = nodes.exec(k, &args);
            c.env_remove("RINGTRAIN_FAULT").env_remove("RINGTRAIN_JOB_TOKEN");
            std::thread::spawn(move || run(c, Duration::from_secs(180)))
        })
        .collect();
    for h in handles {
        h.join().unwrap().assert_success();
    }
    // torchrun assigns node ranks by arrival; whichever node got ranks 0–1 wrote their reports.
    let got: Vec<String> = (0..4)
        .map(|r| {
            let on = |k: usize| dir.path().join(format!("node{k}")).join("ranks").join(format!("rank{r}.json"));
            let k = if on(0).exists() { 0 } else { 1 };
            rank_hash(&dir.path().join(format!("node{k}")), r)
        })
        .collect();
    assert_eq!(got, rank_hashes(&one_node, 4));
}

/// Kubernetes pods on emulated nodes: node k resolves the PyTorchJob's service names
/// (`<job>-master-0`, `<job>-worker-<i>`) as cluster DNS would (`ip netns exec` mounts
/// /etc/netns/<namespace>/hosts over /etc/hosts); removed on drop.
struct PodNames(Vec<PathBuf>);

impl PodNames {
    fn new(nodes: &Nodes, n: usize, job: &str) -> PodNames {
        Self::named(nodes, n, |k| if k == 0 { format!("{job}-master-0") } else { format!("{job}-worker-{}", k - 1) })
    }

    /// An elastic job's pods: workers only, `<job>-worker-<k>` on node k.
    fn workers(nodes: &Nodes, n: usize, job: &str) -> PodNames {
        Self::named(nodes, n, |k| format!("{job}-worker-{k}"))
    }

    fn named(nodes: &Nodes, n: usize, name: impl Fn(usize) -> String) -> PodNames {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for k in 0..n {
            let name = name(k);
            hosts.push_str(&format!("{} {name}\n", nodes.addr(k)));
        }
        let dirs: Vec<PathBuf> = (0..n).map(|k| PathBuf::from(format!("/etc/netns/rt{}n{k}", nodes.id))).collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("hosts"), &hosts).unwrap();
        }
        PodNames(dirs)
    }
}

impl Drop for PodNames {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs `cmds` at once (one per node) to their ends, each within 2 minutes.
fn run_together(cmds: impl Iterator<Item = Command>) -> Vec<Output> {
    let handles: Vec<_> = cmds.map(|c| std::thread::spawn(move || run(c, Duration::from_secs(120)))).collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The PyTorchJob manifests' command for a pod's run directory: `ringrun ringtrain …` (with
/// `launcher`) or the worker alone.
fn manifest_command(launcher: bool, cfg: &Path, run_dir: &Path) -> Vec<String> {
    let (cfg, run_dir) = (cfg.display().to_string(), run_dir.display().to_string());
    let worker = [RINGTRAIN, "--config", &cfg, "--run-dir", &run_dir, "--resume", "auto"].map(String::from);
    launcher.then(|| RINGRUN.to_string()).into_iter().chain(worker).collect()
}

/// `cmd` in a pod on node k with none of the test's own launch variables: the operator's are
/// all it gets.
fn bare_pod(nodes: &Nodes, k: usize, cmd: &[String]) -> Command {
    let mut c = nodes.exec(k, cmd);
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RINGTRAIN_FAULT"] {
        c.env_remove(v);
    }
    c.env_remove("RINGTRAIN_JOB_TOKEN").env_remove("RINGTRAIN_LOCAL_ADDR").env_remove("OMP_NUM_THREADS");
    c
}

/// What Kubeflow's training operator (v1 PyTorchJob, `pkg/controller.v1/pytorch/envvar.go` and
/// `master.go`) sets in replica k's container: MASTER_ADDR/MASTER_PORT (the master's service and
/// its `pytorchjob-port`), WORLD_SIZE = replicas × nprocPerNode, RANK = the replica's index (the
/// master 0, worker i i + 1), PET_NPROC_PER_NODE, PET_NODE_RANK = RANK, PET_NNODES = replicas
/// (no elastic policy), PYTHONUNBUFFERED=0. Nothing else: the test's own variables of that kind
/// are removed.
fn operator_pod(nodes: &Nodes, k: usize, replicas: usize, nproc: &str, job: &str, cmd: &[String]) -> Command {
    let mut c = bare_pod(nodes, k, cmd);
    let per_node: usize = nproc.parse().unwrap_or(1);
    c.envs([
        ("PYTHONUNBUFFERED", "0".to_string()),
        ("MASTER_PORT", "23456".to_string()),
        ("MASTER_ADDR", format!("{job}-master-0")),
        ("WORLD_SIZE", (replicas * per_node).to_string()),
        ("RANK", k.to_string()),
        ("PET_NPROC_PER_NODE", nproc.to_string()),
        ("PET_NODE_RANK", k.to_string()),
        ("PET_NNODES", replicas.to_string()),
    ]);
    c
}

/// What the operator sets in a pod of a PyTorchJob with an `elasticPolicy`
/// (`pkg/controller.v1/pytorch/elastic.go`): PET_RDZV_ENDPOINT = worker 0's service and port,
/// PET_RDZV_BACKEND = c10d, PET_NNODES = "min:max", PET_MAX_RESTARTS, PET_NPROC_PER_NODE; no
/// MASTER_*, RANK, WORLD_SIZE or PET_NODE_RANK (there is no master replica).
fn elastic_operator_pod(nodes: &Nodes, k: usize, nnodes: &str, job: &str, cmd: &[String]) -> Command {
    let mut c = bare_pod(nodes, k, cmd);
    c.envs([
        ("PYTHONUNBUFFERED", "0".to_string()),
        ("PET_RDZV_ENDPOINT", format!("{job}-worker-0:23456")),
        ("PET_RDZV_BACKEND", "c10d".to_string()),
        ("PET_NNODES", nnodes.to_string()),
        ("PET_MAX_RESTARTS", "3".to_string()),
        ("PET_NPROC_PER_NODE", "2".to_string()),
    ]);
    c
}

#[test]
fn pytorchjob_pods_with_an_elastic_policy_train_as_ringrun_on_one_node() {
    let Some(nodes) = Nodes::up(43, 2) else { return };
    let _names = PodNames::workers(&nodes, 2, "pje");
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let one_node = dir.path().join("one-node");
    run(ringrun(4, &cfg, &one_node, &[]), Duration::from_secs(120)).assert_success();
    // "2:2" (minReplicas = maxReplicas) is a c10d rendezvous too: nodes numbered as they arrive.
    for nnodes in ["1:2", "2:2"] {
        // deploy/pytorchjob-elastic.yaml's command.
        let outs = run_together((0..2).map(|k| {
            let cmd = manifest_command(true, &cfg, &dir.path().join(format!("{nnodes}-pod{k}")));
            elastic_operator_pod(&nodes, k, nnodes, "pje", &cmd)
        }));
        for o in &outs {
            o.assert_success();
        }
        assert!(outs[0].stderr.contains("this node serves the job's store (node 0)"), "{}", outs[0].report());
        // Worker 0's pod (the endpoint's) is node 0 whatever order the pods came in.
        let got: Vec<String> = (0..4).map(|r| rank_hash(&dir.path().join(format!("{nnodes}-pod{}", r / 2)), r)).collect();
        assert_eq!(got, rank_hashes(&one_node, 4), "{nnodes}");
    }
}

#[test]
fn pytorchjob_pods_running_ringrun_train_as_ringrun_on_one_node() {
    let Some(nodes) = Nodes::up(38, 2) else { return };
    let _names = PodNames::new(&nodes, 2, "pj");
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let one_node = dir.path().join("one-node");
    run(ringrun(4, &cfg, &one_node, &[]), Duration::from_secs(120)).assert_success();
    // deploy/pytorchjob-ringrun.yaml's command: no flags, all from the operator's variables.
    for out in run_together(
        (0..2).map(|k| operator_pod(&nodes, k, 2, "2", "pj", &manifest_command(true, &cfg, &dir.path().join(format!("pod{k}"))))),
    ) {
        out.assert_success();
    }
    let got: Vec<String> = (0..4).map(|r| rank_hash(&dir.path().join(format!("pod{}", r / 2)), r)).collect();
    assert_eq!(got, rank_hashes(&one_node, 4));
}

#[test]
fn pytorchjob_pods_running_one_worker_each_train_as_ringrun_on_one_node() {
    let Some(nodes) = Nodes::up(39, 2) else { return };
    let _names = PodNames::new(&nodes, 2, "pj");
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "ring");
    let one_node = dir.path().join("one-node");
    // Alone in its pod, a worker computes with all the node's cores: the same thread count here.
    let cores = std::thread::available_parallelism().unwrap().get().to_string();
    let mut reference = ringrun(2, &cfg, &one_node, &[]);
    reference.env("OMP_NUM_THREADS", &cores);
    run(reference, Duration::from_secs(120)).assert_success();
    // deploy/pytorchjob-one-per-pod.yaml: the worker itself, nprocPerNode left at auto.
    for out in run_together(
        (0..2).map(|k| operator_pod(&nodes, k, 2, "auto", "pj", &manifest_command(false, &cfg, &dir.path().join(format!("pod{k}"))))),
    ) {
        out.assert_success();
    }
    let got: Vec<String> = (0..2).map(|r| rank_hash(&dir.path().join(format!("pod{r}")), r)).collect();
    assert_eq!(got, rank_hashes(&one_node, 2));
}

#[test]
fn killing_the_node_that_serves_the_store_says_so_on_the_others() {
    let Some(nodes) = Nodes::up(40, 2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "job.yaml",
        &mlp_config(2, "").replace("epochs: 1", "epochs: 100").replace("timeout_secs: 20", "timeout_secs: 8"),
    );
    let node1 = ringrun_node(&nodes, 1, 29640, &cfg, &dir.path().join("node1"), &[]);
    let survivor = std::thread::spawn(move || run(node1, Duration::from_secs(120)));
    let node0_dir = dir.path().join("node0");
    let mut node0 = ringrun_node(&nodes, 0, 29640, &cfg, &node0_dir, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let metrics = node0_dir.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    node0.kill().unwrap(); // SIGKILL to node 0's ringrun: the store and rank 0 go with it
    node0.wait().unwrap();
    let out = survivor.join().unwrap();
    out.assert_failure();
    assert!(out.stderr.contains("ringrun: error: node 0 is gone") && out.stderr.contains("serves the job's store"), "{}", out.report());
}

/// The global steps a run's node-0 log says each resume started from, in order.
fn resumed_steps(stderr: &str) -> Vec<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("resuming from"))
        .filter_map(|l| l.split("(global step ").nth(1)?.split(',').next()?.parse().ok())
        .collect()
}

/// (epoch, sample) of every sample trained on in the steps that count, from the "epoch sample
/// step" lines of every samples/rank*.txt under `dirs`. Each start of a worker writes "# start
/// after global step N (restart R)" first; a rank may log into another file after a restart, so
/// the starts are gathered from every file: what restart R logged past the step the next restart
/// resumed from was work lost to a failure, and is dropped.
fn samples_kept(dirs: &[PathBuf]) -> Vec<(u64, u64)> {
    /// One start of a worker: its restart, the step it resumed after, its (epoch, sample, step) lines.
    struct Start {
        restart: u64,
        after: u64,
        lines: Vec<[u64; 3]>,
    }
    let mut starts: Vec<Start> = Vec::new();
    for d in dirs {
        for e in std::fs::read_dir(d.join("samples")).unwrap() {
            for line in std::fs::read_to_string(e.unwrap().path()).unwrap().lines() {
                if let Some(rest) = line.strip_prefix("# start after global step ") {
                    let (step, restart) = rest.trim_end_matches(')').split_once(" (restart ").unwrap();
                    starts.push(Start { restart: restart.parse().unwrap(), after: step.parse().unwrap(), lines: Vec::new() });
                    continue;
                }
                let f: Vec<u64> = line.split(' ').map(|f| f.parse().unwrap()).collect();
                starts.last_mut().expect("a start line first").lines.push([f[0], f[1], f[2]]);
            }
        }
    }
    let resumed_after = |r: u64| starts.iter().find(|s| s.restart == r).map(|s| s.after);
    let mut out = Vec::new();
    for s in &starts {
        let next = (s.restart + 1..).take(16).find_map(resumed_after);
        out.extend(s.lines.iter().filter(|l| next.is_none_or(|n| l[2] <= n)).map(|l| (l[0], l[1])));
    }
    out
}

#[test]
fn an_elastic_job_admits_a_node_then_loses_it_and_ends_as_ringrun_at_each_world_size() {
    let Some(nodes) = Nodes::up(41, 3) else { return };
    let dir = tempfile::tempdir().unwrap();
    // 1,200 samples, batch 10: 60 steps per epoch at 2 ranks, 40 at 3; a checkpoint every 5 steps.
    let cfg = write_config(
        dir.path(),
        "job.yaml",
        &mlp_config(10, "checkpoint: {every_steps: 5, keep: 50}")
            .replace("epochs: 1", "epochs: 3")
            .replace("timeout_secs: 20", "timeout_secs: 8"),
    );
    let elastic = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-settle-secs", "1", "--max-restarts", "3"].map(String::from);
    let node = |k: usize| {
        let mut c = node_command(&nodes, k, 29641, &elastic, &cfg, &dir.path().join(format!("node{k}")));
        // Steps slow enough for nodes to come and go mid-epoch.
        c.env("RINGTRAIN_TEST_STEP_MS", "60").env("RINGTRAIN_SAMPLE_LOG", "1");
        c
    };
    let metrics = dir.path().join("node0").join("metrics.jsonl");
    let steps_at = |world: u64| -> u64 {
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        let lines = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        lines.filter(|l| l["kind"] == "step" && l["world_size"] == world).count() as u64
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first_two: Vec<_> = [node(0), node(1)].into_iter().map(|c| std::thread::spawn(move || run(c, Duration::from_secs(300)))).collect();
    wait_for("2 nodes did not start training", &|| steps_at(2) >= 2);
    // A third node arrives: node 0 has every node stop at a checkpoint and re-forms with it.
    let mut third = node(2).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for("the job did not re-form with 3 nodes", &|| steps_at(3) >= 2);
    third.kill().unwrap(); // SIGKILL: the node is gone, its worker with it
    third.wait().unwrap();
    let outs: Vec<Output> = first_two.into_iter().map(|h| h.join().unwrap()).collect();
    for o in &outs {
        o.assert_success();
    }
    let log = &outs[0].stderr;
    let third_addr = nodes.addr(2);
    assert!(log.contains(&format!("generation 1: 3 node(s), world size 3 (joined: {third_addr}")), "{}", outs[0].report());
    assert!(log.contains(&format!("generation 2: 2 node(s), world size 2 (left: {third_addr}")), "{}", outs[0].report());
    assert!(log.contains("waiting to join; stopped at a checkpoint to re-form the job"), "{}", outs[0].report());
    let resumed = resumed_steps(log);
    assert_eq!(resumed.len(), 2, "{}", outs[0].report());
    let (s1, s2) = (resumed[0], resumed[1]);

    // Each sample once per epoch, over the work that counts (restart 1's steps after s2 were lost).
    let all = samples_kept(&[0, 1, 2].map(|k| dir.path().join(format!("node{k}"))));
    for epoch in 0..3 {
        let mut ids: Vec<u64> = all.iter().filter(|(e, _)| *e == epoch).map(|(_, s)| *s).collect();
        ids.sort();
        assert_eq!(ids, (0..1200).collect::<Vec<_>>(), "epoch {epoch} must see each sample once (resumed at {s1}, {s2})");
    }

    // ringrun on one node through the same world sizes from the same steps: the same bits.
    let reference = dir.path().join("reference");
    run(ringrun(2, &cfg, &reference, &["--set", &format!("train.max_steps={s1}")]), Duration::from_secs(120)).assert_success();
    if s2 > s1 {
        run(ringrun(3, &cfg, &reference, &["--resume", "auto", "--set", &format!("train.max_steps={s2}")]), Duration::from_secs(120))
            .assert_success();
    }
    run(ringrun(2, &cfg, &reference, &["--resume", "auto"]), Duration::from_secs(120)).assert_success();
    let got = vec![rank_hash(&dir.path().join("node0"), 0), rank_hash(&dir.path().join("node1"), 1)];
    assert_eq!(got, rank_hashes(&reference, 2), "resumed at {s1} then {s2}");
}

#[test]
fn an_elastic_node_whose_launcher_stops_heartbeating_is_counted_lost_and_the_rest_go_on() {
    let Some(nodes) = Nodes::up(42, 3) else { return };
    let dir = tempfile::tempdir().unwrap();
    // 240 steps at 3 ranks, 40 ms each: training outlasts the node timeout after the freeze.
    let cfg = write_config(dir.path(), "job.yaml", &mlp_config(10, "checkpoint: {every_steps: 5}").replace("epochs: 1", "epochs: 6"));
    let elastic =
        ["--nnodes", "2:3", "--nproc-per-node", "1", "--max-restarts", "1", "--node-timeout-secs", "5", "--rdzv-settle-secs", "1"]
            .map(String::from);
    let node = |k: usize| {
        let mut c = node_command(&nodes, k, 29642, &elastic, &cfg, &dir.path().join(format!("node{k}")));
        c.env("RINGTRAIN_TEST_STEP_MS", "40");
        c
    };
    // All three in at once: MAX reached, no settle wait.
    let mut third = node(2).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let first_two: Vec<_> = [node(0), node(1)].into_iter().map(|c| std::thread::spawn(move || run(c, Duration::from_secs(300)))).collect();
    let metrics = dir.path().join("node0").join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(90);
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Node 2's launcher freezes (its worker trains on): only its heartbeat says it is gone.
    unsafe { libc::kill(third.id() as i32, libc::SIGSTOP) };
    let outs: Vec<Output> = first_two.into_iter().map(|h| h.join().unwrap()).collect();
    let _ = third.kill();
    let _ = third.wait();
    for o in &outs {
        o.assert_success();
    }
    let log = &outs[0].stderr;
    // Nodes are numbered as they arrive: the frozen one may be node 1 or 2.
    let lost = format!("({} (pid {})) sent no heartbeat for 5s", nodes.addr(2), third.id());
    assert!(log.contains(&lost) && log.contains("generation 1: 2 node(s), world size 2 (left: "), "{}", outs[0].report());
    assert!(outs[1].stderr.contains(&lost), "{}", outs[1].report());
    let last = metrics_lines(&dir.path().join("node0"), "step").pop().unwrap();
    assert_eq!(last["world_size"], 2, "{last}");
}
