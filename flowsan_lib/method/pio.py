"""Per-image optimisation (`pio`): the upper bound on what a SAN trained on the run's losses can amortise.

For each image a perturbation inside the residual SAN's budget, I' = clip(I + eps/255 tanh(w)) (w minus
its spatial mean when san.center_edit, as `SAN.output`), starts at I' = I (w = 0) and is optimised with
Adam for k steps on the SANs' J: the same seen gender ensemble and targets (t_op = 1 - l, l the
prototype label of san.direction, the coin included), the same J_M matchers, distance and weights, the
same input diversity before the classifiers. The SAN's I'_sm is the image itself here (only I'_op is
released), so J's terms on I'_sm are constants: J_D = 0, and J_M compares the mean of R(I) and R(I')
with R(I), as `SanLoss` does for a SAN whose I'_sm is I. J_M is summed over the batch as in training and
weighed by san.batch_size / batch, so each image's trade-off between J_M and J_G is the one a SAN saw
in training; Adam steps on batch x J (a sum over images), so no image's step depends on its batch.
`objective` is checked against `SanLoss` in the tests.

Seeded (input diversity per batch and step), deterministic on the CPU; one run to the largest k
yields every smaller k on the way (Adam's trajectory to k is the same either way).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from flowsan_lib.core.config import SanParams
from flowsan_lib.core.seeding import derive_seed
from flowsan_lib.method.losses import gender_logit, gender_loss, match_loss

MATCH_REDUCTION = "sum"   # as the SANs' training (san_training.MATCH_REDUCTION)


def seen_gender(aux: list[nn.Module], sp: SanParams, device) -> nn.Module:
    """The seen gender ensemble pio optimises against: every G_i of the run plus san.seen_classifiers."""
    from flowsan_lib.method.frozen import GenderEnsemble
    from flowsan_lib.models.interfaces import load_gender_classifier
    nets = list(aux) + [load_gender_classifier(name, device) for name in sp.seen_classifiers]
    if not nets:
        raise ValueError("per-image optimisation needs a seen gender classifier (the run's G_i or "
                         "san.seen_classifiers); set evaluate.pio_steps: []")
    return freeze(GenderEnsemble(nets))


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: pio differentiates through a network, never trains it."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def edit(w: torch.Tensor, x: torch.Tensor, eps: float, center: bool) -> torch.Tensor:
    """I' = clip(I + eps/255 tanh(w)), w centred per image when `center` (as SAN.output)."""
    if center:
        w = w - w.mean((-2, -1), keepdim=True)
    return (x + (eps / 255) * torch.tanh(w)).clamp(0, 1)


@dataclass
class PioSetup:
    """What pio optimises against and how: the frozen networks of J, the run's SanParams, Adam's settings."""
    gender: nn.Module            # seen gender ensemble (see seen_gender), on the device
    matcher: nn.Module           # the J_M matcher (frozen.loss_matcher), on the device
    sp: SanParams                # J's weights and kinds, eps, center_edit, input_diversity, batch_size
    seed: int = 0                # input diversity draws derive from it
    lr: float = 0.1              # Adam's learning rate on w
    batch: int = 64              # images optimised together


class PioObjective:
    """J of one batch as a function of I' (see the module docstring); the I'_sm terms computed once."""

    def __init__(self, setup: PioSetup, x: torch.Tensor, labels: torch.Tensor):
        self.s, self.labels = setup, labels.float()
        with torch.no_grad():
            self.desc = setup.matcher(x).float()                      # R(I) = R(I'_sm)
            self.z_sm = gender_logit(setup.gender, x)                 # G(I'_sm)
        self.scale = setup.sp.batch_size / len(x)                     # J_M per image as in training

    def __call__(self, x_adv: torch.Tensor, diversity_seed: int | None = None) -> torch.Tensor:
        sp = self.s.sp
        j = x_adv.new_zeros((), dtype=torch.float32)
        if sp.w_match:
            d = self.s.matcher(x_adv)
            j_m = match_loss(self.desc, d, self.desc, MATCH_REDUCTION, sp.match_distance,
                             getattr(self.s.matcher, "dims", None))
            j = j + sp.w_match * self.scale * j_m
        if sp.w_gender:
            seen = x_adv
            if sp.input_diversity and diversity_seed is not None:
                from flowsan_lib.method.augment import input_diversity
                seen = input_diversity(x_adv, diversity_seed)
            j = j + sp.w_gender * gender_loss(self.z_sm, gender_logit(self.s.gender, seen), self.labels,
                                              sp.gender_target)
        return j


@dataclass
class PioResult:
    """pio's outputs at every reported k."""
    images: dict = field(default_factory=dict)      # k -> float [N,1,R,R] in [0,1], on the CPU
    seconds: dict = field(default_factory=dict)     # k -> wall seconds per image to reach k steps
    objective: dict = field(default_factory=dict)   # k -> mean J over batches (no input diversity); 0 = start


def optimise_batch(setup: PioSetup, x: torch.Tensor, labels: torch.Tensor, steps: list[int], tag: int):
    """Yield (k, I' at k, J at k, seconds) for each k in sorted `steps` (k = 0 first: the start)."""
    t0 = time.perf_counter()
    obj = PioObjective(setup, x, labels)
    w = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([w], lr=setup.lr)
    sp = setup.sp
    with torch.no_grad():
        yield 0, x.clone(), float(obj(x)), time.perf_counter() - t0
    todo = sorted(steps)
    for step in range(1, todo[-1] + 1):
        seed = derive_seed(setup.seed, "pio", tag, step) if sp.input_diversity else None
        loss = obj(edit(w, x, sp.eps, sp.center_edit), seed) * len(x)   # a sum over images: each image's
        opt.zero_grad(set_to_none=True)                                    # gradient is free of its batch
        loss.backward()
        opt.step()
        if step in todo:
            with torch.no_grad():
                out = edit(w, x, sp.eps, sp.center_edit)
                elapsed = time.perf_counter() - t0
                yield step, out, float(obj(out)), elapsed


def pio(x: torch.Tensor, labels: torch.Tensor, setup: PioSetup, steps: list[int], device=None) -> PioResult:
    """Per-image optimisation of gray crops x [N,1,R,R] (uint8 or float) pushed to 1 - labels, on `device`
    (where setup's networks live; decided once by the caller); images at every k of `steps`, on the CPU."""
    if not steps or min(steps) < 1:
        raise ValueError(f"pio needs Adam steps k >= 1, got {steps}")
    device = torch.device(device or "cpu")
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    res = PioResult()
    total: dict[int, float] = {}
    for b, i in enumerate(range(0, len(x), setup.batch)):
        xb = x[i:i + setup.batch].to(device)
        yb = torch.as_tensor(labels[i:i + setup.batch]).float().to(device)
        for k, out, j, secs in optimise_batch(setup, xb, yb, steps, b):
            res.images.setdefault(k, []).append(out.detach().cpu())
            res.objective[k] = res.objective.get(k, 0.0) + j * len(xb) / len(x)
            total[k] = total.get(k, 0.0) + secs
    res.images = {k: torch.cat(v) for k, v in res.images.items()}
    res.seconds = {k: s / max(1, len(x)) for k, s in total.items()}
    return res
