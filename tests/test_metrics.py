"""Golden-value tests for pretrain.metrics: hand-computed tiny inputs, ignore pixels, cross-rank sync."""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pretrain.metrics import (
    ClassificationMeter,
    CocoDetectionMeter,
    SegmentationMeter,
    category_ids_from_gt,
    reduce_zero_label,
)


class FakeWorld:
    """N 'ranks' as threads; reduce/gather behave like all_reduce(SUM) / all_gather_object, blocking like them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots: list = [None] * size

    def _exchange(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return everyone

    def reduce_fn(self, rank: int):
        return lambda t: torch.stack(self._exchange(rank, t.clone())).sum(dim=0)

    def gather_fn(self, rank: int):
        # The JSON round trip proves the payload is plain data (what all_gather_object would pickle).
        return lambda obj: self._exchange(rank, json.loads(json.dumps(obj)))

    def sync_all(self, meters: list, fn_name: str) -> None:
        with ThreadPoolExecutor(self.size) as pool:
            futures = [pool.submit(m.sync, getattr(self, fn_name)(r)) for r, m in enumerate(meters)]
            for f in futures:
                f.result()


# ---------------------------------------------------------------------------------------------------- classification

# 7 samples, 6 classes; rank of the label's logit (0 = arg-max) in the comment.
LOGITS = torch.tensor(
    [
        [0.1, 0.2, 0.9, 0.3, 0.0, 0.4],  # label 2, rank 0 → top1 hit
        [0.5, 0.9, 0.1, 0.7, 0.2, 0.3],  # label 0, rank 2 (0.9, 0.7 above) → top5 hit only
        [0.6, 0.5, 0.4, 0.3, 0.1, 0.2],  # label 4, rank 5 (lowest) → miss both
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 5, rank 0 → top1 hit
        [0.9, 0.5, 0.8, 0.7, 0.6, 0.1],  # label 1, rank 4 → top5 hit only
        [0.2, 0.1, 0.9, 0.8, 0.0, 0.3],  # label 3, rank 1 → top5 hit only
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0, rank 0 → top1 hit
    ]
)
LABELS = torch.tensor([2, 0, 4, 5, 1, 3, 0])
# top1 = 3/7, top5 = 6/7. Batches of 3, 3, 1: the mean of batch means would give top1 (1/3 + 1/3 + 1) / 3 = 5/9.
TOP1, TOP5 = 100 * 3 / 7, 100 * 6 / 7
BATCHES = [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_topk_counts_with_uneven_last_batch():
    meter = ClassificationMeter(topk=(1, 5))
    for sl in BATCHES:
        meter.update(LOGITS[sl], LABELS[sl])
    out = meter.compute()
    assert out == pytest.approx({"top1": TOP1, "top5": TOP5})
    assert out["top1"] != pytest.approx(100 * 5 / 9)
    assert meter.num_samples == 7


def test_topk_larger_than_num_classes_counts_every_sample():
    meter = ClassificationMeter(topk=(1, 5))
    meter.update(torch.tensor([[0.2, 0.8, 0.0], [0.9, 0.05, 0.05]]), torch.tensor([2, 0]))
    assert meter.compute() == pytest.approx({"top1": 50.0, "top5": 100.0})


def test_classification_sync_three_ranks_one_empty():
    world = FakeWorld(3)
    meters = [ClassificationMeter(topk=(1, 5)) for _ in range(3)]
    meters[0].update(LOGITS[BATCHES[0]], LABELS[BATCHES[0]])
    meters[0].update(LOGITS[BATCHES[1]], LABELS[BATCHES[1]])
    meters[1].update(LOGITS[BATCHES[2]], LABELS[BATCHES[2]])  # rank 2 saw nothing but must join the collective
    world.sync_all(meters, "reduce_fn")
    for meter in meters:
        assert meter.compute() == pytest.approx({"top1": TOP1, "top5": TOP5})
    world.sync_all(meters, "reduce_fn")  # repeatable: local counts are kept, no double counting
    assert meters[2].compute() == pytest.approx({"top1": TOP1, "top5": TOP5})
    assert meters[1].num_samples == 7


def test_classification_bad_input():
    meter = ClassificationMeter()
    with pytest.raises(ValueError, match="logits"):
        meter.update(LOGITS, LABELS[:3])
    with pytest.raises(ValueError, match="no samples"):
        meter.compute()
    with pytest.raises(ValueError, match="topk"):
        ClassificationMeter(topk=(0, 5))


# ------------------------------------------------------------------------------------------------------ segmentation

# 3 real classes (+ an unused 4th), ignore 255. Pixel (0, 3) is ignored although predicted as 2.
SEG_LABEL = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
SEG_PRED = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
# Valid (gt, pred) pairs: (0,0) (0,1) (1,1) (2,2) (2,0) (1,1) (1,0)
# confusion rows gt:  gt0 [1,1,0,0]  gt1 [1,2,0,0]  gt2 [1,0,1,0]  gt3 [0,0,0,0]
# diag [1,2,1,0]; gt sums [2,3,2,0]; pred sums [3,3,1,0]; union = gt + pred - diag = [4,4,2,0]
# IoU = [1/4, 2/4, 1/2, class 3 has union 0 (no GT, no prediction)]
# "skip" (mmseg): class 3 left out → mIoU = (0.25 + 0.5 + 0.5) / 3 = 41.667 %
# "zero" (official dense meters): class 3 counts 0 → mIoU = (0.25 + 0.5 + 0.5 + 0) / 4 = 31.25 %
# acc = [1/2, 2/3, 1/2, NaN] → mAcc = (0.5 + 0.6667 + 0.5) / 3 = 55.556 % under both; aAcc = 4 / 7 = 57.143 %
SEG_GOLDEN = {"mIoU": 100 * 1.25 / 3, "mAcc": 100 * (0.5 + 2 / 3 + 0.5) / 3, "aAcc": 100 * 4 / 7}


def test_segmentation_golden_with_ignore_and_absent_class():
    meter = SegmentationMeter(num_classes=4, ignore_index=255, empty_classes="skip")
    meter.update(SEG_PRED, SEG_LABEL)
    assert meter.confusion.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert meter.compute() == pytest.approx(SEG_GOLDEN)
    assert math.isnan(meter.class_iou()[3])
    official = SegmentationMeter(num_classes=4, ignore_index=255)  # the default: "zero"
    official.update(SEG_PRED, SEG_LABEL)
    assert official.class_iou().tolist() == [0.25, 0.5, 0.5, 0.0]
    assert official.compute() == pytest.approx({**SEG_GOLDEN, "mIoU": 31.25})


def test_segmentation_empty_class_conventions_pooled_over_images():
    """Two images, C = 4. Class 3 is predicted only on an ignored pixel, so it stays empty (union 0)."""
    meter_zero, meter_skip = SegmentationMeter(num_classes=4), SegmentationMeter(num_classes=4, empty_classes="skip")
    images = [(torch.tensor([[0, 1, 2], [1, 1, 0]]), torch.tensor([[0, 0, 255], [1, 1, 1]])),
              (torch.tensor([[2, 0], [0, 3]]), torch.tensor([[2, 2], [0, 255]]))]
    for meter in (meter_zero, meter_skip):
        for pred, label in images:
            meter.update(pred, label)
    # valid (gt, pred): image 1 (0,0) (0,1) (1,1) (1,1) (1,0) [pred 2 at the ignored pixel dropped];
    #                   image 2 (2,2) (2,0) (0,0) [pred 3 at the ignored pixel dropped]
    # rows gt: [2,1,0,0] [1,2,0,0] [1,0,1,0] [0,0,0,0]; diag [2,2,1,0]; gt sums [3,3,2,0]; pred sums [4,3,1,0]
    # union = gt + pred − diag = [5, 4, 2, 0] → IoU = [2/5, 2/4, 1/2, empty]
    assert meter_zero.confusion.tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # acc = [2/3, 2/3, 1/2, no GT] → mAcc = (11/6) / 3 = 61.111 % (mmseg's, both); aAcc = 5 correct / 8 valid
    common = {"mAcc": 100 * 11 / 18, "aAcc": 100 * 5 / 8}
    assert meter_zero.compute() == pytest.approx({"mIoU": 100 * (0.4 + 0.5 + 0.5 + 0) / 4, **common})  # 35 %
    assert meter_skip.compute() == pytest.approx({"mIoU": 100 * (0.4 + 0.5 + 0.5) / 3, **common})  # 46.667 %
    # with E empty classes out of C, zero = skip · (C − E) / C (the NYUD: 38.03 · 37/40 = 35.18)
    assert meter_zero.compute()["mIoU"] == pytest.approx(meter_skip.compute()["mIoU"] * 3 / 4)
    with pytest.raises(ValueError, match="empty_classes"):
        SegmentationMeter(num_classes=4, empty_classes="nan")


def test_segmentation_false_positive_class_counts_as_zero_iou():
    # gt [[0,0],[1,1]], pred [[0,3],[1,1]], C=4: IoU = [1/2, 2/2, class 2 empty, 0/1 (predicted, no GT)]
    # "skip": mIoU = (0.5 + 1 + 0) / 3 = 50 %; "zero": (0.5 + 1 + 0 + 0) / 4 = 37.5 %
    # acc = [1/2, 1, NaN, NaN] → mAcc 75 %; aAcc = 3/4
    for empty_classes, miou in (("skip", 50.0), ("zero", 37.5)):
        meter = SegmentationMeter(num_classes=4, empty_classes=empty_classes)
        meter.update(torch.tensor([[0, 3], [1, 1]]), torch.tensor([[0, 0], [1, 1]]))
        assert meter.compute() == pytest.approx({"mIoU": miou, "mAcc": 75.0, "aAcc": 75.0})


def test_segmentation_accepts_logits_batched():
    logits_BCHW = torch.nn.functional.one_hot(SEG_PRED, 4).permute(2, 0, 1).float().unsqueeze(0)
    meter = SegmentationMeter(num_classes=4, empty_classes="skip")
    meter.update(logits_BCHW, SEG_LABEL.unsqueeze(0).to(torch.uint8))
    assert meter.compute() == pytest.approx(SEG_GOLDEN)


def test_segmentation_sync_two_ranks_equals_one_meter():
    second_pred, second_label = torch.tensor([[0, 3], [1, 1]]), torch.tensor([[0, 0], [255, 1]])
    whole = SegmentationMeter(num_classes=4)
    whole.update(SEG_PRED, SEG_LABEL)
    whole.update(second_pred, second_label)
    halves = [SegmentationMeter(num_classes=4) for _ in range(2)]
    halves[0].update(SEG_PRED, SEG_LABEL)
    halves[1].update(second_pred, second_label)
    FakeWorld(2).sync_all(halves, "reduce_fn")
    for meter in halves:
        assert torch.equal(meter.confusion, whole.confusion)
        assert meter.compute() == pytest.approx(whole.compute())


def test_segmentation_bad_input():
    meter = SegmentationMeter(num_classes=150)
    with pytest.raises(ValueError, match="reduce_zero_label"):
        meter.update(torch.tensor([[0, 1]]), torch.tensor([[150, 1]]))  # raw ADE label 150 without the shift
    with pytest.raises(ValueError, match="resize logits"):
        meter.update(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="no valid"):
        meter.compute()
    with pytest.raises(ValueError, match="collides"):
        SegmentationMeter(num_classes=4, ignore_index=3)


def test_reduce_zero_label_torch_and_numpy():
    raw = [0, 1, 2, 150, 255]
    expected = [255, 0, 1, 149, 255]
    out = reduce_zero_label(torch.tensor(raw, dtype=torch.uint8))
    assert out.dtype == torch.uint8 and out.tolist() == expected
    assert reduce_zero_label(torch.tensor(raw, dtype=torch.int64)).tolist() == expected
    out_np = reduce_zero_label(np.array(raw, dtype=np.uint8))
    assert out_np.dtype == np.uint8 and out_np.tolist() == expected
    with pytest.raises(ValueError, match="integer"):
        reduce_zero_label(torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------------------------------------- detection

CAT_IDS = [1, 3, 7]  # non-contiguous original ids; detector labels 1, 2, 3


def make_gt(boxes_by_image: dict[int, list[tuple[int, list[float]]]]) -> dict:
    """COCO dict from {image_id: [(category_id, [x, y, w, h]), ...]}; images 200×200."""
    anns = []
    for image_id, objects in boxes_by_image.items():
        for cat_id, bbox in objects:
            anns.append(
                {"id": len(anns) + 1, "image_id": image_id, "category_id": cat_id, "bbox": bbox,
                 "area": bbox[2] * bbox[3], "iscrowd": 0}
            )  # fmt: skip
    return {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in boxes_by_image],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS],
    }


# One small (area 400 < 32²), one medium (2500) and one large (10000 > 96²) object, so APs/APm/APl all exist.
THREE_SIZES = {10: [(1, [10, 10, 20, 20]), (3, [50, 50, 50, 50]), (7, [0, 100, 100, 100])], 20: [(3, [20, 20, 60, 60])]}


def dets_from(objects: list[tuple[int, list[float]]], *, label_of=None) -> dict[str, torch.Tensor]:
    """Torchvision-style output that reproduces `objects` exactly (xyxy boxes, contiguous labels)."""
    label_of = label_of or (lambda cat_id: CAT_IDS.index(cat_id) + 1)
    boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([label_of(c) for c, _ in objects], dtype=torch.int64)
    return {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(objects)), "labels": labels}


NO_DETS = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}


def test_coco_perfect_detections_give_ap_100_and_stdout_stays_clean(capsys, caplog):
    gt = make_gt(THREE_SIZES)
    gt_before = copy.deepcopy(gt)
    meter = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=category_ids_from_gt(gt))
    meter.update(torch.tensor([10, 20]), [dets_from(THREE_SIZES[10]), dets_from(THREE_SIZES[20])])
    with caplog.at_level(logging.INFO, logger="pretrain.metrics.detection"):
        out = meter.compute()
    assert out == pytest.approx({k: 100.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
    assert capsys.readouterr().out == ""
    assert "Average Precision" in caplog.text
    assert gt == gt_before  # COCOeval's 'ignore' keys went into a copy
    assert meter.results()[0] == {"image_id": 10, "category_id": 1, "bbox": [10.0, 10.0, 20.0, 20.0],
                                  "score": pytest.approx(0.9)}  # fmt: skip


def test_coco_known_iou_two_thirds():
    # GT [0,0,100,100]; detection shifted 20 px right: IoU = 80·100 / (120·100) = 2/3.
    # Matched at IoU thresholds .50 .55 .60 .65 (4 of 10) → AP = 40, AP50 = 100, AP75 = 0; large object only.
    gt = make_gt({1: [(1, [0, 0, 100, 100])]})
    meter = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=CAT_IDS)
    meter.update([1], [dets_from([(1, [20, 0, 100, 100])])])
    out = meter.compute()
    assert out["AP"] == pytest.approx(40.0) and out["APl"] == pytest.approx(40.0)
    assert out["AP50"] == pytest.approx(100.0) and out["AP75"] == pytest.approx(0.0)
    assert math.isnan(out["APs"]) and math.isnan(out["APm"])  # no GT in those ranges: COCOeval's -1 → NaN


def test_coco_category_id_restoration():
    gt = make_gt({10: [(3, [50, 50, 50, 50])]})
    right = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=CAT_IDS)
    right.update([10], [dets_from([(3, [50, 50, 50, 50])], label_of=lambda c: 2)])  # label 2 → id 3
    assert right.results()[0]["category_id"] == 3
    assert right.compute()["AP"] == pytest.approx(100.0)
    wrong = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=CAT_IDS)
    wrong.update([10], [dets_from([(3, [50, 50, 50, 50])], label_of=lambda c: 3)])  # label 3 → id 7: wrong class
    assert wrong.results()[0]["category_id"] == 7
    assert wrong.compute()["AP"] == pytest.approx(0.0)


def test_coco_empty_detections_give_zero():
    meter = CocoDetectionMeter(gt=make_gt(THREE_SIZES), contiguous_to_cat_id=CAT_IDS)
    meter.update([10, 20], [NO_DETS, NO_DETS])
    assert meter.compute() == pytest.approx({k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})


def test_coco_scores_only_seen_images_and_deduplicates():
    meter = CocoDetectionMeter(gt=make_gt(THREE_SIZES), contiguous_to_cat_id=CAT_IDS)
    meter.update([10], [dets_from(THREE_SIZES[10])])
    meter.update([10], [NO_DETS])  # padded repeat of image 10: ignored, not a second (empty) prediction
    assert meter.num_images == 1 and len(meter.results()) == 3
    assert meter.compute()["AP"] == pytest.approx(100.0)  # image 20 was never seen, so its GT is not a miss


def test_coco_sync_two_ranks_with_padding_duplicate():
    gt = make_gt(THREE_SIZES)
    meters = [CocoDetectionMeter(gt=gt, contiguous_to_cat_id=CAT_IDS) for _ in range(2)]
    meters[0].update([10], [dets_from(THREE_SIZES[10])])
    meters[1].update([20, 10], [dets_from(THREE_SIZES[20]), dets_from(THREE_SIZES[10])])  # 10 = sampler padding
    assert meters[0].compute()["AP"] == pytest.approx(100.0)  # local: image 10 only
    FakeWorld(2).sync_all(meters, "gather_fn")
    for meter in meters:
        assert meter.num_images == 2 and len(meter.results()) == 4
        assert meter.compute()["AP"] == pytest.approx(100.0)
    # an image seen with no detections on one rank is still scored after the merge: its GT objects become misses
    meters = [CocoDetectionMeter(gt=gt, contiguous_to_cat_id=CAT_IDS) for _ in range(2)]
    meters[0].update([10, 20], [dets_from(THREE_SIZES[10]), NO_DETS])
    meters[1].update([10], [dets_from(THREE_SIZES[10])])
    FakeWorld(2).sync_all(meters, "gather_fn")
    assert meters[1].compute()["AP"] < 100.0


def test_coco_bad_input():
    gt = make_gt({10: [(3, [50, 50, 50, 50])]})
    with pytest.raises(ValueError, match=r"\[5\]"):
        CocoDetectionMeter(gt=gt, contiguous_to_cat_id=[1, 3, 5])
    no_area = copy.deepcopy(gt)
    del no_area["annotations"][0]["area"]
    with pytest.raises(ValueError, match="area"):
        CocoDetectionMeter(gt=no_area, contiguous_to_cat_id=CAT_IDS)
    meter = CocoDetectionMeter(gt=gt, contiguous_to_cat_id=CAT_IDS)
    with pytest.raises(ValueError, match="image id 99"):
        meter.update([99], [NO_DETS])
    with pytest.raises(ValueError, match="outside 1..3"):
        meter.update([10], [dets_from([(3, [0, 0, 5, 5])], label_of=lambda c: 0)])
    with pytest.raises(ValueError, match="no images"):
        meter.compute()


def test_metrics_package_imports_no_distributed_code():
    import ast
    import pathlib

    import pretrain.metrics

    for path in pathlib.Path(pretrain.metrics.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.startswith(("deepspeed", "torch.distributed"))]
            assert not bad, f"{path.name} imports {bad}: inject reduce_fn/gather_fn instead"
