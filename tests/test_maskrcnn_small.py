"""The Mask R-CNN configurations of eval.maskrcnn beyond torchvision's default: smaller ResNet-FPN
backbones, narrower FPN and heads, other anchor sizes, and bf16 autocast."""
import json

import pytest
import torch

from data.demo import DemoConfig, make_demo_dataset
from eval import maskrcnn
from eval.maskrcnn import MaskRCNNConfig, build_maskrcnn

pytestmark = pytest.mark.usefixtures("one_thread")


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_default_is_torchvisions_resnet50_fpn_and_small_configs_are_the_same_class():
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
        assert shapes(build_maskrcnn(4)) == shapes(reference)
        frozen = build_maskrcnn(4, pretrained_layout=True, backbone="resnet34")
        plain = build_maskrcnn(4, backbone="resnet18", fpn_channels=64)
    small = build_maskrcnn(4, backbone="resnet18", fpn_channels=64, anchor_sizes=(8, 16, 32, 64, 128))
    assert type(small) is MaskRCNN and small.backbone.out_channels == 64
    assert small.roi_heads.box_head.fc7.out_features == 256  # 4 x the width, as torchvision's 1024 for 256
    assert small.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert [s[0] for s in small.rpn.anchor_generator.sizes] == [8, 16, 32, 64, 128]
    assert isinstance(small.backbone.body.bn1, torch.nn.BatchNorm2d)  # from scratch: BatchNorm trains
    n_small, n_default = (sum(p.numel() for p in m.parameters()) for m in (small, reference))
    assert n_small < 0.35 * n_default
    assert shapes(plain) == shapes(small)  # anchors change no weight: 3 aspect ratios x 1 size per level
    assert type(frozen.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    with pytest.raises(ValueError, match="--backbone must be one of"):
        build_maskrcnn(4, backbone="resnet101")
    with pytest.raises(ValueError, match="--anchor-sizes takes 5"):
        build_maskrcnn(4, anchor_sizes=(8, 16))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_demo_dataset(DemoConfig(out=str(root), size=64, num_defective=6, num_free=0, seed=1), progress=False)
    return root / "annotations.json"


def test_small_detector_trains_and_evaluates_in_bf16(tiny, tmp_path, capsys):
    cfg = MaskRCNNConfig(real=str(tiny), out=str(tmp_path / "run"), experiments=("real",), real_fractions=(1.0,),
                         iterations=2, batch_size=1, min_size=64, max_size=64, test_fraction=0.34, progress=False,
                         warmup_iterations=1, rois_per_image=16, detections_per_image=10, device="cpu",
                         backbone="resnet18", fpn_channels=16, anchor_sizes=(4, 8, 16, 32, 64), precision="bf16")
    run = maskrcnn.run_benchmark(cfg)["experiments"]["real@100%"]["runs"][0]
    assert 0.0 <= run["segm_map"] <= 1.0 and run["n_test_images"] == 2
    train = json.loads((tmp_path / "run" / "real-100pct-s0" / "train.json").read_text())
    assert train["signature"]["precision"] == "bf16" and train["signature"]["backbone"] == "resnet18"
    assert all(torch.isfinite(torch.tensor(step["loss"])) for step in train["losses"])
    weights = torch.load(tmp_path / "run" / "real-100pct-s0" / "model_final.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())  # float32 master weights


def test_auto_precision_resolves_per_cpu(monkeypatch, capsys):
    cfg = MaskRCNNConfig(device="cpu")
    assert maskrcnn.resolved_precision(cfg).precision == "fp32"  # tests pin auto to fp32 (conftest)
    monkeypatch.setenv("DEFECTSYNTH_CPU_BF16", "1")
    assert maskrcnn.resolved_precision(cfg).precision == "bf16"
    assert "eval.maskrcnn: dtype auto -> bf16" in capsys.readouterr().out
    assert maskrcnn.resolved_precision(MaskRCNNConfig(device="cpu", precision="fp32")).precision == "fp32"
