"""Per-timestep-group engines (engine/groups.py): rows reach the engine of their own timestep group,
in the simulation's grouping, and come back in input order; the timestep grid of a manifest is
rebuilt exactly and a tampered one refused. The built engines themselves are tested per backend
(test_openvino_backend.py, test_engine_verification.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quest.timesteps import groups_for
from quest_export.engine import groups
from quest_export.errors import UserError
from quest_export.export.manifest import lookup_sha256


def _grid(lookup: np.ndarray) -> dict:
    starts = [t for t in range(lookup.size) if t == 0 or lookup[t] != lookup[t - 1]]
    return {"num_train_timesteps": lookup.size, "num_groups": int(lookup.max()) + 1, "group_starts": starts,
            "lookup_sha256": lookup_sha256(lookup)}


def test_group_lookup_is_rebuilt_from_the_manifest_grid_and_a_tampered_grid_is_refused() -> None:
    lookup = np.repeat(np.arange(3), [400, 350, 250]).astype(np.int64)
    rebuilt = groups.group_lookup(_grid(lookup))
    assert torch.equal(rebuilt, torch.from_numpy(lookup))
    tampered = {**_grid(lookup), "group_starts": [0, 401, 750]}
    with pytest.raises(UserError, match="lookup hash"):
        groups.group_lookup(tampered)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_dispatch_sends_each_row_to_its_group_and_keeps_row_order(as_numpy: bool) -> None:
    lookup = torch.from_numpy(np.repeat(np.arange(3), [400, 350, 250]).astype(np.int64))
    # each group's "engine" marks its rows with its group number and keeps the row's own value
    calls = [lambda s, t, c, g=g: s * 0 + (g * 1000 + s) for g in range(3)]
    timestep = torch.tensor([999.0, 10.0, 500.4, 399.5, 399.4, 749.6, 0.0])  # 399.5 rounds to 400 (half to even)
    sample = torch.arange(len(timestep), dtype=torch.float32).reshape(-1, 1)
    states = torch.zeros(len(timestep), 2)
    if as_numpy:
        out = groups.dispatch(calls, lookup, sample.numpy(), timestep.numpy(), states.numpy(), np.concatenate)
        out = torch.from_numpy(out)
    else:
        out = groups.dispatch(calls, lookup, sample, timestep, states, torch.cat)
    expected_group = groups_for(lookup, timestep)
    assert torch.equal(out.flatten(), expected_group.float() * 1000 + sample.flatten())
    assert expected_group.tolist() == [2, 0, 1, 1, 0, 2, 0]


def test_a_batch_of_one_group_is_one_call_on_the_inputs_themselves() -> None:
    lookup = torch.zeros(1000, dtype=torch.long)
    lookup[500:] = 1
    seen = []
    calls = [lambda s, t, c, g=g: seen.append((g, s)) or s for g in range(2)]
    sample = np.ones((4, 1), np.float32)
    groups.dispatch(calls, lookup, sample, np.full(4, 700.0, np.float32), np.zeros((4, 2), np.float32), np.concatenate)
    assert len(seen) == 1 and seen[0][0] == 1 and seen[0][1] is sample


def test_group_keys_orders_groups_numerically_and_refuses_a_missing_group() -> None:
    keys = groups.group_keys({f"group{i}": {} for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)})
    assert keys == [f"group{i}" for i in range(11)]
    assert groups.group_keys({"model": {}}) == ["model"]
    with pytest.raises(UserError, match="group0..groupN"):
        groups.group_keys({"group0": {}, "group2": {}})


def test_build_engine_refuses_a_scale_form_it_cannot_apply(run_cli, exported: dict, tmp_path) -> None:
    """--timestep-scales is chosen when a checkpoint is exported: an export directory keeps its own."""
    from conftest import assert_one_line_error

    result = run_cli("build-engine", exported["onnxruntime"], "--timestep-scales", "per-engine", "--out", tmp_path / "e")
    assert_one_line_error(result, contains="--timestep-scales applies when building from a checkpoint")
    result = run_cli("build-engine", exported["onnxruntime"], "--timestep-scales", "per-group", "--out", tmp_path / "e")
    assert_one_line_error(result, contains="unknown --timestep-scales 'per-group'; choose one of: table, per-engine")
    assert not (tmp_path / "e").exists()
