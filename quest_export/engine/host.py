"""What an engine's integer kernels depend on: the host CPU's instruction-set class and the runtime.

ONNX Runtime (MLAS) and OpenVINO (oneDNN) choose their int8 kernels from the CPU at run time, and
those kernels do not all compute the same thing: without VNNI, x86 U8S8 kernels add pairs of
u8*s8 products in a saturating int16 (VPMADDUBSW), with VNNI/AMX they accumulate in int32. So an
engine verified on one class of CPU says nothing certain about another; the manifest records the
class an engine was verified on and loading elsewhere re-verifies it (``runtime/engine_unet.py``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# CPU flags (Linux /proc/cpuinfo names) that select different integer GEMM/conv kernels
KERNEL_FLAGS = ("sse4_1", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8",
                "asimddp", "i8mm", "sve")


def _cpuinfo() -> tuple[str | None, str | None, set[str]]:
    """(vendor, model name, flags) from /proc/cpuinfo; Nones and no flags where it is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, platform.processor() or None, set()
    vendor = model = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "vendor_id" and vendor is None:
            vendor = value
        elif key in ("model name", "Model") and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return vendor, model, flags


def cpu_flags() -> set[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is unreadable)."""
    return _cpuinfo()[2]


def kernel_class(flags: set[str]) -> str:
    """The integer-kernel family a CPU gets, best first (one word, for messages and comparisons)."""
    for name, needs in (("amx", {"amx_int8"}), ("avx512-vnni", {"avx512_vnni"}), ("avx-vnni", {"avx_vnni"}),
                        ("avx512", {"avx512bw"}), ("avx2", {"avx2"}), ("sse4.1", {"sse4_1"}),
                        ("arm-i8mm", {"i8mm"}), ("arm-dotprod", {"asimddp"})):
        if needs <= flags:
            return name
    return "generic"


def host_description() -> dict[str, Any]:
    """This host as the engine manifest records it."""
    vendor, model, flags = _cpuinfo()
    present = sorted(f for f in KERNEL_FLAGS if f in flags)
    return {"kind": "cpu", "machine": platform.machine(), "vendor": vendor, "model": model, "cores": os.cpu_count(),
            "kernel_flags": present, "kernel_class": kernel_class(set(present))}


def runtime_fingerprint(device: dict[str, Any], backend_version: str, provider: str) -> dict[str, Any]:
    """What must be equal for a verified engine to compute the same codes: the CPU's kernel flags
    (or the GPU and its compute capability), the runtime version and the execution provider."""
    keys = ("machine", "kernel_flags") if device.get("kind") == "cpu" else ("name", "compute_capability")
    return {"device": {k: device.get(k) for k in ("kind", *keys)}, "backend_version": backend_version, "provider": provider}


def describe(host: dict[str, Any]) -> str:
    """One phrase naming a host for messages: model, kernel class."""
    if host.get("kind") == "cuda":
        return f"{host.get('name')} (compute capability {host.get('compute_capability')})"
    return f"{host.get('model') or host.get('machine') or 'unknown CPU'} ({host.get('kernel_class', 'unknown')})"
