"""Networks: the dual-path multi-task 3D CNN and a ResNet with two heads, and their settings in checkpoints.

Every network here returns the one output tensor of :mod:`monai_mtl.outputs`:
``(B, num_classes + 1)``, the response logits followed by the sigmoid severity in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from monai_mtl.errors import ConfigError
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, TASKS, severity_bin_centres, split_output  # noqa: F401 (split_output: re-exported)


#: ``pooling`` choices of :class:`DualPathNet`'s middle blocks
POOLINGS = ("max", "avg", "mixed")
#: ``anti_alias`` choices of :class:`DualPathNet`: where a low-pass comes before the encoder's subsampling
ANTI_ALIAS = ("none", "pool", "all")


class MixedPool3d(nn.Module):
    """Per-channel learned mix of max and average pooling, ``a * max + (1 - a) * avg`` with ``a = sigmoid(gate)``.

    The "mixed" pooling of Lee, Gallagher & Tu (AISTATS 2016), with one gate per channel rather than
    per layer: a channel carrying a local contrast (the caudate's class signature) can keep its
    maximum while a channel carrying an amount of tissue (an atrophy's partial volume) keeps its sum.
    The gates start at 0 (an even mix) and learn with the network.
    """

    def __init__(self, channels: int, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.gate = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = torch.sigmoid(self.gate).view(1, -1, 1, 1, 1)
        return mix * nn.functional.max_pool3d(x, self.kernel_size) + (1 - mix) * nn.functional.avg_pool3d(x, self.kernel_size)


class BlurDownsample3d(nn.Module):
    """A fixed binomial low-pass ``[1, 2, 1] / 4`` per strided axis, then subsampling by ``stride`` (Zhang, ICML 2019).

    "Making convolutional networks shift-invariant again": a strided convolution or a max pool
    samples its input without a low-pass first, so the same anatomy one voxel further along
    reaches the next layer through other samples (aliasing). Blurring before the subsampling
    removes the frequencies the coarser grid cannot hold. Axes with stride 1 are not blurred
    (``stride`` ``(2, 2, 1)`` blurs x and y only). Depthwise and without parameters; edges
    replicate (the volumes' background is uniform). ``stride`` 1 blurs on the same grid.
    Neither MONAI nor torch has this layer (MONAI's ``GaussianFilter`` does not subsample).
    """

    def __init__(self, channels: int, stride: int | Sequence[int] = 2, blur: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.stride = _triple(stride)
        axes = self.stride if blur is None else _triple(blur)  # the axes to low-pass (default: the strided ones)
        taps = [torch.tensor([1.0, 2.0, 1.0]) / 4 if a > 1 else torch.ones(1) for a in axes]
        kernel = taps[0].view(-1, 1, 1) * taps[1].view(1, -1, 1) * taps[2].view(1, 1, -1)
        self.channels = channels
        # derived from the constructor arguments: not a learned state, so not in checkpoints
        self.register_buffer("kernel", kernel.expand(channels, 1, *kernel.shape).contiguous(), persistent=False)
        self.padding = [p for k in reversed(kernel.shape) for p in ((k - 1) // 2, (k - 1) // 2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = nn.functional.pad(x, self.padding, mode="replicate")
        return nn.functional.conv3d(padded, self.kernel.to(x.dtype), stride=self.stride, groups=self.channels)


def _triple(value: int | Sequence[int]) -> list[int]:
    return [int(value)] * 3 if isinstance(value, int) else [int(v) for v in value]


def _pool(pooling: str, channels: int, anti_alias: str = "none") -> nn.Module:
    if anti_alias != "none":  # Zhang's MaxBlurPool: the max over each 2-voxel neighbourhood, then a blurred subsampling
        return nn.Sequential(nn.MaxPool3d(kernel_size=2, stride=1), BlurDownsample3d(channels, stride=2))
    if pooling == "max":
        return nn.MaxPool3d(kernel_size=2)
    if pooling == "avg":
        return nn.AvgPool3d(kernel_size=2)
    return MixedPool3d(channels)


def _conv_block(in_channels: int, out_channels: int, stride: int | Sequence[int] = 1, pool: bool = True,
                pooling: str = "max", anti_alias: str = "none") -> nn.Sequential:
    layers: list[nn.Module] = []
    if anti_alias == "all" and max(_triple(stride)) > 1:
        # the low-pass before the strided convolution: both are linear, so blur-then-convolve-with-stride is
        # the convolution evaluated everywhere, blurred and subsampled (Zhang's ConvBlurPool without the
        # ReLU in between), at the cost of one depthwise blur instead of a full-resolution convolution
        layers.append(BlurDownsample3d(in_channels, stride=1, blur=stride))
    layers += [
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(_pool(pooling, out_channels, anti_alias))
    return nn.Sequential(*layers)


class TaskAttention(nn.Module):
    """Channel (squeeze-excitation) then spatial attention over shared features, for one task path.

    Each task re-weights the shared encoder's channels and voxels its own way, so the severity path
    can attend to the hippocampi and cortex while the response path looks elsewhere too.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, channels, kernel_size=1),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(nn.Conv3d(channels, 1, kernel_size=3, padding=1), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features * self.channel(features)
        return features * self.spatial(features)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``scale`` backward (0: a stop-gradient)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_gradient(features: torch.Tensor, scale: float) -> torch.Tensor:
    """``features`` unchanged, their gradient scaled by ``scale`` (as in gradient-reversal layers, without the sign)."""
    if scale == 1.0 or not torch.is_grad_enabled():
        return features
    return _ScaleGradient.apply(features, scale)


#: how non-imaging features enter a task path (:class:`TaskHead`)
FUSIONS = ("concat", "film")


class TaskHead(nn.Module):
    """One task path: its own conv blocks (optional), attention, global average pooling, dropout and two dense layers.

    ``extra_features`` non-imaging features (the covariate embedding) enter the path by ``fusion``:

    * ``concat``: joined to the pooled image features before the dense layers;
    * ``film``: feature-wise linear modulation (Perez et al., AAAI 2018) of the pooled image features,
      ``pooled * (1 + gamma) + beta`` with ``gamma``, ``beta`` a linear function of the extra features,
      zero at initialisation, so training starts from the imaging-only path. The covariates act on
      the image evidence multiplicatively rather than beside it.
    """

    def __init__(self, channels: int, hidden: int, out_features: int, dropout: float, block: nn.Module | None = None,
                 extra_features: int = 0, fusion: str = "concat") -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"covariate_fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        self.block = block if block is not None else nn.Identity()
        self.attention = TaskAttention(channels)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.film: nn.Linear | None = None
        if extra_features and fusion == "film":
            self.film = nn.Linear(extra_features, 2 * channels)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        joined = extra_features if self.film is None else 0
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels + joined, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_features),
        )

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``extra`` ``(B, extra_features)``: non-imaging features, fused with the pooled image features by ``fusion``."""
        pooled = self.pool(self.attention(self.block(features))).flatten(1)
        if extra is None:
            return self.mlp(pooled)
        extra = extra.to(pooled.dtype)
        if self.film is not None:
            gamma, beta = self.film(extra).chunk(2, dim=1)
            return self.mlp(pooled * (1 + gamma) + beta)
        return self.mlp(torch.cat([pooled, extra], dim=1))


class DualPathNet(nn.Module):
    """Shared 3D encoder with two attention task paths: response classification and severity regression.

    The encoder is a stack of conv-BN-ReLU(-max-pool) blocks. The first two convolutions have stride
    2 on every axis and the middle blocks halve the grid with max pooling, so a 64 x 64 x 16 input
    is 32 x 32 x 8 after the stem and 4 x 4 x 1 at the last block. The input is small and smooth;
    striding early made a CPU training step 4x faster than stride 1 in the second block, at the
    same validation accuracy (README "Speed").

    Args:
        in_channels: image channels.
        num_classes: response classes.
        channels: encoder widths, one block each.
        strides: stride of each block's convolution.
        hidden: width of each head's hidden dense layer.
        dropout: dropout probability in the heads.
        task_blocks: how many of the last blocks each task path gets its own copy of, instead of
            sharing them (0: the whole encoder is shared). Task blocks let the severity path shape
            its own features rather than use only those the classification loss shapes.
        tasks: the task paths to build; one task gives the single-task baseline with the same encoder.
            A task left out has no parameters and outputs a constant (logits 0, severity 0.5), so the
            output keeps its shape and the other task's metrics, losses and tools work unchanged.
        num_covariates: encoded clinical covariates per subject (0: imaging only).
        covariate_features: width of the covariate embedding shared by both task paths.
        covariate_fusion: how that embedding enters each task path, ``concat`` or ``film``
            (:class:`TaskHead`); without covariates it has no effect.
        response_encoder_gradient: how much of the response loss's gradient reaches the shared encoder
            (1: all of it, the paper's multi-task training; 0: the shared encoder learns from the
            severity alone and the response path from what those features carry, plus its own task
            blocks and head, which learn in full). The forward pass is the same for every value.
        severity_encoder_gradient: the same for the severity loss's gradient (1: all of it). Below 1 the shared
            encoder is shaped mostly by the response while the severity path's own task blocks and head learn in
            full: a severity loss with large gradients (the ``bins`` KL) then cannot take the shared features over.
        pooling: how the middle blocks halve the grid, ``max`` (the paper's kind of CNN), ``avg``
            (keeps sums of intensities over a region, what an atrophy's partial volume changes) or
            ``mixed`` (a learned mix of the two per channel, :class:`MixedPool3d`).
        anti_alias: a low-pass before the encoder's subsampling, so that a scan moved by a voxel reaches the
            heads as nearly the same features: ``none``; ``pool``, the middle blocks' max pooling as Zhang's
            MaxBlurPool (after the ReLU, as Zhang builds it); ``all``, also a :class:`BlurDownsample3d` before
            each strided convolution (cheap, but a linear blur of the block's input, not Zhang's convolution at
            full resolution, ReLU, then blur). Only with ``pooling`` ``max``.
        severity_bins: 0 (a sigmoid severity), or K > 1: the severity path gives a probability over K equal bins
            of the severity's range and the severity is its mean (SFCN's brain-age head, Peng et al. 2021); the
            bins' logits follow the severity in the output, for the ``bins`` severity loss.

    Returns (forward):
        ``(B, num_classes + 1)``: response logits, then the sigmoid severity in [0, 1]; with ``severity_bins`` K,
        ``(B, num_classes + 1 + K)``: the severity is the bins' mean, and their K logits follow it.

    Example:
        >>> net = DualPathNet()
        >>> net(torch.zeros(2, 1, 64, 64, 16)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = NUM_RESPONSE_CLASSES,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int | Sequence[int]] = (2, 2, 1, 1),
        hidden: int = 64,
        dropout: float = 0.3,
        task_blocks: int = 1,
        tasks: Sequence[str] = TASKS,
        num_covariates: int = 0,
        covariate_features: int = 16,
        covariate_fusion: str = "concat",
        response_encoder_gradient: float = 1.0,
        severity_encoder_gradient: float = 1.0,
        pooling: str = "max",
        anti_alias: str = "none",
        severity_bins: int = 0,
    ) -> None:
        super().__init__()
        self.init_args = {
            "in_channels": in_channels, "num_classes": num_classes, "channels": list(channels),
            "strides": [list(s) if isinstance(s, Sequence) else s for s in strides], "hidden": hidden,
            "dropout": dropout, "task_blocks": task_blocks, "tasks": list(tasks),
        }
        if num_covariates:  # recorded only when used, so imaging-only checkpoints keep their stored settings
            self.init_args.update(num_covariates=int(num_covariates), covariate_features=int(covariate_features),
                                  covariate_fusion=covariate_fusion)
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if pooling != "max":  # recorded only when used, like the covariates
            self.init_args["pooling"] = pooling
        if anti_alias not in ANTI_ALIAS:
            raise ConfigError(f"anti_alias must be one of {list(ANTI_ALIAS)}, got {anti_alias!r}")
        if anti_alias != "none" and pooling != "max":
            raise ConfigError(f"anti_alias is built for pooling 'max' (MaxBlurPool), got pooling {pooling!r}")
        if anti_alias != "none":  # recorded only when used
            self.init_args["anti_alias"] = anti_alias
        whole = isinstance(severity_bins, int) and not isinstance(severity_bins, bool)
        if not whole or severity_bins < 0 or severity_bins == 1:
            raise ConfigError(f"severity_bins must be 0 (a sigmoid severity) or a whole number above 1, "
                              f"got {severity_bins!r}")
        if severity_bins:  # recorded only when used
            self.init_args["severity_bins"] = severity_bins
        self.severity_bins = severity_bins
        # not in the state dict: a function of severity_bins, and checkpoints without bins keep their keys
        self.register_buffer("bin_centres", severity_bin_centres(severity_bins), persistent=False)
        for name, scale in (("response_encoder_gradient", response_encoder_gradient),
                            ("severity_encoder_gradient", severity_encoder_gradient)):
            if not 0.0 <= scale <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {scale}")
            if scale != 1.0:  # recorded only when used
                self.init_args[name] = float(scale)
        self.response_encoder_gradient = float(response_encoder_gradient)
        self.severity_encoder_gradient = float(severity_encoder_gradient)
        self.num_covariates = int(num_covariates)
        # encoded clinical covariates -> a small embedding, fused into both task paths
        self.covariate_embedding = (nn.Sequential(nn.Linear(num_covariates, covariate_features), nn.ReLU(inplace=True))
                                    if num_covariates else None)
        extra = covariate_features if num_covariates else 0
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise ConfigError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
        if len(channels) != len(strides):
            raise ConfigError(f"channels and strides need the same length, got {len(channels)} and {len(strides)}")
        if not 0 <= task_blocks < len(channels):
            raise ConfigError(f"task_blocks must be in [0, {len(channels) - 1}], got {task_blocks}")
        shared = len(channels) - task_blocks
        widths = [in_channels, *channels]

        def blocks(first: int, last: int) -> nn.Sequential:
            # no pooling after the strided stem nor after the last block (the heads pool globally)
            return nn.Sequential(*(
                _conv_block(widths[i], widths[i + 1], stride=strides[i], pool=0 < i < len(channels) - 1, pooling=pooling,
                            anti_alias=anti_alias)
                for i in range(first, last)
            ))

        self.encoder = blocks(0, shared)
        self.num_classes = num_classes

        def head(out_features: int) -> TaskHead:
            return TaskHead(channels[-1], hidden, out_features, dropout, blocks(shared, len(channels)) if task_blocks else None,
                            extra, covariate_fusion)

        self.response_head = head(num_classes) if "response" in tasks else ConstantHead(num_classes)
        severity_outputs = severity_bins or 1
        self.severity_head = head(severity_outputs) if "severity" in tasks else ConstantHead(severity_outputs)

    def forward(self, x: torch.Tensor, covariates: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045 (TorchScript)
        return self.task_outputs(self.encoder(x), covariates)

    def task_outputs(self, features: torch.Tensor, covariates: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        """The two task paths on the shared encoder's ``features``: what :meth:`forward` returns.

        Separate so that explaining the covariates (:mod:`monai_mtl.attribution`) runs the encoder once per scan.
        """
        extra: Optional[torch.Tensor] = None  # noqa: UP045
        if self.covariate_embedding is not None:
            if covariates is None:
                raise ConfigError("this network was trained with covariate features: give them "
                                  "(the covariates of the checkpoint's encoding)")
            extra = self.covariate_embedding(covariates.to(features.device, torch.float32))
        response_features = features
        severity_features = features
        if not torch.jit.is_scripting():  # training only: TorchScript has no autograd.Function, export needs none
            response_features = scale_gradient(features, self.response_encoder_gradient)
            severity_features = scale_gradient(features, self.severity_encoder_gradient)
        response_logits = self.response_head(response_features, extra)
        severity_outputs = self.severity_head(severity_features, extra)
        if self.severity_bins:
            severity = (torch.softmax(severity_outputs, dim=1) * self.bin_centres).sum(dim=1, keepdim=True)
            return torch.cat([response_logits, severity, severity_outputs], dim=1)
        return torch.cat([response_logits, torch.sigmoid(severity_outputs)], dim=1)


class ConstantHead(nn.Module):
    """A task path that is not trained: zeros ``(B, out_features)`` (uniform probabilities, severity 0.5 after sigmoid)."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return features.new_zeros(features.shape[0], self.out_features)


class ResNetMultiTask(nn.Module):
    """MONAI's 3D ResNet-18 as the shared encoder, with a response and a severity head (the ResNet baseline).

    The backbone is ``monai.networks.nets.resnet18`` without its classifier; its 512 pooled features
    feed two dropout + linear heads. The first convolution has stride 2 on every axis, as in
    :class:`DualPathNet` (MONAI's default, stride 1, makes CPU training about 4x slower on 64x64x16).

    Returns (forward):
        ``(B, num_classes + 1)`` like :class:`DualPathNet`.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_RESPONSE_CLASSES, dropout: float = 0.1,
                 conv1_stride: int = 2) -> None:
        super().__init__()
        from monai.networks.nets import resnet18

        self.init_args = {"in_channels": in_channels, "num_classes": num_classes, "dropout": dropout, "conv1_stride": conv1_stride}
        self.encoder = resnet18(spatial_dims=3, n_input_channels=in_channels, conv1_t_stride=conv1_stride, feed_forward=False)
        width = 512
        self.num_classes = num_classes
        self.response_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
        self.severity_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        return torch.cat([self.response_head(features), torch.sigmoid(self.severity_head(features))], dim=1)


def network_config(network: nn.Module) -> dict[str, Any]:
    """``{"_target_": "module.Class", **constructor arguments}`` of a network of this package (DDP unwrapped).

    Stored in every checkpoint, so evaluation and inference rebuild exactly the trained network.

    Raises:
        TypeError: a network that does not record its constructor arguments (``init_args``).
    """
    network = getattr(network, "module", network)
    args = getattr(network, "init_args", None)
    if args is None:
        raise TypeError(f"{type(network).__name__} does not record its constructor arguments (init_args)")
    return {"_target_": f"{type(network).__module__}.{type(network).__qualname__}", **args}


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """The network described by :func:`network_config`'s dict (a bundle ``network_def`` dict works too)."""
    from monai.utils import instantiate

    config = dict(config)
    target = config.pop("_target_")
    return instantiate(target if "." in target else f"{__name__}.{target}", "default", **config)
