"""Per-timestep scale tables inside one graph (the rescaling construction of DESIGN.md).

Q/DQ scales must be constants, so a quantizer with scale table ``s[g]`` is exported with one
constant scale ``s0`` and a per-sample factor ``f[g] = s0 / s[g]`` gathered by the UNet's own
``timestep`` input: ``Q(x * f; s0) == Q(x; s_g)`` and a linear op's output is divided by the same
factor afterwards. The group index comes from a constant 1000-entry timestep -> group lookup, so
the engine needs no extra input and any scheduler or step count works. ``s0`` and ``f`` come
from quest.quantizers.graph_scale_table, the definition the simulation quantizes with.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


class TimestepGroups:
    """Builds (once) the group-index subgraph and per-table gathers on a graphsurgeon graph."""

    def __init__(self, graph: gs.Graph, lookup: np.ndarray, timestep_input: str = "timestep") -> None:
        self.graph = graph
        self.lookup = lookup.astype(np.int64)
        self.timestep_input = timestep_input
        self._groups: gs.Variable | None = None
        self._count = 0

    def groups(self) -> gs.Variable:
        """Group index per sample (shape ``(batch,)`` or ``(1,)``), from the ``timestep`` input:
        ``lookup[clip(round(t), 0, N-1)]``, as the simulation's TimestepContext computes it."""
        if self._groups is not None:
            return self._groups
        g = self.graph
        t_in = next(v for v in g.inputs if v.name == self.timestep_input)
        t = g.layer(op="Reshape", inputs=[t_in, gs.Constant("quest_t_flat", np.array([-1], np.int64))],
                    outputs=[gs.Variable("quest_t", dtype=None)])[0]
        if t_in.dtype != np.float32:
            t = g.layer(op="Cast", inputs=[t], outputs=[gs.Variable("quest_t_float")], attrs={"to": 1})[0]
        t = g.layer(op="Round", inputs=[t], outputs=[gs.Variable("quest_t_round")])[0]
        last = float(len(self.lookup) - 1)
        t = g.layer(op="Clip", inputs=[t, gs.Constant("quest_t_lo", np.array(0.0, np.float32)),
                                       gs.Constant("quest_t_hi", np.array(last, np.float32))],
                    outputs=[gs.Variable("quest_t_clip")])[0]
        t = g.layer(op="Cast", inputs=[t], outputs=[gs.Variable("quest_t_index")], attrs={"to": 7})[0]
        self._groups = g.layer(op="Gather", inputs=[gs.Constant("quest_timestep_lookup", self.lookup), t],
                               outputs=[gs.Variable("quest_group", dtype=np.int64)])[0]
        return self._groups

    def per_sample(self, name: str, table: np.ndarray, table_name: str | None = None) -> gs.Variable:
        """``table[group]``, one value per sample (shape ``(batch,)``; a per-axis Q/DQ parameter);
        the table keeps its dtype."""
        self._count += 1
        constant = gs.Constant(table_name or f"{name}_table", np.ascontiguousarray(table))
        return self.graph.layer(op="Gather", name=f"{name}/Gather", inputs=[constant, self.groups()],
                                outputs=[gs.Variable(name)])[0]

    def factor(self, table: np.ndarray, rank: int, name: str) -> gs.Variable:
        """``table[group]`` per sample, shaped ``(batch, 1, ..., 1)`` to broadcast over a rank-``rank`` tensor."""
        gathered = self.per_sample(f"{name}_gathered", table.astype(np.float32), table_name=f"{name}_table")
        shape = np.array([-1] + [1] * (rank - 1), np.int64)
        return self.graph.layer(op="Reshape", inputs=[gathered, gs.Constant(f"{name}_shape", shape)],
                                outputs=[gs.Variable(f"{name}")])[0]
