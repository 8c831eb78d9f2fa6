"""Seeds, devices and dtypes: where a run computes, in which precision, and every random generator
it draws from (saved and restored by a resumable checkpoint); and the CPU threads and memory a run's
process keeps (``set_threads``, ``keep_freed_memory``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import sys

import numpy as np
import torch

from . import distributed
from .config import DTYPES, valid_device_name  # noqa: F401 (valid_device_name: its old place)
from .files import ConfigError

_INTEROP_SET = False  # torch sizes its inter-op pool once per process


def set_threads(threads: int) -> int:
    """Use ``threads`` CPU threads for torch's operators (0: leave torch's own choice untouched);
    return the number in use, which a run records in its ``config.json``.

    Called before a run's first tensor operation. The intra-op pool (the threads that split one
    matrix product) can be resized at any time; the inter-op pool (independent operators run side
    by side, which eager code hardly uses) only before it first runs, so it is sized once, and
    left as it is when something has used it already."""
    global _INTEROP_SET
    if threads > 0:
        torch.set_num_threads(threads)
        if not _INTEROP_SET:
            _INTEROP_SET = True
            with contextlib.suppress(RuntimeError):  # "cannot set ... after parallel work has started"
                torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a training step frees, for the next step to reuse;
    return whether it was set (Linux with glibc, and no ``MALLOC_*_THRESHOLD_`` of the user's).

    A step on the CPU allocates and frees its activations, tens of MB. With glibc's defaults a
    freed block above a threshold goes back to the OS (``munmap``, or a trim of the heap's top),
    and the next step faults every page of it back in, each zeroed by the kernel: time spent on
    memory, not on the model. Two thresholds raised keep those pages in the process:
    ``M_MMAP_THRESHOLD`` at its maximum (32 MiB on 64-bit: blocks up to that come from the heap)
    and ``M_TRIM_THRESHOLD`` at 256 MiB (the heap's free top is kept up to that). The numbers are
    the same (the allocator decides where a tensor lives, not what is computed in it); the page
    faults and the time they took are in ``docs/measurements.md``. Process-wide, so the stages
    and ``minialign bench`` set it, not ``import minialign``."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user's own settings
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """The device named (``auto``: CUDA, else MPS, else CPU); under torchrun, this rank's GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return distributed.device_for_rank(torch.device("cuda"))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but CUDA is not available here (try --device cpu)")
    return distributed.device_for_rank(device)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast for the matmuls; a no-op in float32. ``ops`` keeps log-probs float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=resolve_dtype(dtype))


def rng_state() -> dict:
    """Every global random generator: python, numpy, torch's CPU one and (if in use) CUDA's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
