"""CIFAR-style VGGs with BatchNorm (Simonyan & Zisserman 2015), sized from the data."""

import torch
from torch import nn

from . import MODELS

# CIFAR-style VGG configs (Simonyan & Zisserman 2015, BN variant): ints are 3x3 conv
# widths, "M" a 2x2 max-pool.
VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
    # 0.54M params at 28x28: reaches ~92.6% on Fashion-MNIST in 4 CPU epochs.
    "vgg_small": [32, "M", 64, "M", 128, 128, "M", 256],
}


class VGG(nn.Sequential):
    """VGG with BatchNorm: ``features`` (conv-bn-relu / max-pool), global average
    pool, flatten, linear ``classifier``. A Sequential so the layer order is explicit.
    Feature points: ``stageK`` the ReLU before the K-th max-pool (the last stage: the
    last ReLU), ``penultimate`` the classifier's input.

    >>> VGG([16, "M", 32], in_channels=1, num_classes=10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, cfg, in_channels=3, num_classes=10, ceil_mode=False):
        layers, c, stages = [], in_channels, []
        for v in cfg:
            if v == "M":
                if layers and isinstance(layers[-1], nn.ReLU):
                    stages.append(f"features.{len(layers) - 1}")
                layers.append(nn.MaxPool2d(2, ceil_mode=ceil_mode))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                c = int(v)
        if layers and isinstance(layers[-1], nn.ReLU):
            stages.append(f"features.{len(layers) - 1}")
        super().__init__()
        self.feature_points = {**{f"stage{i + 1}": p for i, p in enumerate(stages)},
                               "penultimate": "classifier"}
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _vgg_factory(name):
    def make(in_channels=3, num_classes=10, width=1.0, cfg=None):
        base = cfg if cfg is not None else VGG_CFGS[name]
        scaled = [v if v == "M" else max(1, int(round(int(v) * width))) for v in base]
        # Five floor-mode pools take 28x28 to 0x0; rounding up keeps 1x1 (28-14-7-4-2-1).
        # At 32x32 both modes agree; vgg_small keeps the floor mode its results were measured with.
        ceil = sum(v == "M" for v in scaled) >= 5
        return VGG(scaled, in_channels=in_channels, num_classes=num_classes, ceil_mode=ceil)

    make.__name__ = name
    make.__doc__ = f"{name}: VGG-BN, cfg {VGG_CFGS[name]} scaled by `width`; `cfg` replaces it."
    return make


for _name in VGG_CFGS:
    MODELS.register(_name)(_vgg_factory(_name))


def validate_cfg(cfg):
    """None if a VGG cfg list is well formed, else what is wrong."""
    if not isinstance(cfg, (list, tuple)) or not cfg:
        return "must be a non-empty list of positive ints and 'M'"
    for v in cfg:
        if not (v == "M" or (isinstance(v, int) and not isinstance(v, bool) and v > 0)):
            return f"must be a non-empty list of positive ints and 'M', got element {v!r}"
    return None
