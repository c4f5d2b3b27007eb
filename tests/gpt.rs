//! The language-model path with real processes: prepare-text, a GPT trained by 2 workers on the
//! token files, evaluation, sampling, and exact resume (dropout included).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn gpt_job(tokens: &Path, extra: &str) -> String {
    format!(
        "model: {{name: gpt, n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, dropout: 0.0}}
data: {{format: tokens, dir: {}, eval_windows: 64}}
train: {{max_steps: 60, batch_size: 8, seed: 3, log_every_steps: 10, eval_every_steps: 30}}
optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.1, weight_decay_1d: false, schedule: {{name: warmup_cosine, warmup_steps: 5, decay_steps: 60, min_lr: 0.0003}}}}
comm: {{timeout_secs: 30}}
sample: {{prompt: 'the ', max_new_tokens: 40, top_k: 5, seed: 1}}
{extra}",
        tokens.display()
    )
}

#[test]
fn two_workers_train_evaluate_and_sample_a_gpt() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = prepare_tokens(dir.path());
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tokens.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["vocab_size"], 256);
    let total = meta["train_tokens"].as_u64().unwrap() + meta["val_tokens"].as_u64().unwrap();
    assert_eq!(std::fs::metadata(tokens.join("train.bin")).unwrap().len(), 2 * meta["train_tokens"].as_u64().unwrap());
    assert_eq!(meta["train_tokens"].as_u64().unwrap(), total * 9 / 10);

    let cfg = write_config(dir.path(), "gpt.yaml", &gpt_job(&tokens, ""));
    let run_dir = dir.path().join("run");
    let out = run(ringrun(2, &cfg, &run_dir, &[]), Duration::from_secs(300));
    out.assert_success();
    assert_eq!(rank_hash(&run_dir, 0), rank_hash(&run_dir, 1), "replicas differ");
    let steps = metrics_lines(&run_dir, "step");
    let first = steps.first().unwrap()["loss"].as_f64().unwrap();
    let last = steps.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < first * 0.6, "loss {first} -> {last}\n{}", out.report());
    assert!(steps.iter().all(|s| s["tokens_per_s"].as_f64().unwrap() > 0.0 && s["flops_per_s"].as_f64().unwrap() > 0.0));
    // Mid-training evaluation at step 30, and the final one, with perplexity = exp(loss).
    let evals = metrics_lines(&run_dir, "eval");
    assert_eq!(evals.iter().map(|e| e["global_step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![30]);
    let end = metrics_lines(&run_dir, "epoch").pop().unwrap();
    let (loss, ppl) = (end["test_loss"].as_f64().unwrap(), end["test_perplexity"].as_f64().unwrap());
    assert!((ppl - loss.exp()).abs() < 1e-9 * ppl && loss < evals[0]["test_loss"].as_f64().unwrap() + 0.5, "{end}");
    assert!(out.stdout.contains("final: test_loss") && out.stdout.contains("sample:\n[rank0] the "), "{}", out.report());

    // `ringtrain sample` on the run: the same seed, the same text; another seed, other text.
    let sample = |seed: &str| {
        let mut c = Command::new(RINGTRAIN);
        c.args(["sample", "--run-dir"]).arg(&run_dir).args(["--prompt", "the cat ", "--max-new-tokens", "60", "--seed", seed]);
        let o = run(c, Duration::from_secs(60));
        o.assert_success();
        o.stdout
    };
    let (a, b, c) = (sample("5"), sample("5"), sample("6"));
    assert!(a.starts_with("the cat ") && a.len() > 40, "{a}");
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn gpt_resume_with_dropout_is_bitwise_exact() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = prepare_tokens(dir.path());
    let job = gpt_job(&tokens, "checkpoint: {every_steps: 10}\n")
        .replace("dropout: 0.0", "dropout: 0.1")
        .replace("max_steps: 60", "max_steps: 40");
    let cfg = write_config(dir.path(), "gpt.yaml", &job);
    let reference = dir.path().join("reference");
    run(ringrun(2, &cfg, &reference, &["--set", "train.eval=false"]), Duration::from_secs(300)).assert_success();
    let expected = rank_hash(&reference, 0);
    let resumed = dir.path().join("resumed");
    run(ringrun(2, &cfg, &resumed, &["--set", "train.eval=false", "--set", "train.max_steps=17"]), Duration::from_secs(300))
        .assert_success();
    let out = run(ringrun(2, &cfg, &resumed, &["--set", "train.eval=false", "--resume", "auto"]), Duration::from_secs(300));
    out.assert_success();
    assert!(out.stderr.contains("global step 17"), "{}", out.report());
    assert_eq!(rank_hashes(&resumed, 2), vec![expected.clone(), expected], "{}", out.report());
}

#[test]
fn missing_token_files_and_wrong_runs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "gpt.yaml", &gpt_job(&dir.path().join("nothing"), ""));
    let out = run(ringrun(1, &cfg, &dir.path().join("run"), &[]), Duration::from_secs(60));
    out.assert_failure();
    assert!(out.stderr.contains("no train.bin") && out.stderr.contains("prepare-text"), "{}", out.report());
    let mut c = Command::new(RINGTRAIN);
    c.args(["sample", "--run-dir"]).arg(dir.path().join("nowhere"));
    let o = run(c, Duration::from_secs(30));
    o.assert_failure();
    assert!(o.stderr.contains("ringtrain: error:") && o.stderr.contains("config.yaml"), "{}", o.report());
    let mut c = Command::new(RINGTRAIN);
    c.args(["prepare-text", "--input"]).arg(dir.path().join("missing.txt")).arg("--out").arg(dir.path().join("t"));
    let o = run(c, Duration::from_secs(30));
    o.assert_failure();
    assert!(o.stderr.contains("missing.txt"), "{}", o.report());
}
