//! `ringbench`: collective benchmarks, run under ringrun or mpirun like the worker:
//!   ringrun --nproc-per-node 2 ringbench allreduce --backend ring
//!   mpirun -np 2 ringbench allreduce --backend mpi
//! and the data loader alone (one process): decode + transform throughput of a config's train split
//!   ringbench loader --config configs/fashion_mnist_resnet18.yaml --workers 1,2

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
        /// Ring backend across nodes: the hierarchical all-reduce (comm.hierarchical).
        #[arg(long)]
        hierarchical: bool,
        /// Buffers from the communicator (`alloc_reduce_buffer`), as the DDP reducer's buckets:
        /// shared memory every rank maps, when the ring is all on one node.
        #[arg(long)]
        shared_buffers: bool,
    },
    /// Images/s of the loader alone (decode and transforms, no model) over a config's train split.
    Loader {
        #[arg(long)]
        config: std::path::PathBuf,
        /// Loader thread counts to measure, comma-separated.
        #[arg(long, default_value = "1,2")]
        workers: String,
        /// Stop after this many batches (0: the whole split).
        #[arg(long, default_value_t = 0)]
        batches: usize,
        /// Config overrides, as ringtrain's --set.
        #[arg(long = "set")]
        overrides: Vec<String>,
    },
}

fn try_main() -> Result<()> {
    match Args::parse().bench {
        Bench::Allreduce { sizes, backend, iters, timeout_secs, device, local_transport, hierarchical, shared_buffers } => {
            allreduce(sizes, backend, iters, timeout_secs, device, local_transport, hierarchical, shared_buffers)
        }
        Bench::Loader { config, workers, batches, overrides } => loader(&config, &workers, batches, &overrides),
    }
}

/// One line per thread count: images/s through `Loader` (batches in sampler order, epoch 0).
fn loader(config: &std::path::Path, workers: &str, batches: usize, overrides: &[String]) -> Result<()> {
    let cfg = ringtrain::config::Config::load(config, overrides)?;
    let ctx = ringtrain::data::LoadContext { context_length: cfg.model.spec.context_length(), seed: cfg.train.seed };
    let splits = ringtrain::data::load(&cfg.data, &ctx)?;
    let n = splits.train.len();
    let indices = ringtrain::data::DistributedSampler::new(n, 1, 0, true, cfg.train.seed, false).indices();
    println!(
        "# loader: {n} train samples of {:?}, batch {}, prefetch {}",
        splits.sample_shape, cfg.train.batch_size, cfg.data.prefetch_batches
    );
    for w in workers.split(',') {
        let w: usize = w.trim().parse().map_err(|_| anyhow::anyhow!("--workers {workers}: expected numbers like 1,2"))?;
        let start = std::time::Instant::now();
        let mut images = 0usize;
        let loader = ringtrain::data::Loader::spawn_workers(
            splits.train.clone(),
            indices.clone(),
            cfg.train.batch_size,
            cfg.data.prefetch_batches,
            0,
            w,
        )?;
        for (k, b) in loader.enumerate() {
            images += b?.len;
            if batches > 0 && k + 1 == batches {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!("ringtrain loader workers={w} images={images} seconds={secs:.2} images_per_s={:.0}", images as f64 / secs);
    }
    Ok(())
}

fn allreduce(
    sizes: String,
    backend: String,
    iters: usize,
    timeout_secs: u64,
    device: String,
    local_transport: String,
    hierarchical: bool,
    shared_buffers: bool,
) -> Result<()> {
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
    let pg = ringtrain::init(ringtrain::InitOptions {
        backend,
        device,
        timeout_secs,
        local_transport,
        hierarchical,
        logging: true,
        log_file: None,
    })?;
    let device = pg.device();
    let mut comm = pg.comm();
    if comm.rank() == 0 {
        println!("# memcpy 100 MB, one process: {:.2} GB/s", ringtrain::internal::bench::memcpy_gbps(100 << 20));
    }
    let (rows, shared) = ringtrain::internal::bench::all_reduce_sweep(&mut *comm, &sizes, iters, device, shared_buffers)?;
    if comm.rank() == 0 {
        let name = if shared { format!("{} (shared buffers)", comm.backend_name()) } else { comm.backend_name().to_string() };
        if shared_buffers && !shared {
            println!("# no shared buffers from this backend: ordinary buffers");
        }
        ringtrain::internal::bench::print_table(&name, comm.world_size(), &rows);
    }
    let wrong: usize = rows.iter().map(|r| r.wrong).sum();
    drop(comm);
    pg.finish();
    anyhow::ensure!(wrong == 0, "{wrong} wrong elements");
    Ok(())
}

fn main() -> ExitCode {
    ringtrain::telemetry::one_line_panics("ringbench");
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringbench: error: {}", ringtrain::telemetry::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
