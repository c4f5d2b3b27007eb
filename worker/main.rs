//! `ringtrain`: one training worker. Started by `ringrun` (or torchrun-style env by hand).

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ringtrain", version, about = "A data-parallel training worker (one per GPU or CPU slot)")]
struct Args {
    /// YAML config (see configs/).
    #[arg(long)]
    config: PathBuf,
    /// Override a config value: --set train.epochs=2 (repeatable; the value is YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Where outputs go (default: runs/<config name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// `auto` (newest usable checkpoint in the run directory, else start fresh) or a checkpoint
    /// folder. A group restarted by ringrun always resumes `auto`.
    #[arg(long, value_name = "auto|PATH")]
    resume: Option<ringtrain::train::Resume>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let worker_args = ringtrain::internal::worker::WorkerArgs {
        config: args.config,
        overrides: args.overrides,
        run_dir: args.run_dir,
        resume: args.resume,
    };
    match ringtrain::internal::worker::run(worker_args) {
        Ok(summary) => {
            if summary.rank == 0 {
                if summary.stopped {
                    println!("stopped after {} steps on request; resume with --resume auto", summary.global_steps);
                } else if let Some(last) = summary.epochs.last() {
                    // The task's metrics but the loss: test_acc for classification, …
                    let acc: String = last
                        .test
                        .iter()
                        .flat_map(|t| t.metrics.iter().filter(|(k, _)| *k != "loss"))
                        .map(|(k, v)| if *k == "acc" { format!("test_acc {:.2}%, ", v * 100.0) } else { format!("test_{k} {v:.4}, ") })
                        .collect();
                    println!("final: {acc}{:.0} samples/s, {} steps", last.samples_per_s, summary.global_steps);
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringtrain: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
