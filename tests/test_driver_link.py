"""The headline claim of a SADF dataset: every synthetic image was generated from the driver of the
masks it is annotated with. Two independent checks on a tiny synthesis run (2 defect-free images x
2 variants x 2 samples = 8 images, batch 3 so batches straddle pairs, the last one ragged; 6
annotated images, so that neighbouring pairs differ in prompt as well as driver):

1. What the generator received: every generate() call is intercepted and the hint and text
   context of each row are compared, bit for bit, with the driver the data layer builds for the
   pair that annotates that image and the encoding of its prompt, and the image's annotation masks
   must be painted in the hint in their class colours. Run as
   two shards with a crash and a resume in between, then a regeneration from a record.
2. What came out: with a control that visibly follows its hint (below), the stored PNG of an image
   equals a generation written out here with its own pair's driver, and differs by many grey
   levels from one with a zero driver or a neighbouring pair's driver.

The control: a zero-conv copy as trained controls are (non-zero zero convs), with a hint encoder
whose convolutions keep the signal's scale (variance-preserving random init instead of PyTorch's
default, which shrinks the driver ~3x per layer) and whose last convolution is 30x stronger still.
With the test control of test_synthesize.py (0.3 * randn on the last hint conv and the zero convs
only) a zero driver moves an image by about one grey level; with this one a wrong or zero driver
moves the tiny pipeline's 64 px images by ~10 grey levels on average (measured), while the same
driver gives the same image bit for bit.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sample.sadf_inputs as sadf_inputs
from data.coco import load_coco, to_pycocotools
from data.demo import DemoConfig, make_demo_dataset
from data.images import read_image
from data.palette import class_color
from data.pairing import PairingConfig, SadfPairs
from model.controlnet import ControlNet
from sample.pipeline import generate as real_generate
from sample.pipeline import random_pipeline
from sample.records import read_records
from sample.runtime import batch_to_uint8
from sample.synthesize import SynthesizeConfig, main, regenerate
from weights import save_control, save_ldm

SEED = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def hint_following_control(unet, seed: int = 5) -> ControlNet:
    """A control whose residuals depend strongly on the hint (see the module docstring)."""
    control = ControlNet.from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        convs = [m for m in control.input_hint_block if isinstance(m, torch.nn.Conv2d)]
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (3.0 / fan_in) ** 0.5)
            conv.bias.zero_()
        # A driver is mostly dark (topology <= 50/255, small painted masks): the encoded hint is made
        # 30x stronger than the conv_in features it is added to, so it dominates the copy's input.
        convs[-1].weight.mul_(30.0)
        for zero in [*control.zero_convs, control.middle_block_out]:
            conv = zero[0]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
            conv.bias.zero_()
    return control.eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("driver_link")
    # 6 defective images: pairs 1 and 2 (which share a batch) then differ in prompt as well as driver.
    make_demo_dataset(DemoConfig(out=str(root / "demo"), size=64, num_defective=6, num_free=2, seed=0), progress=False)
    sd = random_pipeline("tiny", seed=0)
    save_ldm(sd, root / "tuned.safetensors")
    save_control(hint_following_control(sd.unet), root / "control.safetensors")
    annotated = load_coco(root / "demo" / "annotations.json", progress=False)
    pairs = SadfPairs(load_coco(root / "demo" / "free.json", progress=False), annotated,
                      PairingConfig(resolution=64, variants=2), seed=SEED)
    return SimpleNamespace(root=root, ckpt=root / "tuned.safetensors", control=root / "control.safetensors",
                           free=root / "demo" / "free.json", masks=root / "demo" / "annotations.json", pairs=pairs)


def config(inputs, out, **overrides) -> SynthesizeConfig:
    values = dict(ckpt=str(inputs.ckpt), control=str(inputs.control), free=str(inputs.free), masks=str(inputs.masks),
                  out=str(out), variants=2, samples_per_driver=2, steps=2, batch=3, seed=SEED, device="cpu",
                  progress=False, sheet_pairs=0, save_drivers=True, dtype="fp32")
    values.update(overrides)
    return SynthesizeConfig(**values)


class RecordingGenerate:
    """Stands in for sample.pipeline.generate: keeps every row's hint and text context by its seed
    (seeds are unique per job and attempt), and can crash on call `fail_at` (after recording,
    before sampling)."""

    def __init__(self, fail_at: int | None = None):
        self.hints: dict[int, torch.Tensor] = {}
        self.contexts: dict[int, torch.Tensor] = {}
        self.calls, self.fail_at = [], fail_at

    def __call__(self, *args, seeds, hints, cond, **kwargs):
        assert hints.shape[0] == cond.shape[0] == len(seeds)  # one hint and prompt per row, never broadcast
        self.calls.append(list(seeds))
        for seed, hint, context in zip(seeds, hints, cond):
            self.hints[seed] = hint.detach().clone()
            self.contexts[seed] = context.detach().clone()
        if len(self.calls) == self.fail_at:
            raise RuntimeError("simulated crash")
        return real_generate(*args, seeds=seeds, hints=hints, cond=cond, **kwargs)


def assert_masks_painted(hint: torch.Tensor, masks: list[tuple[np.ndarray, int]], what: str) -> None:
    """Every pixel of every annotation mask carries its class colour in the hint (later masks on top,
    as the driver paints them, so only the pixels no later mask covers)."""
    pixels = (hint * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    covered = np.zeros(pixels.shape[:2], bool)
    for mask, category_id in reversed(masks):
        visible = mask.astype(bool) & ~covered
        assert visible.any(), what
        assert (pixels[visible] == np.array(class_color(category_id), np.uint8)).all(), what
        covered |= mask.astype(bool)


def test_every_image_got_its_own_pairs_driver(inputs, monkeypatch):
    out = inputs.root / "sharded"
    recorder = RecordingGenerate()
    monkeypatch.setattr(sadf_inputs, "generate", recorder)
    main(config(inputs, out, shard=1, num_shards=2))           # batch 1 (images 4-6)
    crashing = RecordingGenerate(fail_at=2)
    monkeypatch.setattr(sadf_inputs, "generate", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(config(inputs, out, shard=0, num_shards=2))       # batch 0, then batch 2 dies
    resumed = RecordingGenerate()
    monkeypatch.setattr(sadf_inputs, "generate", resumed)
    result = main(config(inputs, out, shard=0, num_shards=2))  # batch 2 again, then the merge
    assert result.coco == out / "sadf.json" and len(resumed.calls) == 1

    # The hints that made the stored images: the shard run, the first call before the crash, the resume.
    received = {**recorder.hints, **dict(list(crashing.hints.items())[:3]), **resumed.hints}
    contexts = {**recorder.contexts, **dict(list(crashing.contexts.items())[:3]), **resumed.contexts}
    sd = random_pipeline("tiny", seed=0)  # the weights of the saved checkpoint
    coco = to_pycocotools(load_coco(out / "sadf.json"))
    assert len(coco.imgs) == 8 and sorted(received) == sorted(img["seed"] for img in coco.imgs.values())
    for image_id, img in coco.imgs.items():
        pair = inputs.pairs.build(img["pair_id"])  # built here, by the data layer, not by the run
        hint = received[img["seed"]]
        assert torch.equal(hint, pair.driver), f"image {image_id} got another driver than pair {img['pair_id']}'s"
        # ... and its own prompt (each prompt is encoded alone, so the context is bit-exact).
        assert img["prompt"] == pair.prompt
        assert torch.equal(contexts[img["seed"]], sd.encode_prompts([pair.prompt])[0]), f"image {image_id}: prompt"
        masks = [(coco.annToMask(a), a["category_id"]) for a in sorted(coco.imgToAnns[image_id], key=lambda a: a["id"])]
        assert len(masks) == len(pair.instances) > 0
        assert_masks_painted(hint, masks, f"image {image_id}: an annotation mask is not painted in its hint")
        saved = read_image(out / "drivers" / f"{img['pair_id']:06d}.png")
        assert np.array_equal(saved, batch_to_uint8(pair.driver[None])[0].numpy())
    # Batches straddle pairs: the second batch holds pairs 1, 2, 2 and all three drivers differ from their
    # neighbours', so a shuffle inside a batch cannot pass.
    assert [coco.imgs[i]["pair_id"] for i in (4, 5, 6)] == [1, 2, 2]
    assert not torch.equal(inputs.pairs.build(1).driver, inputs.pairs.build(2).driver)
    assert inputs.pairs.build(1).prompt != inputs.pairs.build(2).prompt

    # Regenerating an image from its record hands the generator the same rows again.
    again = RecordingGenerate()
    monkeypatch.setattr(sadf_inputs, "generate", again)
    regenerate(out, 5, device="cpu")
    record = read_records(out)[5]
    assert again.calls == [[seed for _, _, seed in record["call"]["rows"]]]
    for pair_id, _, seed in record["call"]["rows"]:
        assert torch.equal(again.hints[seed], inputs.pairs.build(pair_id).driver)


def generate_batch(sd, rows: list[tuple[str, torch.Tensor, int]], control, cfg: SynthesizeConfig) -> torch.Tensor:
    """The generator call of one batch written out from the public pieces: each prompt encoded
    alone, the rows' hints stacked, uint8 (B, H, W, 3)."""
    cond = torch.cat([sd.encode_prompts([prompt]) for prompt, _, _ in rows])  # B x (1, 77, D) -> (B, 77, D)
    images = real_generate(sd, seeds=[seed for _, _, seed in rows], cond=cond,
                           uncond=sd.encode_prompts([cfg.negative_prompt]), sampler=cfg.sampler, steps=cfg.steps,
                           guidance=cfg.guidance, height=64, width=64, control=control,
                           hints=torch.stack([hint for _, hint, _ in rows]))
    return batch_to_uint8(images)


def test_stored_images_follow_their_driver(inputs):
    """Output level: image 5 (row 1 of the batch of pairs 1, 2, 2) equals a generation with its own
    pair's driver, bit for bit, and a wrong or zero driver in its row changes it by many grey levels."""
    cfg = config(inputs, inputs.root / "plain")
    main(cfg)
    record = read_records(inputs.root / "plain")[5]
    stored = read_image(inputs.root / "plain" / record["file_name"]).astype(int)
    sd = random_pipeline("tiny", seed=0)
    control = hint_following_control(sd.unet)
    own = [(inputs.pairs.build(p).prompt, inputs.pairs.build(p).driver, seed) for p, _, seed in record["call"]["rows"]]
    row = record["call"]["row"]
    assert record["pair_id"] == 2 and row == 1

    assert np.array_equal(generate_batch(sd, own, control, cfg)[row].numpy(), stored)
    zero = [r if i != row else (r[0], torch.zeros_like(r[1]), r[2]) for i, r in enumerate(own)]
    wrong = [r if i != row else (r[0], own[0][1], r[2]) for i, r in enumerate(own)]  # pair 1's driver
    for name, rows in (("zero", zero), ("wrong", wrong)):
        moved = np.abs(generate_batch(sd, rows, control, cfg)[row].numpy().astype(int) - stored)
        assert moved.mean() > 4.0 and (moved > 5).mean() > 0.25, (name, moved.mean())  # measured ~10, 57-63%
