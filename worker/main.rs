//! `ringtrain`: one training worker, started by `ringrun` (or torchrun-style env by hand, mpirun,
//! srun); `plot` for pictures of runs; and two tools for language models: `prepare-text` and
//! `sample`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ringtrain",
    version,
    about = "A data-parallel training worker (one per GPU or CPU slot)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// YAML config (see configs/).
    #[arg(long, required = true)]
    config: Option<PathBuf>,
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
    #[command(subcommand)]
    tool: Option<Tool>,
}

#[derive(Subcommand)]
enum Tool {
    /// UTF-8 text files or folders → train.bin / val.bin (byte-level tokens, 90/10) + meta.json.
    PrepareText {
        /// Text files or folders (read sorted, recursively; .dat and .u8 files skipped).
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// A PNG of one or more runs (overlaid): loss, accuracy or perplexity, lr, throughput, and
    /// every rank's per-step phase breakdown.
    Plot {
        /// Run directories (their metrics.jsonl and breakdown.json).
        #[arg(required = true, num_args = 1..)]
        runs: Vec<PathBuf>,
        /// Output PNG (default: plot.png in the run directory for one run, else ./plot.png).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Text from a trained GPT: the prompt and its continuation.
    Sample {
        /// The training run's directory (its config.yaml and checkpoints).
        #[arg(long)]
        run_dir: PathBuf,
        /// A checkpoint folder or a safetensors file (default: the run's newest checkpoint).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long, default_value = "\n")]
        prompt: String,
        #[arg(long, default_value_t = 300)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// The same seed gives the same text.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn train(args: Args) -> anyhow::Result<()> {
    let worker_args = ringtrain::worker::WorkerArgs {
        config: args.config.expect("clap requires --config without a subcommand"),
        overrides: args.overrides,
        run_dir: args.run_dir,
        resume: args.resume,
    };
    ringtrain::worker::print_summary(&ringtrain::worker::run(worker_args)?);
    Ok(())
}

fn tool(t: Tool) -> anyhow::Result<()> {
    match t {
        Tool::PrepareText { input, out } => {
            let p = ringtrain::data::prepare::prepare_text(&input, &out)?;
            println!(
                "prepared {}: {} file(s), {} train and {} val tokens (byte-level, vocabulary 256)",
                out.display(),
                p.files.len(),
                p.train_tokens,
                p.val_tokens
            );
        }
        Tool::Plot { runs, out } => {
            // So the reader's warnings (torn metrics lines) are seen.
            let _ = ringtrain::telemetry::init_tracing(0, None);
            let out = out.unwrap_or_else(|| if runs.len() == 1 { runs[0].join("plot.png") } else { PathBuf::from("plot.png") });
            ringtrain::telemetry::plot::plot_dirs(&runs, &out)?;
            println!("wrote {}", out.display());
        }
        Tool::Sample { run_dir, checkpoint, prompt, max_new_tokens, temperature, top_k, seed } => {
            anyhow::ensure!(temperature > 0.0 && temperature.is_finite(), "--temperature must be a positive number, got {temperature}");
            let _ = ringtrain::telemetry::init_tracing(0, None);
            let options = ringtrain::models::generate::SampleOptions { max_new_tokens, temperature, top_k, seed };
            let text = ringtrain::internal::sample::run(ringtrain::internal::sample::SampleArgs { run_dir, checkpoint, prompt, options })?;
            println!("{text}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    ringtrain::telemetry::one_line_panics("ringtrain");
    let mut args = Args::parse();
    let result = match args.tool.take() {
        Some(t) => tool(t),
        None => train(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("ringtrain: error: {}", ringtrain::telemetry::error_text(&e));
            eprintln!("{text}");
            ringtrain::launch::write_torchelastic_error(&text);
            ExitCode::FAILURE
        }
    }
}
