"""The settings the two fine-tuning stages share: which SD model and data, how to optimise, and how
to run (seeds, checkpoints, logging). train.concept.ConceptConfig and train.condition.ConditionConfig
extend FineTuneOptions with their own fields; a subclass that redefines a field (its help, its
default) keeps the field's place in the order, so the command line lists the same groups for both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model.stable_diffusion import PRESETS
from train.monitor import REPORT_TO
from train.optim import LR_SCHEDULES
from train.precision import PRECISIONS

# Fields that may change between a run and its resumption in both stages: they change how long it
# runs, what it logs and what it exports, never what is trained.
RESUMABLE_CHANGES = frozenset({"steps", "resume", "overwrite", "progress", "log_every", "checkpoint_every", "keep_last",
                               "validate_every", "validation_sampler_steps", "validation_guidance", "save_diffusers",
                               "save_dtype", "export_ema", "device", "report_to"})

# Our old --validation-steps meant sampler steps; diffusers' --validation_steps means "validate every
# N steps". Accepting either spelling would misread one of the two, so both are refused (saved JSON
# configs, which only we wrote, still load the key as sampler steps, with a deprecation line).
VALIDATION_STEPS_REFUSAL = ("ambiguous, so not accepted: for sampler steps per validation sample use "
                            "--validation-sampler-steps (our old --validation-steps); for diffusers' meaning, "
                            "validate every N optimizer steps, use --validate-every")


@dataclass(frozen=True)
class FineTuneOptions:
    # ---- model and data
    ckpt: str = field(default="", metadata={"help": "base SD checkpoint: single .safetensors/.ckpt file "
                                                    "or diffusers folder"})
    preset: str = field(default="sd15", metadata={"help": "architecture for --random-weights",
                                                  "choices": sorted(PRESETS)})
    random_weights: bool = field(default=False, metadata={
        "help": "random weights of --preset instead of --ckpt (smoke tests, CPU demos)"})
    prediction_type: str = field(default="auto", metadata={
        "help": "override the model's prediction type", "choices": ["auto", "epsilon", "v_prediction"]})
    data: str = field(default="", metadata={"help": "training images: a COCO folder holding "
                                                    "annotations.json, or the COCO JSON itself"})
    out: str = field(default="", metadata={"help": "output folder (required)"})
    resolution: int = field(default=0, metadata={"help": "training resolution in pixels, a multiple of 64; "
                                                         "0 = the model's native size"})
    # ---- optimisation
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr_schedule: str = field(default="constant", metadata={"help": "after warmup", "choices": list(LR_SCHEDULES)})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: none)"})
    precision: str = field(default="auto", metadata={
        "help": "auto: bf16 on CUDA and on CPUs with native bf16 (AMX / AVX-512 BF16), else fp32; trainable weights stay float32",
        "choices": ["auto", *PRECISIONS]})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the trained networks (UNet, control copy); pays on long runs, the first steps compile"})
    ema: bool = field(default=False, metadata={"help": "keep an EMA of the trained weights"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step (with --ema)"})
    # ---- run
    seed: int = field(default=0, metadata={"help": "run seed (data order, noise, samples)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    log_every: int = field(default=10, metadata={
        "help": "optimizer steps between metric records; each record holds the mean loss over those steps"})
    checkpoint_every: int = field(default=200, metadata={"help": "optimizer steps between checkpoints "
                                                                 "(0: at the end only)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint folder"})
    overwrite: bool = field(default=False, metadata={
        "help": "start over in an --out that holds a run: move that run to OUT/previous_runs/<time>/ first "
                "(without it, such an --out is refused unless --resume is given)"})
    validation_sampler_steps: int = field(default=25, metadata={
        "help": "sampler steps of each validation sample (not an interval: that is --validate-every)",
        "formerly": ("validation_steps",), "refuse_formerly": VALIDATION_STEPS_REFUSAL})
    validation_guidance: float = field(default=7.5, metadata={"help": "CFG scale of the validation samples"})
    save_diffusers: bool = field(default=False, metadata={"help": "also write OUT/diffusers"})
    save_dtype: str = field(default="fp32", metadata={
        "help": "dtype of the exported model files (fp16: half the size, what A1111 / ComfyUI users share; "
                "checkpoints keep fp32 to resume exactly)", "choices": list(PRECISIONS)})
    export_ema: bool = field(default=False, metadata={"help": "also write the EMA weights (needs --ema)"})
    report_to: str = field(default="none", metadata={
        "help": "also log the metrics to TensorBoard (OUT/tensorboard; needs the optional tensorboard package)",
        "choices": list(REPORT_TO)})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
