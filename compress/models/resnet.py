"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning", sec. 4.2): a 3x3 stem, three
stages of BasicBlocks at strides 1, 2, 2, global average pool, linear classifier. Depth
6n + 2. Where a block changes width or stride, its shortcut is a 1x1 conv + BN (the
paper's option B, as in the CRD/DKD code), which torch-pruning couples with the block's
output through the add."""

import torch
from torch import nn

from . import MODELS


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU.

    >>> BasicBlock(8, 16, 2)(torch.zeros(1, 8, 8, 8)).shape
    torch.Size([1, 16, 4, 4])
    """

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu2 = nn.ReLU(inplace=True)   # a module of its own: its output is the block's

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-`depth` for small images: widths [stem, stage1, stage2, stage3].

    Feature points: ``stem`` (after the first conv), ``stage1``..``stage3`` (each stage's
    last block), ``penultimate`` (the classifier's input). `zero_init_residual` starts each
    block's last BN scale at 0 (Goyal et al. 2017), so every block begins as the identity.

    >>> CifarResNet(20, [16, 16, 32, 64], in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    feature_points = {"stem": "relu", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
                      "penultimate": "fc"}

    def __init__(self, depth, widths, in_channels=3, num_classes=10, zero_init_residual=False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, stride if j == 0 else 1))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock) and zero_init_residual:
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


# name: (depth, widths). resnet20..110: He et al. 2016's CIFAR family (16-32-64 channels);
# resnet8x4/resnet32x4: the wide pair of the CRD (Tian et al. 2020) and DKD tables, 4x the
# channels (stem 32, stages 64-128-256).
RESNETS = {
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


def _resnet_factory(name):
    depth, widths = RESNETS[name]

    def make(in_channels=3, num_classes=10, width=1.0, zero_init_residual=False):
        return CifarResNet(depth, [max(1, int(round(w * width))) for w in widths], in_channels, num_classes,
                           bool(zero_init_residual))

    make.__name__ = name
    make.__doc__ = f"{name}: CIFAR ResNet, depth {depth}, widths {widths} scaled by `width`."
    return make


for _name in RESNETS:
    MODELS.register(_name)(_resnet_factory(_name))
