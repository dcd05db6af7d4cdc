"""The SAN autoencoder of the original code (one FlowSAN stage), with width and resolution as parameters.

Layers at width 1 and 3-channel prototypes (324,248 parameters, as the original):
encoder conv3x3 (1+C)->8, LeakyReLU, avgpool 2, conv3x3 8->12, LeakyReLU, avgpool 2;
decoder conv3x3 12->256, LeakyReLU, nearest x2, conv3x3 256->128, LeakyReLU, nearest x2;
combiner concat(features, P) -> conv1x1 (128+C)->1 -> sigmoid, applied once with P_sm and once with P_op.
No normalisation layers, so a SAN behaves the same on a batch of one as on a large batch.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.01))


class SAN(nn.Module):
    """Semi-adversarial autoencoder: (I, P_sm, P_op) -> (I'_sm, I'_op), all in [0,1]."""

    def __init__(self, resolution: int = 64, proto_channels: int = 3, width: float = 1.0):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"SAN resolution must be a multiple of 4 (two 2x poolings), got {resolution}")
        self.resolution, self.proto_channels, self.width = resolution, proto_channels, width
        c1, c2 = max(1, round(256 * width)), max(1, round(128 * width))
        self.encoder = nn.Sequential(_conv(1 + proto_channels, 8), nn.AvgPool2d(2), _conv(8, 12), nn.AvgPool2d(2))
        self.decoder = nn.Sequential(_conv(12, c1), nn.Upsample(scale_factor=2, mode="nearest"),
                                     _conv(c1, c2), nn.Upsample(scale_factor=2, mode="nearest"))
        self.combiner = nn.Conv2d(c2 + proto_channels, 1, 1)

    def config(self) -> dict:
        """Constructor arguments, saved beside the weights."""
        return {"resolution": self.resolution, "proto_channels": self.proto_channels, "width": self.width}

    def check_inputs(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor) -> None:
        r, c = self.resolution, self.proto_channels
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (r, r):
            raise ValueError(f"SAN expects images [B,1,{r},{r}], got {list(x.shape)} (model resolution {r})")
        for name, p in (("P_sm", p_sm), ("P_op", p_op)):
            if p.ndim != 4 or p.shape[1] != c or tuple(p.shape[-2:]) != (r, r) or p.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"SAN expects {name} [B or 1,{c},{r},{r}], got {list(p.shape)}")

    def combine(self, feats: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
        """1x1 combiner of decoder features and one prototype -> image in [0,1]."""
        proto = proto.to(feats.dtype).expand(feats.shape[0], -1, -1, -1)
        return torch.sigmoid(self.combiner(torch.cat([feats, proto], 1)))

    def forward(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor):
        """x [B,1,R,R], prototypes [B or 1,C,R,R] -> (I'_sm, I'_op), each [B,1,R,R]."""
        self.check_inputs(x, p_sm, p_op)
        p_sm_b = p_sm.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        feats = self.decoder(self.encoder(torch.cat([x, p_sm_b], 1)))
        return self.combine(feats, p_sm), self.combine(feats, p_op)

    def perturb(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor) -> torch.Tensor:
        """The privacy output I' = I'_op only (what inference keeps)."""
        self.check_inputs(x, p_sm, p_op)
        p_sm_b = p_sm.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        feats = self.decoder(self.encoder(torch.cat([x, p_sm_b], 1)))
        return self.combine(feats, p_op)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

