"""Networks of paper §3.1: trunk f, projector P, predictor q, EMA target (f_xi, P_xi).

g(x) = normalize(P(f(x))). At test time only f and P remain (`GrafitNet.embed`).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# ====== trunks ======
def conv4(in_channels: int = 1, width: int = 64) -> tuple[nn.Module, int]:
    """A small 4-block ConvNet (the few-shot Omniglot trunk): trains in minutes on 2 CPU cores."""
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    trunk = nn.Sequential(block(in_channels, width), block(width, width), block(width, 2 * width),
                          block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return trunk, 2 * width


def resnet(name: str, in_channels: int = 3, small_stem: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; `small_stem` for 32-64 px inputs
    (3x3 stride-1 first conv, no max-pool, as for CIFAR)."""
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


TRUNKS = ("conv4", "resnet18", "resnet34", "resnet50", "resnet101")


def build_trunk(name: str, in_channels: int, small_stem: bool, width: int = 64) -> tuple[nn.Module, int]:
    if name == "conv4":
        return conv4(in_channels, width)
    if name in TRUNKS:
        return resnet(name, in_channels, small_stem)
    raise ValueError(f"unknown trunk {name!r}; known: {', '.join(TRUNKS)}")


# ====== heads ======
def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """Linear-BN-ReLU-Linear (BYOL's projector and predictor)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def build_projector(kind: str, in_dim: int, hidden: int, out_dim: int) -> tuple[nn.Module, int]:
    """P_theta: 'mlp' (Grafit), 'linear' (Grafit FC) or 'none' (trunk features are the embedding)."""
    if kind == "mlp":
        return mlp(in_dim, hidden, out_dim), out_dim
    if kind == "linear":
        return nn.Linear(in_dim, out_dim), out_dim
    if kind == "none":
        return nn.Identity(), in_dim
    raise ValueError(f"unknown projector {kind!r}; known: mlp, linear, none")


class GrafitNet(nn.Module):
    """f_theta + P_theta (+ a separate instance projector when P is 'none') + q_theta + classifier.

    `embed` is g_theta: the l2-normalised output used by the kNN loss, the memory and evaluation.
    """

    def __init__(self, trunk: nn.Module, feat_dim: int, projector: str, embed_dim: int,
                 hidden_dim: int, predictor: bool, num_classes: int = 0):
        super().__init__()
        self.trunk = trunk
        self.projector, self.embed_dim = build_projector(projector, feat_dim, hidden_dim, embed_dim)
        # Table 5 rows "CE + inst" and "inst" have no kNN head: the instance branch keeps
        # BYOL's MLP projector of its own while retrieval uses the trunk features.
        self.inst_projector = (mlp(feat_dim, hidden_dim, embed_dim)
                               if predictor and projector == "none" else None)
        inst_dim = embed_dim if predictor else 0
        self.predictor = mlp(inst_dim, hidden_dim, inst_dim) if predictor else None
        self.classifier = nn.Linear(feat_dim, num_classes) if num_classes > 0 else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        p = self.projector(h)          # once: a second call would update BN statistics twice
        out = {"features": h, "z": F.normalize(p, dim=1)}
        if self.predictor is not None:
            proj = self.inst_projector(h) if self.inst_projector is not None else p
            out["inst"] = proj
            out["pred"] = self.predictor(proj)
        if self.classifier is not None:
            out["logits"] = self.classifier(h)
        return out

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.trunk(x)), dim=1)


class TargetNet(nn.Module):
    """(f_xi, P_xi): an EMA copy of the online trunk and the projector the instance branch uses."""

    def __init__(self, online: GrafitNet):
        super().__init__()
        self.trunk = copy.deepcopy(online.trunk)
        proj = online.inst_projector if online.inst_projector is not None else online.projector
        self.projector = copy.deepcopy(proj)
        for p in self.parameters():
            p.requires_grad_(False)

    def _online_parts(self, online: GrafitNet) -> list[nn.Module]:
        proj = online.inst_projector if online.inst_projector is not None else online.projector
        return [online.trunk, proj]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.trunk(x))

    @torch.no_grad()
    def update(self, online: GrafitNet, tau: float) -> None:
        """xi <- tau * xi + (1 - tau) * theta; BN running statistics are copied."""
        for mine, theirs in zip([self.trunk, self.projector], self._online_parts(online)):
            for p_t, p_o in zip(mine.parameters(), theirs.parameters()):
                p_t.mul_(tau).add_(p_o.detach(), alpha=1.0 - tau)
            for b_t, b_o in zip(mine.buffers(), theirs.buffers()):
                b_t.copy_(b_o)


def ema_tau(tau_base: float, step: int, total_steps: int, schedule: str = "cosine") -> float:
    """BYOL's schedule tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, or the constant tau_base."""
    if schedule == "constant":
        return tau_base
    if schedule != "cosine":
        raise ValueError(f"unknown tau schedule {schedule!r}; known: cosine, constant")
    k = min(step, total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0
