"""Multi-task loss: categorical focal loss on the response plus MSE on the severity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss
from torch import nn

from monai_mtl.outputs import NUM_RESPONSE_CLASSES, split_output


class MultiTaskLoss(nn.Module):
    """``response_weight * focal(response) + severity_weight * MSE(severity)`` (paper: 0.6 and 0.4).

    The focal term is the categorical focal loss ``-alpha (1 - p_t)^gamma log p_t`` with the same
    ``alpha`` for every class, summed over classes and averaged over the batch. MONAI's ``FocalLoss``
    computes the per-class terms; two of its defaults would change the loss silently (see
    MONAI-NOTES): a scalar ``alpha`` weights class 0 by ``1 - alpha`` and the others by ``alpha``,
    and ``reduction="mean"`` also averages over classes. So ``alpha`` is passed per class and the
    reduction is done here.

    Args:
        response_weight: weight of the focal term.
        severity_weight: weight of the MSE term (severity on [0, 1]).
        focal_alpha: class-balancing factor, the same for every class.
        focal_gamma: focusing exponent.
        num_classes: response classes.

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
    ) -> None:
        super().__init__()
        self.response_weight = response_weight
        self.severity_weight = severity_weight
        self.num_classes = num_classes
        self.focal = FocalLoss(
            to_onehot_y=True, use_softmax=True, gamma=focal_gamma, alpha=[focal_alpha] * num_classes, reduction="none"
        )
        self.last_components: dict[str, torch.Tensor] = {}

    def components(self, pred: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The total loss and its two task terms (with gradients)."""
        logits, severity = split_output(pred, self.num_classes)
        response = target["response"].long().view(-1, 1)
        focal = self.focal(logits, response).sum(dim=1).mean()
        mse = F.mse_loss(severity, target["severity"].to(severity.dtype))
        total = self.response_weight * focal + self.severity_weight * mse
        return {"loss": total, "loss_response": focal, "loss_severity": mse}

    def forward(self, pred: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = self.components(pred, target)
        self.last_components = {k: v.detach() for k, v in parts.items()}
        return parts["loss"]
