"""Classification head: mean of the patch tokens → LayerNorm(s) → Linear (Mod-Squad's pooled head)."""

from __future__ import annotations

import logging

import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ORDERS = ("project", "modsquad")


class ClsHead(nn.Module):
    """Pooled-token classifier.

    Args:
        dim: token width D.
        num_classes: C.
        num_prefix_tokens: leading tokens (class token) left out of the mean pool.
        label_smoothing: for the cross-entropy loss.
        order: `project` = mean of the backbone's FINAL-NORMED patch tokens → fc_norm → Linear; `modsquad` =
            Mod-Squad's class path: mean of the UN-normed patch tokens (the backbone's final norm is skipped)
            → fc_norm (eps 1e-6) → the task head's LayerNorm (eps 1e-5) → Linear. `backbone_norm` tells the
            caller which tokens to pass (`VisionTransformer.forward_features(..., norm=head.backbone_norm)`).
    """

    def __init__(self, *, dim: int, num_classes: int, num_prefix_tokens: int = 1, label_smoothing: float = 0.0,
                 order: str = "project") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: the classification head needs at least one class")
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {ORDERS}")
        self.num_prefix_tokens = num_prefix_tokens
        self.label_smoothing = label_smoothing
        self.order = order
        self.backbone_norm = order == "project"
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_norm = nn.LayerNorm(dim) if order == "modsquad" else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def predictor_modules(self) -> list[nn.Module]:
        """The whole head is the classifier (counted as "heads", no "decoder" part)."""
        return [self.fc_norm, self.head_norm, self.fc]

    def forward(self, tokens_BND: Tensor) -> Tensor:
        """tokens_BND [B,P+N,D] (P prefix tokens first; final-normed iff `backbone_norm`) → logits [B,C]."""
        pooled_BD = tokens_BND[:, self.num_prefix_tokens:].mean(dim=1)
        return self.fc(self.head_norm(self.fc_norm(pooled_BD)))

    def loss(self, logits_BC: Tensor, labels_B: Tensor) -> dict[str, Tensor]:
        """Cross-entropy (with label smoothing) of logits [B,C] against int64 labels [B] → {"cls": scalar}."""
        num_classes = logits_BC.shape[1]
        if labels_B.numel() and (int(labels_B.min()) < 0 or int(labels_B.max()) >= num_classes):
            raise ValueError(f"cls labels must lie in [0, {num_classes}); got range "
                             f"[{int(labels_B.min())}, {int(labels_B.max())}]")
        return {"cls": F.cross_entropy(logits_BC, labels_B, label_smoothing=self.label_smoothing)}
