"""ONNX graphs on disk and in ONNX Runtime at any size.

Protobuf cannot serialise a message past 2 GB, and an FP32 SD1.5 UNet is 3.4 GB. Graphs past the
limit are written with their weights in one ``<file>.data`` beside the graph (ONNX external data)
and ONNX Runtime opens them from that file; smaller graphs keep the single-file form. The
in-memory ``ModelProto`` a caller passes is left as it was (onnx's writer moves tensor data out of
it; it is read back).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import load_external_data_for_model

EXTERNAL_DATA_LIMIT = 1 << 31  # protobuf's hard limit on one serialised message
HEADROOM = 64 << 20  # graph structure and metadata on top of the tensors


def serialized_bytes(model: onnx.ModelProto) -> int:
    """The size ``model`` serialises to, summed message by message (protobuf's own ``ByteSize``
    raises past 2 GB, which is exactly when the size matters)."""
    graph = model.graph
    parts = [*graph.initializer, *graph.node, *graph.input, *graph.output, *graph.value_info, *model.functions,
             *model.opset_import, *model.metadata_props]
    return sum(part.ByteSize() for part in parts)


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must be written with external data (its single-file form would not parse)."""
    return serialized_bytes(model) > EXTERNAL_DATA_LIMIT - HEADROOM


def data_file(path: Path) -> Path:
    """Where :func:`save_graph` puts the weights of a large graph saved at ``path``."""
    return Path(path).with_name(Path(path).name + ".data")


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` to ``path``; past the 2 GB limit the tensors go to ``<path>.data``."""
    path = Path(path)
    if not is_large(model):
        onnx.save_model(model, str(path))
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file(path).name, size_threshold=1024)
    load_external_data_for_model(model, str(path.parent))  # the writer emptied the caller's tensors


def graph_files(path: Path) -> list[Path]:
    """The files one saved graph occupies (the graph, and its external data when it has any)."""
    path = Path(path)
    return [path] + ([data_file(path)] if data_file(path).is_file() else [])


def graph_bytes(path: Path) -> int:
    """Bytes on disk of a saved graph, external data included."""
    return sum(p.stat().st_size for p in graph_files(path))


def structure(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """``model`` without the data of its large initializers (names, types and dims kept; small
    ones, such as shape constants, kept whole): what shape inference needs, at any model size,
    without copying gigabytes of weights."""
    initializers = []
    for init in model.graph.initializer:
        if init.ByteSize() <= keep_bytes:
            initializers.append(init)
        else:
            initializers.append(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    graph = onnx.helper.make_graph(model.graph.node, model.graph.name, model.graph.input, model.graph.output,
                                   initializers, value_info=model.graph.value_info)
    skeleton = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    return skeleton


def infer_shapes(model: onnx.ModelProto, strict_mode: bool = False) -> onnx.ModelProto:
    """ONNX shape inference that works past protobuf's 2 GB limit (it runs on :func:`structure`);
    the returned model carries the inferred ``value_info``, not the weights."""
    return onnx.shape_inference.infer_shapes(structure(model), strict_mode=strict_mode)


def inference_session(model: onnx.ModelProto | Path | str, options: Any, providers: list[str], **kwargs: Any):
    """An ONNX Runtime session on an in-memory graph or a saved one, whatever its size (a large
    in-memory graph goes through a temporary external-data file, removed once the session holds it)."""
    import onnxruntime as ort

    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers, **kwargs)
    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers, **kwargs)
    with tempfile.TemporaryDirectory(prefix="quest-large-graph-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_graph(model, path)
        return ort.InferenceSession(str(path), options, providers=providers, **kwargs)
