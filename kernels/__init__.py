"""Hand-written Triton kernels for ftkit, installed as ``ftkit.kernels``.

One op per module: Triton forward/backward, an ``autograd.Function`` and a plain-PyTorch
reference. Nothing here is exported from notebooks; this folder is edited by hand.
"""
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
