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

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .polar import PolarConfig, PolarHead, polar_features

__all__ = ["TaggerNetConfig", "TaggerNet", "RelationBlock", "masked_bce_loss",
           "fuse_for_inference", "position_code",
           "Probabilities", "ProbabilitiesAndFeatures"]


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
    relation_stage : int or None
        Index of the stage after which a :class:`RelationBlock` (self-attention
        over the positions of the feature map) runs; ``None``: no such block.
    relation_heads : int
        Attention heads of that block.
    polar : dict or None
        A :class:`bluesky_xsml.polar.PolarConfig` (as a dict): the network
        gets a :class:`bluesky_xsml.polar.PolarHead`, which corrects the
        logits of frames whose beam centre is given. ``None``: no such head.
    """

    n_tags: int = 23
    in_channels: int = 6
    stem_width: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 192)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    dropout: float = 0.1
    relation_stage: int | None = None
    relation_heads: int = 4
    polar: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["depths"] = list(self.widths), list(self.depths)
        if self.relation_stage is None:  # networks without the block keep their old form (and ids)
            del d["relation_stage"], d["relation_heads"]
        if self.polar is None:
            del d["polar"]
        else:
            d["polar"] = PolarConfig.from_dict(self.polar).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaggerNetConfig:
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


def position_code(h: int, w: int, channels: int) -> torch.Tensor:
    """Fixed 2-D sinusoidal position code, ``(h * w, channels)``, rows first.

    Half the channels encode the row and half the column, each as sines and
    cosines of geometrically spaced frequencies (1 to 1/100 radian per cell), so
    the dot product of two codes depends on the offset between the positions.
    """
    n = channels // 4
    freq = torch.exp(-math.log(100.0) * torch.arange(n, dtype=torch.float32) / max(n, 1))
    y = torch.arange(h, dtype=torch.float32)[:, None] * freq[None, :]
    x = torch.arange(w, dtype=torch.float32)[:, None] * freq[None, :]
    code = torch.zeros(h, w, channels)
    code[:, :, 0 * n:1 * n] = torch.sin(y)[:, None, :]
    code[:, :, 1 * n:2 * n] = torch.cos(y)[:, None, :]
    code[:, :, 2 * n:3 * n] = torch.sin(x)[None, :, :]
    code[:, :, 3 * n:4 * n] = torch.cos(x)[None, :, :]
    return code.reshape(h * w, channels)


class RelationBlock(nn.Module):
    """Self-attention over the positions of a feature map (residual).

    Convolutions see a neighbourhood; this block lets every position look at
    every other, with a position code on queries and keys, so that relations
    across the frame (spots sharing one radius, arcs facing each other) can be
    read. Its output projection starts at zero: inserted into a trained
    network, the block changes nothing until it is trained.
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads or channels % 4:
            raise ValueError(f"relation block: {channels} channels do not split into {heads} "
                             "heads (and must be a multiple of 4)")
        self.heads, self.channels = heads, channels
        self.norm = nn.LayerNorm(channels)
        self.qk = nn.Linear(channels, 2 * channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        c = self.channels
        n, d = h * w, c // self.heads
        t = self.norm(x.flatten(2).transpose(1, 2))                   # (B, N, C)
        pos = position_code(h, w, c).to(device=t.device, dtype=t.dtype)
        q, k = self.qk(t + pos).chunk(2, dim=-1)
        v = self.v(t)

        def split(z):
            return z.reshape(-1, n, self.heads, d).transpose(1, 2)    # (B, heads, N, d)

        a = F.scaled_dot_product_attention(split(q), split(k), split(v))
        a = self.out(a.transpose(1, 2).reshape(-1, n, c))
        return x + a.transpose(1, 2).reshape(-1, c, h, w)


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
    """Residual CNN: stem, stages, optional relation block, pooling, linear head.

    With ``config.polar`` set it also has a :class:`~bluesky_xsml.polar.PolarHead`
    (``self.polar``), used for the rows of a batch whose beam centre is given.
    """

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
        for width, depth in zip(config.widths, config.depths, strict=True):
            for d in range(depth):
                blocks.append(ResidualBlock(c, width, 2 if d == 0 else 1))
                c = width
        self.stages = nn.Sequential(*blocks)
        # the relation block runs after the last residual block of stage `relation_stage`
        self.relation = None
        self._relation_after = -1
        if config.relation_stage is not None:
            k = int(config.relation_stage)
            if not 0 <= k < len(config.widths):
                raise ValueError(f"relation_stage {k} is not a stage index (0 to "
                                 f"{len(config.widths) - 1})")
            self.relation = RelationBlock(config.widths[k], config.relation_heads)
            self._relation_after = sum(config.depths[:k + 1]) - 1
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * c, config.n_tags)
        self.polar = None
        if config.polar is not None:
            self.polar = PolarHead(PolarConfig.from_dict(config.polar), 2 * c, config.n_tags)
        self.register_buffer("pos_weight", torch.ones(config.n_tags), persistent=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, 2 * widths[-1])``: mean and max of the last feature map."""
        h = self.stem(x)
        for i, block in enumerate(self.stages):
            h = block(h)
            if i == self._relation_after:
                h = self.relation(h)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def logits_and_features(self, x: torch.Tensor, centers: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, pooled features)``: the head's output and its input.

        The pooled features are what novelty scores and embeddings are computed
        from (:mod:`bluesky_xsml.novelty`).
        """
        pooled = self.features(x)
        logits = self.head(self.dropout(pooled))
        if self.polar is not None and centers is not None:
            known = torch.isfinite(centers).all(1)
            feats = polar_features(x, centers, self.polar.config)
            logits = logits + self.polar(feats, pooled, known).to(logits.dtype)
        return logits, pooled

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                centers: torch.Tensor | None = None):
        """Return ``(logits, loss)``; ``loss`` is ``None`` without targets.

        ``centers`` (``(N, 2)``, the beam centre of each row on the input, see
        :func:`bluesky_xsml.polar.input_centers`; non-finite rows are unknown)
        feeds the polar head, when the network has one.
        """
        logits, _ = self.logits_and_features(x, centers)
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

    def forward(self, x: torch.Tensor, centers: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = self.net(x, None, centers)
        return torch.sigmoid(logits.float())


class ProbabilitiesAndFeatures(nn.Module):
    """Inference wrapper: ``(float32 probabilities, float32 pooled features)``.

    The features cost nothing extra (the head reads them anyway); the tagger's
    novelty score and embedding are computed from them.
    """

    def __init__(self, net: TaggerNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, centers: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = self.net.logits_and_features(x, centers)
        return torch.sigmoid(logits.float()), pooled.float()
