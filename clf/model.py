"""The CNN that tags clothing: uint8-free, training-free, raw logits out."""

from __future__ import annotations

import torch
from torch import nn


class FashionCNN(nn.Module):
    """Conv blocks (Conv2d, BatchNorm, ReLU, MaxPool2d) then Flatten and a small fully connected head.

    Input: (N, 1, 28, 28) floats, as `clf.data.preprocess` makes them. Output: (N, num_classes) logits.
    The defaults build the model we ship.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64),
        hidden: int = 256,
        num_classes: int = 10,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.config = {
            "channels": list(channels),
            "hidden": hidden,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        blocks = []
        in_channels, side = 1, 28
        for out_channels in channels:
            blocks += [
                # No conv bias: the BatchNorm right after it has its own.
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels, side = out_channels, side // 2
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

        # Channels-last weights make PyTorch's CPU convolutions (oneDNN) take their NHWC kernels: faster
        # training and inference than the default layout (docs/performance.md), same numbers.
        # Inputs stay as they are (with one channel both layouts are the same bytes); state_dicts load
        # into either layout.
        self.to(memory_format=torch.channels_last)

    @classmethod
    def of_width(cls, width: float = 1.0, **kwargs) -> FashionCNN:
        """The shipped shape with `width` times its channels and hidden units (at least one each)."""
        defaults = cls.__init__.__defaults__  # (channels, hidden, num_classes, dropout)
        return cls(channels=tuple(max(1, round(c * width)) for c in defaults[0]),
                   hidden=max(1, round(defaults[1] * width)), **kwargs)

    def forward(self, x):
        return self.classifier(self.features(x))
