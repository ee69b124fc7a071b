"""Time built CPU engines against each other in one run (bench's rotating blocks), on the same
inputs: e.g. a scale-table engine vs the per-group engines of the same checkpoint.

    .venv/bin/python scripts/engine_ab.py ENGINE_DIR... [--timestep 500] [--iterations 40] [--json out.json]

Each engine is opened as EngineUNet opens it (a per-group engine with every group engine), fed
the rows bench feeds (the build profile's opt batch, one timestep). Prints the host first: the
figures hold for this CPU class only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quest_export.engine import bench, groups, host
from quest_export.engine.backends import backend_of_manifest
from quest_export.engine.manifest import read_engine_manifest
from quest_export.engine.profiles import BuildProfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", type=Path)
    parser.add_argument("--timestep", type=float, default=bench.TIMESTEP)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifests = {str(e): read_engine_manifest(e) for e in args.engines}
    first = next(iter(manifests.values()))
    profile, config = BuildProfile.from_dict(first["profile"]), first["unet_config"]
    generator = torch.Generator().manual_seed(3)
    batch, size, tokens = profile.batch.opt, profile.latent.opt, profile.tokens.opt
    feeds = {"sample": torch.randn(batch, config["in_channels"], size, size, generator=generator).numpy(),
             "timestep": torch.full((batch,), args.timestep).numpy(),
             "encoder_hidden_states": torch.randn(batch, tokens, config["cross_attention_dim"], generator=generator).numpy()}
    calls, memory = {}, {}
    for name, manifest in manifests.items():
        calls[name], memory[name] = bench.open_engine(Path(name), manifest, args.threads, feeds)
    timed = bench.measure_engines({name: (lambda call=call: call(feeds)) for name, call in calls.items()},
                                  args.warmup, args.iterations)
    print(host.describe(host.host_description()))
    result = {"host": host.host_description(), "timestep": args.timestep, "threads": args.threads, "batch": batch,
              "iterations": args.iterations, "engines": {}}
    for name, manifest in manifests.items():
        entry = {**timed[name], "resident_bytes": memory[name], "group_engines": len(groups.pieces(Path(name), manifest)),
                 "engine_bytes": backend_of_manifest(manifest).model_bytes(Path(name), manifest)}
        result["engines"][name] = entry
        print(f"{name}: {entry['latency_ms']:.1f} ms (spread {entry['latency_ms_spread'][0]:.1f}-{entry['latency_ms_spread'][1]:.1f}), "
              f"{entry['group_engines']} engine(s), {entry['engine_bytes'] / 2**20:.2f} MiB on disk, "
              f"{entry['resident_bytes'] / 2**20:.0f} MiB resident")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
