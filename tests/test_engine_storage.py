"""Engine file storage: packed 4-bit weights round-trip exactly and the compacted graph computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quest_export.engine.storage import PACKED_KEY, load_engine_model, store_engine_model, unpack_int4_initializers
from quest_export.export.parity import ort_session


def _int_matmul_model(w4: np.ndarray, w8: np.ndarray) -> onnx.ModelProto:
    """x -> DQ(w4) matmul -> DQ(w8) matmul: one weight on the 4-bit grid, one using all 8 bits."""
    inits = [numpy_helper.from_array(w4, "layer_a.weight_codes"), numpy_helper.from_array(w8, "layer_b.weight_codes"),
             numpy_helper.from_array(np.float32(0.05), "scale"), numpy_helper.from_array(np.int8(0), "zero")]
    nodes = [helper.make_node("DequantizeLinear", ["layer_a.weight_codes", "scale", "zero"], ["wa"], name="/layer_a/DQ"),
             helper.make_node("MatMul", ["x", "wa"], ["h"], name="/layer_a/MatMul"),
             helper.make_node("DequantizeLinear", ["layer_b.weight_codes", "scale", "zero"], ["wb"], name="/layer_b/DQ"),
             helper.make_node("MatMul", ["h", "wb"], ["y"], name="/layer_b/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])], inits,
                              value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [3, 16])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_packed_engine_file_is_smaller_and_computes_bit_identically(tmp_path) -> None:
    rng = np.random.default_rng(0)
    w4 = rng.integers(-8, 8, size=(16, 15)).astype(np.int8)  # odd element count: the last byte is half used
    w4 = np.pad(w4, ((0, 0), (0, 1)))
    w8 = rng.integers(-128, 128, size=(16, 8)).astype(np.int8)
    model = _int_matmul_model(w4, w8)
    x = {"x": rng.normal(size=(3, 16)).astype(np.float32)}
    expected = ort_session(model, optimize=False).run(None, x)[0]

    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    report = store_engine_model(stored)
    assert report == {"packed_int4_weights": 1, "int8_weights": ["layer_b.weight_codes"]}
    assert stored.ByteSize() < model.ByteSize() - w4.size // 2 + 16
    assert not stored.graph.value_info and all(not n.name for n in stored.graph.node)
    weights = sorted(i.data_type for i in stored.graph.initializer if len(i.dims) == 2)
    assert weights == [TensorProto.INT8, TensorProto.INT4]  # the zero point (a scalar) stays INT8 too
    path = tmp_path / "engine.onnx"
    onnx.save_model(stored, str(path))
    got = ort_session(load_engine_model(str(path)), optimize=False).run(None, x)[0]
    np.testing.assert_array_equal(got, expected)


def test_unpack_refuses_a_file_whose_packed_list_does_not_match() -> None:
    model = _int_matmul_model(np.zeros((16, 16), np.int8), np.full((16, 8), 100, np.int8))
    store_engine_model(model)
    entry = next(p for p in model.metadata_props if p.key == PACKED_KEY)
    entry.value += ",missing"
    try:
        unpack_int4_initializers(model)
    except ValueError as exc:
        assert "packed" in str(exc)
    else:
        raise AssertionError("a damaged packed list must be refused")


def test_op_profile_sums_kernel_time_per_op_type() -> None:
    from quest_export.engine.bench import op_profile

    rng = np.random.default_rng(1)
    model = _int_matmul_model(rng.integers(-8, 8, size=(16, 16)).astype(np.int8), rng.integers(-128, 128, size=(16, 8)).astype(np.int8))
    profile = op_profile(model, {"x": rng.normal(size=(3, 16)).astype(np.float32)}, threads=1, calls=2)
    assert profile["MatMul"]["nodes"] == 2 and profile["DequantizeLinear"]["nodes"] == 2
    assert all(entry["ms"] >= 0 for entry in profile.values())
    assert list(profile) == sorted(profile, key=lambda op: -profile[op]["ms"])  # most expensive first


def test_speed_ceiling_splits_shared_float_work_from_what_quantization_replaces() -> None:
    from quest_export.engine.bench import speed_ceiling

    fp32 = {"MultiHeadAttention": {"ms": 50.0}, "Conv": {"ms": 30.0}, "MatMul": {"ms": 15.0}, "ReorderInput": {"ms": 5.0},
            "LayerNormalization": {"ms": 10.0}, "Add": {"ms": 10.0}}
    quantized = {"MultiHeadAttention": {"ms": 49.0}, "QLinearConv": {"ms": 10.0}, "MatMulIntegerToFloat": {"ms": 10.0},
                 "QuantizeLinear": {"ms": 6.0}, "LayerNormalization": {"ms": 10.0}, "Add": {"ms": 15.0}}
    ceiling = speed_ceiling({"fp32": fp32, "quantized": quantized})
    assert ceiling["fp32_kernel_ms"] == 120.0 and ceiling["quantized_kernel_ms"] == 100.0
    assert ceiling["shared_float_ms"] == 70.0  # attention, norm, adds: float in both engines
    assert ceiling["integer_kernel_ms"] == 20.0 and ceiling["quantization_overhead_ms"] == 10.0
    assert ceiling["ceiling_free_integer"] == round(120 / 70, 3)
    assert ceiling["ceiling_measured_integer"] == round(120 / 90, 3)
    assert ceiling["fp32_attention_ms"] == 50.0


def test_measure_does_not_time_the_call_that_follows_the_other_engine() -> None:
    """A call right after another session's call competes with its spinning threads;
    measure_engines() must time no engine in that state (alternating single calls measured 1.7-1.9x
    too slow)."""
    import time

    from quest_export.engine.bench import measure_engines

    last: list[str] = [""]
    calls = {"q": 0, "f": 0, "g": 0}

    def engine(name: str, own_ms: float):
        def run() -> None:
            calls[name] += 1
            time.sleep((own_ms + (20.0 if last[0] != name else 0.0)) / 1000.0)
            last[0] = name
        return run

    result = measure_engines({"q": engine("q", 1.0), "f": engine("f", 3.0), "g": engine("g", 2.0)}, warmup=1, iterations=7)
    q, f, g = (result[n]["latency_ms"] for n in "qfg")
    assert q < 10.0 and f < 12.0 and g < 11.0
    assert 1.5 < f / q < 4.0 and 1.2 < g / q < 3.0
    assert all(calls[n] >= 1 + 7 for n in "qfg")


def test_bench_baselines_are_chosen_by_name_and_onnxruntime_fp32_is_always_timed() -> None:
    from quest_export.engine.bench import FLOAT_BASELINES, parse_baselines
    from quest_export.errors import UserError

    assert parse_baselines("all") == FLOAT_BASELINES
    assert parse_baselines("openvino-fp32") == ("onnxruntime-fp32", "openvino-fp32")
    assert parse_baselines(" openvino-bf16 , onnxruntime-fp32") == ("onnxruntime-fp32", "openvino-bf16")
    for bad in ("", "tensorrt-fp16", "openvino-fp32,nope"):
        with pytest.raises(UserError, match="--baselines"):
            parse_baselines(bad)
