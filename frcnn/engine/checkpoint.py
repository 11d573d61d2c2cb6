"""Crash-safe checkpoints under ``<output_dir>/checkpoints`` and strict model-weight loading.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over its final name (``os.replace`` is atomic on POSIX), and only then does the
``last_checkpoint`` pointer (replaced the same way) name it. Older checkpoints are pruned after
that, so a crash at any moment leaves the previous good checkpoint and a pointer naming a
complete file. Files are read with ``torch.load(weights_only=True)`` only: a checkpoint holds
tensors and plain Python values, and anything else is refused rather than unpickled.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

POINTER_FILE = "last_checkpoint"
FINAL_NAME = "model_final"
HEAD_KEYWORD = "box_predictor"
_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
_PLAIN_LEAVES = (bool, int, float, str, type(None))
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)


def check_plain_state(value: Any, path: str = "state") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` would
    refuse: only tensors, bool/int/float/str/None and dict/list/tuple of them are allowed."""
    if isinstance(value, Tensor) or type(value) in _PLAIN_LEAVES:
        return
    if type(value) not in _PLAIN_CONTAINERS:
        raise TypeError(
            f"checkpoint {path} is a {type(value).__module__}.{type(value).__qualname__}; "
            "checkpoints hold only tensors and plain Python values (convert it, e.g. a "
            "dataclass with dataclasses.asdict, a numpy value with .item() or torch.as_tensor)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in _PLAIN_LEAVES:
                raise TypeError(f"checkpoint {path} has a key of type {type(key).__name__}")
            check_plain_state(item, f"{path}[{key!r}]")
    else:
        for index, item in enumerate(value):
            check_plain_state(item, f"{path}[{index}]")


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; some file systems do not support fsync on directories.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, make it durable, rename it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def is_complete(path: Path) -> bool:
    """True when ``path`` is a whole torch zip archive: central directory present and every
    member's CRC correct. Catches truncated and corrupted files without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


class Checkpointer:
    """Saves and finds checkpoints in ``<output_dir>/checkpoints``.

    ``keep`` periodic checkpoints (``model_XXXXXXX.pth``) are kept besides ``model_final.pth``.
    Under DDP only rank 0 should call `save`; every rank may call `load` and `last`.
    """

    def __init__(self, output_dir: str | os.PathLike, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"Checkpointer keep must be >= 1, got {keep}")
        self.directory = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, name: str, state: Mapping[str, Any]) -> Path:
        """Write ``state`` atomically to ``<name>.pth``, point ``last_checkpoint`` at it, prune."""
        check_plain_state(dict(state))
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.pth"
        _write_atomic(path, lambda f: torch.save(dict(state), f))
        _write_atomic(self.directory / POINTER_FILE, lambda f: f.write(path.name.encode()))
        self._prune(current=path)
        logger.info("Saved checkpoint %s", path)
        return path

    def _prune(self, current: Path) -> None:
        periodic = sorted(p for p in self.directory.iterdir() if _PERIODIC.match(p.name))
        for old in periodic[: -self.keep]:
            if old != current:
                old.unlink(missing_ok=True)
        # Temporary files left by a writer that was killed mid-save.
        for stale in self.directory.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Checkpoint files, newest first: ``model_final`` then periodic by iteration."""
        if not self.directory.is_dir():
            return []
        periodic = sorted(
            (p for p in self.directory.iterdir() if _PERIODIC.match(p.name)), reverse=True
        )
        final = self.directory / f"{FINAL_NAME}.pth"
        return ([final] if final.is_file() else []) + periodic

    def last(self) -> Path | None:
        """The checkpoint named by ``last_checkpoint`` if complete, else the newest complete one,
        else None."""
        pointer = self.directory / POINTER_FILE
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if is_complete(named):
                return named
            logger.warning("%s names %s, which is missing or incomplete", pointer, named)
        for path in self.candidates():
            if is_complete(path):
                logger.warning("Falling back to checkpoint %s", path)
                return path
            logger.warning("Skipping incomplete checkpoint %s", path)
        return None

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        return load_checkpoint(path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unsafe, truncated, or made for another model. The
    message names the file and the fix; the tools print it without a traceback."""


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True`` (never arbitrary unpickling)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise CheckpointError(
            f"refusing checkpoint {path}: {_unpickler_reason(error)}. frcnn reads checkpoints "
            "with torch.load(weights_only=True): files holding arbitrary Python objects (which "
            "could run code when unpickled) and truncated files are refused. Use a checkpoint "
            "written by frcnn or tools/convert_weights.py, or a plain state_dict of tensors."
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def _unpickler_reason(error: Exception) -> str:
    """What torch refused (e.g. "unsupported GLOBAL posix.mkdir"), without its advice to load the
    file unsafely."""
    for line in str(error).splitlines():
        line = line.strip()
        if line and "weights_only" not in line and "Check the documentation" not in line:
            return line.rstrip(".")
    return type(error).__name__


def load_weights_file(
    model: nn.Module, path: str | os.PathLike, allow_head_reinit: bool = True
) -> list[str]:
    """Load the model weights of an frcnn checkpoint or a bare state_dict file into ``model``
    (safely, see load_checkpoint); returns the head parameters re-initialised, if allowed."""
    state = model_state_from_checkpoint(load_checkpoint(path))
    return load_model_weights(model, state, allow_head_reinit, str(path))


def model_state_from_checkpoint(checkpoint: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """The model weights of an frcnn checkpoint (key ``model``) or of a bare state_dict."""
    model_state = checkpoint.get("model", checkpoint)
    if not isinstance(model_state, Mapping):
        raise TypeError(f"checkpoint['model'] is a {type(model_state).__name__}, not a mapping")
    return model_state


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _format_names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _mismatch_report(
    missing: list[str], unexpected: list[str], shapes: dict[str, tuple[tuple, tuple]]
) -> str:
    lines = []
    if missing:
        lines.append(f"  missing from the checkpoint: {_format_names(missing)}")
    if unexpected:
        lines.append(f"  not in the model: {_format_names(unexpected)}")
    for name, (ckpt_shape, model_shape) in list(shapes.items())[:10]:
        lines.append(f"  shape of {name}: checkpoint {ckpt_shape} vs model {model_shape}")
    return "\n".join(lines)


def load_model_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    allow_head_reinit: bool = True,
    source: str = "checkpoint",
) -> list[str]:
    """Copy ``state_dict`` into ``model``; every name and shape must match.

    With ``allow_head_reinit``, parameters whose name contains ``box_predictor`` may differ in
    shape only (a checkpoint trained on another number of classes): they are not loaded and
    keep the model's fresh initialisation. Returns those names. Anything else that differs
    raises a ValueError listing the keys.
    """
    state = _strip_prefix(_strip_prefix(state_dict, "module."), "_orig_mod.")
    model_state = model.state_dict()
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = {
        k: (tuple(state[k].shape), tuple(v.shape))
        for k, v in model_state.items()
        if k in state and state[k].shape != v.shape
    }
    reinit = [k for k in shapes if allow_head_reinit and HEAD_KEYWORD in k]
    for name in reinit:
        del shapes[name]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not match the model:\n{_mismatch_report(missing, unexpected, shapes)}"
            "\nCheck that model.backbone.name, the heads and model.num_classes are those of the "
            "run that wrote it (tools/convert_weights.py converts torchvision weights)."
        )
    if reinit:
        logger.warning(
            "Re-initialising %s: its shape in %s differs from the model's (another number of "
            "classes); these parameters keep their fresh initialisation for fine-tuning",
            _format_names(reinit),
            source,
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in reinit}, strict=False)
    return reinit
