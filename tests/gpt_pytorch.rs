//! ringtrain's GPT against nanoGPT's, in PyTorch (scripts/reference/gpt_reference.py): the same
//! loss on the same batch from the same weights, the same SGD and AdamW step, checkpoints that
//! load into nanoGPT's `GPT` strictly, and PyTorch weights starting a ringtrain run (init_from).
//! Runs where a Python with torch is found (`scripts/setup.sh --python` provides one).

mod common;
use common::*;
use ringtrain::config::{OptimizerConfig, OptimizerName};
use ringtrain::data::Batch;
use ringtrain::models::{self, Gpt, GptConfig, Model};
use ringtrain::optim::Optimizer;
use ringtrain::train::tasks::{LanguageModel, Task};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tch::Tensor;

const CONFIG: &str = r#"{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "bias": true, "dropout": 0.0}"#;

fn gpt_config() -> GptConfig {
    GptConfig { vocab_size: 64, block_size: 16, n_layer: 2, n_head: 2, n_embd: 32, bias: true, dropout: 0.0 }
}

fn reference(python: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference/gpt_reference.py");
    let mut c = Command::new(python);
    c.arg(script).args(args);
    let out = run(c, Duration::from_secs(120));
    out.assert_success();
    out.stdout
}

fn json_loss(stdout: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// A ringtrain GPT holding the weights of `file` (PyTorch names; the tied pair under either name).
fn gpt_from(file: &Path) -> Gpt {
    let m = Gpt::new(&gpt_config(), tch::Device::Cpu).unwrap();
    let loaded = models::without_aliases(Tensor::read_safetensors(file).unwrap(), &m.tied());
    ringtrain::checkpoint::copy_into(m.named_parameters(), &loaded, file).unwrap();
    m
}

fn batch(dir: &Path) -> Batch {
    let t = Tensor::read_safetensors(dir.join("batch.safetensors")).unwrap();
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    Batch { input: get("x"), target: get("y"), len: 4 }
}

fn sorted(m: &Gpt) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = m.named_parameters().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn sorted_file(file: &Path, tied: &[(String, String)]) -> Vec<(String, Tensor)> {
    let mut v = models::without_aliases(Tensor::read_safetensors(file).unwrap(), tied);
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn setup() -> Option<(String, tempfile::TempDir, PathBuf)> {
    let python = python_with_torch("gpt_pytorch")?;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    reference(&python, &["init", cfg.to_str().unwrap(), dir.path().to_str().unwrap(), "1234"]);
    Some((python, dir, cfg))
}

#[test]
fn same_loss_same_sgd_and_adamw_step_and_strict_load_into_nanogpt() {
    let Some((python, dir, cfg)) = setup() else { return };
    let (d, c) = (dir.path(), cfg.to_str().unwrap());
    let init = d.join("init.safetensors");
    let b = batch(d);
    let task = LanguageModel { block_size: 16 };
    for (opt_name, opt_cfg) in [
        ("sgd", OptimizerConfig::new(OptimizerName::Sgd, 0.1)),
        (
            "adamw",
            OptimizerConfig {
                betas: [0.9, 0.95],
                weight_decay: 0.1,
                weight_decay_1d: false,
                ..OptimizerConfig::new(OptimizerName::Adamw, 1e-3)
            },
        ),
    ] {
        let out = d.join(format!("{opt_name}.safetensors"));
        let py_loss = json_loss(&reference(
            &python,
            &["step", c, init.to_str().unwrap(), d.join("batch.safetensors").to_str().unwrap(), opt_name, out.to_str().unwrap()],
        ));
        let m = gpt_from(&init);
        let mut opt = Optimizer::new(&opt_cfg, m.named_parameters());
        let loss = task.loss(&m, &b).unwrap();
        let ours = loss.double_value(&[]);
        assert!((ours - py_loss).abs() <= 1e-5 * py_loss.abs(), "loss: ringtrain {ours}, nanoGPT {py_loss}");
        loss.backward();
        opt.step().unwrap();
        let diff = max_relative_difference(&sorted(&m), &sorted_file(&out, &m.tied()));
        assert!(diff <= 1e-5, "{opt_name}: weights after one step differ from PyTorch's by {diff:e}");
    }

    // A ringtrain file (the tied weight once, under transformer.wte.weight) loads into nanoGPT's
    // GPT strictly with safetensors' load_model, and with load_state_dict missing only lm_head.
    let m = gpt_from(&init);
    let ours = {
        let _g = tch::no_grad_guard();
        let logits = m.forward_t(&b.input, false).unwrap();
        logits.view([-1, 64]).cross_entropy_for_logits(&b.target.view([-1])).double_value(&[])
    };
    let file = d.join("ringtrain.safetensors");
    let state: Vec<(String, Tensor)> = m.named_parameters().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    Tensor::write_safetensors(&state, &file).unwrap();
    let checked = reference(&python, &["check", c, file.to_str().unwrap(), d.join("batch.safetensors").to_str().unwrap()]);
    assert!(checked.contains("\"tied\": true"), "{checked}");
    let py = json_loss(&checked);
    assert!((ours - py).abs() <= 1e-5 * py.abs(), "eval loss: ringtrain {ours}, nanoGPT {py}");
}

/// Mixed precision on the GPT against nanoGPT's under `torch.autocast("cpu", dtype)`: 3 SGD steps on
/// one batch, bf16, and fp16 with GradScaler's defaults (scale 65536, no overflow here). Both sides
/// run libtorch's CPU kernels on the same casts (autocast's op lists are libtorch's): the gradients
/// are bitwise equal. SGD, not AdamW: ringtrain's AdamW agrees with torch.optim's to an ulp (the
/// test above), and in fp16 Adam turns an ulp into a full step on the attention's key bias, whose
/// true gradient is zero (softmax ignores a shift) and whose fp16 gradient is rounding noise.
#[test]
fn autocast_bf16_and_fp16_steps_match_pytorch_cpu_autocast() {
    use ringtrain::amp::{autocast, GradScaler, GradScalerConfig, Precision};
    let Some((python, dir, cfg)) = setup() else { return };
    // One thread, as the reference: libtorch's fp16 CPU kernels split their sums by thread.
    tch::set_num_threads(1);
    let (d, c) = (dir.path(), cfg.to_str().unwrap());
    let init = d.join("init.safetensors");
    let b = batch(d);
    let task = LanguageModel { block_size: 16 };
    let opt_cfg = OptimizerConfig::new(OptimizerName::Sgd, 0.1);
    for (name, precision) in [("bf16", Precision::Bf16), ("fp16", Precision::Fp16)] {
        let out = d.join(format!("amp-{name}.safetensors"));
        let batch_file = d.join("batch.safetensors");
        let stdout =
            reference(&python, &["amp", c, init.to_str().unwrap(), batch_file.to_str().unwrap(), name, "3", out.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let py_losses: Vec<f64> = v["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();

        let m = gpt_from(&init);
        let mut opt = Optimizer::new(&opt_cfg, m.named_parameters());
        let mut scaler = (precision == Precision::Fp16).then(|| GradScaler::new(GradScalerConfig::default(), tch::Device::Cpu).unwrap());
        for (step, py_loss) in py_losses.iter().enumerate() {
            for (_, p) in m.named_parameters() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let loss = autocast(tch::Device::Cpu, precision, || task.loss(&m, &b)).unwrap().unwrap();
            let ours = loss.double_value(&[]);
            eprintln!("{name} step {step}: {ours} vs {py_loss}");
            assert!((ours - py_loss).abs() <= 1e-6 * py_loss.abs(), "{name} step {step}: loss {ours} here, {py_loss} in PyTorch");
            match &mut scaler {
                Some(s) => {
                    s.scale(&loss).unwrap().backward();
                    let found = s.unscale_(&opt.grads()).unwrap().double_value(&[]) > 0.0;
                    if !found {
                        opt.step().unwrap();
                    }
                    s.update(found).unwrap();
                }
                None => {
                    loss.backward();
                    opt.step().unwrap();
                }
            }
        }
        if let Some(s) = &scaler {
            assert_eq!(s.current_scale().unwrap(), v["scale"].as_f64().unwrap(), "fp16 loss scale");
        }
        let (ours, theirs) = (sorted(&m), sorted_file(&out, &m.tied()));
        for ((n, a), (_, b)) in ours.iter().zip(&theirs) {
            let d = max_relative_difference(&[(n.clone(), a.shallow_clone())], &[(n.clone(), b.shallow_clone())]);
            eprintln!("{name} {n} {d:e} norm {}", b.norm().double_value(&[]));
        }
        let diff = max_relative_difference(&ours, &theirs);
        eprintln!("GPT {name} vs PyTorch CPU autocast: max relative difference {diff:e} after 3 SGD steps");
        assert!(diff <= 1e-6, "{name}: weights after 3 steps differ from PyTorch's by {diff:e}");
    }
}

#[test]
fn pytorch_weights_start_a_run_and_its_output_loads_back() {
    let Some((python, dir, cfg)) = setup() else { return };
    let d = dir.path();
    // Token files over the 64-token vocabulary.
    let tokens = d.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let ids = |n: usize, k: u64| -> Vec<u8> { (0..n as u64).flat_map(|i| (((i * 7 + k) % 64) as u16).to_le_bytes()).collect() };
    std::fs::write(tokens.join("train.bin"), ids(4000, 1)).unwrap();
    std::fs::write(tokens.join("val.bin"), ids(500, 3)).unwrap();
    std::fs::write(tokens.join("meta.json"), r#"{"vocab_size": 64}"#).unwrap();
    let job = format!(
        "model: {{name: gpt, n_layer: 2, n_head: 2, n_embd: 32, block_size: 16, bias: true, init_from: {}}}
data: {{format: tokens, dir: {}, eval_windows: 8}}
train: {{max_steps: 1, batch_size: 4, eval: false}}
optimizer: {{name: sgd, lr: 1.0e-30}}
comm: {{timeout_secs: 30}}
",
        d.join("init.safetensors").display(),
        tokens.display()
    );
    let cfg_yaml = write_config(d, "job.yaml", &job);
    let run_dir = d.join("run");
    let out = run(ringrun(2, &cfg_yaml, &run_dir, &[]), Duration::from_secs(120));
    out.assert_success();
    assert!(out.stderr.contains("initialised parameters from"), "{}", out.report());
    let m = gpt_from(&d.join("init.safetensors"));
    let diff = max_relative_difference(&sorted_file(&run_dir.join("model.safetensors"), &m.tied()), &sorted(&m));
    assert!(diff <= 1e-6, "the run did not start from PyTorch's weights: {diff:e}");
    let checked = reference(
        &python,
        &[
            "check",
            cfg.to_str().unwrap(),
            run_dir.join("model.safetensors").to_str().unwrap(),
            d.join("batch.safetensors").to_str().unwrap(),
        ],
    );
    assert!(checked.contains("\"tied\": true"), "{checked}");
}
