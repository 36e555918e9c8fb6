"""Resampling as matrices: the exact arithmetic of PyTorch's bicubic and bilinear ``interpolate``.

Resizing a grid from ``n`` to ``m`` samples along one axis is a fixed linear map, an (m, n) matrix. Both framework
packages apply these matrices (two small matmuls per resize) instead of their own resize ops, whose kernels
differ (TensorFlow's bicubic uses a = -0.5, PyTorch's a = -0.75; TensorFlow rounds the half-pixel offsets
differently). The matrices reproduce ``torch.nn.functional.interpolate(..., align_corners=False)`` without
antialiasing, which is what the reference uses for the position table (bicubic) and the segmentation maps
(bilinear).
"""

from __future__ import annotations

import functools

import numpy as np

CUBIC_A = -0.75  # PyTorch's bicubic convolution constant


def _cubic_weights(t: float) -> np.ndarray:
    a = CUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.array([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of bicubic resampling, half-pixel centres, edges clamped."""
    _check_sizes(in_size, out_size)
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for dst in range(out_size):
        # PyTorch does not clamp the source coordinate at 0 for cubic kernels, only the taps.
        src = (dst + 0.5) * scale - 0.5
        base = int(np.floor(src))
        weights = _cubic_weights(src - base)
        for tap, weight in enumerate(weights):
            index = min(max(base - 1 + tap, 0), in_size - 1)
            matrix[dst, index] += weight
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of bilinear resampling, half-pixel centres, no antialiasing."""
    _check_sizes(in_size, out_size)
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for dst in range(out_size):
        src = max((dst + 0.5) * scale - 0.5, 0.0)
        low = min(int(np.floor(src)), in_size - 1)
        high = min(low + 1, in_size - 1)
        frac = src - low
        matrix[dst, low] += 1.0 - frac
        matrix[dst, high] += frac
    matrix.setflags(write=False)
    return matrix


def _check_sizes(in_size: int, out_size: int) -> None:
    for name, value in (("in_size", in_size), ("out_size", out_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resize_grid(grid: np.ndarray, out_height: int, out_width: int, mode: str = "bilinear") -> np.ndarray:
    """Resize the last two axes of a numpy array with the matrices above (reference implementation)."""
    make = {"bilinear": bilinear_matrix, "bicubic": bicubic_matrix}.get(mode)
    if make is None:
        raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
    rows = make(grid.shape[-2], out_height)
    cols = make(grid.shape[-1], out_width)
    return np.einsum("hy,...yx,wx->...hw", rows, grid, cols)


def attention_grid(height: int, width: int, num_tokens: int) -> tuple:
    """The (rows, cols) patch grid that ``num_tokens`` image tokens form for an input of height x width pixels.

    Same rule as the reference's ``resize_attention_map``: the shorter side's token count is rounded from the
    aspect ratio, the longer side's is what remains.
    """
    scale = (height * width // num_tokens) ** 0.5
    if height > width:
        cols = int(np.round(width / scale))
        rows = num_tokens // cols
    else:
        rows = int(np.round(height / scale))
        cols = num_tokens // rows
    if rows * cols != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid for a {height}x{width} image")
    return rows, cols
