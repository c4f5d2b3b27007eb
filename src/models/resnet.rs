//! ResNet-18/34/50 as torchvision's `resnet.py` builds them: the same module names (`conv1`,
//! `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0/1`, `fc`, BatchNorm's `running_mean`,
//! `running_var`, `num_batches_tracked`), so a checkpoint loads into
//! `torchvision.models.resnet18(num_classes=…)` strictly, and its initialisation: convolutions
//! kaiming-normal (fan_out, ReLU gain), BatchNorm weight 1 and bias 0, `fc` as PyTorch's Linear.
//! `small_stem`: the CIFAR variant (3×3 stride-1 `conv1`, no max-pool), for 28–32 px images.

use super::batchnorm::BatchNorm;
use super::{needs_labelled, Inputs, Model, ModelKind, ModelSpec};
use crate::data::DataConfig;
use crate::registry;
use crate::units::Units;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, TchError, Tensor};

pub const RESNET18: ModelKind = ModelKind { name: "resnet18", parse: |keys| parse(keys, Depth::R18) };
pub const RESNET34: ModelKind = ModelKind { name: "resnet34", parse: |keys| parse(keys, Depth::R34) };
pub const RESNET50: ModelKind = ModelKind { name: "resnet50", parse: |keys| parse(keys, Depth::R50) };

/// `model: {name: resnet18, small_stem: true}`; the depth is in the name.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetSpec {
    #[serde(skip)]
    pub depth: Depth,
    /// The small-image stem used for CIFAR (3×3 stride-1 `conv1`, no max-pool) instead of
    /// ImageNet's (7×7 stride-2 `conv1`, 3×3 max-pool).
    #[serde(default)]
    pub small_stem: bool,
    /// Channels of the first stage (torchvision: 64); each stage doubles them. Narrower
    /// networks keep torchvision's layout and names, for small images on few cores.
    #[serde(default = "default_width")]
    pub width: i64,
    /// Every BatchNorm normalises with the statistics of all ranks' batches (SyncBatchNorm,
    /// as `nn.SyncBatchNorm.convert_sync_batchnorm`); the checkpoint's names stay torchvision's.
    #[serde(default)]
    pub sync_batchnorm: bool,
}

fn default_width() -> i64 {
    64
}

fn parse(keys: serde_yaml::Mapping, depth: Depth) -> Result<Box<dyn ModelSpec>, String> {
    Ok(Box::new(ResNetSpec { depth, ..registry::parse(keys)? }))
}

impl ModelSpec for ResNetSpec {
    fn validate(&self, data: &DataConfig) -> Result<(), String> {
        if self.width < 1 {
            return Err(format!("model.width: {} channels; at least 1", self.width));
        }
        needs_labelled("resnet", data)
    }

    fn build(&self, inputs: &Inputs, device: Device) -> Result<Box<dyn Model>, TchError> {
        Ok(Box::new(ResNet::with(&self.options(inputs)?, device)?))
    }
}

impl ResNetSpec {
    /// The network these keys describe for the data's images, with `classes` outputs.
    pub fn options(&self, inputs: &Inputs) -> Result<ResNetOptions, TchError> {
        let [channels, _, _] = inputs.sample_shape else {
            return Err(TchError::Torch(format!(
                "model resnet needs images (channels, height, width); the data's samples have shape {:?}",
                inputs.sample_shape
            )));
        };
        let sync = sync_group(self.sync_batchnorm, inputs)?;
        Ok(ResNetOptions {
            depth: self.depth,
            in_channels: *channels,
            classes: inputs.classes as i64,
            small_stem: self.small_stem,
            width: self.width,
            sync,
        })
    }
}

/// The group SyncBatchNorm normalises over when `sync_batchnorm` is on (`model.sync_batchnorm`).
pub fn sync_group(sync_batchnorm: bool, inputs: &Inputs) -> Result<Option<crate::comm::CommHandle>, TchError> {
    match (sync_batchnorm, inputs.comm) {
        (false, _) => Ok(None),
        (true, Some(c)) => Ok(Some(c.clone())),
        (true, None) => Err(TchError::Torch("model.sync_batchnorm needs a process group (run it under ringtrain)".into())),
    }
}

/// How a ResNet is built.
#[derive(Clone)]
pub struct ResNetOptions {
    pub depth: Depth,
    pub in_channels: i64,
    /// Outputs of `fc`; 0: no `fc`, the output is the pooled features (torchvision's
    /// `fc = nn.Identity()`, as an encoder).
    pub classes: i64,
    pub small_stem: bool,
    pub width: i64,
    /// SyncBatchNorm over this group's ranks instead of BatchNorm.
    pub sync: Option<crate::comm::CommHandle>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Depth {
    #[default]
    R18,
    R34,
    R50,
}

impl Depth {
    /// Blocks per stage and whether they are bottlenecks (expansion 4).
    fn layout(self) -> ([usize; 4], bool) {
        match self {
            Depth::R18 => ([2, 2, 2, 2], false),
            Depth::R34 => ([3, 4, 6, 3], false),
            Depth::R50 => ([3, 4, 6, 3], true),
        }
    }
}

struct Conv {
    weight: Tensor,
    stride: i64,
    padding: i64,
}

impl Clone for Conv {
    fn clone(&self) -> Conv {
        Conv { weight: self.weight.shallow_clone(), stride: self.stride, padding: self.padding }
    }
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.weight, None::<&Tensor>, [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }
}

#[derive(Clone)]
struct Block {
    /// (conv, bn) pairs: two in a basic block, three in a bottleneck.
    layers: Vec<(Conv, BatchNorm)>,
    downsample: Option<(Conv, BatchNorm)>,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut out = x.shallow_clone();
        let last = self.layers.len() - 1;
        for (i, (conv, bn)) in self.layers.iter().enumerate() {
            out = bn.forward(&conv.forward(&out)?, train)?;
            if i < last {
                out = out.f_relu()?;
            }
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
            None => x.shallow_clone(),
        };
        (out + identity).f_relu()
    }
}

pub struct ResNet {
    conv1: Conv,
    bn1: BatchNorm,
    max_pool: bool,
    stages: Vec<Vec<Block>>,
    /// None: the output is the pooled features.
    fc: Option<(Tensor, Tensor)>,
    /// Width of the pooled features (`fc`'s input).
    features: i64,
    sync: Option<crate::comm::CommHandle>,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    /// How stages and the root's segments run (checkpointed, ZeRO-3's gathers).
    units: Units,
}

/// Registers parameters and buffers in torchvision's `state_dict` order while building.
struct Builder {
    device: Device,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    sync: Option<crate::comm::CommHandle>,
}

impl Builder {
    fn param(&mut self, name: String, t: Tensor) -> Result<Tensor, TchError> {
        let t = t.f_to_device(self.device)?.f_set_requires_grad(true)?;
        self.params.push((name, t.shallow_clone()));
        Ok(t)
    }

    /// kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / (out·k·k)), drawn on the
    /// CPU so every device starts from the same values.
    fn conv(&mut self, name: &str, cin: i64, cout: i64, k: i64, stride: i64) -> Result<Conv, TchError> {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let w = Tensor::f_randn([cout, cin, k, k], (Kind::Float, Device::Cpu))?.f_mul_scalar(std)?;
        Ok(Conv { weight: self.param(format!("{name}.weight"), w)?, stride, padding: k / 2 })
    }

    fn bn(&mut self, name: &str, c: i64) -> Result<BatchNorm, TchError> {
        BatchNorm::new(name, c, self.device, self.sync.clone(), &mut self.params, &mut self.buffers)
    }
}

impl ResNet {
    /// torchvision's network: width 64, BatchNorm.
    pub fn new(depth: Depth, in_channels: i64, classes: i64, small_stem: bool, device: Device) -> Result<ResNet, TchError> {
        ResNet::with(&ResNetOptions { depth, in_channels, classes, small_stem, width: 64, sync: None }, device)
    }

    pub fn with(o: &ResNetOptions, device: Device) -> Result<ResNet, TchError> {
        let (depth, in_channels, classes, small_stem, w) = (o.depth, o.in_channels, o.classes, o.small_stem, o.width);
        let (blocks, bottleneck) = depth.layout();
        let expansion = if bottleneck { 4 } else { 1 };
        let mut b = Builder { device, params: vec![], buffers: vec![], sync: o.sync.clone() };
        let conv1 = if small_stem { b.conv("conv1", in_channels, w, 3, 1)? } else { b.conv("conv1", in_channels, w, 7, 2)? };
        let bn1 = b.bn("bn1", w)?;
        let mut inplanes = w;
        let mut stages = vec![];
        for (s, &n) in blocks.iter().enumerate() {
            let planes = w << s;
            let mut stage = vec![];
            for i in 0..n {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let name = format!("layer{}.{i}", s + 1);
                // torchvision registers conv1, bn1, conv2, bn2(, conv3, bn3), then downsample.
                let mut layers = vec![];
                if bottleneck {
                    layers.push((b.conv(&format!("{name}.conv1"), inplanes, planes, 1, 1)?, b.bn(&format!("{name}.bn1"), planes)?));
                    layers.push((b.conv(&format!("{name}.conv2"), planes, planes, 3, stride)?, b.bn(&format!("{name}.bn2"), planes)?));
                    layers.push((b.conv(&format!("{name}.conv3"), planes, planes * 4, 1, 1)?, b.bn(&format!("{name}.bn3"), planes * 4)?));
                } else {
                    layers.push((b.conv(&format!("{name}.conv1"), inplanes, planes, 3, stride)?, b.bn(&format!("{name}.bn1"), planes)?));
                    layers.push((b.conv(&format!("{name}.conv2"), planes, planes, 3, 1)?, b.bn(&format!("{name}.bn2"), planes)?));
                }
                let downsample = if stride != 1 || inplanes != planes * expansion {
                    Some((
                        b.conv(&format!("{name}.downsample.0"), inplanes, planes * expansion, 1, stride)?,
                        b.bn(&format!("{name}.downsample.1"), planes * expansion)?,
                    ))
                } else {
                    None
                };
                stage.push(Block { layers, downsample });
                inplanes = planes * expansion;
            }
            stages.push(stage);
        }
        // nn.Linear's default: weight and bias U(±1/√fan_in).
        let fan_in = 8 * w * expansion;
        let fc = if classes > 0 {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let w = Tensor::f_empty([classes, fan_in], (Kind::Float, Device::Cpu))?.f_uniform_(-bound, bound)?;
            let bias = Tensor::f_empty([classes], (Kind::Float, Device::Cpu))?.f_uniform_(-bound, bound)?;
            Some((b.param("fc.weight".into(), w)?, b.param("fc.bias".into(), bias)?))
        } else {
            None
        };
        Ok(ResNet {
            conv1,
            bn1,
            max_pool: !small_stem,
            stages,
            fc,
            features: fan_in,
            sync: b.sync,
            params: b.params,
            buffers: b.buffers,
            units: Units::default(),
        })
    }
}

impl ResNet {
    /// Width of the pooled features: the output when built without `fc`.
    pub fn feature_width(&self) -> i64 {
        self.features
    }

    /// The group its SyncBatchNorm layers normalise over, if they do.
    pub fn sync(&self) -> Option<&crate::comm::CommHandle> {
        self.sync.as_ref()
    }
}

impl Model for ResNet {
    fn forward_t(&self, input: &Tensor, train: bool) -> Result<Tensor, TchError> {
        // The root's first segment: the stem.
        let (conv1, bn1, max_pool) = (self.conv1.clone(), self.bn1.clone(), self.max_pool);
        let stem = Box::new(move |input: &Tensor| {
            let x = bn1.forward(&conv1.forward(input)?, train)?.f_relu()?;
            if max_pool {
                x.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
            } else {
                Ok(x)
            }
        });
        let mut x = self.units.run("", input, stem)?;
        for (i, stage) in self.stages.iter().enumerate() {
            let blocks = stage.clone();
            let run = Box::new(move |x: &Tensor| blocks.iter().try_fold(x.shallow_clone(), |x, b| b.forward(&x, train)));
            x = self.units.run(&format!("layer{}", i + 1), &x, run)?;
        }
        // The root's second: pooling and the classifier.
        let fc = self.fc.as_ref().map(|(w, b)| (w.shallow_clone(), b.shallow_clone()));
        let head = Box::new(move |x: &Tensor| {
            let x = x.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
            match &fc {
                Some((w, b)) => x.f_linear(w, Some(b)),
                None => Ok(x),
            }
        });
        self.units.run("", &x, head)
    }

    fn unit_names(&self) -> Vec<String> {
        (1..=self.stages.len()).map(|i| format!("layer{i}")).collect()
    }

    fn set_units(&mut self, units: Units) -> Result<(), String> {
        if units.checkpoint && self.sync.is_some() {
            // Recomputing would run SyncBatchNorm's collectives a second time inside backward.
            return Err("train.activation_checkpointing cannot be combined with model.sync_batchnorm: recomputing a stage would run its SyncBatchNorm collectives a second time, inside backward".into());
        }
        self.units = units;
        Ok(())
    }

    fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// Forward + backward FLOPs per image are about 3× the forward multiply-adds × 2; left to
    /// the image throughput figures instead (no token count).
    fn flops_per_token(&self) -> Option<f64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_names_and_sizes() {
        let m = ResNet::new(Depth::R18, 3, 10, false, Device::Cpu).unwrap();
        let n: usize = m.params.iter().map(|(_, p)| p.numel()).sum();
        assert_eq!(n, 11_181_642, "torchvision's resnet18(num_classes=10)");
        assert_eq!(m.params.len(), 62);
        assert_eq!(m.buffers.len(), 60);
        let names: Vec<&str> = m.params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(&names[..4], &["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight"]);
        assert!(names.contains(&"layer2.0.downsample.0.weight") && names.contains(&"layer2.0.downsample.1.bias"));
        assert!(!names.contains(&"layer1.0.downsample.0.weight"));
        let m50 = ResNet::new(Depth::R50, 3, 1000, false, Device::Cpu).unwrap();
        assert_eq!(m50.params.iter().map(|(_, p)| p.numel()).sum::<usize>(), 25_557_032, "torchvision's resnet50");
        let m34 = ResNet::new(Depth::R34, 3, 1000, false, Device::Cpu).unwrap();
        assert_eq!(m34.params.iter().map(|(_, p)| p.numel()).sum::<usize>(), 21_797_672, "torchvision's resnet34");
    }

    #[test]
    fn batchnorm_updates_its_statistics_in_training_only() {
        let m = ResNet::new(Depth::R18, 1, 10, true, Device::Cpu).unwrap();
        let x = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
        let before = m.buffers[0].1.copy();
        let y = m.forward_t(&x, false).unwrap();
        assert_eq!(y.size(), [4, 10]);
        assert!(m.buffers[0].1.equal(&before), "eval mode changed running_mean");
        let _ = m.forward_t(&x, true).unwrap();
        assert!(!m.buffers[0].1.equal(&before), "train mode left running_mean");
        assert_eq!(m.buffers[2].0, "bn1.num_batches_tracked");
        assert_eq!(m.buffers[2].1.int64_value(&[]), 1);
    }
}
