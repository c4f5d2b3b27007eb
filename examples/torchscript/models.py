"""Modules to export for ringtrain's `model.name: torchscript` (see the README's "Models from
PyTorch"): scripts/export_torchscript.py examples/torchscript/models.py:NAME ...
"""
import torch.nn as nn
import torchvision


def resnet18_small(num_classes: int = 10, in_channels: int = 1):
    """torchvision's resnet18 with the small-image stem used for CIFAR and 28x28 images: a 3x3
    stride-1 conv1 and no max-pool (torchvision's names and initialisation otherwise)."""
    m = torchvision.models.resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
    m.maxpool = nn.Identity()
    return m
