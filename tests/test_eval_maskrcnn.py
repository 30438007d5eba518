"""Mask R-CNN benchmark: a few from-scratch CPU steps on a tiny fixture, evaluation, exact resume."""
import json

import pytest
import torch

import eval.detection_data as detection_data
import eval.maskrcnn as maskrcnn
from data.coco import load_coco
from data.demo import DemoConfig, make_demo_dataset
from eval.detection_data import InstanceDataset, LabelMap, batch_indices, hflip_item
from eval.maskrcnn import MaskRCNNConfig, build_maskrcnn, load_init_weights, train_phase


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_demo_dataset(DemoConfig(out=str(root), size=64, num_defective=6, num_free=0, seed=1), progress=False)
    return root / "annotations.json"


def _cfg(tiny, out, **kw):
    base = dict(real=str(tiny), out=str(out), iterations=2, batch_size=1, min_size=64, max_size=64,
                test_fraction=0.34, checkpoint_every=1, progress=False, warmup_iterations=1,
                rois_per_image=32, detections_per_image=10)
    base.update(kw)
    return MaskRCNNConfig(**base)


def test_dataset_items_batches_and_flip(tiny):
    data = load_coco(tiny, check_images=False, progress=False)
    ds = InstanceDataset(data, LabelMap.from_coco(data))
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    n = target["masks"].shape[0]
    assert n >= 1 and target["boxes"].shape == (n, 4) and target["labels"].min() >= 1
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert target["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    flipped_image, flipped = hflip_item(image, target)
    ys, xs = torch.nonzero(flipped["masks"][0], as_tuple=True)
    assert flipped["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert torch.equal(flipped_image.flip(-1), image)
    # Every item once per epoch, the same order whenever asked.
    epoch = [i for step in range(3) for i in batch_indices(6, 2, step, seed=4)]
    assert sorted(epoch) == list(range(6)) and epoch == [i for s in range(3) for i in batch_indices(6, 2, s, 4)]


def test_unknown_synthetic_category_is_an_error(tiny):
    data = load_coco(tiny, check_images=False, progress=False)
    other = {**data, "categories": [{"id": 1, "name": "dent"}]}
    with pytest.raises(ValueError, match="dent"):
        InstanceDataset(other, LabelMap.from_coco(data), source="synthetic.json")


def test_benchmark_trains_from_scratch_and_evaluates(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path / "run", experiments=("real",), real_fractions=(1.0,))
    summary = maskrcnn.main(cfg)
    entry = summary["experiments"]["real@100%"]
    run = entry["runs"][0]
    for key in ("segm_map", "bbox_map"):
        assert 0.0 <= run[key] <= 1.0
    assert run["mean_hausdorff"] <= 1.0 and run["n_test_images"] == 2
    assert set(run["per_class_segm_ap"]) == {"crack", "blowhole", "scratch"}
    phase = tmp_path / "run" / "real-100pct-s0"
    assert (phase / "DONE").is_file() and not (phase / "checkpoint.pt").exists()
    losses = json.loads((phase / "train.json").read_text())["losses"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(l["loss"])) for l in losses)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["classes"] == ["crack", "blowhole", "scratch"]
    # A rerun skips the finished phase and its cached evaluation.
    final = phase / "model_final.pt"
    kept = (final.stat().st_ino, final.read_bytes())  # a rewrite (temporary name + rename) is a new inode
    again = maskrcnn.run_benchmark(cfg)
    assert (final.stat().st_ino, final.read_bytes()) == kept
    assert again["experiments"]["real@100%"]["mean"] == entry["mean"]


@pytest.mark.slow
def test_resume_after_interruption_reproduces_uninterrupted_run(tiny, tmp_path, monkeypatch):
    data = load_coco(tiny, check_images=False, progress=False)
    labels = LabelMap.from_coco(data)
    ds = InstanceDataset(data, labels)
    cfg = _cfg(tiny, tmp_path, iterations=2)
    straight, _ = train_phase(tmp_path / "straight", ds, labels.num_classes, cfg, seed=0)

    real_load = detection_data.load_batch

    def interrupted(dataset, step, *args):
        if step == 1:
            raise KeyboardInterrupt
        return real_load(dataset, step, *args)

    monkeypatch.setattr(maskrcnn, "load_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_phase(tmp_path / "resumed", ds, labels.num_classes, cfg, seed=0)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file() and not (tmp_path / "resumed" / "DONE").exists()
    monkeypatch.setattr(maskrcnn, "load_batch", real_load)
    resumed, _ = train_phase(tmp_path / "resumed", ds, labels.num_classes, cfg, seed=0)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "straight" / "train.json").read_text())["losses"]
    lb = json.loads((tmp_path / "resumed" / "train.json").read_text())["losses"]
    assert [l["loss"] for l in la] == [l["loss"] for l in lb]


def test_init_weights_file_detector_and_backbone(tmp_path):
    # A detector file for another class count loads except the class-specific heads.
    source = build_maskrcnn(5, 64, 64, pretrained_layout=True)
    torch.save({"model": source.state_dict()}, tmp_path / "det.pth")
    model = build_maskrcnn(3, 64, 64, pretrained_layout=True)
    load_init_weights(model, tmp_path / "det.pth")
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    # An ImageNet ResNet-50 file initialises the backbone body.
    import torchvision
    resnet = torchvision.models.resnet50()
    torch.save(resnet.state_dict(), tmp_path / "r50.pth")
    load_init_weights(model, tmp_path / "r50.pth")
    assert torch.equal(model.backbone.body.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_init_weights(model, tmp_path / "bad.pth")
