"""Derived settings of every shipped profile for the two backbones: sparsity, buffer, batch, memory.

    python benchmarks/profile_settings.py --out profile_settings.json
"""

from __future__ import annotations

import argparse
import json

from esacl_edge.learn.plan import plan
from esacl_edge.device.profiles import load_profile, profile_names
from esacl_edge.learn.methods import get_method

CASES = (("resnet18_reduced", (32, 32, 3)), ("small_cnn", (28, 28, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="profile_settings.json")
    parser.add_argument("--method", default="esacl")
    args = parser.parse_args()
    rows = []
    for name in profile_names():
        profile = load_profile(name)
        for model, shape in CASES:
            p = plan(profile, model, shape, 10, get_method(args.method))
            rows.append({"profile": name, "training": profile.training_supported, **p.as_dict()})
    print("| profile | model | sparsity (from) | stored model B | buffer samples | batch | peak estimate MiB "
          "| budget MiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = "" if r["training"] else " (deploy only)"
        print(f"| {r['profile']}{note} | {r['model']} {'x'.join(map(str, r['input_shape']))} | "
              f"{r['target_sparsity']:.3f} ({r['sparsity_from'].replace('profile ', '')}) | "
              f"{r['model_bytes_stored']:,} | {r['buffer_capacity']:,} | {r['batch_size']} | "
              f"{r['memory_estimate_bytes'] / 2 ** 20:,.0f} | {r['memory_budget_bytes'] / 2 ** 20:,.0f} |")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
