"""Backbones (timm DINOv3 ViTs with training additions), projection heads and presets."""
