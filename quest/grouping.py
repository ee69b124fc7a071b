"""Searched timestep grouping (ADP-DM / APQ-DM): which timesteps share an activation scale set.

Uniform grouping cuts [0, T) into G equal intervals. The search instead lets every calibration
timestep ``k`` hold softmax weights ``w[k] = softmax(theta[k] / tau)`` over G candidate scale sets
(initialised from the uniform groups' PTQ tables), so each activation quantizer uses the
per-sample scale ``exp(sum_g w[k, g] * log s_g)``. ``theta`` and the candidate scales are trained
on the calibration loss (final noise MSE vs the FP model) while ``tau`` is annealed, making the
assignment nearly hard. The hard assignment is then the most likely *contiguous* split of the
timesteps into exactly G non-empty groups (dynamic programming over ``log w``), so every group is
used and groups stay intervals in ``t``; timesteps the sampler never visited take the group of the
nearest visited one (or, when the split of the visited timesteps equals the uniform one, the uniform
table is kept as it is). The result is only a different ``TimestepContext.lookup``: PTQ re-initialises
the tables for it, and export and engines need no change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quest.calibration import CalibrationSet
from quest.errors import QuantConfigError
from quest.quantize import QuantizedUNet
from quest.quantizers import ActivationQuantizer
from quest.recipe_blocks import GroupingSearch  # noqa: F401 - the search's settings, re-exported
from quest.teacher import run_teacher
from quest.timesteps import uniform_group_lookup


def nearest_lookup(visited: list[int], labels: list[int], num_train_timesteps: int) -> torch.Tensor:
    """Every timestep in [0, T) takes the label of the nearest visited timestep (ties: the lower one)."""
    v = torch.tensor(sorted(visited), dtype=torch.float64)
    order = sorted(range(len(visited)), key=lambda i: visited[i])
    lab = torch.tensor([labels[i] for i in order], dtype=torch.long)
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    nearest = (t[:, None] - v[None, :]).abs().argmin(1)  # first minimum: the lower visited timestep
    return lab[nearest]


def contiguous_assignment(scores: torch.Tensor) -> list[int]:
    """Labels for rows ``k`` (timesteps in ascending order) maximising ``sum scores[k, label]`` over
    splits into ``G`` contiguous, non-empty, ordered segments (segment g gets label g)."""
    n, g = scores.shape
    if g > n:
        raise QuantConfigError(f"cannot split {n} calibration timesteps into {g} non-empty groups")
    s = scores.double()
    prefix = torch.cat([torch.zeros(1, g, dtype=s.dtype), s.cumsum(0)])  # prefix[k, j] = sum_{<k} s[:, j]
    best = torch.full((g + 1, n + 1), -math.inf, dtype=s.dtype)
    back = torch.zeros((g + 1, n + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for j in range(1, g + 1):
        for end in range(j, n - (g - j) + 1):
            starts = torch.arange(j - 1, end)
            values = best[j - 1, starts] + prefix[end, j - 1] - prefix[starts, j - 1]
            i = int(values.argmax())
            best[j, end], back[j, end] = values[i], starts[i]
    labels = [0] * n
    end = n
    for j in range(g, 0, -1):
        start = int(back[j, end])
        labels[start:end] = [j - 1] * (end - start)
        end = start
    return labels


def check_lookup(lookup: torch.Tensor, num_groups: int) -> None:
    """A lookup is valid when it maps every timestep into [0, G) and uses every group."""
    used = set(lookup.unique().tolist())
    if lookup.min() < 0 or lookup.max() >= num_groups or used != set(range(num_groups)):
        raise ValueError(f"invalid timestep lookup: uses groups {sorted(used)}, expected 0..{num_groups - 1}")


@contextmanager
def _soft_scales(quantizers: list[ActivationQuantizer], log_scales: list[nn.Parameter], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make every quantizer use ``exp(w @ log_s)`` per sample (``weights['w']``: (batch, G))."""

    def make(log_s: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
        def sample_scale(x: torch.Tensor) -> torch.Tensor:
            w = weights["w"]
            if w.shape[0] != x.shape[0]:  # attention's (batch * heads, ...) layout
                w = w.repeat_interleave(x.shape[0] // w.shape[0], dim=0)
            return (w @ log_s).exp().view(-1, *([1] * (x.dim() - 1)))

        return sample_scale

    for quantizer, log_s in zip(quantizers, log_scales):
        object.__setattr__(quantizer, "sample_scale", make(log_s))
    try:
        yield
    finally:
        for quantizer in quantizers:
            object.__delattr__(quantizer, "sample_scale")


def search_grouping(
    qunet: QuantizedUNet, fp_unet: nn.Module, calib: CalibrationSet, settings: GroupingSearch | None = None
) -> dict[str, Any]:
    """Search the timestep -> group lookup of a PTQ-initialised ``qunet`` (uniform tables) and
    install it in ``qunet.context``; returns a report. The caller re-runs PTQ for the new groups."""
    settings = (settings or GroupingSearch()).with_seed(0)  # no seed given: 0
    num_groups = qunet.context.num_groups
    num_train = qunet.context.num_train_timesteps
    visited = sorted({int(v) for v in calib.t.tolist()})
    if num_groups == 1:
        return {"grouping": "searched", "note": "one group: nothing to search"}
    if num_groups > len(visited):
        raise QuantConfigError(
            f"grouping: searched needs at most as many timestep groups ({num_groups}) as calibration timesteps ({len(visited)})"
        )
    started = time.perf_counter()
    uniform = uniform_group_lookup(num_groups, num_train)
    theta = torch.zeros(len(visited), num_groups)
    theta[torch.arange(len(visited)), uniform[torch.tensor(visited)]] = settings.prior
    theta = nn.Parameter(theta)
    quantizers = [m for _, m in qunet.activation_quantizers() if isinstance(m, ActivationQuantizer) and m.enabled and m.num_groups == num_groups]
    log_scales = [nn.Parameter(q.scale.detach().clamp_min(1e-8).log().clone()) for q in quantizers]
    index_of = torch.full((num_train,), -1, dtype=torch.long)
    index_of[torch.tensor(visited)] = torch.arange(len(visited))
    optimizer = torch.optim.Adam([{"params": [theta], "lr": settings.logit_lr}, {"params": log_scales, "lr": settings.scale_lr}])
    frozen = [(p, p.requires_grad) for p in qunet.unet.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    weights: dict[str, torch.Tensor] = {}
    losses = []
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + 4241)
    try:
        with _soft_scales(quantizers, log_scales, weights):
            for step in range(settings.steps):
                frac = step / max(settings.steps - 1, 1)
                tau = settings.tau_start * (settings.tau_end / settings.tau_start) ** frac
                rows = torch.randperm(len(calib), generator=generator)[: settings.batch_size]
                x, t, states = calib.unet_inputs(rows)
                with torch.no_grad():
                    target = run_teacher(fp_unet, x, t, states)
                weights["w"] = F.softmax(theta[index_of[t.long()]] / tau, dim=-1)
                loss = F.mse_loss(qunet.unet(x, t, encoder_hidden_states=states).sample, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    log_w = F.log_softmax(theta.detach() / settings.tau_end, dim=-1)
    labels = contiguous_assignment(log_w)
    uniform_labels = uniform[torch.tensor(visited)].tolist()
    # the same split of the visited timesteps keeps the uniform table (boundaries between visited
    # timesteps are then where uniform grouping puts them)
    lookup = uniform.clone() if labels == uniform_labels else nearest_lookup(visited, labels, num_train)
    check_lookup(lookup, num_groups)
    with torch.no_grad():
        qunet.context.lookup.copy_(lookup.to(qunet.context.lookup.device))
    return {
        "grouping": "searched",
        "visited_timesteps": visited,
        "visited_groups": labels,
        "group_starts": [t for t in range(num_train) if t == 0 or lookup[t] != lookup[t - 1]],
        "changed_vs_uniform": labels != uniform_labels,
        "search_loss_first": round(sum(losses[:5]) / max(len(losses[:5]), 1), 6),
        "search_loss_last": round(sum(losses[-5:]) / max(len(losses[-5:]), 1), 6),
        "seconds": round(time.perf_counter() - started, 2),
    }
