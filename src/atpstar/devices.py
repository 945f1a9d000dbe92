"""Where a module computes: plain models, models split with ``device_map`` and accelerate offloading.

accelerate attaches a hook (``module._hf_hook``) that moves inputs to an execution device and, for
CPU/disk offload, loads weights there just for the call (the parameters themselves sit on the
``meta`` device in between). Activations live on the execution device, so that is the device every
record, patch and gradient of a layer uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate execution device, else its first real tensor's."""
    for candidate in module.modules():  # the module itself first, then its children
        device = _hook_device(getattr(candidate, "_hf_hook", None))
        if device is not None:
            return device
        for tensor in (*candidate.parameters(recurse=False), *candidate.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def check_weights_loaded(hf_model: torch.nn.Module) -> None:
    """Refuse a model with weights on the ``meta`` device that no accelerate hook loads for the call.

    Such weights have a shape but no values (``init_empty_weights``, ``torch.device("meta")``, or a
    ``from_pretrained`` that skipped them); offloaded weights (``device_map`` with CPU/disk offload)
    sit on ``meta`` too, under a module with ``_hf_hook``, and are fine.

    Raises:
        InputError: naming the first empty weights and the two ways to give them values.
    """
    hooked = [name for name, module in hf_model.named_modules() if getattr(module, "_hf_hook", None) is not None]
    empty = [
        name for name, tensor in (*hf_model.named_parameters(), *hf_model.named_buffers())
        if tensor.device.type == "meta" and not any(_under(name, prefix) for prefix in hooked)
    ]  # fmt: skip
    if empty:
        from .errors import InputError

        raise InputError(
            f"{len(empty)} model weights are on the meta device (they have no values), e.g. {empty[:3]}; load "
            "the weights (from_pretrained without init_empty_weights, or load_state_dict(..., assign=True)), "
            "or let accelerate offload them (from_pretrained(..., device_map='auto'))"
        )


def _under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or inside the module ``prefix`` (``""``: the root module holds everything)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _hook_device(hook: Any) -> torch.device | None:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", (hook,)):  # accelerate's SequentialHook holds several
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def is_cuda_oom(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, as opposed to any other failure."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


class HostMemory:
    """Gives the C allocator's free heap back to the system after a CPU batch (glibc ``malloc_trim``).

    Why: glibc raises its mmap threshold as large blocks are freed, so a batch's activations are later
    carved from the heap and not returned; over many batches the process grows past ``memory_gb``
    although the live tensors stay small (measured: 1.7 GB resident for 0.5 GB of batches, 8,000 pairs).
    Trimming at most every ``interval`` seconds keeps the cost negligible; a no-op off glibc.
    """

    interval = 0.25

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._last = 0.0

    def release(self, device: torch.device) -> None:
        """Trim the heap when ``device`` is the CPU and the last trim is ``interval`` seconds old."""
        if self._trim is None or device.type != "cpu":
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._trim(0)
            self._last = time.monotonic()


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


HOST_MEMORY = HostMemory()


def free_cached_memory(device: torch.device) -> None:
    """Return the CUDA caching allocator's free blocks after an out-of-memory error (no-op elsewhere)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
