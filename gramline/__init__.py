"""gramline: the DINOv3 self-supervised recipe as a pipeline of containerized stages."""

__version__ = "0.1.0"
