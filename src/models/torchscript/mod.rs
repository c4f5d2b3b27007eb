//! `model.name: torchscript`: a module scripted in PyTorch (`torch.jit.script`, saved with
//! `torch.jit.save`; `scripts/export_torchscript.py` does both and checks the result), trained like
//! a built-in model. The C++ shim beside this file owns the `torch::jit::Module`; here its
//! parameters and buffers become the model seam's named tensors (sharing the module's storage, so
//! the optimizer's in-place steps are the module's), a tied weight listed once.

use super::{Inputs, Model, ModelKind, ModelSpec, Units};

mod units;
use crate::data::{DataConfig, Samples};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use tch::{Device, TchError, Tensor};

pub const KIND: ModelKind = ModelKind::of::<TorchScriptSpec>("torchscript");

/// `model: {name: torchscript, path: …}`: trained from the weights saved with it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TorchScriptSpec {
    /// The saved module (`torch.jit.save`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Where forward returns a tuple (nanoGPT's `(logits, loss)`), the index of the logits in it.
    #[serde(default)]
    pub output: usize,
    /// On token data: the context length the module takes (training windows are this long).
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Accepted only as false: a scripted module's BatchNorm layers run inside its compiled
    /// forward, which cannot call ringtrain's SyncBatchNorm (the key is here to say so clearly).
    #[serde(default)]
    pub sync_batchnorm: bool,
    /// Its units (ZeRO-3's gathers, activation checkpointing): submodules by their path
    /// (`blocks.0`, `layer1`), each called once per forward with one tensor in and one out.
    #[serde(default)]
    pub units: Vec<String>,
}

impl ModelSpec for TorchScriptSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.path.is_none() {
            return Err("model torchscript needs model.path: the module saved by torch.jit.save".into());
        }
        if self.sync_batchnorm {
            return Err("model.sync_batchnorm: a TorchScript module's BatchNorm runs inside its compiled forward and cannot be \
                        replaced by SyncBatchNorm; the built-in resnet18/34/50 and simclr have it"
                .into());
        }
        match (data.samples(), self.block_size) {
            (Samples::Tokens, None) => Err("model torchscript on token data needs model.block_size: the context length it takes".into()),
            (Samples::Tokens, Some(0)) => Err("model.block_size must be at least 1".into()),
            (Samples::Labelled, Some(_)) => Err("model.block_size applies to token data only".into()),
            _ => Ok(()),
        }
    }

    fn build(&self, _inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        let path = self.path.as_deref().ok_or_else(|| TchError::Torch("model torchscript needs model.path".into()))?;
        let mut m = TorchScript::load(path, self.output, device)?;
        if !self.units.is_empty() {
            // Rewritten before anything runs: the first forward caches its optimised graph.
            // SAFETY: a live module handle; the registration is dropped before the module.
            let module = unsafe { ringtrain_ts_module(m.handle) };
            m.units = Some(units::TsUnits::register(module, &self.units, Units::default()).map_err(|e| err(path, e))?);
            m.unit_names = self.units.clone();
        }
        Ok(Box::new(m))
    }

    fn context_length(&self) -> Option<usize> {
        self.block_size
    }
}

extern "C" {
    fn ringtrain_ts_libtorch_version(out: *mut c_char, len: usize);
    fn ringtrain_ts_load(
        path: *const c_char,
        cuda_index: c_int,
        extra: *mut c_char,
        extra_len: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn ringtrain_ts_free(h: *mut c_void);
    fn ringtrain_ts_module(h: *mut c_void) -> *mut c_void;
    fn ringtrain_ts_named(
        h: *mut c_void,
        buffers: c_int,
        f: extern "C" fn(*mut c_void, *const c_char, *mut c_void),
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn ringtrain_ts_train(h: *mut c_void, on: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn ringtrain_ts_forward(h: *mut c_void, input: *mut c_void, output: c_int, err: *mut c_char, err_len: usize) -> *mut c_void;
    fn ringtrain_ts_baked_mode_ops(h: *mut c_void, out: *mut c_char, len: usize) -> c_int;
}

/// A buffer for a message from the shim.
struct Text(Vec<u8>);

impl Text {
    fn new(len: usize) -> Text {
        Text(vec![0; len])
    }
    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr() as *mut c_char
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end]).trim().to_string()
    }
}

/// The libtorch this program runs on, e.g. "2.11.0".
pub fn libtorch_version() -> String {
    let mut v = Text::new(64);
    // SAFETY: the shim writes at most len bytes, NUL-terminated.
    unsafe { ringtrain_ts_libtorch_version(v.ptr(), v.len()) };
    v.get()
}

/// What `scripts/export_torchscript.py` records in the archive (`extra/ringtrain.json`).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ExportInfo {
    /// The torch version that scripted and saved the module, e.g. "2.11.0+cpu".
    #[serde(default)]
    pub torch: String,
}

/// A loaded TorchScript module. Not shared between threads: the loop drives it from one thread.
pub struct TorchScript {
    handle: *mut c_void,
    path: PathBuf,
    output: usize,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    tied: Vec<(String, String)>,
    /// The mode last set, so forward switches only when it changes.
    train: Cell<Option<bool>>,
    /// `model.units`, and once set, how they run.
    unit_names: Vec<String>,
    units: Option<units::TsUnits>,
}

fn err(path: &Path, what: impl std::fmt::Display) -> TchError {
    TchError::Torch(format!("model.path {}: {what}", path.display()))
}

extern "C" fn collect(ctx: *mut c_void, name: *const c_char, tensor: *mut c_void) {
    // SAFETY: ctx is the Vec passed to ringtrain_ts_named for this call; name is a NUL-terminated
    // string and tensor a new heap torch::Tensor whose ownership passes to the tch Tensor.
    let out = unsafe { &mut *(ctx as *mut Vec<(String, Tensor)>) };
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    out.push((name, unsafe { Tensor::from_ptr(tensor.cast()) }));
}

/// Two names of one tensor (same storage, offset, shape and strides): tied.
fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    // Empty tensors may all have a null data pointer; they share nothing.
    a.numel() > 0 && a.data_ptr() == b.data_ptr() && a.size() == b.size() && a.stride() == b.stride()
}

impl TorchScript {
    /// Loads `path` onto `device`. `output`: which element of a tuple output is the logits.
    /// Errors name the file and say what is wrong: not TorchScript, saved by another torch,
    /// traced (train/eval behaviour baked in).
    pub fn load(path: &Path, output: usize, device: Device) -> Result<TorchScript, TchError> {
        let meta = std::fs::metadata(path).map_err(|e| err(path, format!("cannot be read: {e}")))?;
        if !meta.is_file() {
            return Err(err(path, "is not a file"));
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| err(path, "the path holds a NUL byte"))?;
        let cuda_index = match device {
            Device::Cpu => -1,
            Device::Cuda(i) => i as c_int,
            other => return Err(err(path, format!("TorchScript modules train on cpu or cuda, not {other:?}"))),
        };
        let (mut extra, mut msg) = (Text::new(4096), Text::new(4096));
        // SAFETY: a NUL-terminated path and two buffers with their lengths.
        let handle = unsafe { ringtrain_ts_load(c_path.as_ptr(), cuda_index, extra.ptr(), extra.len(), msg.ptr(), msg.len()) };
        if handle.is_null() {
            return Err(err(path, load_failure(&msg.get())));
        }
        let mut m = TorchScript {
            handle,
            path: path.to_path_buf(),
            output,
            params: vec![],
            buffers: vec![],
            tied: vec![],
            train: Cell::new(None),
            unit_names: vec![],
            units: None,
        };
        m.check_version(&extra.get())?;
        m.check_not_traced()?;
        let params = m.named(false)?;
        let buffers = m.named(true)?;
        let (mut trainable, mut frozen) = (vec![], vec![]);
        for (name, t) in params {
            if let Some((source, _)) = trainable.iter().chain(&frozen).find(|(_, s): &&(String, Tensor)| same_tensor(s, &t)) {
                m.tied.push((name, source.clone()));
            } else if t.requires_grad() {
                trainable.push((name, t));
            } else {
                // requires_grad=False parameters are not trained (DDP skips them too) but are
                // state: broadcast and checkpointed with the buffers.
                frozen.push((name, t));
            }
        }
        m.params = trainable;
        m.buffers = frozen;
        for (name, t) in buffers {
            if !m.params.iter().chain(&m.buffers).any(|(_, s)| same_tensor(s, &t)) {
                m.buffers.push((name, t));
            }
        }
        if m.params.is_empty() {
            return Err(err(path, "the module has no trainable parameters"));
        }
        Ok(m)
    }

    fn check_version(&self, extra: &str) -> Result<(), TchError> {
        let ours = libtorch_version();
        if extra.is_empty() {
            tracing::warn!(
                "model.path {}: no torch version recorded (not saved by scripts/export_torchscript.py); \
                 loading it with libtorch {ours}",
                self.path.display()
            );
            return Ok(());
        }
        let info: ExportInfo =
            serde_json::from_str(extra).map_err(|e| err(&self.path, format!("extra/ringtrain.json is not valid JSON: {e}")))?;
        let major_minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
        if major_minor(&info.torch) != major_minor(&ours) {
            return Err(err(
                &self.path,
                format!(
                    "saved by torch {}, but ringtrain runs libtorch {ours}: export it again with torch {} \
                     (scripts/export_torchscript.py)",
                    info.torch,
                    major_minor(&ours)
                ),
            ));
        }
        Ok(())
    }

    fn check_not_traced(&self) -> Result<(), TchError> {
        let mut names = Text::new(4096);
        // SAFETY: a live module handle and a buffer with its length.
        let n = unsafe { ringtrain_ts_baked_mode_ops(self.handle, names.ptr(), names.len()) };
        match n {
            -1 => Err(err(&self.path, format!("its forward graph cannot be read: {}", names.get()))),
            0 => Ok(()),
            n => Err(err(
                &self.path,
                format!(
                    "{n} op(s) with train/eval behaviour fixed at export ({}): the module was traced \
                     (torch.jit.trace), so BatchNorm/Dropout would ignore evaluation mode; script it with \
                     torch.jit.script (scripts/export_torchscript.py)",
                    names.get()
                ),
            )),
        }
    }

    fn named(&self, buffers: bool) -> Result<Vec<(String, Tensor)>, TchError> {
        let mut out: Vec<(String, Tensor)> = vec![];
        let mut msg = Text::new(4096);
        let ctx = &mut out as *mut Vec<(String, Tensor)> as *mut c_void;
        // SAFETY: `collect` receives `ctx`, the Vec above, alive for the call.
        let rc = unsafe { ringtrain_ts_named(self.handle, buffers as c_int, collect, ctx, msg.ptr(), msg.len()) };
        if rc != 0 {
            return Err(err(&self.path, format!("listing its tensors failed: {}", msg.get())));
        }
        Ok(out)
    }

    fn set_mode(&self, train: bool) -> Result<(), TchError> {
        if self.train.get() == Some(train) {
            return Ok(());
        }
        let mut msg = Text::new(1024);
        // SAFETY: a live module handle and a buffer with its length.
        if unsafe { ringtrain_ts_train(self.handle, train as c_int, msg.ptr(), msg.len()) } != 0 {
            return Err(err(&self.path, format!("setting train({train}) failed: {}", msg.get())));
        }
        self.train.set(Some(train));
        Ok(())
    }
}

/// libtorch's load error in words, with a hint for the common cases.
fn load_failure(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or("").trim();
    // libtorch appends a paragraph about corrupted checkpoints to every archive error.
    let first = first.split(" This is an internal miniz error").next().unwrap_or(first);
    if msg.contains("constants.pkl") || msg.contains("code/") {
        format!(
            "is not a TorchScript module: it holds no TorchScript code (a torch.save file? export the module with \
             scripts/export_torchscript.py; weights alone go in model.init_from as safetensors) ({first})"
        )
    } else if msg.contains("zip archive") || msg.contains("central directory") {
        format!("is not a TorchScript file, not a torch.jit.save archive ({first})")
    } else {
        format!("cannot be loaded as TorchScript: {first}")
    }
}

impl TorchScript {
    /// The module's own forward (its units run through `units` from inside it).
    fn compiled_forward(&self, input: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.set_mode(train)?;
        let mut input = input.shallow_clone();
        let mut msg = Text::new(4096);
        // SAFETY: a live module handle and tch tensor handle; the result is a new heap tensor
        // whose ownership passes to the returned Tensor.
        let out =
            unsafe { ringtrain_ts_forward(self.handle, input.as_mut_ptr() as *mut c_void, self.output as c_int, msg.ptr(), msg.len()) };
        if out.is_null() {
            return Err(err(&self.path, format!("forward failed: {}", msg.get())));
        }
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }
}

impl Drop for TorchScript {
    fn drop(&mut self) {
        // The units' registration names the module: gone first.
        self.units = None;
        // SAFETY: the handle came from ringtrain_ts_load and is freed once; the tensors handed
        // out are separate refcounted handles that keep their storage alive.
        unsafe { ringtrain_ts_free(self.handle) }
    }
}

impl Model for TorchScript {
    fn forward_t(&self, input: &Tensor, train: bool) -> Result<Tensor, TchError> {
        // With units the whole forward is a root segment (the root entered again after each unit).
        let hooks = self.units.as_ref().and_then(|u| u.units().hooks);
        if let Some(h) = &hooks {
            h.before("")?;
        }
        let y = self.compiled_forward(input, train)?;
        match &hooks {
            Some(h) => h.after("", y),
            None => Ok(y),
        }
    }

    fn unit_names(&self) -> Vec<String> {
        self.unit_names.clone()
    }

    fn set_units(&mut self, units: Units) -> Result<(), String> {
        match &self.units {
            Some(u) => {
                u.set(units);
                Ok(())
            }
            None => Err("model torchscript has no units: name its submodules in model.units (e.g. [blocks.0, blocks.1])".into()),
        }
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    fn tied(&self) -> Vec<(String, String)> {
        self.tied.clone()
    }
}
