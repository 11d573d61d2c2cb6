"""Seeding, determinism switches, and RNG states as checkpointable plain values."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device) with ``seed + rank``,
    so ranks draw different random numbers yet every run repeats. Returns the seed used."""
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    return rank_seed


def set_deterministic(enabled: bool) -> None:
    """Prefer deterministic kernels (warn, not fail, where none exists) and fix cuDNN's choice.

    cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first use to be deterministic, so it is
    set here (unless the user already did) when determinism is asked for.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def get_rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain lists (loadable with ``weights_only=True``)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss_next],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states written by `get_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
