"""Parity verification: the exported graph against the PyTorch simulation it came from.

Runs the graph with ONNX Runtime (CPU) on calibration inputs that cover every timestep group and
compares it with the simulation on the same inputs.

Quantized networks amplify float round-off: two correct implementations whose convolutions sum
in a different order (MLAS vs oneDNN, ~1e-7 relative) flip a few codes, each flip moves the next
layer's input by a whole step, and the mismatch snowballs with depth. So the check is made
layer-locally ("teacher forced"): every simulated activation quantizer reads the very float
tensor the graph's quantizer read (softmax probabilities excepted: the simulation recomputes them
from the graph's own q and k codes, as fetching them would take GBs per sample), then

* per quantized tensor, the share of identical integer codes (graph QuantizeLinear output vs the
  simulation's quantizer on the same input) must be >= 99.9%, and (FP32 graphs) every differing
  code must be a rounding tie: off by one, its input within ``TIE_STEPS`` of the half-way point
  (a float round-off flip, not a wrong scale);
* between quantizers the float computation must agree to float precision (``max_abs_error``: the
  final noise prediction of the teacher-forced simulation vs the graph). The simulation continues
  from the graph's codes, so a tie at the last quantizer (``conv_out``'s input: one step there is
  ~2e-3 at the output) is judged by the tie rule, not mistaken for an arithmetic error;
* weights are compared code by code as stored.

The free-running difference (simulation and graph each on their own values) is reported too, for
information: it measures how sensitive the model is to round-off, not whether the export is right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from quest.quantize import QuantizedUNet
from quest.timesteps import groups_for
from quest_export.export.passes import tensor_types
from quest_export.export.qdq import QuantizedTensor

MIN_CODE_AGREEMENT = 0.999
MAX_ABS_ERROR_FP32 = 1e-3
TIE_STEPS = 1e-3  # FP32: a differing code's input lies this close (in steps) to a rounding boundary

# (quantizer name, simulated codes, distance of each input from its rounding boundary in steps)
CodesFn = Callable[[str, np.ndarray, np.ndarray], None]


@dataclass
class ParityInputs:
    """UNet inputs (one row per sample) and their timesteps."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor

    def feeds(self) -> dict[str, np.ndarray]:
        return {
            "sample": self.sample.numpy().astype(np.float32),
            "timestep": self.timestep.float().numpy().astype(np.float32),
            "encoder_hidden_states": self.encoder_hidden_states.numpy().astype(np.float32),
        }


    def __len__(self) -> int:
        return int(self.sample.shape[0])

    def chunks(self, size: int) -> list["ParityInputs"]:
        return [ParityInputs(self.sample[i : i + size], self.timestep[i : i + size], self.encoder_hidden_states[i : i + size])
                for i in range(0, len(self), size)]

    def chunk_size(self) -> int:
        """Samples per graph run: all of them, one at a time for large latents (a 64x64 SD sample's
        quantized tensors, every one a graph output, are about 5 GB)."""
        from quest.calibration import samples_per_call

        return samples_per_call(len(self), int(self.sample[0, 0].numel()))


def inputs_covering_groups(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
                           lookup: torch.Tensor, per_group: int = 2) -> ParityInputs:
    """Pick up to ``per_group`` calibration rows from every timestep group (several timesteps each)."""
    groups = groups_for(lookup, timestep)
    chosen: list[int] = []
    for g in range(int(lookup.max()) + 1):
        rows = torch.nonzero(groups == g).flatten()
        if rows.numel():
            picks = torch.linspace(0, rows.numel() - 1, min(per_group, rows.numel())).round().long()
            chosen += rows[picks].tolist()
    index = torch.tensor(chosen)
    return ParityInputs(sample[index].float(), timestep[index].float(), states[index].float())


def _run_simulation(qunet: QuantizedUNet, inputs: ParityInputs, names: set[str],
                    forced: dict[str, np.ndarray] | None, factors: dict[str, list[float]] | None = None,
                    graph_codes: dict[str, np.ndarray] | None = None, on_codes: CodesFn | None = None,
                    ) -> tuple[dict[str, float], np.ndarray]:
    """One simulation pass; with ``forced``, each named quantizer reads the graph's input tensor
    and (with ``graph_codes``) passes on the graph's codes, dequantized with its own scale.

    Returns the deviation of the simulation's own input from the forced one (in quantization
    steps) and the output; each named quantizer's codes, with the distance (in steps) of each input
    from the nearest rounding boundary, go to ``on_codes`` as they are made (compared and dropped:
    kept for a whole SD1.5 UNet they would be several GB per sample).
    """
    factors = factors or {}
    graph_codes = graph_codes or {}
    deviation: dict[str, float] = {}
    handles = []
    modules = dict(qunet.unet.named_modules())
    for name in names:
        module = modules[name]

        def pre_hook(mod: nn.Module, args: tuple, _name: str = name):
            if forced is None or _name not in forced:
                return None
            own = args[0]
            graph = torch.from_numpy(forced[_name]).to(own.dtype)
            if _name in factors:  # an output quantizer reads the conv output in the rescaled domain
                table = torch.tensor(factors[_name], dtype=own.dtype)
                groups = mod.input_quantizer.current_groups(own.shape[0], own.device)
                graph = graph * table[groups].view(-1, *([1] * (own.dim() - 1)))
            step = mod.sample_scale(own)
            deviation[_name] = float(((own - graph).abs() / step).max())
            return (graph,)

        def hook(mod: nn.Module, args: tuple, out: Any, _name: str = name) -> torch.Tensor | None:
            x = args[0]
            scale = mod.sample_scale(x)
            if on_codes is not None:
                # x / s once, in place: codes (int16) and tie distances (0 at the half-way point)
                # of a 64x64 softmax would otherwise take four float copies of 0.5 GB each
                position = torch.div(x.detach(), scale)
                if hasattr(mod, "spec"):  # quantize_codes, on the one copy of x / s
                    codes = torch.round(position).add_(mod.zero_point).clamp_(mod.spec.qmin, mod.spec.qmax).to(torch.int16)
                else:
                    codes = mod.codes(x).detach().to(torch.int16)
                tie = position.sub_(position.floor()).sub_(0.5).abs_()
                on_codes(_name, codes.cpu().numpy(), tie.cpu().numpy())
                del position, codes, tie
            if _name not in graph_codes or graph_codes[_name].shape != tuple(x.shape):
                return None
            return (torch.from_numpy(graph_codes[_name]).to(x.dtype) - mod.zero_point) * scale

        handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)]
    try:
        with torch.no_grad():
            out = qunet.unet(inputs.sample, inputs.timestep, encoder_hidden_states=inputs.encoder_hidden_states).sample
    finally:
        for handle in handles:
            handle.remove()
    return deviation, out.float().numpy()


def _with_outputs(model: onnx.ModelProto, names: list[tuple[str, int]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name, elem in names:
        if name not in existing:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            existing.add(name)
    return copy


def ort_session(model: onnx.ModelProto, optimize: bool, threads: int = 0):
    """A CPU session on an in-memory model (optimised as the engine would be, or not at all)."""
    import onnxruntime as ort

    from quest_export.engine.onnxruntime_backend import session_options

    from quest_export.onnx_io import inference_session

    options = session_options(threads, optimize=optimize)
    return inference_session(model, options, ["CPUExecutionProvider"])


@dataclass
class ParityReport:
    min_code_agreement: float
    max_abs_error: float
    free_running_max_abs_error: float
    optimized_max_abs_error: float | None
    output_max_abs: float
    samples: int
    timesteps: list[int]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    code_threshold: float = MIN_CODE_AGREEMENT
    error_bound: float = MAX_ABS_ERROR_FP32
    graph_precision: str = "fp32"

    tie_steps: float | None = TIE_STEPS

    @property
    def ties_only(self) -> bool:
        """Every differing activation code is a one-step rounding tie (``tie_steps`` None: not required)."""
        if self.tie_steps is None:
            return True
        active = [t for t in self.tensors if t["kind"] != "weight"]
        return all((t["max_code_diff"] or 0) <= 1 and t["max_tie_distance_steps"] <= self.tie_steps for t in active)

    @property
    def passed(self) -> bool:
        return (self.min_code_agreement >= self.code_threshold and self.max_abs_error <= self.error_bound
                and self.ties_only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "graph_precision": self.graph_precision,
            "min_code_agreement": self.min_code_agreement,
            "code_threshold": self.code_threshold,
            "max_abs_error": self.max_abs_error,
            "error_bound": self.error_bound,
            "code_differences_are_ties": self.ties_only,
            "tie_steps": self.tie_steps,
            "free_running_max_abs_error": self.free_running_max_abs_error,
            "optimized_free_running_max_abs_error": self.optimized_max_abs_error,
            "output_max_abs": self.output_max_abs,
            "samples": self.samples,
            "timesteps": self.timesteps,
            "method": "teacher-forced: each simulated quantizer reads the graph's own input tensor and passes on "
                      "the graph's codes",
            "tensors": self.tensors,
        }


def _weight_agreement(model: onnx.ModelProto, record: QuantizedTensor, qunet: QuantizedUNet) -> dict[str, Any]:
    weights = {init.name: init for init in model.graph.initializer}
    stored = onnx.numpy_helper.to_array(weights[record.codes]).astype(np.int32)
    if record.transposed:
        stored = stored.T
    layer = dict(qunet.unet.named_modules())[record.name.rsplit(".", 1)[0]]
    want = layer.weight_quantizer.codes(layer.weight.detach().float()).numpy().astype(np.int32)
    same = stored.shape == want.shape
    return {"name": record.name, "kind": "weight", "bits": record.bits,
            "code_agreement": float((stored == want).mean()) if same else 0.0,
            "max_code_diff": int(np.abs(stored - want).max()) if same else None}


_COMPARE_BLOCK = 1 << 24  # elements per comparison block


class _CodeStats:
    """Agreement of one quantizer's codes, accumulated over the samples."""

    def __init__(self) -> None:
        self.equal = self.total = self.max_diff = 0
        self.max_tie = 0.0
        self.same_shape = True

    def add(self, got: np.ndarray, want: np.ndarray, tie: np.ndarray) -> None:
        if got.shape != want.shape:
            self.same_shape = False
            return
        got, want, tie = got.reshape(-1), want.reshape(-1), tie.reshape(-1)
        for start in range(0, got.size, _COMPARE_BLOCK):  # bounded temporaries: a 64x64 softmax has 134M codes
            block = slice(start, start + _COMPARE_BLOCK)
            g, w = got[block].astype(np.int32), want[block].astype(np.int32)
            differ = g != w
            self.total += differ.size
            self.equal += differ.size - int(differ.sum())
            if differ.any():
                self.max_diff = max(self.max_diff, int(np.abs(g - w).max()))
                self.max_tie = max(self.max_tie, float(tie[block][differ].max()))

    def entry(self) -> dict[str, Any]:
        return {"code_agreement": self.equal / self.total if self.same_shape and self.total else (1.0 if self.same_shape else 0.0),
                "max_code_diff": self.max_diff if self.same_shape else None,
                "max_tie_distance_steps": self.max_tie if self.same_shape else 0.0}


def check_parity(model: onnx.ModelProto, records: list[QuantizedTensor], qunet: QuantizedUNet, inputs: ParityInputs,
                 *, code_threshold: float = MIN_CODE_AGREEMENT, error_bound: float = MAX_ABS_ERROR_FP32,
                 graph_precision: str = "fp32", check_optimized: bool = True) -> ParityReport:
    """Compare the graph with the simulation (see the module docstring for the method), a chunk of
    samples at a time (:meth:`ParityInputs.chunk_size`); code agreement is counted over all of them."""
    active = [r for r in records if r.kind != "weight"]
    # softmax probabilities are (batch, heads, S, S): 0.5 GB per SD1.5 64x64 attention and sample in
    # FP32, 8 GB for the UNet's 16 self-attentions. They are not fetched from the graph: the simulation
    # computes them itself from the forced (graph's) q and k codes, and their codes are still compared.
    softmax_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
    sources = {r.name: r.source for r in active if r.source not in softmax_outputs}
    code_outputs = {r.name: r.codes for r in active}
    factors = {r.name: r.source_factors for r in active if r.source_factors}
    float_elem = onnx.TensorProto.FLOAT16 if graph_precision == "fp16" else onnx.TensorProto.FLOAT
    extra = [(r.codes, onnx.TensorProto.INT8 if r.signed else onnx.TensorProto.UINT8) for r in active]
    declared = tensor_types(model)  # the FP16 graph keeps some tensors FP32 (timestep embedding)
    extra += [(s, declared.get(s, float_elem)) for s in sources.values() if s not in ("sample", "encoder_hidden_states")]
    session = ort_session(_with_outputs(model, extra), optimize=False)
    names = [o.name for o in session.get_outputs()]
    fused = None
    if check_optimized:
        try:
            fused = ort_session(model, optimize=True)
        except Exception:  # noqa: BLE001 - ORT's optimizer cannot rewrite some int8 graphs; informational only
            fused = None
    stats = {r.name: _CodeStats() for r in active}
    deviation: dict[str, float] = {}
    errors = {"forced": 0.0, "free": 0.0, "optimized": 0.0, "output": 0.0}
    for chunk in inputs.chunks(inputs.chunk_size()):
        feeds = chunk.feeds()  # graph inputs and outputs are FP32 on both targets
        results = dict(zip(names, session.run(None, feeds)))
        results.update(feeds)
        graph_out = results[names[0]].astype(np.float32)
        # no copies: a 64x64 SD sample's quantized tensors are GBs (codes stay 8-bit until a hook reads them)
        forced = {name: results[src].astype(np.float32, copy=False) for name, src in sources.items()}
        graph_codes = {r.name: results[r.codes] for r in active}

        def compare(name: str, codes: np.ndarray, tie: np.ndarray, results: dict = results) -> None:
            stats[name].add(results[code_outputs[name]], codes, tie)

        chunk_deviation, forced_out = _run_simulation(qunet, chunk, {r.name for r in active}, forced, factors, graph_codes, compare)
        del forced, graph_codes, results
        for name, value in chunk_deviation.items():
            deviation[name] = max(deviation.get(name, 0.0), value)
        _, free_out = _run_simulation(qunet, chunk, set(), None)
        errors["forced"] = max(errors["forced"], float(np.abs(graph_out - forced_out).max()))
        errors["free"] = max(errors["free"], float(np.abs(graph_out - free_out).max()))
        errors["output"] = max(errors["output"], float(np.abs(free_out).max()))
        if fused is not None:
            try:
                errors["optimized"] = max(errors["optimized"], float(np.abs(fused.run(None, feeds)[0].astype(np.float32) - free_out).max()))
            except Exception:  # noqa: BLE001 - see above
                fused = None

    tensors = [{"name": r.name, "kind": r.kind, "bits": r.bits, "timestep_groups": r.timestep_groups, **stats[r.name].entry(),
                "input_deviation_steps": deviation.get(r.name)} for r in active]
    tensors += [_weight_agreement(model, r, qunet) for r in records if r.kind == "weight"]
    optimized_error = errors["optimized"] if fused is not None else None
    return ParityReport(
        min_code_agreement=min((t["code_agreement"] for t in tensors), default=1.0),
        max_abs_error=errors["forced"],
        free_running_max_abs_error=errors["free"],
        optimized_max_abs_error=optimized_error,
        output_max_abs=errors["output"],
        samples=int(inputs.sample.shape[0]),
        timesteps=sorted({int(t) for t in inputs.timestep.round().long().tolist()}),
        tensors=tensors,
        code_threshold=code_threshold,
        error_bound=error_bound,
        graph_precision=graph_precision,
        tie_steps=TIE_STEPS if graph_precision == "fp32" else None,  # FP16 moves inputs by whole FP16 ulps
    )
