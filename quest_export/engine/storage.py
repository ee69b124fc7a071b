"""How an ONNX Runtime engine file is stored: packed 4-bit weights and compact names.

**Packed 4-bit weights.**
ONNX Runtime's integer kernels (QLinearConv, MatMulIntegerToFloat) read INT8 weights, so a 4-bit
weight executes as an INT8 tensor whose codes lie in [-8, 7]. On disk that wastes half of every
byte: the engine file stores such initializers as ONNX ``INT4`` tensors (two codes per byte) and the
loader turns them back into the INT8 tensors the kernels expect, bit for bit. The names of the packed
initializers are listed in the model's metadata, so nothing else is touched.

Only INT8 initializers whose every value fits the 4-bit grid and that hold at least
``MIN_ELEMENTS`` values are packed: 8-bit layers, zero points, biases (INT32) and float tensors
(norm weights, scales) stay as they are.

**Compact names.** The readable graph (torch module paths as tensor and node names) lives in the
export directory; the engine file gives tensors short names, drops node names and the optional type
annotations (ONNX Runtime infers them). On a small UNet such as ``digits`` the names are a third of
the file; on SD-sized UNets they are negligible either way.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

PACKED_KEY = "quest.packed_int4"
MIN_ELEMENTS = 64


def _fits_int4(values: np.ndarray) -> bool:
    return values.size >= MIN_ELEMENTS and int(values.min()) >= -8 and int(values.max()) <= 7


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """ONNX INT4 layout: two's-complement nibbles, element 2k in the low half of byte k."""
    nibbles = (values.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(values.shape), raw, raw=True)


def pack_int4_initializers(model: onnx.ModelProto) -> list[str]:
    """Re-store every INT8 initializer on the 4-bit grid as packed INT4, in place; returns the names."""
    packed: list[str] = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.INT8 or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(init)
        if not _fits_int4(values):
            continue
        init.CopyFrom(_int4_tensor(init.name, values))
        packed.append(init.name)
    if packed:
        entry = next((p for p in model.metadata_props if p.key == PACKED_KEY), None) or model.metadata_props.add()
        entry.key, entry.value = PACKED_KEY, ",".join(packed)
    return packed


def unpack_int4_initializers(model: onnx.ModelProto) -> int:
    """Undo :func:`pack_int4_initializers` in place (INT4 -> the INT8 the kernels read); returns the count."""
    entry = next((p for p in model.metadata_props if p.key == PACKED_KEY), None)
    if entry is None or not entry.value:
        return 0
    names = set(entry.value.split(","))
    count = 0
    for init in model.graph.initializer:
        if init.name in names and init.data_type == onnx.TensorProto.INT4:
            values = numpy_helper.to_array(init).astype(np.int8)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
            count += 1
    if count != len(names):
        raise ValueError(f"engine metadata lists {len(names)} packed weights but the file holds {count}")
    return count


def compact_names(model: onnx.ModelProto) -> None:
    """Short tensor names, no node names, no value_info; graph inputs and outputs keep their names."""
    keep = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return short.setdefault(name, format(len(short), "x"))

    for init in model.graph.initializer:
        init.name = rename(init.name)
    for node in model.graph.node:
        node.name = ""
        for index, name in enumerate(node.input):
            node.input[index] = rename(name)
        for index, name in enumerate(node.output):
            node.output[index] = rename(name)
    del model.graph.value_info[:]


def store_engine_model(model: onnx.ModelProto) -> dict[str, int | list[str]]:
    """Compact names and pack 4-bit weights, in place; returns what was done for the manifest
    (with the readable names of the INT8 weights that stay 8-bit)."""
    unpackable = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8
                  and int(np.prod(i.dims)) >= MIN_ELEMENTS and not _fits_int4(numpy_helper.to_array(i))]
    compact_names(model)
    packed = pack_int4_initializers(model)
    return {"packed_int4_weights": len(packed), "int8_weights": unpackable}


def engine_session_source(path: str) -> onnx.ModelProto | str:
    """What ONNX Runtime opens for an engine file (``onnx_io.inference_session`` takes either): the
    file itself when it holds no packed 4-bit weights (an FP32 engine: no copy of its GBs in this
    process), else the graph with them unpacked."""
    from pathlib import Path

    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(path, load_external_data=False)
    entry = next((p for p in model.metadata_props if p.key == PACKED_KEY), None)
    if entry is None or not entry.value:
        return path
    load_external_data_for_model(model, str(Path(path).parent))
    unpack_int4_initializers(model)
    return model


def load_engine_model(path: str) -> onnx.ModelProto:
    """The engine file as the graph ONNX Runtime runs (packed weights unpacked; external weights
    of a graph past 2 GB read in): open it with ``onnx_io.inference_session``."""
    model = onnx.load(path)
    unpack_int4_initializers(model)
    return model
