"""Task heads: `cls` (pooled classifier), `det` (torchvision detectors), `seg` (semantic FPN / UPerNet)."""

from pretrain.models.heads.cls import ClsHead
from pretrain.models.heads.det import DET_HEADS, DetHead
from pretrain.models.heads.pyramid import SimpleFeaturePyramid
from pretrain.models.heads.seg import SEG_HEADS, SegHead

__all__ = ["DET_HEADS", "SEG_HEADS", "ClsHead", "DetHead", "SegHead", "SimpleFeaturePyramid"]
