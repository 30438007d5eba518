"""Checkpoint files: reading, layout detection, key tables, strict loading and writing.

The only package that knows foreign key names (LDM single files, diffusers folders, OpenCLIP,
ControlNet). Public entry points are re-exported here as they land.
"""
