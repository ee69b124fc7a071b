"""Calibration timestep selection (ADP-DM): build the calibration set from one chosen timestep.

Uniform calibration keeps the FP trajectory's inputs ``x_t`` at every sampler step. ADP-DM instead
picks the timestep ``tau*`` whose *generated samples* calibrate best for all timesteps, by a
structural-risk criterion. Here:

- the generated sample of step ``tau`` is the FP model's clean-image estimate ``x0_hat(tau)`` (with
  the deployment guidance; at the last step it is the final image);
- from it, the input for any timestep ``t`` is re-noised as ``sqrt(a_t) x0_hat + sqrt(1 - a_t) eps``;
- the risk of ``tau`` at ``t`` is how far the FP activation statistics on those inputs are from the
  statistics on the true trajectory inputs at ``t`` (mean over every Conv/Linear input of
  ``|log amax ratio| + |log rms ratio|``: what range calibration would get wrong);
- ``tau*`` minimises the expected risk over all sampler timesteps (uniform weight).

The selected set has the same shape as the uniform one (trajectories x steps rows, same labels), so
every timestep group still gets calibration data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quest.calibration import CalibrationSet


def _rows_at(calib: CalibrationSet, t: int, limit: int | None = None) -> torch.Tensor:
    rows = (calib.t == t).nonzero().flatten()
    return rows[:limit] if limit is not None else rows


@torch.no_grad()
def _model_output(unet: nn.Module, calib: CalibrationSet, rows: torch.Tensor, guidance: float, batch_size: int = 64) -> torch.Tensor:
    """The guided model output for ``rows`` (what the deployment sampler combines)."""
    outs = []
    batch_size = calib.rows_per_call(batch_size)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        x, t, states = calib.unet_inputs(chunk)
        out = unet(x, t, encoder_hidden_states=states).sample
        if calib.uncond is not None:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        outs.append(out)
    return torch.cat(outs)


def clean_estimate(
    x: torch.Tensor, output: torch.Tensor, alpha_bar: float, prediction_type: str = "epsilon", clip: float | None = None
) -> torch.Tensor:
    """``x0_hat`` from a model output, as DDIM computes it."""
    a, b = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        x0 = (x - b * output) / a
    elif prediction_type == "v_prediction":
        x0 = a * x - b * output
    elif prediction_type == "sample":
        x0 = output
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0.clamp(-clip, clip) if clip is not None else x0


@torch.no_grad()
def activation_stats(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(layers, 2): abs-max and RMS of the input of every Conv2d/Linear for one batch."""
    stats: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        v = args[0].detach().float()
        stats.append(torch.stack([v.abs().amax(), v.pow(2).mean().sqrt()]))

    handles = [m.register_forward_pre_hook(hook) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        unet(x, t, encoder_hidden_states=states)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(stats)


def _discrepancy(a: torch.Tensor, b: torch.Tensor) -> float:
    eps = 1e-8
    return float(((a + eps).log() - (b + eps).log()).abs().sum(1).mean())


@torch.no_grad()
def select_calibration_steps(
    calib: CalibrationSet,
    unet: nn.Module,
    alphas_cumprod: torch.Tensor,
    guidance: float,
    seed: int,
    prediction_type: str = "epsilon",
    clip: float | None = None,
    score_rows: int = 16,
) -> CalibrationSet:
    """The structural-risk-selected calibration set built from a uniform one (same rows, labels, size)."""
    unet = unet.eval()
    calib = calib.to(next(unet.parameters()).device)
    timesteps = sorted({int(v) for v in calib.t.tolist()})
    alpha = alphas_cumprod.double()

    estimates = {}
    for tau in timesteps:
        rows = _rows_at(calib, tau)
        out = _model_output(unet, calib, rows, guidance)
        estimates[tau] = (rows, clean_estimate(calib.x[rows].double(), out.double(), float(alpha[tau]), prediction_type, clip).to(calib.x.dtype))

    generator = torch.Generator().manual_seed(seed + 7)
    most = max(len(rows) for rows, _ in estimates.values())
    shape = (most, *calib.x.shape[1:])
    noise = {t: torch.randn(shape, generator=generator, dtype=calib.x.dtype).to(calib.x.device) for t in timesteps}

    def renoised(tau: int, t: int, limit: int | None = None) -> CalibrationSet:
        rows, x0 = estimates[tau]
        count = len(rows) if limit is None else min(limit, len(rows))
        a = float(alpha[t])
        x = (a**0.5) * x0[:count] + ((1 - a) ** 0.5) * noise[t][:count]
        uncond = calib.uncond[rows[:count]] if calib.uncond is not None else None
        return CalibrationSet(x, torch.full((count,), t, dtype=torch.long, device=x.device), calib.cond[rows[:count]], uncond)

    true_stats = {}
    for t in timesteps:
        rows = _rows_at(calib, t, score_rows)
        true_stats[t] = activation_stats(unet, *calib.unet_inputs(rows))
    risk = {}
    for tau in timesteps:
        per_t = []
        for t in timesteps:
            candidate = renoised(tau, t, score_rows)
            per_t.append(_discrepancy(activation_stats(unet, *candidate.unet_inputs(torch.arange(len(candidate)))), true_stats[t]))
        risk[tau] = sum(per_t) / len(per_t)
    best = min(timesteps, key=lambda tau: (risk[tau], tau))

    parts = [renoised(best, t) for t in sorted(timesteps, reverse=True)]
    meta: dict[str, Any] = {
        **calib.meta,
        "step_selection": "selected",
        "selected_timestep": best,
        "structural_risk": {str(tau): round(risk[tau], 5) for tau in sorted(timesteps, reverse=True)},
    }
    selected = CalibrationSet(
        torch.cat([p.x for p in parts]),
        torch.cat([p.t for p in parts]),
        torch.cat([p.cond for p in parts]),
        torch.cat([p.uncond for p in parts]) if calib.uncond is not None else None,
        meta,
    )
    selected.validate()
    return selected
