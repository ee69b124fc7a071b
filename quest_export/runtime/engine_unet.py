"""``EngineUNet``: a built engine in place of ``pipe.unet`` in any diffusers pipeline.

It exposes what pipelines read from a UNet (``config``, ``dtype``, ``device``) and the
``forward(sample, timestep, encoder_hidden_states, ..., return_dict)`` signature returning
``UNet2DConditionOutput``. Timesteps may be int or float, scalar or per sample (the engine maps
them to its scale tables itself), so every scheduler and step count works; shapes are checked
against the engine's build profile before any compute.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from quest_export.engine.backends import backend_of_manifest
from quest_export.engine.manifest import check_backend, read_engine_manifest
from quest_export.engine.profiles import BuildProfile
from quest_export.errors import UserError

logger = logging.getLogger(__name__)
VERIFY_MODES = ("auto", "always", "never")
UNSUPPORTED_KWARGS = ("timestep_cond", "added_cond_kwargs", "down_block_additional_residuals",
                      "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
                      "class_labels", "attention_mask")


class EngineUNet(nn.Module):
    """Drop-in replacement for ``UNet2DConditionModel`` backed by a built engine."""

    def __init__(self, directory: Path, manifest: dict[str, Any], runner: Any) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.manifest = manifest
        self.runner = runner
        self.engine_backend = backend_of_manifest(manifest)
        self.backend = self.engine_backend.name
        self.profile = BuildProfile.from_dict(manifest["profile"])
        self._config = FrozenDict(manifest["unet_config"])
        self._device = torch.device(self.engine_backend.device)
        self.verification: dict[str, Any] | None = (manifest.get("verification") or {}).get("result")

    @classmethod
    def from_engine(cls, directory: Path, backend: str | None = None, threads: int | None = None,
                    verify: str = "auto") -> "EngineUNet":
        """Load and check an engine directory (hashes, backend, device) and open its runtime.

        ``verify``: ``auto`` re-runs the build's verification before the first call when this host's
        integer-kernel class, runtime version or execution provider differs from the one the engine
        was verified on (those decide what the fused kernels compute); ``always`` re-runs it anyway;
        ``never`` skips it (build-engine's own check).
        """
        if verify not in VERIFY_MODES:
            raise UserError(f"unknown verify mode {verify!r}; choose one of: {', '.join(VERIFY_MODES)}")
        manifest = read_engine_manifest(directory)
        check_backend(manifest, backend)
        runner = backend_of_manifest(manifest).open_runner(Path(directory), manifest, threads)
        engine = cls(Path(directory), manifest, runner)
        if verify != "never":
            engine.reverify(force=verify == "always")
        return engine

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> "EngineUNet":
        """diffusers-style name for :meth:`from_engine` (an engine directory from ``build-engine``
        or ``api.Engine.save``)."""
        return cls.from_engine(Path(directory), **kwargs)

    def reverify(self, force: bool = False) -> dict[str, Any] | None:
        """Re-run the stored verification when this host could compute other codes (see
        ``from_engine``); refuses the engine with one line when it fails here."""
        from quest_export.engine import host, verify
        from quest_export.pipelines.denoise import unet_fn

        section = self.manifest.get("verification")
        if not section or not section.get("result"):
            if force:
                raise UserError(f"engine {self.directory} was built with --no-verify and holds no verification set; "
                                "rebuild it without --no-verify")
            warnings.warn(f"engine {self.directory} was built without engine verification (--no-verify); "
                          "what it computes was not checked against the simulation", stacklevel=3)
            return None
        here = self.engine_backend.device_description()  # the CPU for ORT; the GPU for TensorRT tactics
        fingerprint = host.runtime_fingerprint(here, self.manifest["backend_version"], getattr(self.runner, "provider", self.backend))
        if not force and fingerprint == section["fingerprint"]:
            return section["result"]
        vset = verify.VerificationSet.load(self.directory, section)
        result = verify.check(unet_fn(self), vset)
        if not result["passed"]:
            raise UserError(
                f"engine {self.directory} was verified on {host.describe(section['host'])} but computes something else on "
                f"this host ({host.describe(here)}): {verify.failure_summary(result)}; rebuild it here with "
                "quest-export build-engine (its verification names the layer)"
            )
        logger.info("engine %s re-verified on %s: %s", self.directory, host.describe(here), result)
        self.verification = result
        return result

    def _check_timesteps(self, t: torch.Tensor) -> None:
        """Refuse timesteps outside the training range: the engine's scale lookup would clamp them
        silently to its first or last entry, and the UNet was never trained there."""
        last = int(self.manifest.get("timestep_grid", {}).get("num_train_timesteps", 1000)) - 1
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > last:
            bad = t[~torch.isfinite(t) | (t < 0) | (t > last)][0].item()
            raise UserError(f"timestep {bad} is outside the model's training range [0, {last}]; "
                            "check the scheduler (num_train_timesteps, steps_offset)")

    # -- what pipelines read -----------------------------------------------------------------
    @property
    def config(self) -> FrozenDict:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._device

    # -- the call ------------------------------------------------------------------------------
    def forward(  # noqa: D417 - the diffusers signature
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        used = [k for k in UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
        if used or (cross_attention_kwargs and cross_attention_kwargs.get("scale", 1.0) != 1.0):
            raise UserError(f"the engine UNet does not take {', '.join(used) or 'cross_attention_kwargs scale'}; "
                            "these change the network and are fixed when the engine is built")
        batch, _, height, width = sample.shape
        if encoder_hidden_states.shape[0] != batch:
            raise UserError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != sample batch {batch}")
        self.profile.check_inputs(batch, height, width, int(encoder_hidden_states.shape[1]))
        t = torch.as_tensor(timestep).reshape(-1).to(torch.float32)
        t = t.expand(batch) if t.numel() == 1 else t
        self._check_timesteps(t)
        for name, tensor in (("sample", sample), ("encoder_hidden_states", encoder_hidden_states)):
            if not torch.isfinite(tensor).all():
                raise UserError(f"{name} contains NaN or Inf; check the scheduler and inputs")
        out = self.runner.run(sample, t, encoder_hidden_states)
        out = out.to(device=sample.device, dtype=sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
