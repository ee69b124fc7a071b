"""What ``quest-export eval`` measures: an FP model, a quantized checkpoint (against its FP twin:
``psnr_vs_fp``) or a built engine (against its checkpoint's PyTorch simulation:
``psnr_vs_simulation``), loaded and checked before any sampling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quest_export.errors import UserError


def evaluate_source(*, model: str | None = None, checkpoint: Path | None = None, engine: Path | None = None,
                    num_samples: int = 500, steps: int = 20, seed: int = 0, guidance: float | None = None,
                    batch_size: int = 250, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """The metrics of one of ``model``, ``checkpoint`` or ``engine`` (evaluation/evaluate.py); the
    PyTorch models (FP, simulation) run on ``device``, an engine on its own backend."""
    from quest_export.evaluation.evaluate import evaluate
    from quest_export.models.resolve import load_model
    from quest_export.quantization import load_quantized
    from quest_export.sampling import default_guidance

    if sum(x is not None for x in (checkpoint, model, engine)) > 1:
        raise UserError("pass one of --model, --checkpoint or --engine (checkpoints and engines name their own model)")
    fp_twin, meta = None, None
    if engine is not None:
        from quest_export.runtime.load import check_engine_shapes, load_engine_model

        loaded = load_engine_model(engine)
        check_engine_shapes(loaded, min(batch_size, num_samples), default_guidance(guidance, loaded), "--batch-size")
        source = loaded.pipeline.unet.manifest["source_checkpoint"]
        if not Path(source["path"]).is_dir():
            raise UserError(f"the engine's source checkpoint {source['path']} is gone; psnr_vs_simulation needs it")
        fp_twin, _, meta = load_quantized(Path(source["path"]), device)
    elif checkpoint is not None:
        loaded, _, meta = load_quantized(checkpoint, device)
        fp_twin = load_model(loaded.reload_name, device)
    else:
        loaded = load_model(model or "digits", device)
    result = evaluate(loaded, num_samples, steps, seed, default_guidance(guidance, loaded), batch_size, progress=progress,
                      fp_twin=fp_twin)
    if meta is not None:
        result.update({"method": meta.get("method"), "bits": meta["bits"], "target": meta["target"]})
    if checkpoint is not None:
        result["checkpoint"] = str(checkpoint)
    if engine is not None:
        result["psnr_vs_simulation"] = result.pop("psnr_vs_fp")
        result.update({"engine": str(engine), "backend": loaded.pipeline.unet.backend})
    return result
