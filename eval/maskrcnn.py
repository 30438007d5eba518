"""The Mask R-CNN benchmark (paper 5.2): what is the synthetic data worth to a segmentation model?

    python -m eval.maskrcnn --real real.json --synthetic sadf.json --out runs/maskrcnn \\
        [--test test.json] [--real-fractions 1.0 0.1] [--seeds 0 1 2] [--iterations 2000]

torchvision's `maskrcnn_resnet50_fpn`, never downloaded: from scratch (weights=None,
weights_backbone=None) or initialised from a state-dict file (`--init-weights`, loaded with
weights_only=True; see `build_maskrcnn`). Classes = the real dataset's categories (+ background).

Experiments, each for every seed (repeats) and every real fraction f (seeded subset of the real
training images, `data.coco.subset_coco`, stratified by class):
    real            train on f of the real training images
    synthetic       train on the synthetic set only (independent of f)
    synthetic+real  the synthetic model fine-tuned on f of the real training images
Every model is evaluated on the same held-out real split (`--test`, or a seeded `--test-fraction`
of `--real`): segm and bbox mAP (COCOeval, `eval.coco_eval`), mean IoU of matched instances and
mean normalised Hausdorff distance (`eval.instance_metrics`: greedy same-class matching by IoU of
predictions with score >= --score-threshold; an unmatched ground truth counts HD 1.0).

Each training phase lives in OUT/<phase>/: `checkpoint.pt` (model, optimizer, step, RNG state,
losses; rewritten atomically every --checkpoint-every steps), then `model_final.pt`, `train.json`
and last the `DONE` marker. A rerun skips finished phases and resumes unfinished ones exactly.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data.coco import load_coco, save_coco, split_coco, subset_coco
from data.files import atomic_path, write_bytes_atomic, write_json_atomic
from data.masks import mask_to_rle
from data.seeding import derive_seed
from defectsynth.errors import UserError, command
from defectsynth.device import DEVICE_HELP, resolve_device
from defectsynth.runconfig import config_from_args, config_to_dict, parser_from_dataclass
from eval.coco_eval import evaluate_coco
from eval.detection_data import InstanceDataset, LabelMap, load_batch
from eval.instance_metrics import MATCHING_RULE, InstanceAccumulator

EXPERIMENTS = ("real", "synthetic", "synthetic+real")
DONE = "DONE"
# Class-specific layers, re-initialised when an init file was trained for another class count.
CLASS_SPECIFIC = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.",
                  "roi_heads.mask_predictor.mask_fcn_logits.")
# FPN backbones: torchvision's Mask R-CNN uses resnet50 (the real run's default); the smaller ResNets
# make the same MaskRCNN class that learns in minutes on a CPU (the demo).
BACKBONES = ("resnet50", "resnet34", "resnet18")


@dataclass(frozen=True)
class MaskRCNNConfig:
    """Train Mask R-CNN on real / synthetic / synthetic-then-real data and evaluate on held-out real."""

    real: str = field(default="", metadata={"help": "real annotated COCO json (required)"})
    synthetic: str | None = field(default=None, metadata={"help": "synthetic (SADF) COCO json"})
    test: str | None = field(default=None, metadata={"help": "held-out real COCO json; default: split off --real"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of --real held out when --test is not given"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/test split"})
    out: str = field(default="runs/maskrcnn", metadata={"help": "output folder"})
    experiments: tuple[str, ...] = field(default=EXPERIMENTS, metadata={"help": f"subset of {list(EXPERIMENTS)}"})
    real_fractions: tuple[float, ...] = field(default=(1.0, 0.1), metadata={
        "help": "fractions of the real training images"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "one repeat per seed"})
    iterations: int = field(default=2000, metadata={"help": "optimizer steps per training phase"})
    batch_size: int = field(default=2, metadata={"help": "images per step"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    warmup_iterations: int = field(default=100, metadata={"help": "linear warm-up from lr/1000"})
    lr_decay_at: tuple[float, ...] = field(default=(0.75,), metadata={
        "help": "fractions of --iterations where lr *= 0.1"})
    grad_clip: float = field(default=10.0, metadata={"help": "gradient-norm clip (0: off)"})
    min_size: int = field(default=512, metadata={"help": "detector resize: shorter side"})
    max_size: int = field(default=512, metadata={"help": "detector resize: longest side cap"})
    init_weights: str | None = field(default=None, metadata={
        "help": "state-dict file: a torchvision Mask R-CNN (class heads re-initialised if the class count "
                "differs) or an ImageNet ResNet-50 backbone; default: from scratch"})
    trainable_backbone_layers: int | None = field(default=None, metadata={
        "help": "0-5; default 5 from scratch, 3 with --init-weights"})
    backbone: str = field(default="resnet50", metadata={
        "help": "ResNet of the FPN backbone (torchvision's Mask R-CNN is resnet50; resnet18/34 learn faster "
                "on a CPU, the demo's choice)", "choices": list(BACKBONES)})
    fpn_channels: int = field(default=256, metadata={
        "help": "channels of the FPN and of the box / mask heads (torchvision: 256, a 1024-wide box MLP); fewer "
                "make the same model several times cheaper (the demo: 64, a 256-wide box MLP)"})
    anchor_sizes: tuple[int, ...] = field(default=(32, 64, 128, 256, 512), metadata={
        "help": "RPN anchor side per FPN level, 5 values (torchvision's default; small defects in small images "
                "want smaller ones, the demo: 8 16 32 64 128)"})
    precision: str = field(default="auto", metadata={
        "help": "autocast dtype of training and inference (auto: bf16 on CUDA and on CPUs with native bf16, "
                "else fp32); the weights stay float32", "choices": ["auto", "fp32", "bf16"]})
    rois_per_image: int = field(default=512, metadata={
        "help": "RoIs sampled per image for the box/mask heads in training (torchvision: 512; fewer is faster on CPU)"})
    detections_per_image: int = field(default=100, metadata={
        "help": "most detections kept per image (COCO mAP counts up to 100)"})
    score_threshold: float = field(default=0.5, metadata={"help": "IoU / Hausdorff: predictions kept"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    progress: bool = field(default=True, metadata={"help": "progress bars"})


def build_maskrcnn(num_classes: int, min_size: int = 512, max_size: int = 512, pretrained_layout: bool = False,
                   trainable_backbone_layers: int | None = None, rois_per_image: int = 512,
                   detections_per_image: int = 100, backbone: str = "resnet50",
                   fpn_channels: int = 256, anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)) -> torch.nn.Module:
    """torchvision Mask R-CNN with a ResNet-FPN `backbone` (BACKBONES; resnet50 with 256 `fpn_channels`
    is torchvision's `maskrcnn_resnet50_fpn`) and `num_classes` (background included), random weights.
    `fpn_channels` other than 256 narrows the FPN and the heads with it: the mask head's four convs
    and its deconvolution have that width, the box head's two-layer MLP 4x that width (torchvision:
    1024 for 256). `anchor_sizes`: the RPN's anchor side on each of the 5 FPN levels (aspect ratios
    0.5, 1, 2 as torchvision's); torchvision's default (32 ... 512) is built when they are its own.

    pretrained_layout False: the from-scratch setup of `maskrcnn_resnet50_fpn(weights=None,
    weights_backbone=None)` (BatchNorm trained, all 5 backbone stages trainable). True: the layout
    torchvision uses around pretrained weights (frozen BatchNorm, `trainable_backbone_layers`
    stages trainable, default 3), ready for `load_init_weights`.
    """
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if backbone not in BACKBONES:
        raise ValueError(f"eval.maskrcnn: --backbone must be one of {list(BACKBONES)}, got {backbone!r}")
    heads = dict(min_size=min_size, max_size=max_size, box_batch_size_per_image=rois_per_image,
                 box_detections_per_img=detections_per_image)
    if len(anchor_sizes) != 5 or min(anchor_sizes) < 1:
        raise ValueError(f"eval.maskrcnn: --anchor-sizes takes 5 positive sides (one per FPN level), got {list(anchor_sizes)}")
    if tuple(anchor_sizes) != (32, 64, 128, 256, 512):
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        heads["rpn_anchor_generator"] = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    if fpn_channels < 1:
        raise ValueError(f"eval.maskrcnn: --fpn-channels must be at least 1, got {fpn_channels}")
    if not pretrained_layout and backbone == "resnet50" and fpn_channels == 256:
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **heads)
    if pretrained_layout:
        norm_layer, layers = FrozenBatchNorm2d, 3 if trainable_backbone_layers is None else trainable_backbone_layers
    else:  # what maskrcnn_resnet50_fpn builds without weights, on a smaller ResNet
        norm_layer, layers = torch.nn.BatchNorm2d, 5
    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm_layer, trainable_layers=layers)
    if fpn_channels == 256:
        return MaskRCNN(body, num_classes=num_classes, **heads)
    return MaskRCNN(narrow_fpn(body, fpn_channels), num_classes=None, **heads, **narrow_heads(fpn_channels, num_classes))


def narrow_fpn(body: torch.nn.Module, channels: int) -> torch.nn.Module:
    """`body` (torchvision's BackboneWithFPN, 256 channels) with its FPN rebuilt at `channels`: the
    same layers (inner 1x1 and layer 3x3 convs per level, the max-pool level), narrower."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    in_channels = [block.in_channels for block in (b[0] for b in body.fpn.inner_blocks)]
    narrow = BackboneWithFPN(body.body, {}, in_channels, channels, extra_blocks=LastLevelMaxPool())
    narrow.body = body.body  # the IntermediateLayerGetter already built (its return_layers kept)
    return narrow


def narrow_heads(channels: int, num_classes: int) -> dict[str, torch.nn.Module]:
    """MaskRCNN's box and mask heads at `channels` (torchvision's defaults scaled by channels / 256)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    representation = 4 * channels  # torchvision: 1024 for 256 channels
    return {"box_head": TwoMLPHead(channels * 7 * 7, representation),  # RoIAlign 7x7 of each level
            "box_predictor": FastRCNNPredictor(representation, num_classes),
            "mask_head": MaskRCNNHeads(channels, (channels,) * 4, 1),
            "mask_predictor": MaskRCNNPredictor(channels, channels, num_classes)}


def load_init_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Initialise a `build_maskrcnn(..., pretrained_layout=True)` model from a state-dict file
    (torch.load weights_only=True; a dict with a "model" entry, as torchvision's reference scripts
    save, is unwrapped). The file holds either a whole Mask R-CNN (keys "backbone.", "rpn.",
    "roi_heads."; loaded strictly except the class-specific layers CLASS_SPECIFIC when their
    shapes differ, e.g. COCO's 91 classes) or an ImageNet ResNet-50 ("conv1.weight", "layer1...":
    loaded strictly into the backbone body, `fc.` dropped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--init-weights {path}: file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith("backbone.") for k in state):
        own = model.state_dict()
        state = {k: v for k, v in state.items()
                 if not (k.startswith(CLASS_SPECIFIC) and k in own and v.shape != own[k].shape)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith(CLASS_SPECIFIC)]
        if bad_missing or unexpected:
            raise UserError(f"{path}: not a torchvision Mask R-CNN ResNet-50-FPN state dict: "
                             f"missing {bad_missing[:8]}, unexpected {unexpected[:8]}")
    elif "conv1.weight" in state:
        body = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            model.backbone.body.load_state_dict(body, strict=True)
        except RuntimeError as err:
            raise UserError(f"{path}: not a torchvision ResNet-50 state dict: {err}") from err
    else:
        raise UserError(f"{path}: neither a Mask R-CNN (keys 'backbone.*') nor a ResNet-50 "
                         f"('conv1.weight') state dict; first keys {list(state)[:5]}")


def model_for(cfg: "MaskRCNNConfig", num_classes: int) -> torch.nn.Module:
    """The benchmark's detector architecture for `cfg` (random weights)."""
    return build_maskrcnn(num_classes, cfg.min_size, cfg.max_size, cfg.init_weights is not None,
                          cfg.trainable_backbone_layers, cfg.rois_per_image, cfg.detections_per_image,
                          cfg.backbone, cfg.fpn_channels, cfg.anchor_sizes)


def detector_autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast in `precision` ("fp32": a no-op, "bf16"; see `resolved_precision`). The
    weights and the SGD update stay float32."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"eval.maskrcnn: precision {precision!r} is not resolved (fp32 or bf16)")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def resolved_precision(cfg: "MaskRCNNConfig", announce: bool = True) -> "MaskRCNNConfig":
    """`cfg` with precision "auto" replaced by what its device runs (sample.runtime.resolve_dtype),
    and (`announce`) the choice printed."""
    from dataclasses import replace as replace_fields

    from sample.runtime import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.precision, resolve_device(cfg.device), announce="eval.maskrcnn" if announce else "")
    return replace_fields(cfg, precision="bf16" if dtype == torch.bfloat16 else "fp32")


def lr_at(step: int, cfg: MaskRCNNConfig) -> float:
    """Linear warm-up from lr/1000 over warmup_iterations, then x0.1 at each lr_decay_at point."""
    factor = 1.0
    if step < cfg.warmup_iterations:
        alpha = step / cfg.warmup_iterations
        factor = 0.001 * (1 - alpha) + alpha
    decays = sum(step >= int(f * cfg.iterations) for f in cfg.lr_decay_at)
    return cfg.lr * factor * 0.1 ** decays


def _train_signature(cfg: MaskRCNNConfig, dataset: InstanceDataset, seed: int, init_from: str | None) -> dict:
    """What must be equal for a checkpoint to be resumed."""
    keys = ("iterations", "batch_size", "lr", "momentum", "weight_decay", "warmup_iterations", "lr_decay_at",
            "grad_clip", "min_size", "max_size", "init_weights", "trainable_backbone_layers", "hflip",
            "rois_per_image", "backbone", "fpn_channels", "anchor_sizes", "precision")
    out = {k: config_to_dict(cfg)[k] for k in keys}
    out.update(seed=seed, init_from=init_from, num_images=len(dataset),
               image_ids=[int(im["id"]) for im in dataset.images][:1000])
    return out


def train_phase(phase_dir: Path, dataset: InstanceDataset, num_classes: int, cfg: MaskRCNNConfig, seed: int,
                init_from: Path | None = None) -> tuple[Path, torch.nn.Module | None]:
    """Train one phase (or finish / skip it, see module doc). Returns the final weights' path and
    the trained model (None when the phase was already done), so it can be evaluated at once."""
    final = phase_dir / "model_final.pt"
    if (phase_dir / DONE).is_file():
        return final, None
    phase_dir.mkdir(parents=True, exist_ok=True)
    cfg = resolved_precision(cfg, announce=False)  # run_benchmark resolved (and announced) it already
    device = resolve_device(cfg.device)  # "auto" -> cuda if available, else cpu (defectsynth/device.py)
    # One seed for the random initialisation and the training randomness (RPN / RoI sampling):
    # every phase of a repeat starts from the same weights, so experiments are paired.
    torch.manual_seed(derive_seed(seed, "maskrcnn") % (2 ** 63))
    model = model_for(cfg, num_classes)
    if init_from is not None:  # fine-tuning: start from an earlier phase's weights
        model.load_state_dict(torch.load(init_from, map_location="cpu", weights_only=True), strict=True)
    elif cfg.init_weights is not None:
        load_init_weights(model, cfg.init_weights)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    signature = _train_signature(cfg, dataset, seed, str(init_from) if init_from else None)
    checkpoint = phase_dir / "checkpoint.pt"
    start, losses, seconds = 0, [], 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        changed = [k for k in signature if state["signature"].get(k) != signature[k]]
        if changed:
            raise UserError(f"{checkpoint}: written with different settings ({', '.join(changed)}); "
                             f"delete {phase_dir} or restore the settings to resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)

    def save_checkpoint(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                 "seconds": seconds, "rng": torch.get_rng_state(), "signature": signature}
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    bar = tqdm(range(start, cfg.iterations), desc=phase_dir.name, disable=not cfg.progress,
               initial=start, total=cfg.iterations)
    for step in bar:
        tic = time.perf_counter()
        images, targets = load_batch(dataset, step, cfg.batch_size, seed, cfg.hflip)
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with detector_autocast(device, cfg.precision):
            loss_dict = {k: v.float() for k, v in model(images, targets).items()}
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{phase_dir.name}: non-finite loss at step {step}: "
                                     f"{ {k: float(v) for k, v in loss_dict.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        seconds += time.perf_counter() - tic
        losses.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in loss_dict.items()}})
        bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.iterations:
            save_checkpoint(step + 1)
    with atomic_path(final) as tmp:
        torch.save(model.state_dict(), tmp)
    steps_run = max(len(losses), 1)
    write_json_atomic(phase_dir / "train.json", {"signature": signature, "losses": losses,
                                                 "train_seconds": seconds, "seconds_per_step": seconds / steps_run},
                      indent=1)
    write_bytes_atomic(phase_dir / DONE, b"done\n")  # the completion marker, written last
    checkpoint.unlink(missing_ok=True)
    return final, model


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, test: InstanceDataset, label_map: LabelMap, score_threshold: float = 0.5,
                   device: str = "cpu", progress: bool = True, precision: str = "fp32") -> dict[str, Any]:
    """COCO segm/bbox mAP, per-class AP, mean matched IoU and mean normalised Hausdorff on `test`
    (`precision`: "bf16" runs the model under autocast)."""
    model.to(device).eval()
    cat_of_label = {label: cat for cat, label in test.label_of.items()}
    accumulator = InstanceAccumulator(score_threshold=score_threshold)
    detections = []
    for index in tqdm(range(len(test)), desc="evaluate", disable=not progress):
        record = test.images[index]
        with detector_autocast(device, precision):
            out = {k: v.float() if v.is_floating_point() else v for k, v in model([test.image(index).to(device)])[0].items()}
        masks = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)  # (P, 1, H, W) probabilities -> (P, H, W)
        boxes, scores = out["boxes"].cpu().numpy(), out["scores"].cpu().numpy()
        cats = [cat_of_label[int(label)] for label in out["labels"].cpu()]
        for mask, box, score, cat in zip(masks, boxes, scores, cats):
            x0, y0, x1, y1 = (float(v) for v in box)
            detections.append({"image_id": record["id"], "category_id": cat, "score": float(score),
                               "segmentation": mask_to_rle(mask), "bbox": [x0, y0, x1 - x0, y1 - y0]})
        gt_masks, gt_cats = test.instances(index)
        shape = (0, record["height"], record["width"])
        accumulator.add(np.stack(gt_masks) if gt_masks else np.zeros(shape, np.uint8), gt_cats,
                        masks if len(masks) else np.zeros(shape, np.uint8), cats, scores)
    segm, bbox = evaluate_coco(test.data, detections, "segm"), evaluate_coco(test.data, detections, "bbox")
    instances = accumulator.result()
    return {"segm_map": segm["map"], "segm_map50": segm["map50"], "bbox_map": bbox["map"], "bbox_map50": bbox["map50"],
            "mean_iou": instances["mean_iou"], "mean_hausdorff": instances["mean_hausdorff"],
            "per_class_segm_ap": segm["per_class"], "per_class_bbox_ap": bbox["per_class"],
            "instances": instances, "n_test_images": len(test), "n_detections": len(detections)}


def evaluate_phase(weights: Path, test: InstanceDataset, label_map: LabelMap, cfg: MaskRCNNConfig,
                   model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Metrics of a finished phase, cached in <phase>/eval.json (`model`: its weights in memory)."""
    cache = weights.parent / "eval.json"
    if cache.is_file():
        return load_json(cache)
    if model is None:
        model = model_for(cfg, label_map.num_classes)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    metrics = evaluate_model(model, test, label_map, cfg.score_threshold, cfg.device, cfg.progress,
                             resolved_precision(cfg, announce=False).precision)
    train = load_json(weights.parent / "train.json")
    metrics.update(train_seconds=train["train_seconds"], seconds_per_step=train["seconds_per_step"])
    write_json_atomic(cache, metrics, indent=1)
    return metrics


def load_json(path: Path) -> Any:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


SCALAR_METRICS = ("segm_map", "segm_map50", "bbox_map", "bbox_map50", "mean_iou", "mean_hausdorff")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std (over seeds, population) of the scalar metrics; NaN-aware."""
    mean, std = {}, {}
    for key in SCALAR_METRICS:
        values = np.array([r[key] for r in runs], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean[key] = float(finite.mean()) if finite.size else math.nan
        std[key] = float(finite.std()) if finite.size else math.nan
    classes = runs[0]["per_class_segm_ap"].keys() if runs else []
    mean["per_class_segm_ap"] = {c: float(np.nanmean([r["per_class_segm_ap"][c] for r in runs]))
                                 if any(np.isfinite(r["per_class_segm_ap"][c]) for r in runs) else math.nan
                                 for c in classes}
    return {"mean": mean, "std": std}


def prepare_splits(cfg: MaskRCNNConfig, out: Path) -> tuple[dict, dict, dict | None]:
    """(real train, real test, synthetic or None) as COCO dicts; the split is saved in OUT/splits/."""
    if not cfg.real:
        raise UserError("eval.maskrcnn: --real (the real annotated COCO json) is required")
    check_intervals(cfg)
    real = load_coco(cfg.real, check_images=False, progress=False)
    if cfg.test:
        train, test = real, load_coco(cfg.test, check_images=False, progress=False)
    else:
        if not 0 < cfg.test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1), got {cfg.test_fraction}")
        parts = split_coco(real, [1 - cfg.test_fraction, cfg.test_fraction], seed=cfg.split_seed,
                           names=["train", "test"])
        train, test = parts["train"], parts["test"]
        save_coco(train, out / "splits" / "real_train.json", validate=False)
        save_coco(test, out / "splits" / "real_test.json", validate=False)
    if not test["images"] or not train["images"]:
        raise UserError(f"{cfg.real}: the real train/test split left an empty part "
                         f"({len(train['images'])} train, {len(test['images'])} test images)")
    synthetic = load_coco(cfg.synthetic, check_images=False, progress=False) if cfg.synthetic else None
    return train, test, synthetic


def check_intervals(cfg) -> None:
    """Step counts that divide or bound the loop must be positive (before: `--checkpoint-every 0`
    was a ZeroDivisionError after every earlier stage had finished)."""
    for name in ("iterations", "checkpoint_every"):
        if getattr(cfg, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")


def run_benchmark(cfg: MaskRCNNConfig) -> dict[str, Any]:
    """Run (or resume) every requested experiment; returns and writes OUT/results.json:
    {"experiments": {key: {"experiment", "real_fraction", "runs": [metrics per seed], "mean", "std"}
    or {"not_run": reason}}, "classes", "config", "n_test_images", "matching_rule"}."""
    cfg = replace(cfg, device=str(resolve_device(cfg.device)))  # "auto" -> cuda if available, else cpu
    unknown = sorted(set(cfg.experiments) - set(EXPERIMENTS))
    if unknown:
        raise UserError(f"--experiments: unknown {unknown}; choose from {list(EXPERIMENTS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolved_precision(cfg)
    train, test, synthetic = prepare_splits(cfg, out)
    label_map = LabelMap.from_coco(train)
    test_ds = InstanceDataset(test, label_map, cfg.test or "real test split")
    synthetic_ds = InstanceDataset(synthetic, label_map, cfg.synthetic) if synthetic else None
    results: dict[str, Any] = {}

    def record(key: str, experiment: str, fraction: float | None,
               phases: list[tuple[int, tuple[Path, torch.nn.Module | None]]]) -> None:
        runs = [{"seed": seed, **evaluate_phase(final, test_ds, label_map, cfg, model)}
                for seed, (final, model) in phases]
        results[key] = {"experiment": experiment, "real_fraction": fraction, "runs": runs, **aggregate(runs)}

    needs_synthetic = {"synthetic", "synthetic+real"} & set(cfg.experiments)
    synthetic_finals: dict[int, Path] = {}
    synthetic_phases = {}
    if needs_synthetic and synthetic_ds is None:
        for name in sorted(needs_synthetic):
            results[name] = {"not_run": "no synthetic dataset given (--synthetic)"}
    elif needs_synthetic:
        for seed in cfg.seeds:
            synthetic_phases[seed] = train_phase(out / f"synthetic-s{seed}", synthetic_ds, label_map.num_classes,
                                                 cfg, seed)
            synthetic_finals[seed] = synthetic_phases[seed][0]
        if "synthetic" in cfg.experiments:
            record("synthetic", "synthetic", None, [(s, synthetic_phases[s]) for s in cfg.seeds])
        synthetic_phases.clear()  # release the models
    for fraction in cfg.real_fractions:
        for experiment in ("real", "synthetic+real"):
            if experiment not in cfg.experiments or (experiment == "synthetic+real" and not synthetic_finals):
                continue
            phases = []
            for seed in cfg.seeds:
                subset = subset_coco(train, fraction, seed=seed)
                dataset = InstanceDataset(subset, label_map, cfg.real)
                tag = "real" if experiment == "real" else "synthetic_then_real"
                init = synthetic_finals.get(seed) if experiment == "synthetic+real" else None
                phases.append((seed, train_phase(out / f"{tag}-{fraction * 100:g}pct-s{seed}", dataset,
                                                 label_map.num_classes, cfg, seed, init)))
            record(f"{experiment}@{percent(fraction)}", experiment, fraction, phases)
    summary = {"experiments": results, "classes": list(label_map.names), "config": config_to_dict(cfg),
               "n_test_images": len(test_ds), "n_real_train_images": len(train["images"]),
               "matching_rule": MATCHING_RULE.format(threshold=cfg.score_threshold)}
    write_json_atomic(out / "results.json", summary, indent=1)
    return summary


def get_args_parser():
    return parser_from_dataclass(MaskRCNNConfig, prog="python -m eval.maskrcnn")


def main(cfg: MaskRCNNConfig) -> dict[str, Any]:
    summary = run_benchmark(cfg)
    for key, entry in summary["experiments"].items():
        if "not_run" in entry:
            print(f"{key}: not run: {entry['not_run']}")
            continue
        m, s = entry["mean"], entry["std"]
        print(f"{key}: segm mAP {m['segm_map']:.3f}+-{s['segm_map']:.3f}  bbox mAP {m['bbox_map']:.3f}  "
              f"IoU {m['mean_iou']:.3f}  HD {m['mean_hausdorff']:.3f}  ({len(entry['runs'])} seed(s))")
    print(f"wrote {Path(cfg.out) / 'results.json'}")
    return summary


@command("maskrcnn")
def cli(argv: list[str] | None = None) -> int:
    main(config_from_args(MaskRCNNConfig, get_args_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
