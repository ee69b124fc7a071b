"""Target profiles: what each engine really computes, and therefore what the simulation does.

A profile turns a requested bit-width into an exact integer grid (type, range, symmetry), says
which tensors carry quantizers, and refuses settings its engine cannot run. The exporter reads
the same profile, so the graph computes the same integer codes as the finetuned simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from quest.errors import QuantConfigError


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: codes in [qmin, qmax], zero point fixed at 0 when symmetric; and the float
    precision the exported graph stores its scales in ("fp16": the simulation quantizes with the
    FP16-rounded scales the engine reads, see quest.quantizers.graph_scale_table)."""

    bits: int
    signed: bool
    symmetric: bool
    narrow: bool = False
    scale_precision: str = "fp32"

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def container_bits(self) -> int:
        """Storage width in the engine: sub-8-bit grids live in 8-bit containers (INT4 weights of
        MatMul on TensorRT are the one exception, decided by the exporter)."""
        return 8


@dataclass(frozen=True)
class TargetProfile:
    """The arithmetic of one engine target."""

    name: str
    activation_signed: bool
    activation_symmetric: bool
    conv_output_quantizers: bool
    per_timestep_zero_points: bool = False
    attention_quantizers: bool = True  # quantize the attention matmul inputs (q, k, v, softmax output)
    min_bits: int = 2
    max_bits: int = 8
    # widest weight grid the engine's integer kernels compute exactly on every host it runs on
    # (requests above it get this grid; see ONNXRUNTIME below)
    max_weight_bits: int = 8
    # bumped whenever the arithmetic of an existing profile changes: a checkpoint finetuned for an
    # older revision simulates something the exporter no longer builds, so loading it is refused
    revision: int = 1
    # -- how the exported graph expresses this arithmetic (read by quest_export.export) --------
    # standalone Q and output DQ may read a per-sample scale gathered from the timestep table at
    # run time (False: constant scales everywhere, as TensorRT needs)
    runtime_scales: bool = False
    # quantized Linear layers read by Gemm are exported as MatMul + Add (ONNX Runtime CPU: a Gemm with
    # a float bias does not fuse into an integer kernel)
    gemm_as_matmul: bool = False
    # precision of the float parts of the shipped graph ("fp16": converted after the strict FP32 parity)
    graph_precision: str = "fp32"
    # the Q/DQ placement rules the graph must pass (export/lint.py), "" for none
    graph_rules: str = ""
    # the engine runtime re-fuses the graph into integer kernels (ONNX Runtime CPU): parity also runs
    # the runtime's optimised graph and the export reports which kernels it fused
    fused_kernel_checks: bool = False
    description: str = ""

    def weight_spec(self, bits: int) -> QuantSpec:
        """Per-output-channel weights: symmetric, signed, narrow range (zero point 0), both targets,
        at most ``max_weight_bits`` wide."""
        self.check_bits(bits, "weight")
        return QuantSpec(min(bits, self.max_weight_bits), signed=True, symmetric=True, narrow=True,
                         scale_precision=self.graph_precision)

    def activation_spec(self, bits: int) -> QuantSpec:
        """Per-tensor activations on the target's integer type (full range, as QuantizeLinear saturates)."""
        self.check_bits(bits, "activation")
        return QuantSpec(bits, signed=self.activation_signed, symmetric=self.activation_symmetric,
                         scale_precision=self.graph_precision)

    def check_bits(self, bits: int, what: str) -> None:
        if not self.min_bits <= bits <= self.max_bits:
            raise QuantConfigError(
                f"target {self.name} cannot run {bits}-bit {what}s; use {self.min_bits}-{self.max_bits} bits"
            )

    def check_activation_layout(self, symmetric: bool | None, per_channel: bool) -> None:
        """Refuse activation layouts the engine cannot run as integer kernels."""
        if per_channel:
            raise QuantConfigError(
                f"target {self.name} quantizes activations per tensor only; set activation_per_channel: false"
            )
        if symmetric is not None and symmetric != self.activation_symmetric:
            wanted = "symmetric (zero point 0)" if self.activation_symmetric else "asymmetric uint8 (only uint8 fuses on x86)"
            raise QuantConfigError(
                f"target {self.name} needs {wanted} activations; remove activation_symmetric from the recipe or change --target"
            )


TENSORRT = TargetProfile(
    name="tensorrt",
    activation_signed=True,
    activation_symmetric=True,
    conv_output_quantizers=False,
    graph_precision="fp16",
    graph_rules="tensorrt",
    # 2: scales quantize as the FP16 numbers the FP16 graph stores (the reference scale and the
    # per-timestep factors each rounded to FP16), not as the FP32 values finetuning learned
    revision=2,
    description=(
        "TensorRT explicit quantization: symmetric INT8 Q/DQ (zero point 0), per-channel weights, "
        "per-tensor activations, inputs of Conv/MatMul quantized and outputs not; sub-8-bit grids in "
        "INT8 containers (activations clipped to the grid); scales as FP16 numbers (the graph is FP16)."
    ),
)

ONNXRUNTIME = TargetProfile(
    name="onnxruntime",
    activation_signed=False,
    activation_symmetric=False,
    conv_output_quantizers=True,
    # ORT CPU has no integer attention that beats its float one at UNet shapes (head dims 8-64, long
    # sequences): QLinearMatMul with K = head_dim and the table-driven QLinearSoftmax run slower than
    # FusedMatMul/Softmax, and Q/DQ around softmax add full passes over the (B, heads, S, S) scores.
    # So q @ k^T, softmax and probs @ v run in float, reading the float outputs of the integer
    # to_q/to_k/to_v kernels (MatMulIntegerToFloat), and the simulation does the same.
    attention_quantizers=False,
    # x86 CPUs without VNNI (AVX2-only, AVX-512 without VNNI) run ORT's U8S8 kernels with
    # VPMADDUBSW, which adds two u8*s8 products into a *saturating* int16: 255*127*2 = 64770 does not
    # fit, so 8-bit weights compute other codes there than on VNNI/AMX hosts (measured: 77% of
    # conv_in's codes on an AVX2-only host). With |w| <= 63 every pair sum fits (255*63*2 = 32130),
    # so the same codes come out on every x86 class; ORT's own quantizer calls this reduce_range.
    # 8-bit weight requests get the 7-bit narrow grid [-63, 63]; 2-7-bit grids are unchanged.
    max_weight_bits=7,
    revision=2,
    runtime_scales=True,
    gemm_as_matmul=True,
    fused_kernel_checks=True,
    description=(
        "ONNX Runtime CPU: uint8 asymmetric activations (one zero point per tensor, shared by all "
        "timestep groups), int8 symmetric per-channel weights at most 7 bits wide ([-63, 63], exact "
        "on x86 with and without VNNI), output quantizers on Conv so "
        "DQ->Conv->Q fuses into QLinearConv; Linear layers as MatMulIntegerToFloat; attention "
        "matmuls and softmax in float; sub-8-bit grids in 8-bit containers."
    ),
)

OPENVINO = TargetProfile(
    name="openvino",
    # OpenVINO's CPU plugin turns each Q -> DQ pair into a FakeQuantize and runs Conv / MatMul
    # between FakeQuantizes as oneDNN int8 kernels when the ranges are constants: per-timestep tables
    # therefore use the constant-scale rescaling construction (as TensorRT), not gathered scales,
    # which it leaves in float and cannot broadcast.
    activation_signed=True,
    activation_symmetric=True,
    conv_output_quantizers=False,
    # oneDNN runs signed activations as u8 (shifted by 128) times s8 weights; without VNNI those
    # kernels add u8*s8 pairs in a saturating int16 like ONNX Runtime's (see ONNXRUNTIME), so
    # weights stay within [-63, 63] to compute the same integers on every x86 class
    max_weight_bits=7,
    description=(
        "OpenVINO CPU: symmetric INT8 Q/DQ with constant scales (FakeQuantize -> oneDNN int8 "
        "Convolution / FullyConnected / MatMul), per-channel weights at most 7 bits wide ([-63, 63], "
        "exact with and without VNNI), per-tensor activations, attention matmul inputs quantized, "
        "FP32 graph; sub-8-bit grids in INT8 containers."
    ),
)

PROFILES: dict[str, TargetProfile] = {p.name: p for p in (TENSORRT, ONNXRUNTIME, OPENVINO)}


def get_profile(name: str) -> TargetProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise QuantConfigError(f"unknown target {name!r}; choose one of: {', '.join(PROFILES)}") from None
