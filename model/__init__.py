"""Networks and diffusion maths: UNet, VAE, CLIP text encoder + tokenizer, ControlNet, noise schedule.

No file I/O, argparse, prints or foreign key names here (weights/ owns checkpoint layouts).
Import the submodules directly: `from model.unet import UNet, UNetConfig`.
"""
