//! `ringbench`: collective benchmarks, run under ringrun or mpirun like the worker:
//!   ringrun --nproc-per-node 2 ringbench allreduce --backend ring
//!   mpirun -np 2 ringbench allreduce --backend mpi

use anyhow::Result;
use clap::{Parser, Subcommand};
use ringtrain::config::{Backend, LocalTransport};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ringbench", version, about = "ringtrain's collective benchmarks (nccl-tests' columns)")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// In-place f32 sum all-reduce over a sweep of sizes.
    Allreduce {
        /// Sizes in bytes (K, M, G suffixes).
        #[arg(long, default_value = "4K,64K,1M,4M,25M,64M,256M")]
        sizes: String,
        /// ring, mpi, nccl or auto.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// Minimum timed iterations per size.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// cpu or cuda (buffers on cuda:LOCAL_RANK).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Ring links within a node: shm, unix or tcp.
        #[arg(long, default_value = "shm")]
        local_transport: String,
    },
}

fn try_main() -> Result<()> {
    let Args { bench: Bench::Allreduce { sizes, backend, iters, timeout_secs, device, local_transport } } = Args::parse();
    let device = match device.as_str() {
        "cpu" => ringtrain::config::DeviceChoice::Cpu,
        "cuda" => ringtrain::config::DeviceChoice::Cuda,
        other => anyhow::bail!("--device {other}: expected cpu or cuda"),
    };
    let local_transport = match local_transport.as_str() {
        "unix" => LocalTransport::Unix,
        "shm" => LocalTransport::Shm,
        "tcp" => LocalTransport::Tcp,
        other => anyhow::bail!("--local-transport {other}: expected shm, unix or tcp"),
    };
    let sizes = ringtrain::internal::bench::parse_sizes(&sizes).map_err(anyhow::Error::msg)?;
    let backend = match backend.as_str() {
        "ring" => Backend::Ring,
        "mpi" => Backend::Mpi,
        "nccl" => Backend::Nccl,
        "auto" => Backend::Auto,
        other => anyhow::bail!("--backend {other}: expected ring, mpi, nccl or auto"),
    };
    let mut pg = ringtrain::init(ringtrain::InitOptions { backend, device, timeout_secs, local_transport, logging: true, log_file: None })?;
    let device = pg.device();
    let comm = pg.comm();
    if comm.rank() == 0 {
        println!("# memcpy 100 MB, one process: {:.2} GB/s", ringtrain::internal::bench::memcpy_gbps(100 << 20));
    }
    let rows = ringtrain::internal::bench::all_reduce_sweep(comm, &sizes, iters, device)?;
    if comm.rank() == 0 {
        ringtrain::internal::bench::print_table(comm.backend_name(), comm.world_size(), &rows);
    }
    let wrong: usize = rows.iter().map(|r| r.wrong).sum();
    pg.finish();
    anyhow::ensure!(wrong == 0, "{wrong} wrong elements");
    Ok(())
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringbench: error: {}", ringtrain::internal::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
