"""Detection head: torchvision Faster R-CNN or RetinaNet on a ViTDet simple feature pyramid.

torchvision's detectors call `backbone(images)` with one argument, after their own transform (resize to
`min_size`/`max_size`, ImageNet normalisation, padding). `ViTDetBackbone` therefore carries the detection task's
id (a constant) to the ViT for routing. It holds the ViT by a plain reference (not a registered submodule): the ViT
belongs to `MultiTaskModel.backbone`, and registering it twice would duplicate its weights in state dicts.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from pretrain.models.heads.pyramid import SCALES, SimpleFeaturePyramid
from pretrain.models.sample_random import active

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSS_PREFIX = "det_"  # DetHead's training losses are torchvision's keys with this prefix


class KeyedSampler(BalancedPositiveNegativeSampler):
    """torchvision's fg/bg sampler (RPN anchors, RoIs) with its contract and counts: per image, min(batch_size_per_image
    · positive_fraction, #positives) positives, negatives fill up to batch_size_per_image; masks per image.

    Outside a keyed forward it IS torchvision's (`torch.randperm` per image, the process RNG). Inside one
    (`sample_random.py`) each image picks the elements of smallest keyed score, so the picks follow the image, not
    the rank or its batch-mates, and the number picked is recorded for `terms`: torchvision's losses of this stage
    are means over the local batch's picks, which the training side turns into means over the global batch's.
    """

    def __init__(self, *, batch_size_per_image: int, positive_fraction: float, terms: tuple[str, ...]) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.terms = terms

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        keyed = active()
        if keyed is None:
            return super().__call__(matched_idxs)
        device = matched_idxs[0].device if matched_idxs else torch.device("cpu")
        # one call for the batch; element j of image b is scored by (b's key, call, j): no dependence on the others
        scores_BM = keyed.bits(len(matched_idxs), max((m.numel() for m in matched_idxs), default=0), device)
        pos_idx, neg_idx, picked = [], [], 0
        for labels, scores in zip(matched_idxs, scores_BM):
            positive, negative = torch.where(labels >= 1)[0], torch.where(labels == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            for chosen, out in ((_smallest(positive, scores, num_pos), pos_idx),
                                (_smallest(negative, scores, num_neg), neg_idx)):
                mask = torch.zeros_like(labels, dtype=torch.uint8)
                mask[chosen] = 1
                out.append(mask)
            picked += num_pos + num_neg
        for term in self.terms:
            keyed.count_term(term, picked)
        return pos_idx, neg_idx


def _smallest(idx: Tensor, scores: Tensor, k: int) -> Tensor:
    """The k of `idx` with the smallest scores (ties: the lower index, so any layout picks the same)."""
    return idx[scores[idx].sort(stable=True).indices[:k]]


def _key_samplers(detector: FasterRCNN) -> FasterRCNN:
    """Swap the RPN's and the RoI heads' samplers for `KeyedSampler`s of the same sizes (torchvision's
    constructor takes no sampler; they hold no state)."""
    for stage, terms in ((detector.rpn, ("loss_objectness", "loss_rpn_box_reg")),
                         (detector.roi_heads, ("loss_classifier", "loss_box_reg"))):
        old = stage.fg_bg_sampler
        stage.fg_bg_sampler = KeyedSampler(batch_size_per_image=old.batch_size_per_image,
                                           positive_fraction=old.positive_fraction,
                                           terms=tuple(LOSS_PREFIX + t for t in terms))
    return detector


class ViTDetBackbone(nn.Module):
    """ViT (last block, final norm) → simple feature pyramid, for torchvision detectors.

    Args:
        vit: the shared `VisionTransformer` (held by reference, see module docstring).
        task_id: the detection task's id, used for every image's routing and task embedding.
        out_channels: pyramid width C.
        norm: pyramid norm (`ln` | `gn`).
    """

    def __init__(self, *, vit: nn.Module, task_id: int, out_channels: int, norm: str = "ln") -> None:
        super().__init__()
        self._vit = (vit,)  # a tuple keeps nn.Module from registering it
        self.task_id = task_id
        self.out_channels = out_channels
        self.pyramid = SimpleFeaturePyramid(in_dim=vit.embed_dim, out_channels=out_channels, norm=norm)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(max(1, int(self._vit[0].patch_size / s)) for s in SCALES)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """x [B,3,H,W] normalised, padded by the detector's transform → pyramid '0'..'3' of [B,C,*,*]."""
        task_B = torch.full((x.shape[0],), self.task_id, dtype=torch.long, device=x.device)
        (feat_BDhw,) = self._vit[0].forward_intermediates(x, task_B, indices=1, norm=True, intermediates_only=True)
        return self.pyramid(feat_BDhw)


def faster_rcnn(*, backbone: ViTDetBackbone, num_classes: int, min_size: int, max_size: int, box_fc_dim: int = 1024,
                rois_per_image: int = 512, proposals: int = 2000) -> FasterRCNN:
    """Faster R-CNN with one anchor size per level (8 × stride) × 3 ratios and 7×7 RoIAlign over the 4 levels.

    box_fc_dim: width of the two-FC box head; rois_per_image: RoIs sampled per image for the box head in training;
    proposals: RPN proposals kept per image in training, before and after NMS. The defaults are torchvision's
    (Detectron's COCO recipe); with a few objects per small image far fewer RoIs still hold every positive, and at
    those defaults the box head (RoIAlign backward, the 12544→1024 FC) is most of a CPU step.
    """
    sizes = tuple((8 * s,) for s in backbone.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(backbone.out_channels * 7 * 7, box_fc_dim)
    detector = FasterRCNN(backbone, min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_MEAN),
                          image_std=list(IMAGENET_STD), rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                          box_head=box_head, box_predictor=FastRCNNPredictor(box_fc_dim, num_classes),
                          box_batch_size_per_image=rois_per_image, rpn_pre_nms_top_n_train=proposals,
                          rpn_post_nms_top_n_train=proposals, size_divisible=max(backbone.strides))
    return _key_samplers(detector)


def retinanet(*, backbone: ViTDetBackbone, num_classes: int, min_size: int, max_size: int,
              **two_stage: int) -> RetinaNet:
    """RetinaNet with 3 scales (4·stride·2^(i/3)) × 3 ratios per level and a GroupNorm head (torchvision's v2).
    It has no RoI stage: Faster R-CNN's `two_stage` settings do not apply. Nothing random in training, and its losses
    are per-image means averaged over the images, so ranks of equal batches average to the global batch's."""
    sizes = tuple(tuple(int(round(4 * s * 2 ** (i / 3))) for i in range(3)) for s in backbone.strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    c = backbone.out_channels
    head = RetinaNetHead(c, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, math.gcd(32, c)))
    return RetinaNet(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                     image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), anchor_generator=anchors,
                     head=head, size_divisible=max(backbone.strides))


DET_HEADS: dict[str, Callable[..., nn.Module]] = {"fasterrcnn": faster_rcnn, "retinanet": retinanet}


class DetHead(nn.Module):
    """A torchvision detector on the shared ViT.

    Args:
        vit: the shared backbone (by reference). task_id: the det task id.
        kind: key of `DET_HEADS`. num_classes: foreground classes K (labels 1..K; the detector gets K+1).
        min_size, max_size: the detector transform's resize bounds (torchvision's defaults 800/1333 are too big).
        out_channels: pyramid width. norm: pyramid norm.
        two_stage: Faster R-CNN's `box_fc_dim`, `rois_per_image`, `proposals` (see `faster_rcnn`).
    """

    def __init__(self, *, vit: nn.Module, task_id: int, kind: str = "fasterrcnn", num_classes: int = 80,
                 min_size: int = 512, max_size: int = 512, out_channels: int = 256, norm: str = "ln",
                 **two_stage: int) -> None:
        super().__init__()
        if kind not in DET_HEADS:
            raise ValueError(f"unknown det head {kind!r}; expected one of {', '.join(DET_HEADS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: the detector needs at least one foreground class")
        self.kind = kind
        self.num_classes = num_classes
        backbone = ViTDetBackbone(vit=vit, task_id=task_id, out_channels=out_channels, norm=norm)
        self.detector = DET_HEADS[kind](backbone=backbone, num_classes=num_classes + 1, min_size=min_size,
                                        max_size=max_size, **two_stage)

    def predictor_modules(self) -> list[nn.Module]:
        """The final class/box predictors (counted as "heads"; everything else here is "decoder")."""
        if self.kind == "fasterrcnn":
            return [self.detector.roi_heads.box_predictor]
        head = self.detector.head
        return [head.classification_head.cls_logits, head.regression_head.bbox_reg]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """images: list of float [3,H,W] in [0,1]. Training: targets (boxes [n,4] xyxy float, labels [n] int64 in
        1..K) → losses prefixed `det_`. Eval: list of {boxes [m,4], scores [m], labels [m]} in input pixels."""
        if self.training:
            if targets is None:
                raise ValueError("det training forward needs targets (list of {'boxes', 'labels'})")
            for i, t in enumerate(targets):
                labels = t["labels"]
                if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
                    raise ValueError(f"det target {i}: labels must lie in 1..{self.num_classes}, got "
                                     f"[{int(labels.min())}, {int(labels.max())}]")
            losses = self.detector(images, targets)
            return {f"{LOSS_PREFIX}{k}": v for k, v in losses.items()}
        return self.detector(images)
