"""Per-timestep-group engines: one compiled model per timestep group, built from an
``export --timestep-scales per-engine`` directory.

Every activation scale of a group engine is a constant, so OpenVINO and ONNX Runtime fuse its
Q/DQ pairs straight into integer kernels, with none of the table form's per-timestep Gathers and
rescaling Muls (measured on digits: OpenVINO 26.6 -> 20.0 ms per call). The engine directory holds
one backend engine per group in a sub-directory (``group0/``, ``group1/`` ...); the manifest's
``engine_groups`` section has each one's backend fields. The runner picks the group of every row's
timestep exactly as the simulation does (``quest.timesteps.groups_for``) and runs the rows of each
group through that group's engine; a diffusers pipeline calls with one timestep per call, so a call
runs one engine.

Each group engine holds its own copy of the weights (on disk and in memory): G groups cost G times
the weights of one engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quest_export.errors import UserError

GROUPS_KEY = "engine_groups"
# what an export's graphs are called (export/exporter.py): one graph, or one per timestep group
SINGLE_GRAPH = "model"


def group_keys(graphs: dict[str, Any]) -> list[str]:
    """``["model"]`` for a single-graph export, else ``["group0", "group1", ...]`` in group order
    (refused when a group is missing)."""
    if SINGLE_GRAPH in graphs:
        return [SINGLE_GRAPH]
    keys = [f"group{i}" for i in range(len(graphs))]
    if not keys or sorted(graphs) != sorted(keys):
        raise UserError(f"the export's graphs {sorted(graphs)} are neither one 'model' graph nor group0..groupN; re-export it")
    return keys


def group_lookup(grid: dict[str, Any]) -> torch.Tensor:
    """The timestep -> group table of ``timestep_grid`` (a manifest section), rebuilt from its
    group starts and checked against its hash."""
    from quest_export.export.manifest import lookup_sha256

    size, starts = int(grid["num_train_timesteps"]), [int(s) for s in grid["group_starts"]]
    lookup = np.zeros(size, np.int64)
    for group, start in enumerate(starts):
        lookup[start:] = group
    if lookup_sha256(lookup) != grid.get("lookup_sha256"):
        raise UserError("the manifest's timestep_grid does not match its lookup hash; rebuild the engine")
    return torch.from_numpy(lookup)


def is_grouped(manifest: dict[str, Any]) -> bool:
    return bool(manifest.get(GROUPS_KEY))


def pieces(directory: Path, manifest: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """``(directory, manifest)`` of every backend engine in an engine directory: the directory itself,
    or each group's sub-directory with the manifest's fields overlaid by that group's own."""
    if not is_grouped(manifest):
        return [(Path(directory), manifest)]
    entries = manifest[GROUPS_KEY]
    return [(Path(directory) / entries[key]["directory"], {**manifest, **entries[key]}) for key in group_keys(entries)]


def piece_of_timestep(directory: Path, manifest: dict[str, Any], timestep: float) -> tuple[Path, dict[str, Any]]:
    """The backend engine that runs ``timestep`` (what ``bench`` profiles)."""
    from quest.timesteps import groups_for

    found = pieces(directory, manifest)
    if len(found) == 1:
        return found[0]
    return found[int(groups_for(group_lookup(manifest["timestep_grid"]), timestep)[0])]


def dispatch(calls: Sequence[Callable[..., Any]], lookup: torch.Tensor, sample: Any, timestep: Any, states: Any,
             concatenate: Callable[[list[Any]], Any]) -> Any:
    """Run every row through the call of its timestep group; rows come back in input order.

    Works on torch tensors and numpy arrays alike (``concatenate`` joins outputs); a batch of one
    group (every pipeline step) is one call, with no copy."""
    from quest.timesteps import groups_for

    groups = groups_for(lookup, torch.as_tensor(timestep))
    present = torch.unique(groups).tolist()
    if len(present) == 1:
        return calls[present[0]](sample, timestep, states)
    order = torch.cat([torch.nonzero(groups == g).flatten() for g in present])
    outputs = []
    for g in present:
        rows = torch.nonzero(groups == g).flatten()
        index = rows if torch.is_tensor(sample) else rows.numpy()
        outputs.append(calls[g](sample[index], timestep[index], states[index]))
    joined = concatenate(outputs)
    inverse = torch.argsort(order)
    return joined[inverse if torch.is_tensor(joined) else inverse.numpy()]


class GroupedRunner:
    """The runners of a grouped engine behind one runner: ``run`` on torch tensors (EngineUNet) and,
    for CPU backends, ``__call__`` on numpy arrays (bench)."""

    def __init__(self, runners: list[Any], lookup: torch.Tensor) -> None:
        if int(lookup.max()) + 1 != len(runners):
            raise UserError(f"the engine holds {len(runners)} group engines for {int(lookup.max()) + 1} timestep groups; rebuild it")
        self.runners = runners
        self.lookup = lookup
        self.provider = getattr(runners[0], "provider", None)

    def run(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> Any:
        return dispatch([r.run for r in self.runners], self.lookup, sample, timestep, encoder_hidden_states, torch.cat)

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, encoder_hidden_states: np.ndarray) -> np.ndarray:
        return dispatch(self.runners, self.lookup, sample, timestep, encoder_hidden_states, np.concatenate)


def grouped_fn(fns: list[Callable[..., Any]], lookup: torch.Tensor) -> Callable[..., Any]:
    """A model function (torch in, torch out) that runs each row through its group's function: the
    per-group reference graphs seen as one model by engine verification."""
    return lambda sample, timestep, states: dispatch(fns, lookup, sample, timestep, states, torch.cat)
