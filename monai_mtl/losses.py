"""Multi-task loss: categorical focal loss on the response plus a regression loss (MSE, L1 or Huber) on the severity, with a choice of task weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss
from torch import nn

from monai_mtl.errors import ConfigError
from monai_mtl.outputs import NUM_RESPONSE_CLASSES, severity_bin_centres, severity_bin_logits, split_output

#: ``loss_weighting`` choices of :class:`MultiTaskLoss`
LOSS_WEIGHTINGS = ("fixed", "uncertainty", "dwa")

#: ``severity_loss`` choices of :class:`MultiTaskLoss`, on the severity scaled to [0, 1]. ``mse`` is the
#: paper's; its gradient vanishes as the error shrinks (2 x 0.03 at 3 points of MAE), while ``l1``'s stays
#: 1 and ``huber`` (PyTorch's, quadratic below ``huber_delta``) is ``l1`` beyond ``huber_delta``. ``bins``
#: (SFCN's brain-age loss, Peng et al. 2021) needs a network with severity bins: the Kullback-Leibler
#: divergence from a Gaussian soft label around the true severity (``severity_bin_sigma``, on [0, 1]) to the
#: bins' predicted distribution.
SEVERITY_LOSSES = ("mse", "l1", "huber", "bins")


class MultiTaskLoss(nn.Module):
    """``response_weight * focal(response) + severity_weight * MSE(severity)`` (paper: 0.6 and 0.4).

    The focal term is the categorical focal loss ``-alpha (1 - p_t)^gamma log p_t`` with the same
    ``alpha`` for every class, summed over classes and averaged over the batch. MONAI's ``FocalLoss``
    computes the per-class terms; two of its defaults would change the loss silently (see
    MONAI-NOTES): a scalar ``alpha`` weights class 0 by ``1 - alpha`` and the others by ``alpha``,
    and ``reduction="mean"`` also averages over classes. So ``alpha`` is passed per class and the
    reduction is done here.

    How the two weighted terms ``L_k`` are combined (``weighting``):

    - ``fixed``: ``L_response + L_severity`` (the paper).
    - ``uncertainty``: ``sum_k exp(-s_k) L_k + s_k`` with learned task log-variances ``s_k`` (Kendall, Gal
      & Cipolla 2018), trained with the network (give the optimizer ``loss.parameters()`` too); under
      DDP their gradients are averaged across ranks like the network's.
    - ``dwa``: dynamic weight averaging (Liu, Johns & Davison 2019): ``sum_k lambda_k L_k`` with
      ``lambda_k = 2 softmax(r / T)_k``, ``r_k`` the ratio of task ``k``'s mean training loss in the last
      two epochs (a task whose loss falls slowly gets more weight), ``T = dwa_temperature``; 1 for
      the first two epochs. :class:`monai_mtl.handlers.LossWeightingHandler` feeds it each epoch's losses.

    The learned log-variances, the DWA weights and their loss history are in ``state_dict()``, so a
    resumed run continues with them.

    Args:
        response_weight: weight of the focal term.
        severity_weight: weight of the MSE term (severity on [0, 1]).
        focal_alpha: class-balancing factor, the same for every class.
        focal_gamma: focusing exponent.
        num_classes: response classes.
        weighting: one of :data:`LOSS_WEIGHTINGS`.
        dwa_temperature: softmax temperature of ``dwa`` (2 in the paper).
        severity_loss: one of :data:`SEVERITY_LOSSES` (the paper: ``mse``).
        huber_delta: where ``huber`` turns from quadratic to linear, on the [0, 1] severity scale.

    ``forward(pred, target)`` takes the network output ``(B, num_classes + 1)`` and
    ``target = {"response": (B,) int, "severity": (B,) float in [0, 1]}``; after each call,
    ``last_components`` holds the detached ``loss``, ``loss_response`` and ``loss_severity``.
    """

    def __init__(
        self,
        response_weight: float = 0.6,
        severity_weight: float = 0.4,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_classes: int = NUM_RESPONSE_CLASSES,
        weighting: str = "fixed",
        dwa_temperature: float = 2.0,
        severity_loss: str = "mse",
        huber_delta: float = 0.05,
        severity_bin_sigma: float = 0.02,
    ) -> None:
        super().__init__()
        if weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
        if severity_loss not in SEVERITY_LOSSES:
            raise ConfigError(f"severity_loss must be one of {SEVERITY_LOSSES}, got {severity_loss!r}")
        self.severity_loss, self.huber_delta = severity_loss, float(huber_delta)
        if not severity_bin_sigma > 0:
            raise ConfigError(f"severity_bin_sigma must be above 0, got {severity_bin_sigma!r}")
        self.severity_bin_sigma = float(severity_bin_sigma)
        self.response_weight = response_weight
        self.severity_weight = severity_weight
        self.num_classes = num_classes
        self.weighting, self.dwa_temperature = weighting, float(dwa_temperature)
        if weighting == "uncertainty":
            self.log_variances = nn.Parameter(torch.zeros(2))
            self.log_variances.register_hook(_mean_over_ranks)
        self.register_buffer("task_weights", torch.ones(2))
        # mean training loss of each task in the last two epochs (row 0: the last one); NaN until known
        self.register_buffer("epoch_losses", torch.full((2, 2), float("nan")))
        self.focal = FocalLoss(
            to_onehot_y=True, use_softmax=True, gamma=focal_gamma, alpha=[focal_alpha] * num_classes, reduction="none"
        )
        self.last_components: dict[str, torch.Tensor] = {}

    def components(self, pred: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The total loss and its two task terms (with gradients)."""
        logits, severity = split_output(pred, self.num_classes)
        response = target["response"].long().view(-1, 1)
        focal = self.focal(logits, response).sum(dim=1).mean()
        true = target["severity"].to(severity.dtype)
        if self.severity_loss == "bins":
            regression = self.bins_term(severity_bin_logits(pred, self.num_classes), true)
        else:
            regression = self.severity_term(severity, true)
        return {"loss": self.combine(focal, regression), "loss_response": focal, "loss_severity": regression}

    def severity_term(self, predicted: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """The batch mean of the ``severity_loss`` between predicted and true severities on [0, 1]."""
        if self.severity_loss == "l1":
            return F.l1_loss(predicted, true)
        if self.severity_loss == "huber":
            return F.huber_loss(predicted, true, delta=self.huber_delta)
        return F.mse_loss(predicted, true)

    def bins_term(self, logits: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """The batch mean of KL(soft label || predicted bins): the soft label is a Gaussian of standard deviation
        ``severity_bin_sigma`` around each true severity on [0, 1], over the bins' centres, normalised."""
        bins = logits.shape[1]
        if bins < 2:
            raise ConfigError("severity_loss 'bins' needs a network with severity bins (the severity_bins key, "
                              f"network_def#severity_bins, above 1); this network's output has {bins} bin logits")
        centres = severity_bin_centres(bins).to(logits)
        soft = torch.softmax(-0.5 * ((centres[None, :] - true.view(-1, 1)) / self.severity_bin_sigma) ** 2, dim=1)
        return F.kl_div(torch.log_softmax(logits, dim=1), soft, reduction="batchmean")

    def combine(self, response_loss: torch.Tensor, severity_loss: torch.Tensor) -> torch.Tensor:
        """The total of the two task losses under this loss's ``weighting``."""
        terms = torch.stack([self.response_weight * response_loss, self.severity_weight * severity_loss])
        if self.weighting == "uncertainty":
            log_variances = self.log_variances.to(terms.device)  # differentiable: the parameter may stay on the CPU
            return (torch.exp(-log_variances) * terms + log_variances).sum()
        if self.weighting == "dwa":
            return (self.task_weights.to(terms) * terms).sum()
        return terms.sum()

    def end_epoch(self, response_loss: float, severity_loss: float) -> None:
        """Record an epoch's mean training loss per task; with ``dwa``, set the next epoch's task weights."""
        self.epoch_losses[1] = self.epoch_losses[0].clone()
        self.epoch_losses[0] = torch.tensor([response_loss, severity_loss], dtype=self.epoch_losses.dtype)
        if self.weighting == "dwa" and not torch.isnan(self.epoch_losses).any():
            ratios = self.epoch_losses[0] / self.epoch_losses[1].clamp_min(1e-12)
            self.task_weights = 2.0 * torch.softmax(ratios / self.dwa_temperature, dim=0)

    def forward(self, pred: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.components(pred, target)
        self.last_components = {k: v.detach() for k, v in parts.items()}
        return parts["loss"]


def _mean_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    # the loss is not inside DistributedDataParallel: average its parameters' gradients as DDP does the network's
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        grad = grad.clone()
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grad
