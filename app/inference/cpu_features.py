"""What the CPU's integer kernels can compute exactly: whether an INT8 variant measured on one machine
means the same thing on another.

x86 CPUs without VNNI multiply unsigned-by-signed bytes with ``vpmaddubsw``, whose 16-bit pair sums
saturate when both operands use the full 8-bit range (ONNX Runtime's MLAS kernels; measured on an
AVX2-only EPYC: the default image encoder's features fell from cosine 0.98 to 0.84 with 8-bit weights,
README "INT8"). VNNI (``vpdpbusd``, AVX-512 VNNI or AVX-VNNI), AMX and non-x86 CPUs accumulate in 32
bits and do not saturate. So an INT8 graph with full-range weights that was measured faithful on a
saturation-free CPU can change its answers on an x86 CPU without VNNI, and the recorded agreement no
longer describes it there. ``model.quantize`` records the requirement; ``choose_precision`` checks it.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterable
from pathlib import Path

EXACT_INT8_DOT = "exact_int8_dot"
"""Feature name recorded in a variant's quality: 8-bit x 8-bit dot products without saturation."""

_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def has_exact_int8_dot(machine: str | None = None) -> bool | None:
    """True on non-x86 CPUs and x86 with VNNI/AMX; False on x86 without; None when it cannot be told
    (x86 without /proc/cpuinfo). ``machine`` defaults to this machine's (tests pass others)."""
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return True
    flags = cpu_flags()
    if flags is None:
        return None
    return bool(flags & _VNNI_FLAGS)


def missing_features(required: Iterable[str], *, exact_int8_dot: bool | None = None) -> list[str]:
    """The required features this CPU lacks (an unknown answer counts as lacking: a guess must not
    put a variant with unverified answers in service)."""
    have = has_exact_int8_dot() if exact_int8_dot is None else exact_int8_dot
    return [f for f in required if not (f == EXACT_INT8_DOT and have)]
