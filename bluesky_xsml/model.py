"""The multi-label tagger network: a small residual CNN with a sigmoid head.

Pure model code: a config dataclass and an ``nn.Module`` whose ``forward``
returns ``(logits, loss)``. Devices, files and training loops live elsewhere.

Examples
--------
>>> import torch
>>> from bluesky_xsml.model import TaggerNet, TaggerNetConfig
>>> net = TaggerNet(TaggerNetConfig(n_tags=3, in_channels=6, widths=(8, 16), depths=(1, 1)))
>>> logits, loss = net(torch.zeros(2, 6, 32, 32), torch.tensor([[1., 0., float("nan")]] * 2))
>>> tuple(logits.shape), bool(torch.isfinite(loss))
((2, 3), True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TaggerNetConfig", "TaggerNet", "masked_bce_loss", "fuse_for_inference",
           "Probabilities"]


@dataclass
class TaggerNetConfig:
    """Shape of the network; saved in every checkpoint.

    Parameters
    ----------
    n_tags : int
        Number of sigmoid outputs.
    in_channels : int
        Channels of the preprocessed input.
    stem_width : int
        Channels after the stride-2 stem convolution.
    widths, depths : tuple of int
        Channels and residual blocks per stage; each stage halves the resolution.
    dropout : float
        Dropout before the classifier.
    """

    n_tags: int = 23
    in_channels: int = 6
    stem_width: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 192)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    dropout: float = 0.1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["depths"] = list(self.widths), list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TaggerNetConfig":
        fields = cls.__dataclass_fields__
        kw = {k: v for k, v in d.items() if k in fields}
        for key in ("widths", "depths"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        return cls(**kw)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + s, inplace=True)


def masked_bce_loss(logits: torch.Tensor, targets: torch.Tensor,
                    pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy over known labels only.

    ``NaN`` targets are unknown (partial labels) and contribute nothing.
    ``pos_weight`` (per tag) up-weights positives of rare tags.
    """
    known = torch.isfinite(targets)
    t = torch.where(known, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), t.float(), pos_weight=pos_weight, reduction="none"
    )
    n = known.sum()
    return (loss * known).sum() / n.clamp(min=1)


class TaggerNet(nn.Module):
    """Residual CNN: stem, stages, global average + max pooling, linear head."""

    def __init__(self, config: TaggerNetConfig):
        super().__init__()
        if len(config.widths) != len(config.depths) or not config.widths:
            raise ValueError("widths and depths must be non-empty and of equal length")
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, config.stem_width, 3, 2, 1, bias=False),
            nn.BatchNorm2d(config.stem_width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        c = config.stem_width
        for width, depth in zip(config.widths, config.depths):
            for d in range(depth):
                blocks.append(ResidualBlock(c, width, 2 if d == 0 else 1))
                c = width
        self.stages = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * c, config.n_tags)
        self.register_buffer("pos_weight", torch.ones(config.n_tags), persistent=True)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """Return ``(logits, loss)``; ``loss`` is ``None`` without targets."""
        h = self.stages(self.stem(x))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        logits = self.head(self.dropout(pooled))
        loss = None
        if targets is not None:
            loss = masked_bce_loss(logits, targets, self.pos_weight)
        return logits, loss


def fuse_for_inference(net: TaggerNet) -> TaggerNet:
    """A copy of ``net`` with every batch norm folded into its convolution.

    Same outputs in eval mode, fewer passes over memory: the form inference runs.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(net).eval()
    fused.stem[0] = fuse_conv_bn_eval(fused.stem[0], fused.stem[1])
    fused.stem[1] = nn.Identity()
    for block in fused.stages:
        block.conv1 = fuse_conv_bn_eval(block.conv1, block.bn1)
        block.bn1 = nn.Identity()
        block.conv2 = fuse_conv_bn_eval(block.conv2, block.bn2)
        block.bn2 = nn.Identity()
        if block.shortcut is not None:
            block.shortcut = fuse_conv_bn_eval(block.shortcut[0], block.shortcut[1])
    return fused


class Probabilities(nn.Module):
    """Inference wrapper: input in the network's dtype -> float32 probabilities."""

    def __init__(self, net: TaggerNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.net(x)
        return torch.sigmoid(logits.float())
