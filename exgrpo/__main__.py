"""exgrpo <command> [--config FILE.yaml] [key=value ...]

Commands: ei (Explanatory Inversion data), sft (warm-up), train (ExGRPO), eval, demo (the built-in default).
Each command has one frozen dataclass config; the YAML file and the key=value overrides set its fields, and the
final config is saved into the run folder.
"""
from __future__ import annotations

import argparse
import json
import sys

from exgrpo.config import load_config


def main(argv=None):
    ap = argparse.ArgumentParser(prog="exgrpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["ei", "sft", "train", "eval", "demo"])
    ap.add_argument("--config", default=None, help="YAML file with config fields")
    ap.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    ap.add_argument("--seeds", type=int, default=None, help="demo: seeds to run (mean and 95%% interval)")
    ap.add_argument("--quick", action="store_true", help="demo: a few steps of everything (CI)")
    ap.add_argument("--backend", default=None, help="demo/train: generation backend (transformers | vllm)")
    ap.add_argument("overrides", nargs="*", help="key=value (nested: teacher_chat.base_url=...)")
    a = ap.parse_intermixed_args(argv)
    a.overrides += [f"{k}={v}" for k, v in (("seeds", a.seeds), ("backend", a.backend)) if v is not None]
    if a.quick:
        a.overrides.append("quick=true")
    try:
        if a.command == "ei":
            from exgrpo.ei.pipeline import EIConfig, run_ei
            report = run_ei(load_config(EIConfig, a.config, a.overrides))
            print(json.dumps(report, indent=1))
        else:
            from exgrpo import commands
            getattr(commands, a.command)(a.config, a.overrides, resume=a.resume)
    except ValueError as e:
        print(f"exgrpo {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
