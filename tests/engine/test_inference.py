from __future__ import annotations

import torch
from engine_fakes import FakeDetector, make_batch

from frcnn.engine.inference import inference_on_dataset, merge_predictions
from frcnn.structures import Detections


class RecordingEvaluator:
    def __init__(self) -> None:
        self.image_ids: list[int] = []
        self.detections: list[Detections] = []

    def update(self, image_ids: list[int], detections: list[Detections]) -> None:
        self.image_ids += image_ids
        self.detections += detections

    def evaluate(self) -> dict:
        return {"AP": 50.0, "count": len(self.image_ids)}


def _det(score: float) -> Detections:
    return Detections(torch.zeros(1, 4), torch.tensor([score]), torch.ones(1, dtype=torch.int64))


def test_merge_drops_padding_duplicates_and_sorts() -> None:
    rank0 = [(4, _det(0.4)), (0, _det(0.0))]
    rank1 = [(1, _det(0.1)), (0, _det(0.9))]  # id 0 repeated by a padding sampler
    merged = merge_predictions([rank0, rank1])
    assert [image_id for image_id, _ in merged] == [0, 1, 4]
    assert float(merged[0][1].scores[0]) == 0.0


def test_inference_on_dataset_single_process() -> None:
    torch.manual_seed(0)
    model = FakeDetector().train()
    batches = [make_batch(it, batch_size=2) for it in (1, 0)]
    coco, voc = RecordingEvaluator(), RecordingEvaluator()
    results = inference_on_dataset(
        model, batches, {"bbox": coco, "voc": voc}, torch.device("cpu"), amp="bf16"
    )
    assert results == {"bbox": {"AP": 50.0, "count": 4}, "voc": {"AP": 50.0, "count": 4}}
    assert coco.image_ids == [0, 1, 2, 3]
    assert model.training  # mode restored
    for image_id, det in zip(coco.image_ids, coco.detections):
        info = batches[1 - image_id // 2].infos[image_id % 2]
        oh, ow = info.original_size
        assert det.boxes.device.type == "cpu" and det.boxes.shape == (1, 4)
        assert (det.boxes[:, 2] <= ow).all() and (det.boxes[:, 3] <= oh).all()
        assert 1 <= int(det.labels[0]) <= 3
