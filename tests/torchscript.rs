//! `model.name: torchscript`: modules scripted in PyTorch (scripts/export_torchscript.py), trained
//! by ringrun's workers. Against PyTorch DDP (torchrun + gloo, scripts/reference/torchscript_ddp.py)
//! on a module with BatchNorm and a tied weight; exact resume; init_from; a scripted nanoGPT on
//! token data; and the bad inputs (not TorchScript, traced, wrong output, another torch version).
//! Runs where a Python with torch is found (`scripts/setup.sh --python` provides one).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn python(py: &str, args: &[&str]) -> Output {
    let mut c = Command::new(py);
    c.args(args).env("OMP_NUM_THREADS", "1");
    run(c, Duration::from_secs(180))
}

/// Exports `spec` (scripts/export_torchscript.py) to `out`; its stdout.
fn export(py: &str, spec: &str, extra: &[&str], out: &Path) -> String {
    let s = script("export_torchscript.py");
    let mut args = vec![s.to_str().unwrap(), spec, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = python(py, &args);
    o.assert_success();
    o.stdout
}

/// The BatchNorm + tied-weight module of the reference script, exported to `dir/bn.pt`.
fn bn_module(py: &str, dir: &Path, kwargs: &str) -> PathBuf {
    let out = dir.join(format!("bn{}.pt", kwargs.len()));
    let spec = format!("{}:BnTiedNet", script("reference/torchscript_ddp.py").display());
    let listing = export(py, &spec, &["--kwargs", kwargs, "--input-shape", "2,1,28,28"], &out);
    assert!(listing.contains("bn.num_batches_tracked [] int64"), "{listing}");
    assert!(listing.contains("shared_a.weight = shared_b.weight"), "{listing}");
    out
}

fn job(module: &Path, extra: &str) -> String {
    format!(
        "model: {{name: torchscript, path: {}}}
data: {{format: idx, dir: {FASHION_MNIST}}}
train: {{max_steps: 6, batch_size: 16, seed: 0, log_every_steps: 2, eval: false}}
optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
comm: {{timeout_secs: 60}}
{extra}",
        module.display()
    )
}

#[test]
fn batchnorm_and_tied_weight_train_as_pytorch_ddp_and_load_back() {
    let Some(py) = python_with_torch("torchscript") else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = bn_module(&py, dir.path(), "{}");
    let cfg = write_config(dir.path(), "job.yaml", &job(&module, ""));
    let run_dir = dir.path().join("run");
    let mut c = ringrun(2, &cfg, &run_dir, &[]);
    c.env("OMP_NUM_THREADS", "1");
    let out = run(c, Duration::from_secs(180));
    out.assert_success();
    assert!(out.stderr.contains("9 tensors, 14026 parameters, 3 buffer(s)"), "{}", out.report());
    let hashes = rank_hashes(&run_dir, 2);
    assert_eq!(hashes[0], hashes[1], "replicas (parameters and BatchNorm buffers) differ");

    // PyTorch DDP on the same module file, data, sampler, batch and optimizer.
    let reference = dir.path().join("reference.safetensors");
    let port = free_port().to_string();
    let s = script("reference/torchscript_ddp.py");
    python(
        &py,
        &[
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            &port,
            s.to_str().unwrap(),
            module.to_str().unwrap(),
            FASHION_MNIST,
            reference.to_str().unwrap(),
            "--steps",
            "6",
        ],
    )
    .assert_success();
    let ours = load_params(&run_dir);
    let mut theirs = tch::Tensor::read_safetensors(&reference).unwrap();
    theirs.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"bn.running_var") && names.contains(&"bn.num_batches_tracked"), "{names:?}");
    assert!(!names.contains(&"shared_b.weight"), "a tied weight is stored once: {names:?}");
    let diff = max_relative_difference(&ours, &theirs);
    eprintln!("torchscript vs PyTorch DDP: max relative difference {diff:e}");
    assert!(diff <= 1e-6, "{diff}");
    let steps = ours.iter().find(|(n, _)| n == "bn.num_batches_tracked").unwrap().1.int64_value(&[]);
    assert_eq!(steps, 6);

    // The checkpoint loads into the Python module, strictly.
    let check = format!(
        "import sys; sys.path.insert(0, '{}')\n\
         from torchscript_ddp import BnTiedNet\n\
         from safetensors.torch import load_model, load_file\n\
         m = BnTiedNet(); missing, unexpected = load_model(m, '{}', strict=True)\n\
         f = load_file('{}')\n\
         assert m.shared_b.weight is m.shared_a.weight and (m.shared_b.weight == f['shared_a.weight']).all()\n\
         assert (m.bn.running_var == f['bn.running_var']).all() and int(m.bn.num_batches_tracked) == 6\n\
         sd = dict(f); sd['shared_b.weight'] = sd['shared_a.weight']; BnTiedNet().load_state_dict(sd, strict=True)\n\
         print('loaded', len(m.state_dict()))",
        script("reference").display(),
        run_dir.join("model.safetensors").display(),
        run_dir.join("model.safetensors").display()
    );
    let o = python(&py, &["-c", &check]);
    o.assert_success();
    assert!(o.stdout.contains("loaded 13"), "{}", o.report());
}

#[test]
fn resume_is_bitwise_exact_and_init_from_sets_the_weights() {
    let Some(py) = python_with_torch("torchscript") else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = bn_module(&py, dir.path(), "{}");
    let cfg = write_config(dir.path(), "job.yaml", &job(&module, ""));
    let whole = dir.path().join("whole");
    run(ringrun(2, &cfg, &whole, &[]), Duration::from_secs(180)).assert_success();
    let stopped = dir.path().join("stopped");
    run(ringrun(2, &cfg, &stopped, &["--set", "train.max_steps=3"]), Duration::from_secs(180)).assert_success();
    let out = run(ringrun(2, &cfg, &stopped, &["--resume", "auto"]), Duration::from_secs(180));
    out.assert_success();
    assert!(out.stderr.contains("global step 3"), "{}", out.report());
    assert_eq!(rank_hashes(&stopped, 2), rank_hashes(&whole, 2));

    // init_from: the trained weights replace the module file's own; with lr 1e-30 they stay (a step of ~1e-30 rounds away).
    let init = whole.join("model.safetensors");
    let from = dir.path().join("from");
    let set = format!("model.init_from={}", init.display());
    run(ringrun(2, &cfg, &from, &["--set", &set, "--set", "optimizer.lr=1e-30", "--set", "train.max_steps=1"]), Duration::from_secs(180))
        .assert_success();
    let (a, b) = (load_params(&from), load_params(&whole));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        if !n.starts_with("bn.running") && !n.ends_with("num_batches_tracked") {
            assert!(x.equal(y), "{n} is not the init_from weight");
        }
    }
}

#[test]
fn a_scripted_nanogpt_trains_on_tokens_and_loads_back() {
    let Some(py) = python_with_torch("torchscript") else { return };
    let dir = tempfile::tempdir().unwrap();
    let tokens = prepare_tokens(dir.path());
    let gpt_json = dir.path().join("gpt.json");
    std::fs::write(
        &gpt_json,
        r#"{"vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "bias": true, "dropout": 0.0}"#,
    )
    .unwrap();
    let module = dir.path().join("gpt.pt");
    let spec = format!("{}:gpt_from_json", script("reference/gpt_reference.py").display());
    let args = format!("[\"{}\"]", gpt_json.display());
    let listing = export(&py, &spec, &["--args", &args, "--input-shape", "2,32", "--input-dtype", "long", "--input-high", "256"], &module);
    assert!(listing.contains("(Tensor[2, 32, 256], NoneType)"), "{listing}");
    let cfg = write_config(
        dir.path(),
        "gpt.yaml",
        &format!(
            "model: {{name: torchscript, path: {}, output: 0, block_size: 32}}
data: {{format: tokens, dir: {}, eval_windows: 32}}
train: {{max_steps: 30, batch_size: 8, seed: 3, log_every_steps: 10, eval_every_steps: 30}}
optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.1, weight_decay_1d: false}}
comm: {{timeout_secs: 60}}",
            module.display(),
            tokens.display()
        ),
    );
    let run_dir = dir.path().join("run");
    let out = run(ringrun(2, &cfg, &run_dir, &[]), Duration::from_secs(300));
    out.assert_success();
    let losses: Vec<f64> = metrics_lines(&run_dir, "step").iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert!(losses.len() >= 2 && losses.last().unwrap() < &(losses[0] - 1.0), "loss did not fall: {losses:?}");
    let names: Vec<String> = load_params(&run_dir).into_iter().map(|(n, _)| n).collect();
    let tied = names.iter().filter(|n| *n == "lm_head.weight" || *n == "transformer.wte.weight").count();
    assert_eq!(tied, 1, "the tied embedding is stored once: {names:?}");
    // nanoGPT's GPT loads it strictly (gpt_reference.py check: load_model strict).
    let batch_dir = dir.path().join("batch");
    std::fs::create_dir_all(&batch_dir).unwrap();
    let r = script("reference/gpt_reference.py");
    python(&py, &[r.to_str().unwrap(), "init", gpt_json.to_str().unwrap(), batch_dir.to_str().unwrap(), "1"]).assert_success();
    let o = python(
        &py,
        &[
            r.to_str().unwrap(),
            "check",
            gpt_json.to_str().unwrap(),
            run_dir.join("model.safetensors").to_str().unwrap(),
            batch_dir.join("batch.safetensors").to_str().unwrap(),
        ],
    );
    o.assert_success();
    assert!(o.stdout.contains("\"loss\""), "{}", o.report());
}

/// One worker on `module` (with `args`, e.g. --set): fails with one line naming the problem,
/// and writes no weights.
fn fails_with(dir: &Path, name: &str, module: &Path, args: &[&str], words: &[&str]) {
    let cfg = write_config(dir, &format!("{name}.yaml"), &job(module, ""));
    let run_dir = dir.join(name);
    let out = run(ringrun(1, &cfg, &run_dir, args), Duration::from_secs(120));
    out.assert_failure();
    let line =
        out.stderr.lines().find(|l| words.iter().all(|w| l.contains(w))).unwrap_or_else(|| panic!("{name}: {words:?}\n{}", out.report()));
    assert!(!line.contains("panicked"), "{line}");
    assert!(!run_dir.join("model.safetensors").exists(), "{name}: weights written");
}

#[test]
fn bad_modules_are_clear_errors() {
    let Some(py) = python_with_torch("torchscript") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = bn_module(&py, d, "{}");

    let garbage = d.join("garbage.pt");
    std::fs::write(&garbage, b"these bytes are not a zip archive").unwrap();
    fails_with(d, "garbage", &garbage, &[], &["garbage.pt", "is not a TorchScript file"]);

    // torch.save of a state_dict, a traced module, one saved by "another torch", a 7-class head.
    let make = format!(
        "import sys, json, zipfile, torch; sys.path.insert(0, '{}')\n\
         from torchscript_ddp import BnTiedNet\n\
         m = BnTiedNet(); torch.save(m.state_dict(), '{d}/state_dict.pt')\n\
         torch.jit.trace(m, torch.randn(2, 1, 28, 28)).save('{d}/traced.pt')\n\
         zin = zipfile.ZipFile('{good}')\n\
         zout = zipfile.ZipFile('{d}/old.pt', 'w')\n\
         for i in zin.infolist():\n    data = zin.read(i.filename)\n    \
         data = json.dumps({{'torch': '2.5.1'}}).encode() if i.filename.endswith('extra/ringtrain.json') else data\n    \
         zout.writestr(i, data)\n\
         zout.close()",
        script("reference").display(),
        d = d.display(),
        good = good.display()
    );
    python(&py, &["-c", &make]).assert_success();
    fails_with(d, "state_dict", &d.join("state_dict.pt"), &[], &["state_dict.pt", "not a TorchScript module"]);
    fails_with(d, "traced", &d.join("traced.pt"), &[], &["traced.pt", "torch.jit.trace", "aten::batch_norm"]);
    fails_with(d, "old", &d.join("old.pt"), &[], &["old.pt", "saved by torch 2.5.1", "libtorch 2.11"]);
    let seven = bn_module(&py, d, "{\"classes\": 7}");
    fails_with(d, "seven", &seven, &[], &["[2, 7]", "10 classes"]);
    fails_with(d, "output", &good, &["--set", "model.output=1"], &["model.output 1 must be 0"]);
    fails_with(d, "missing", &d.join("nope.pt"), &[], &["nope.pt", "cannot be read"]);

    // The export script refuses a module TorchScript cannot compile, in one line, writing nothing.
    let unscriptable = d.join("unscriptable.py");
    std::fs::write(
        &unscriptable,
        "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        \
         self.fc = torch.nn.Linear(4, 2)\n    def forward(self, x, *extra):\n        return self.fc(x)\n",
    )
    .unwrap();
    let s = script("export_torchscript.py");
    let spec = format!("{}:Net", unscriptable.display());
    let out_pt = d.join("unscriptable.pt");
    let o = python(&py, &[s.to_str().unwrap(), &spec, "--input-shape", "2,4", "--out", out_pt.to_str().unwrap()]);
    o.assert_failure();
    let line = o.stderr.lines().find(|l| l.contains("cannot be scripted")).unwrap_or_else(|| panic!("{}", o.report()));
    assert!(line.starts_with("export_torchscript: ") && line.contains("Net"), "{line}");
    assert!(!out_pt.exists());
}

/// A scripted module whose blocks (a ModuleList, with dropout) are named as units: ZeRO-3
/// gathers each block inside the compiled forward, with and without activation checkpointing,
/// and ends with DDP's bits; unit names that do not fit are clear errors.
#[test]
fn scripted_submodules_are_units_for_zero3_and_checkpointing_with_ddps_bits() {
    let Some(py) = python_with_torch("torchscript") else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("unitnet.py");
    std::fs::write(
        &src,
        "import torch\n\
         class Block(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        \
         self.fc = torch.nn.Linear(64, 64)\n        self.drop = torch.nn.Dropout(0.1)\n    \
         def forward(self, x):\n        return self.drop(torch.relu(self.fc(x))) + x\n\
         class UnitNet(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        \
         self.stem = torch.nn.Linear(784, 64)\n        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])\n        \
         self.head = torch.nn.Linear(64, 10)\n    def forward(self, x):\n        h = self.stem(x.flatten(1))\n        \
         for b in self.blocks:\n            h = b(h)\n        return self.head(h)\n",
    )
    .unwrap();
    let module = d.join("unitnet.pt");
    export(&py, &format!("{}:UnitNet", src.display()), &["--input-shape", "2,1,28,28"], &module);
    let units = "[blocks.0, blocks.1, blocks.2]";
    let train = |name: &str, units: &str, sets: &[&str]| {
        let yaml =
            // Small buckets: each block's parameters in buckets of their own, so a unit whose
            // gather were skipped would compute with released parameters.
            job(&module, "ddp: {bucket_cap_mb: 0.01, first_bucket_cap_mb: 0.01}\n")
                .replace(&format!("path: {}}}", module.display()), &format!("path: {}, units: {units}}}", module.display()));
        let cfg = write_config(d, &format!("{name}.yaml"), &yaml);
        let run_dir = d.join(name);
        let mut args = vec![];
        for s in sets {
            args.extend(["--set", s]);
        }
        let mut c = ringrun(2, &cfg, &run_dir, &args);
        c.env("OMP_NUM_THREADS", "1");
        (run(c, Duration::from_secs(180)), run_dir)
    };
    let (out, plain) = train("ddp", "[]", &[]);
    out.assert_success();
    let want = rank_hashes(&plain, 2);
    for checkpointing in [false, true] {
        let name = format!("zero3-{checkpointing}");
        let (out, run_dir) = train(&name, units, &["ddp.shard=params", &format!("train.activation_checkpointing={checkpointing}")]);
        out.assert_success();
        assert!(out.stderr.contains("optimizer sharded (ZeRO-3)"), "{}", out.report());
        assert!(out.stderr.contains("parameter all-gathers"), "{}", out.report());
        assert_eq!(out.stderr.contains("activation checkpointing: "), checkpointing, "{}", out.report());
        assert_eq!(rank_hashes(&run_dir, 2), want, "ZeRO-3 over scripted units, checkpointing {checkpointing}");
    }
    for (name, units, words) in [
        ("missing", "[blocks.7]", "`blocks.7` is not a submodule"),
        ("nested", "[blocks, blocks.0]", "`blocks.0` lies inside `blocks`; units cannot nest"),
        ("twice", "[blocks]", "no forward of the TorchScript module calls `blocks` directly"),
        (
            "none",
            "[]",
            "model torchscript has none (GPT's blocks and ResNet's stages are units, a TorchScript module's are named in model.units)",
        ),
    ] {
        let (out, run_dir) = train(name, units, &["ddp.shard=params"]);
        out.assert_failure();
        assert!(out.stderr.contains(words), "{name}: {}", out.report());
        assert!(!run_dir.join("model.safetensors").exists(), "{name}: weights written");
    }
}
