#!/usr/bin/env bash
# Re-run an engine's stored verification on an emulated AVX2-only x86 CPU (no AVX-512, no VNNI,
# no AMX), the CPU class whose U8S8 integer kernels saturate int16 pair sums (VPMADDUBSW).
# ONNX Runtime picks its kernels from CPUID at run time, so under QEMU's user-mode emulation with
# `-cpu Haswell` it runs exactly the AVX2 code path it runs on such a host: the integer results are
# those of that CPU class (timings are not: emulation is ~50x slower).
#
#   scripts/verify_on_emulated_avx2.sh ENGINE_DIR [--json OUT]
#
# Needs qemu-user (Debian: apt-get install qemu-user). Prints the verification figures; exits
# non-zero with the refusal line when the engine computes something else on that CPU class.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:?usage: scripts/verify_on_emulated_avx2.sh ENGINE_DIR [--json OUT]}
shift
command -v qemu-x86_64 >/dev/null || { echo "error: qemu-x86_64 not found; install qemu-user (apt-get install qemu-user)" >&2; exit 2; }
PY=${PY:-.venv/bin/python}
exec qemu-x86_64 -cpu Haswell "$PY" -m quest_export.cli verify-engine "$engine" "$@" 2> >(grep -v '^qemu-x86_64: warning' >&2)
