"""The plain conv-block CNNs of the seed papers' teacher / assistant / student families
(TAKD, Mirzadeh et al. 2019; Morikawa 2022/2023: "CNN with scale factor 32/16",
"CNN8/12/16").

What we chose, since the seed papers give the family by its two knobs rather than a layer
table: `layers` 3x3 conv-BN-ReLU blocks in four stages whose widths are `scale` x [1, 2,
4, 8] (TAKD's plain CNNs double the width after every 2x2 max-pool in the same way); the
blocks are split as evenly as possible over the stages, earlier stages taking the extra
ones (8 layers: 2-2-2-2; 12: 3-3-3-3; 6: 2-2-1-1); a max-pool closes every stage but the
last; then global average pooling (so the model is sized by the data, not by a fixed
input) and one linear classifier. BatchNorm is added after every conv (the TAKD tables
have none) so that deep members of the family train at the CPU recipes' short schedules.
"""

import torch
from torch import nn

from . import MODELS


class PlainCNN(nn.Module):
    """``features`` (conv-bn-relu blocks, max-pools between stages), global average pool,
    flatten, linear ``classifier``.

    Feature points: ``stage1``..``stage4`` (the last ReLU of each stage), ``penultimate``
    (the classifier's input).

    >>> PlainCNN(scale=8, layers=4, in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, scale=16, layers=8, in_channels=3, num_classes=10):
        super().__init__()
        if layers < 1 or scale < 1:
            raise ValueError(f"layers and scale must be >= 1, got {layers} and {scale}")
        n_stages = min(4, layers)
        per_stage = [layers // n_stages + (i < layers % n_stages) for i in range(n_stages)]
        mods, points, c = [], {}, in_channels
        for s, n in enumerate(per_stage):
            w = scale * 2 ** s
            for _ in range(n):
                mods += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            points[f"stage{s + 1}"] = f"features.{len(mods) - 1}"
            if s < n_stages - 1:
                mods.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, num_classes)
        self.feature_points = {**points, "penultimate": "classifier"}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


@MODELS.register("cnn")
def cnn(in_channels=3, num_classes=10, scale=16, layers=8):
    """cnn: plain conv-block CNN, `layers` convs in four stages of widths `scale` x [1, 2, 4, 8]."""
    return PlainCNN(int(scale), int(layers), in_channels, num_classes)


def _cnn_factory(depth):
    def make(in_channels=3, num_classes=10, scale=16):
        return PlainCNN(int(scale), depth, in_channels, num_classes)

    make.__name__ = f"cnn{depth}"
    make.__doc__ = f"cnn{depth}: the plain CNN with {depth} conv layers, widths `scale` x [1, 2, 4, 8]."
    return make


# The seed papers' student / assistant / teacher depths.
for _depth in (8, 12, 16):
    MODELS.register(f"cnn{_depth}")(_cnn_factory(_depth))
