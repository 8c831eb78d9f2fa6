r"""The ceilings ``minialign bench`` divides by: the CPU's theoretical peak and the measured matmul.

**The theoretical peak** of one CPU core in float32 (``cpu_peak``):

$$\text{FLOP/s} = \text{lanes}\times 2\,(\text{an FMA is a multiply and an add})\times\text{FMA units}\times\text{clock}$$

with 16 lanes under AVX-512, 8 under AVX2 (and 4 with SSE only), times the cores used. The vector
width and FMA come from the flags of ``/proc/cpuinfo``, the clock from ``lscpu``'s "CPU max MHz"
(the turbo clock) or else ``/proc/cpuinfo``'s "cpu MHz" (the clock of the moment, under a
hypervisor often the nominal one, below turbo); the number of FMA units per core is not written
anywhere the OS shows, so it is *assumed* to be 2 (Intel since Haswell's server parts, AMD since
Zen 2; some AVX-512 parts have 1). ``Peak.describe`` says which figures were read and which assumed.
An AVX2 + FMA core at 2.45 GHz: 8 x 2 x 2 x 2.45e9 = 78.4 GFLOP/s.

**The measured ceiling** (``Ceiling``): a short burst of the model's own largest matmul, run
*between* the timed steps (``bench.time_alternately``'s ``between``), so that it sees the same load
as they do; the ceiling is the best burst. A step that seems to run above it (a fraction over
100 %) means the bursts all fell on busy moments: ``Ceiling.fraction`` then measures more bursts,
and if the step still beats them it returns None, printed as "not printed: the ceiling measurement
was disturbed", never as a fraction above 100 %.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..runtime.devices import autocast

FMA_UNITS = 2  # assumed: the OS does not report it


@dataclass
class Peak:
    """A CPU's theoretical float32 FLOP/s for ``cores`` cores, and where each factor came from."""
    lanes: int             # float32 lanes of the widest vector unit
    fma: bool              # fused multiply-add: 2 FLOPs per lane per instruction
    units: int             # FMA (or multiply-add) units per core
    ghz: float | None      # clock; None if the OS gave none
    cores: int             # cores counted (the threads used, at most the cores present)
    read: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)

    @property
    def flops_per_s(self) -> float | None:
        if self.ghz is None:
            return None
        return self.lanes * (2 if self.fma else 1) * self.units * self.ghz * 1e9 * self.cores

    def describe(self) -> str:
        if self.flops_per_s is None:
            return "theoretical peak: unknown (no clock in /proc/cpuinfo or lscpu)"
        return (f"theoretical peak {self.flops_per_s / 1e9:.1f} GFLOP/s = {self.lanes} float32 lanes x "
                f"{2 if self.fma else 1} (FMA) x {self.units} units x {self.ghz:.2f} GHz x {self.cores} core(s); "
                f"read: {', '.join(self.read)}; assumed: {', '.join(self.assumed) or 'nothing'}")


def cpu_peak(threads: int, cpuinfo: str | None = None, lscpu: str | None = None) -> Peak:
    """The theoretical float32 peak of ``threads`` cores of this CPU (texts given: for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            cpuinfo = ""
    if lscpu is None:
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            lscpu = ""
    flags_line = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    read, assumed = [], []
    if flags_line:
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx" in flags else 4
        widest = "avx512f" if lanes == 16 else "avx2" if "avx2" in flags else "avx" if lanes == 8 else "sse"
        read.append(f"vector width {lanes} lanes ({widest} in /proc/cpuinfo flags)")
        read.append(f"FMA {'present' if 'fma' in flags else 'absent'} (/proc/cpuinfo flags)")
    else:
        lanes = 8
        assumed.append("vector width 8 lanes (no flags line in /proc/cpuinfo)")
    fma = "fma" in flags or "avx512f" in flags or not flags_line
    if not flags_line:
        assumed.append("FMA present")
    assumed.append(f"{FMA_UNITS} FMA units per core")
    max_mhz = re.search(r"^CPU max MHz:\s*([\d.]+)", lscpu, re.M)
    now_mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)]
    if max_mhz:
        ghz = float(max_mhz.group(1)) / 1000
        read.append(f"clock {ghz:.2f} GHz (lscpu CPU max MHz)")
    elif now_mhz:
        ghz = max(now_mhz) / 1000
        read.append(f"clock {ghz:.2f} GHz (/proc/cpuinfo cpu MHz: the clock of the moment, not turbo)")
    else:
        ghz = None
    present = len(re.findall(r"^processor\s*:", cpuinfo, re.M)) or threads
    cores = max(1, min(threads, present))
    read.append(f"{cores} core(s): the threads used, of {present} present")
    return Peak(lanes, fma, FMA_UNITS, ghz, cores, read, assumed)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device, dtype: str, n: int | None = None, repeats: int | None = None,
                 shape: tuple[int, int, int] | None = None, rounds: int = 3) -> float:
    """Measured FLOP/s of a matmul, the ceiling the MFU figures are a fraction of.

    ``shape`` (m, k, n): an (m, k) input times a (k, n) weight, e.g. a model's own largest matmul
    (tokens x n_embd into 4 n_embd); default an n x n square, big enough to saturate the device.
    Run the way the model runs its matmuls: ``F.linear`` on float32 tensors under the same
    autocast (a CPU without bf16 units multiplies bf16 through a slower path than ``a @ b``'s
    fp32 one, and ``nn.Linear`` under autocast takes yet another). The best of ``rounds`` rounds,
    so a moment of contention from other processes does not lower the ceiling.
    """
    cuda = device.type == "cuda"
    n = n or (4096 if cuda else 1024)
    m, k, n = shape or (n, n, n)
    repeats = repeats or max(2, int((50 if cuda else 2) * 1024 ** 3 / (m * k * n)))
    a = torch.randn(m, k, device=device)
    b = torch.randn(n, k, device=device)
    best = 0.0
    with autocast(device, dtype):
        F.linear(a, b)  # warm-up (kernel selection, casts)
        for _ in range(rounds):
            _sync(device)
            t = time.perf_counter()
            for _ in range(repeats):
                F.linear(a, b)
            _sync(device)
            best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t))
    return best


class Ceiling:
    """The measured matmul ceiling, one short burst at a time between timed steps; the best burst counts.

    ``measure`` runs one burst (one round of ``matmul_flops`` at ``shape``); ``fraction`` divides a
    step's FLOP/s by the best burst, and never returns a fraction above 1 (see the module's docstring).
    """

    def __init__(self, device, dtype: str, shape: tuple[int, int, int], burst=None):
        self.device, self.dtype, self.shape = torch.device(device), dtype, shape
        self.burst = burst or (lambda: matmul_flops(self.device, self.dtype, shape=self.shape, rounds=1))
        self.samples: list[float] = []
        self.remeasured = 0

    def measure(self) -> None:
        self.samples.append(self.burst())

    @property
    def best(self) -> float:
        if not self.samples:
            self.measure()
        return max(self.samples)

    def fraction(self, flops_per_s: float, retries: int = 5) -> float | None:
        """``flops_per_s`` / the best burst; over 1, up to ``retries`` more bursts, then None."""
        for _ in range(retries):
            if flops_per_s <= self.best:
                break
            self.measure()
            self.remeasured += 1
        return flops_per_s / self.best if flops_per_s <= self.best else None


def percent(fraction: float | None, ceiling: "Ceiling") -> str:
    """A fraction of the ceiling as printed: ``53%``, or why none is printed."""
    if fraction is None:
        return (f"not printed: the ceiling measurement was disturbed (the step beat all {len(ceiling.samples)} "
                f"matmul bursts, {ceiling.remeasured} of them remeasured)")
    return f"{100 * fraction:.0f}%"
