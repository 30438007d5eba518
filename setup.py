"""defectsynth: synthetic, self-annotated industrial defect datasets with Stable Diffusion.

A pure-PyTorch implementation of Valvano et al., "Controllable Image Synthesis of Industrial Data
using Stable Diffusion" (arXiv:2401.03152). See README.md.
"""
import re

from setuptools import setup

# One version, kept in defectsynth/__init__.py (`defectsynth --version` prints it).
VERSION = re.search(r'__version__ = "([^"]+)"', open("defectsynth/__init__.py", encoding="utf-8").read()).group(1)

setup(
    name="defectsynth",
    version=VERSION,
    description="Self-annotated synthetic industrial defect datasets with Stable Diffusion, in plain PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The stage packages, listed explicitly (imports point one way:
    # data, model -> weights -> train, sample -> eval; defectsynth is the umbrella CLI on top).
    packages=["model", "weights", "data", "train", "sample", "eval", "defectsynth"],
    install_requires=[
        "torch",
        "torchvision",
        "safetensors",
        "open-clip-torch",
        "opencv-python-headless",
        "pycocotools",
        "numpy",
        "tqdm",
    ],
    extras_require={
        # Test-only: pytest and the reference implementations our parity tests compare against
        # (pytorch-fid: the FID Inception; its weights are never fetched by the tests).
        "test": ["pytest", "diffusers", "transformers", "scipy", "pytorch-fid"],
        # Optional: `--report-to tensorboard` in the training stages (imported only when asked for).
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["defectsynth = defectsynth.cli:main"]},
)
