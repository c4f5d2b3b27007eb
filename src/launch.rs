//! Who am I: rank, world size and the master's address, read from the launch environment.
//!
//! Precedence (first match wins): torchrun-style variables (RANK, WORLD_SIZE, …, which ringrun
//! sets) → Open MPI (OMPI_COMM_WORLD_*) → MPICH/Hydra and PMI (PMI_RANK, PMI_SIZE,
//! MPI_LOCALRANKID) → Slurm (SLURM_PROCID, SLURM_NTASKS, …) → a single standalone process.
//! Pure: an environment map in, a `LaunchInfo` out.

use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchSource {
    Torchrun,
    OpenMpi,
    Pmi,
    Slurm,
    Standalone,
}

impl LaunchSource {
    pub fn describe(self) -> &'static str {
        match self {
            LaunchSource::Torchrun => "torchrun-style environment (RANK/WORLD_SIZE)",
            LaunchSource::OpenMpi => "Open MPI environment (OMPI_COMM_WORLD_*)",
            LaunchSource::Pmi => "PMI environment (PMI_RANK/PMI_SIZE)",
            LaunchSource::Slurm => "Slurm environment (SLURM_PROCID/SLURM_NTASKS)",
            LaunchSource::Standalone => "no launcher environment: a single process",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LaunchInfo {
    pub source: LaunchSource,
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// Shared secret every connection to the store and the ring must present.
    pub job_token: String,
    /// How many times the launcher restarted the group (TORCHELASTIC_RESTART_COUNT), or Slurm
    /// requeued the job (SLURM_RESTART_COUNT).
    pub restart_count: u32,
    /// The store is already served: by the multi-node launcher, or by rank 0 itself after it
    /// shared its address over MPI.
    pub store_served: bool,
    /// torchrun's agent serves a c10d TCPStore on MASTER_ADDR:MASTER_PORT for its workers
    /// (TORCHELASTIC_USE_AGENT_STORE=True): rank 0 must not serve one there; every rank is its
    /// client.
    pub agent_store: bool,
    /// Started by srun as a job step (SLURM_STEP_ID): Slurm's variables find rank 0, so the ring
    /// needs no MPI even where srun's PMI plugin also set PMI_RANK.
    pub under_srun: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("launch environment: {0}")]
pub struct LaunchError(pub String);

fn get_num(env: &HashMap<String, String>, key: &str) -> Result<Option<usize>, LaunchError> {
    match env.get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| LaunchError(format!("{key}={v:?} is not a non-negative integer"))),
    }
}

/// The store port of Slurm job `job`, step `step` under srun: in 20000..40000, different for
/// the steps of one job (up to 20,000 of them), so two steps of one allocation never collide.
pub fn slurm_port(job: u64, step: u64) -> u16 {
    (20000 + job.wrapping_mul(7919).wrapping_add(step) % 20000) as u16
}

impl LaunchInfo {
    pub fn from_env(env: &HashMap<String, String>) -> Result<LaunchInfo, LaunchError> {
        let n = |k: &str| get_num(env, k);
        let (source, rank, world, local_rank, local_world) = if let (Some(r), Some(w)) = (n("RANK")?, n("WORLD_SIZE")?) {
            match (n("LOCAL_RANK")?, n("LOCAL_WORLD_SIZE")?) {
                // Kubernetes' operator, one process per pod: RANK and WORLD_SIZE, no local ones,
                // and its PET_NODE_RANK: each process is alone on its node.
                (None, None) if env.contains_key("PET_NODE_RANK") => (LaunchSource::Torchrun, r, w, 0, 1),
                (lr, lw) => (LaunchSource::Torchrun, r, w, lr.unwrap_or(r), lw.unwrap_or(w)),
            }
        } else if let (Some(r), Some(w)) = (n("OMPI_COMM_WORLD_RANK")?, n("OMPI_COMM_WORLD_SIZE")?) {
            (LaunchSource::OpenMpi, r, w, n("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(r), n("OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(w))
        } else if let (Some(r), Some(w)) = (n("PMI_RANK")?, n("PMI_SIZE")?) {
            (LaunchSource::Pmi, r, w, n("MPI_LOCALRANKID")?.unwrap_or(r), n("MPI_LOCALNRANKS")?.unwrap_or(w))
        } else if let (Some(r), Some(w)) = (n("SLURM_PROCID")?, n("SLURM_NTASKS")?) {
            let local_world = match n("SLURM_NTASKS_PER_NODE")? {
                Some(k) => k,
                // SLURM_TASKS_PER_NODE looks like "2(x3),1"; the first group is this layout's
                // common case. Without it, assume one node.
                None => env.get("SLURM_TASKS_PER_NODE").and_then(|s| s.split(['(', ',']).next()).and_then(|s| s.parse().ok()).unwrap_or(w),
            };
            (LaunchSource::Slurm, r, w, n("SLURM_LOCALID")?.unwrap_or(r), local_world)
        } else {
            (LaunchSource::Standalone, 0, 1, 0, 1)
        };
        if world == 0 {
            return Err(LaunchError("world size is 0".into()));
        }
        let step_id = env.get("SLURM_STEP_ID").or_else(|| env.get("SLURM_STEPID"));
        let under_srun = env.contains_key("SLURM_PROCID") && step_id.is_some();
        // In an sbatch script without srun, the batch step is one process that Slurm's variables
        // describe as rank 0 of N: it would wait for ranks that never start.
        if source == LaunchSource::Slurm && world > 1 && step_id.is_none() {
            return Err(LaunchError(format!(
                "SLURM_NTASKS={world} but this is the batch step of an sbatch script (no SLURM_STEP_ID): \
                 start the workers with srun (e.g. `srun ringtrain --config …`), one task per slot"
            )));
        }
        // Inside an interactive allocation (salloc -n N) without srun, nothing describes this
        // process as a task: alone, it would train as world 1 of the N the user asked for.
        if source == LaunchSource::Standalone && step_id.is_none() {
            if let (Some(job), Some(tasks)) = (env.get("SLURM_JOB_ID"), n("SLURM_NTASKS")?.filter(|&t| t > 1)) {
                return Err(LaunchError(format!(
                    "SLURM_NTASKS={tasks} in Slurm allocation {job}, but this process is not one of its tasks (no SLURM_PROCID or \
                     SLURM_STEP_ID: started in the salloc shell?): start the workers with srun (e.g. `srun ringtrain --config …`), \
                     or with ringrun"
                )));
            }
        }
        if rank >= world {
            return Err(LaunchError(format!("rank {rank} is not below world size {world}")));
        }
        if local_world == 0 || local_rank >= local_world {
            return Err(LaunchError(format!("local rank {local_rank} is not below local world size {local_world}")));
        }
        let master_port = match env.get("MASTER_PORT") {
            None => None,
            Some(p) => Some(p.trim().parse::<u16>().map_err(|_| LaunchError(format!("MASTER_PORT={p:?} is not a port number")))?),
        };
        // A launcher's restarts, else Slurm's requeues (`--requeue`, `scontrol requeue`): either
        // way the job has run before and resumes from its newest checkpoint.
        let restart_count = match ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"].iter().find_map(|k| env.get(*k).map(|v| (k, v))) {
            None => 0,
            Some((k, v)) => v.trim().parse().map_err(|_| LaunchError(format!("{k}={v:?} is not a count")))?,
        };
        Ok(LaunchInfo {
            source,
            rank,
            local_rank,
            world_size: world,
            local_world_size: local_world,
            master_addr: env.get("MASTER_ADDR").cloned(),
            master_port,
            job_token: env.get("RINGTRAIN_JOB_TOKEN").cloned().unwrap_or_default(),
            restart_count,
            // A multi-node ringrun serves the store itself (on node 0's launcher).
            store_served: env.get("RINGTRAIN_STORE_HOSTED").is_some_and(|v| v == "1"),
            // torchrun writes Python's str(bool).
            agent_store: env.get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| matches!(v.as_str(), "True" | "true" | "1")),
            under_srun,
        })
    }

    /// The store address, required when more than one process takes part.
    pub fn store_addr(&self) -> Result<String, LaunchError> {
        match (&self.master_addr, self.master_port) {
            (Some(a), Some(p)) => Ok(format!("{a}:{p}")),
            _ if self.world_size == 1 => Ok("127.0.0.1:0".into()),
            _ => Err(LaunchError(format!(
                "world size {} needs MASTER_ADDR and MASTER_PORT for the ring backend's rendezvous \
                 (ringrun sets them; under mpirun and srun they are found automatically, or export them)",
                self.world_size
            ))),
        }
    }
}

/// Under torchrun: the error for its failure summary, in the file its agent names
/// (TORCHELASTIC_ERROR_FILE; the `{"message", "timestamp"}` form torch.distributed.elastic
/// reads), so the summary shows the cause instead of `<N/A>`. Best effort: the same line is on
/// stderr.
pub fn write_torchelastic_error(message: &str) {
    let Ok(path) = std::env::var("TORCHELASTIC_ERROR_FILE") else { return };
    let timestamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let body = serde_json::json!({ "message": message, "timestamp": timestamp });
    if let Err(e) = std::fs::write(&path, body.to_string()) {
        eprintln!("ringtrain: could not write torchrun's error file {path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn precedence_and_sources() {
        let cases: &[(&[(&str, &str)], LaunchSource, usize, usize, usize, usize)] = &[
            (&[], LaunchSource::Standalone, 0, 1, 0, 1),
            (&[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")], LaunchSource::Torchrun, 1, 4, 1, 2),
            // By hand on one host: RANK and WORLD_SIZE alone mean one node.
            (&[("RANK", "2"), ("WORLD_SIZE", "3")], LaunchSource::Torchrun, 2, 3, 2, 3),
            // A PyTorchJob pod running the worker directly: one process per pod.
            (&[("RANK", "2"), ("WORLD_SIZE", "3"), ("PET_NODE_RANK", "2"), ("PET_NNODES", "3")], LaunchSource::Torchrun, 2, 3, 0, 1),
            (
                &[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "3"), ("RANK", "0"), ("WORLD_SIZE", "1")],
                LaunchSource::Torchrun,
                0,
                1,
                0,
                1,
            ),
            (
                &[
                    ("OMPI_COMM_WORLD_RANK", "2"),
                    ("OMPI_COMM_WORLD_SIZE", "3"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "1"),
                ],
                LaunchSource::OpenMpi,
                2,
                3,
                0,
                1,
            ),
            (&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")], LaunchSource::Pmi, 1, 2, 1, 2),
            (
                &[
                    ("SLURM_PROCID", "3"),
                    ("SLURM_NTASKS", "4"),
                    ("SLURM_LOCALID", "1"),
                    ("SLURM_TASKS_PER_NODE", "2(x2)"),
                    ("SLURM_STEP_ID", "0"),
                ],
                LaunchSource::Slurm,
                3,
                4,
                1,
                2,
            ),
        ];
        for (vars, source, rank, world, lrank, lworld) in cases {
            let li = LaunchInfo::from_env(&env(vars)).unwrap();
            assert_eq!(
                (li.source, li.rank, li.world_size, li.local_rank, li.local_world_size),
                (*source, *rank, *world, *lrank, *lworld),
                "{vars:?}"
            );
        }
    }

    #[test]
    fn bad_values_are_named() {
        for (vars, needle) in [
            (&[("RANK", "x"), ("WORLD_SIZE", "2")][..], "RANK"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], "rank 2"),
            (&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")][..], "MASTER_PORT"),
        ] {
            let e = LaunchInfo::from_env(&env(vars)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let li = LaunchInfo::from_env(&env(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap();
        assert!(li.store_addr().unwrap_err().to_string().contains("MASTER_ADDR"));
        // An sbatch script's batch step (no SLURM_STEP_ID) is not rank 0 of N: it says so.
        let e = LaunchInfo::from_env(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_ID", "5")])).unwrap_err().to_string();
        assert!(e.contains("sbatch") && e.contains("srun"), "{e}");
        // In a salloc shell without srun: no task variables, so it says so rather than train alone.
        let e = LaunchInfo::from_env(&env(&[("SLURM_NTASKS", "2"), ("SLURM_JOB_ID", "5")])).unwrap_err().to_string();
        assert!(e.contains("salloc") && e.contains("srun") && e.contains("SLURM_NTASKS=2"), "{e}");
        assert!(LaunchInfo::from_env(&env(&[("SLURM_NTASKS", "1"), ("SLURM_JOB_ID", "5")])).is_ok(), "one task: fine alone");
        let one = LaunchInfo::from_env(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap();
        assert!(!one.under_srun, "a one-task batch step is fine on its own");
        let pmi2 =
            LaunchInfo::from_env(&env(&[("PMI_RANK", "0"), ("PMI_SIZE", "2"), ("SLURM_PROCID", "0"), ("SLURM_STEP_ID", "3")])).unwrap();
        assert!(pmi2.under_srun && pmi2.source == LaunchSource::Pmi);
    }
}
