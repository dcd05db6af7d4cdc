"""The SAN autoencoder of the original code (one FlowSAN stage), with width and resolution as parameters.

Layers at width 1 and 3-channel prototypes (324,248 parameters, as the original):
encoder conv3x3 (1+C)->8, LeakyReLU, avgpool 2, conv3x3 8->12, LeakyReLU, avgpool 2;
decoder conv3x3 12->256, LeakyReLU, nearest x2, conv3x3 256->128, LeakyReLU, nearest x2;
combiner concat(features, P) -> conv1x1 (128+C)->1 -> sigmoid, applied once with P_sm and once with P_op.
No normalisation layers, so a SAN behaves the same on a batch of one as on a large batch.

`forward`/`perturb` compute the same function with fewer operations (see `upsample_conv3x3_1x1`):
the decoder's second conv (97% of the multiply-adds) runs as four 2x2 phase convs at half
resolution, and the 1x1 combiner's feature part is applied before the last upsample. The layer-by-
layer `reference_forward` is kept for tests and for checking; both use the same parameters.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The 3x3 taps (0, 1, 2 = high-resolution offsets -1, 0, +1) that fall on each low-resolution offset
# after a nearest x2 upsample, for even (0) and odd (1) output rows or columns.
_TAPS = {0: ([0], [1, 2]), 1: ([0, 1], [2])}


def phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """3x3 kernel [Co,Ci,3,3] applied after a nearest x2 upsample -> its 4 phase kernels [4*Co,Ci,2,2]."""
    out = []
    for di in (0, 1):
        rows = [w[:, :, idx].sum(2) for idx in _TAPS[di]]
        for dj in (0, 1):
            out.append(torch.stack([torch.stack([r[:, :, idx].sum(2) for idx in _TAPS[dj]], -1) for r in rows], -2))
    return torch.cat(out, 0)


def upsample_conv3x3_1x1(a: torch.Tensor, conv: nn.Conv2d, act: nn.Module, w_1x1: torch.Tensor) -> torch.Tensor:
    """w_1x1 * act(conv(nearest_x2(a))) for a 3x3 padding-1 conv, computed at a's size -> [B,C1,2h,2w].

    Output pixel (2i+di, 2j+dj) of the conv only sees low-resolution rows i-1+di..i+di and columns
    j-1+dj..j+dj, so each of the 4 phases is a 2x2 conv of the zero-padded input (16/36 of the MACs).
    The activation and the 1x1 conv act per pixel, so they run per phase too, and only their C1-channel
    result is interleaved to full size (never the wide conv output).
    """
    b, _, h, w = a.shape
    c1 = w_1x1.shape[0]
    y = act(F.conv2d(F.pad(a, (1, 1, 1, 1)), phase_kernels(conv.weight), conv.bias.repeat(4)))  # [B,4*Co,h+1,w+1]
    z = F.conv2d(y, w_1x1.repeat(4, 1, 1, 1), groups=4).view(b, 2, 2, c1, h + 1, w + 1)
    rows = [torch.stack([z[:, di, dj, :, di:di + h, dj:dj + w] for dj in (0, 1)], -1) for di in (0, 1)]
    return torch.stack(rows, 3).reshape(b, c1, 2 * h, 2 * w)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.01))


class SAN(nn.Module):
    """Semi-adversarial autoencoder: (I, P_sm, P_op) -> (I'_sm, I'_op), all in [0,1]."""

    def __init__(self, resolution: int = 64, proto_channels: int = 3, width: float = 1.0, residual_eps: float = 0.0,
                 center_edit: bool = False):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"SAN resolution must be a multiple of 4 (two 2x poolings), got {resolution}")
        if not 0 <= residual_eps <= 255:
            raise ValueError(f"SAN residual_eps must be in [0, 255] grey levels (0 = full reconstruction), got {residual_eps}")
        self.resolution, self.proto_channels, self.width = resolution, proto_channels, width
        # 0: the paper's network, output = sigmoid(combiner). > 0: residual, output = clip(I + eps * tanh(combiner))
        # with eps in grey levels, so every pixel moves by at most eps and J_D measures the perturbation.
        self.residual_eps = float(residual_eps)
        if center_edit and not self.residual_eps:
            raise ValueError("SAN center_edit needs a residual SAN (residual_eps > 0)")
        # Each output's logit minus its spatial mean: a uniform brightness shift, which matchers and
        # classifiers mostly ignore, cannot take the budget (on medium it took +62 of 64 grey levels in
        # the first epoch, and tanh then had no gradient left; docs/RESULTS.md).
        self.center_edit = bool(center_edit)
        c1, c2 = max(1, round(256 * width)), max(1, round(128 * width))
        self.encoder = nn.Sequential(_conv(1 + proto_channels, 8), nn.AvgPool2d(2), _conv(8, 12), nn.AvgPool2d(2))
        self.decoder = nn.Sequential(_conv(12, c1), nn.Upsample(scale_factor=2, mode="nearest"),
                                     _conv(c1, c2), nn.Upsample(scale_factor=2, mode="nearest"))
        self.combiner = nn.Conv2d(c2 + proto_channels, 1, 1)
        if self.residual_eps:
            # Start at the identity (I' = I, tanh'(0) = 1): the edit grows from nothing, not from a
            # random pattern, and a SAN that learns nothing changes nothing.
            nn.init.zeros_(self.combiner.weight)
            nn.init.zeros_(self.combiner.bias)

    def config(self) -> dict:
        """Constructor arguments, saved beside the weights."""
        cfg = {"resolution": self.resolution, "proto_channels": self.proto_channels, "width": self.width}
        if self.residual_eps:                          # absent for the paper's SAN: old files load unchanged
            cfg["residual_eps"] = self.residual_eps
        if self.center_edit:
            cfg["center_edit"] = True
        return cfg

    def output(self, logit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The image from the combiner's logit: sigmoid (paper), or the input plus a bounded residual."""
        if not self.residual_eps:
            return torch.sigmoid(logit)
        if self.center_edit:
            logit = logit - logit.mean((-2, -1), keepdim=True)
        return (x.to(logit.dtype) + (self.residual_eps / 255) * torch.tanh(logit)).clamp(0, 1)

    def check_inputs(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor) -> None:
        r, c = self.resolution, self.proto_channels
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (r, r):
            raise ValueError(f"SAN expects images [B,1,{r},{r}], got {list(x.shape)} (model resolution {r})")
        for name, p in (("P_sm", p_sm), ("P_op", p_op)):
            if p.ndim != 4 or p.shape[1] != c or tuple(p.shape[-2:]) != (r, r) or p.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"SAN expects {name} [B or 1,{c},{r},{r}], got {list(p.shape)}")

    def combine(self, feats: torch.Tensor, proto: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """1x1 combiner of full-size decoder features and one prototype -> image in [0,1]."""
        proto = proto.to(feats.dtype).expand(feats.shape[0], -1, -1, -1)
        return self.output(self.combiner(torch.cat([feats, proto], 1)), x)

    def reference_forward(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor):
        """`forward` computed layer by layer as the original network (slower; the same values)."""
        self.check_inputs(x, p_sm, p_op)
        p_sm_b = p_sm.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        feats = self.decoder(self.encoder(torch.cat([x, p_sm_b], 1)))
        return self.combine(feats, p_sm, x), self.combine(feats, p_op, x)

    def feature_term(self, x: torch.Tensor, p_sm: torch.Tensor) -> torch.Tensor:
        """The combiner's feature part, w_f . decoder(encoder(x, P_sm)), as [B,1,R,R]."""
        p = p_sm.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        a = self.decoder[0](self.encoder(torch.cat([x, p], 1)))        # conv 12->256 + LeakyReLU, R/4
        conv2, act2 = self.decoder[2][0], self.decoder[2][1]
        w_f = self.combiner.weight[:, :-self.proto_channels]
        f = upsample_conv3x3_1x1(a, conv2, act2, w_f)                  # [B,1,R/2,R/2]
        return F.interpolate(f, scale_factor=2, mode="nearest")

    def prototype_term(self, f_term: torch.Tensor, proto: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """output(feature term + the combiner's prototype part + bias): one output image.

        The prototype part is an explicit per-channel sum, not a conv: a conv's rounding depends on
        the prototype's memory layout (a channels-last bank gave outputs 6e-8 apart), this does not.
        """
        w_p = self.combiner.weight[0, -self.proto_channels:, 0, 0]
        proto = proto.to(f_term.dtype)
        term = self.combiner.bias.view(1, 1, 1, 1) + proto[:, :1] * w_p[0]
        for c in range(1, self.proto_channels):
            term = term + proto[:, c:c + 1] * w_p[c]
        return self.output(f_term + term, x)

    def forward(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor):
        """x [B,1,R,R], prototypes [B or 1,C,R,R] -> (I'_sm, I'_op), each [B,1,R,R]."""
        self.check_inputs(x, p_sm, p_op)
        f = self.feature_term(x, p_sm)
        return self.prototype_term(f, p_sm, x), self.prototype_term(f, p_op, x)

    def perturb(self, x: torch.Tensor, p_sm: torch.Tensor, p_op: torch.Tensor) -> torch.Tensor:
        """The privacy output I' = I'_op only (what inference keeps)."""
        self.check_inputs(x, p_sm, p_op)
        return self.prototype_term(self.feature_term(x, p_sm), p_op, x)
