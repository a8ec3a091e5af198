"""MobileNetV2 (Sandler et al. 2018) for small images: inverted residual blocks (1x1
expansion, 3x3 depthwise, linear 1x1 projection), ReLU6. CIFAR-style strides: the stem and
the second block group keep the resolution (stride 1 instead of 2), so a 32x32 input ends
at 4x4 (28x28 at 4x4) instead of 1x1."""

import torch
from torch import nn

from . import MODELS

# (expansion t, channels c, blocks n, first stride s) of the paper's Table 2, with the
# CIFAR strides: s of the 2nd group 1 (paper: 2); the stem conv also has stride 1.
CIFAR_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]


def make_divisible(v, divisor=8):
    """Round a channel count to a multiple of `divisor`, never more than 10% down (as the
    reference implementations do, so scaled widths stay friendly to vector units)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6], 3x3 depthwise-BN-ReLU6, 1x1 project-BN, + x when the
    stride is 1 and the width is kept (a fixed property of the block, not of the data).

    >>> InvertedResidual(16, 16, 1, 6)(torch.zeros(1, 16, 8, 8)).shape
    torch.Size([1, 16, 8, 8])
    """

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """``features`` (stem, inverted residuals, 1x1 head conv), global average pool,
    dropout-free linear ``classifier``.

    Feature points: ``stage1``..``stage4`` (the last block at each resolution: 1, 1/2, 1/4,
    1/8 of the input), ``head`` (the last 1x1 conv), ``penultimate`` (the classifier's input).

    >>> MobileNetV2(in_channels=1, width=0.5)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels=3, num_classes=10, width=1.0, cfg=None):
        super().__init__()
        c = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        blocks, stages, stride_total = [conv_bn(in_channels, c, 3, 1)], {}, 1
        for t, ch, n, s in cfg or CIFAR_CFG:
            out = make_divisible(ch * width)
            for i in range(n):
                stride = s if i == 0 else 1
                if stride != 1:
                    stride_total *= stride
                blocks.append(InvertedResidual(c, out, stride, t))
                stages[stride_total] = f"features.{len(blocks) - 1}"
                c = out
        blocks.append(conv_bn(c, last, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(last, num_classes)
        self.feature_points = {**{f"stage{i + 1}": p for i, (_, p) in enumerate(sorted(stages.items()))},
                               "head": f"features.{len(blocks) - 1}", "penultimate": "classifier"}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels=3, num_classes=10, width=1.0):
    """mobilenetv2: CIFAR-style MobileNetV2; `width` scales every layer (rounded to 8)."""
    return MobileNetV2(in_channels, num_classes, width)
