"""ringtrain's `model: {name: yolo}` and its detection loss in PyTorch, with the same module names,
as the reference for tests/detection.rs and the model of scripts/reference/yolo_ddp.py.

  python yolo_reference.py check WEIGHTS BATCH OUT --width 16 --classes 10 --channels 1 [--no-spp] [--no-fpn] [--no-pan]

Builds Yolo(...), loads WEIGHTS (ringtrain's model.safetensors) with load_state_dict(strict=True),
reads BATCH (safetensors: `x` [B, C, H, W] and `target` [B, M, 5] rows (class, x1, y1, x2, y2),
class -1 for padding) and writes OUT (safetensors): the eval-mode output `eval`, then in training
mode the output `train` and the loss `loss` with its parts `giou`, `objectness`, `classes`, and
bn's running statistics of the stem. The box loss is torchvision's generalized_box_iou_loss.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.ops import generalized_box_iou_loss

STRIDES = (8, 16, 32)
PRIOR = 0.01
RADIUS = 1.0
BOX_WEIGHT = 5.0
MAX_LOG_SIZE = 10.0


class Conv(nn.Module):
    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class Backbone(nn.Module):
    def __init__(self, c, w):
        super().__init__()
        self.stem = Conv(c, w, 3, 2)
        self.dark2 = nn.Sequential(Conv(w, 2 * w, 3, 2), Conv(2 * w, 2 * w, 3, 1))
        self.dark3 = nn.Sequential(Conv(2 * w, 4 * w, 3, 2), Conv(4 * w, 4 * w, 3, 1))
        self.dark4 = nn.Sequential(Conv(4 * w, 8 * w, 3, 2), Conv(8 * w, 8 * w, 3, 1))
        self.dark5 = nn.Sequential(Conv(8 * w, 16 * w, 3, 2), Conv(16 * w, 16 * w, 3, 1))

    def forward(self, x):
        x = self.dark2(self.stem(x))
        c3 = self.dark3(x)
        c4 = self.dark4(c3)
        return c3, c4, self.dark5(c4)


class SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1 = Conv(c, c // 2, 1, 1)
        self.cv2 = Conv(c // 2 * 4, c, 1, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


def up(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class Neck(nn.Module):
    def __init__(self, w, pan):
        super().__init__()
        self.lat5 = Conv(16 * w, 8 * w, 1, 1)
        self.td4 = Conv(16 * w, 8 * w, 3, 1)
        self.lat4 = Conv(8 * w, 4 * w, 1, 1)
        self.td3 = Conv(8 * w, 4 * w, 3, 1)
        self.pan = pan
        if pan:
            self.down3 = Conv(4 * w, 4 * w, 3, 2)
            self.bu4 = Conv(8 * w, 8 * w, 3, 1)
            self.down4 = Conv(8 * w, 8 * w, 3, 2)
            self.bu5 = Conv(16 * w, 16 * w, 3, 1)

    def forward(self, c3, c4, c5):
        l5 = self.lat5(c5)
        t4 = self.td4(torch.cat([up(l5), c4], 1))
        l4 = self.lat4(t4)
        p3 = self.td3(torch.cat([up(l4), c3], 1))
        if not self.pan:
            return p3, t4, c5
        p4 = self.bu4(torch.cat([self.down3(p3), l4], 1))
        return p3, p4, self.bu5(torch.cat([self.down4(p4), l5], 1))


class Head(nn.Module):
    def __init__(self, c, h, classes):
        super().__init__()
        self.stem = Conv(c, h, 1, 1)
        self.cls = Conv(h, h, 3, 1)
        self.cls_pred = nn.Conv2d(h, classes, 1)
        self.reg = Conv(h, h, 3, 1)
        self.reg_pred = nn.Conv2d(h, 5, 1)
        prior = -math.log((1 - PRIOR) / PRIOR)
        nn.init.constant_(self.cls_pred.bias, prior)
        with torch.no_grad():
            self.reg_pred.bias[4] = prior

    def forward(self, x):
        x = self.stem(x)
        out = torch.cat([self.reg_pred(self.reg(x)), self.cls_pred(self.cls(x))], 1)
        return out.flatten(2)


def anchor_points(h, w):
    rows = []
    for s in STRIDES:
        ys = (torch.arange(h // s, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w // s, dtype=torch.float32) + 0.5) * s
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        rows.append(torch.stack([x.reshape(-1), y.reshape(-1), torch.full((x.numel(),), float(s))], 1))
    return torch.cat(rows, 0)


class Yolo(nn.Module):
    def __init__(self, channels, classes, width=16, spp=True, fpn=True, pan=True):
        super().__init__()
        w = width
        self.backbone = Backbone(channels, w)
        self.spp = SPPF(16 * w) if spp else None
        self.neck = Neck(w, pan) if fpn else None
        self.head = nn.ModuleList([Head(c, 4 * w, classes) for c in (4 * w, 8 * w, 16 * w)])

    def forward(self, x):
        c3, c4, c5 = self.backbone(x)
        if self.spp is not None:
            c5 = self.spp(c5)
        levels = self.neck(c3, c4, c5) if self.neck is not None else (c3, c4, c5)
        raw = torch.cat([h(l) for h, l in zip(self.head, levels)], 2).permute(0, 2, 1).float()
        p = anchor_points(x.shape[2], x.shape[3]).to(x.device)
        centre = p[:, :2] + raw[..., :2] * p[:, 2:]
        half = raw[..., 2:4].clamp(max=MAX_LOG_SIZE).exp() * p[:, 2:] * 0.5
        return torch.cat([centre - half, centre + half, raw[..., 4:]], 2)


def assign(points, targets):
    """For every (image, point): the index of the target row it takes, and whether it takes one."""
    b, n = targets.shape[0], points.shape[0]
    if targets.shape[1] == 0:
        return torch.zeros(b, n, dtype=torch.long), torch.zeros(b, n, dtype=torch.bool)
    x1, y1, x2, y2 = targets[..., 1], targets[..., 2], targets[..., 3], targets[..., 4]
    valid = (targets[..., 0] >= 0)[:, None, :]
    w, h = x2 - x1, y2 - y1
    cx, cy = ((x1 + x2) * 0.5)[:, None, :], ((y1 + y2) * 0.5)[:, None, :]
    size, area = torch.maximum(w, h)[:, None, :], (w * h)[:, None, :]
    px, py, ps = (points[:, i].view(1, n, 1) for i in range(3))
    lo = torch.where(ps == ps.min(), torch.zeros_like(ps), ps * 1.5)
    hi = torch.where(ps == ps.max(), torch.full_like(ps, math.inf), ps * 5.0)
    near = ((px - cx).abs() < ps * RADIUS) & ((py - cy).abs() < ps * RADIUS)
    claims = near & (size >= lo) & (size < hi) & valid
    cost = torch.where(claims, area.expand(b, n, -1), torch.full_like(claims, math.inf, dtype=torch.float32))
    return cost.min(2).indices, claims.any(2)


def detection_loss(out, points, targets):
    """(total, giou, objectness, classes), each summed and divided by the assigned points."""
    classes = out.shape[2] - 5
    if targets.shape[1] == 0:  # no image has a box: one padding row each
        targets = torch.cat([torch.full((out.shape[0], 1, 1), -1.0), torch.zeros(out.shape[0], 1, 4)], 2)
    with torch.no_grad():
        best, positive = assign(points, targets)
    count = positive.sum().float().clamp(min=1)
    assigned = torch.gather(targets, 1, best[..., None].expand(-1, -1, 5))[positive]
    giou = generalized_box_iou_loss(out[..., :4][positive], assigned[:, 1:5], reduction="sum")
    objectness = F.binary_cross_entropy_with_logits(out[..., 4], positive.float(), reduction="sum")
    wanted = F.one_hot(assigned[:, 0].long(), classes).float()
    cls = F.binary_cross_entropy_with_logits(out[..., 5:][positive], wanted, reduction="sum")
    giou, objectness, cls = giou / count, objectness / count, cls / count
    return BOX_WEIGHT * giou + objectness + cls, giou, objectness, cls


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["check"])
    p.add_argument("weights")
    p.add_argument("batch")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--no-spp", action="store_true")
    p.add_argument("--no-fpn", action="store_true")
    p.add_argument("--no-pan", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    m = Yolo(a.channels, a.classes, a.width, not a.no_spp, not a.no_fpn, not a.no_pan)
    m.load_state_dict(load_file(a.weights), strict=True)
    batch = load_file(a.batch)
    x, target = batch["x"], batch["target"]
    points = anchor_points(x.shape[2], x.shape[3])
    m.eval()
    with torch.no_grad():
        ev = m(x)
    m.train()
    tr = m(x)
    loss, giou, obj, cls = detection_loss(tr, points, target)
    save_file({"eval": ev, "train": tr.detach().contiguous(), "loss": loss.detach(), "giou": giou.detach(), "objectness": obj.detach(),
               "classes": cls.detach(), "stem.running_mean": m.backbone.stem.bn.running_mean,
               "stem.running_var": m.backbone.stem.bn.running_var}, a.out)
    print("ok", len(m.state_dict()))


if __name__ == "__main__":
    main()
