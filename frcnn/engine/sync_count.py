"""Count the calls that make the host wait for the device (host synchronisations).

On a GPU each of these stalls the Python thread until every queued kernel has run; on a CPU they
cost nothing, which is why they have to be counted rather than timed. The counter recognises them
by what they are, so it gives the same count on either device:

- reading a tensor on the host: ``item``, ``tolist``, ``numpy``, ``cpu``, and ``bool`` / ``int`` /
  ``float`` / ``index`` of a tensor (a Python ``if`` on a tensor);
- operations whose output size depends on the data: ``nonzero`` (and one-argument ``torch.where``),
  boolean-mask indexing and assignment, ``masked_select``, ``unique``, ``repeat_interleave``
  without ``output_size``;
- comparisons answered on the host (``torch.equal``), and torchvision's ``nms``, whose CUDA kernel
  copies its suppression mask to the host.

    with count_host_syncs() as syncs:
        loss = model(images, targets)
    print(syncs.total, syncs.by_call)

Python-level calls are seen through a TorchFunctionMode and operator-level ones through a
TorchDispatchMode; a Python-level call counts once even though it reaches the operators too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor methods that hand a value to the host
_HOST_READS = {
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
}
_DATA_DEPENDENT_OPS = {
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.equal.default",
    "aten.is_nonzero.default",
    "aten._local_scalar_dense.default",
    "torchvision.nms.default",
}
_MASK_INDEX_OPS = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}
_REPEAT_INTERLEAVE = {"aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor"}


class HostSyncCount:
    """What :func:`count_host_syncs` saw: ``by_call`` maps a call's name to its count."""

    def __init__(self) -> None:
        self.by_call: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_call.values())

    def __repr__(self) -> str:
        return f"HostSyncCount(total={self.total}, by_call={dict(self.by_call)})"


class _MethodCounter(TorchFunctionMode):
    def __init__(self, count: HostSyncCount, state: dict[str, int]) -> None:
        super().__init__()
        self.count = count
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if name not in _HOST_READS:
            return func(*args, **(kwargs or {}))
        self.count.by_call[f"Tensor.{name}"] += 1
        self.state["inside_read"] += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.state["inside_read"] -= 1


class _OperatorCounter(TorchDispatchMode):
    def __init__(self, count: HostSyncCount, state: dict[str, int]) -> None:
        super().__init__()
        self.count = count
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if not self.state["inside_read"]:
            name = str(func)
            if _syncs(name, args, kwargs):
                self.count.by_call[_short(name, args)] += 1
        return func(*args, **kwargs)


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _DATA_DEPENDENT_OPS:
        return True
    if name in _MASK_INDEX_OPS:
        return any(_is_mask(index) for index in args[1])
    if name in _REPEAT_INTERLEAVE:
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    return False


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _short(name: str, args: tuple) -> str:
    if name in _MASK_INDEX_OPS:
        return "boolean-mask " + ("indexing" if name == "aten.index.Tensor" else "assignment")
    return name.removesuffix(".default")


@contextmanager
def count_host_syncs() -> Iterator[HostSyncCount]:
    """Count host synchronisations inside the ``with`` block (this thread only)."""
    count = HostSyncCount()
    state = {"inside_read": 0}
    with _OperatorCounter(count, state), _MethodCounter(count, state):
        yield count
