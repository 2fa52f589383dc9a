"""exgrpo <command> [--config FILE.yaml] [key=value ...]

Commands: ei (Explanatory Inversion data), sft (warm-up), train (ExGRPO), eval, demo (the built-in default), plan
(memory per GPU). Each command has one frozen dataclass config; the YAML file and the key=value overrides set its
fields (nested: model.lora_rank=32), and the final config is saved into the run folder. `exgrpo <command> --help`
lists every field with its default; `--print-config` prints the resolved YAML and exits.

Errors in what you pass (a missing file or folder, an unknown data set, a value out of range) are one line naming
the field and the value, exit code 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys

import yaml

from exgrpo.config import load_config, to_dict


def _config_classes():
    from exgrpo.commands import COMMANDS
    return {name: cls for name, (cls, _) in COMMANDS.items()}


SUMMARY = {"ei": "build D_EI: teacher rationales, probes of the 10 rules, consistency and difficulty filters",
           "sft": "SFT warm-up on D_EI (probe -> rationale pairs, or whole dialogues)",
           "train": "ExGRPO: GRPO over multi-turn probe dialogues with the DSU bonus",
           "eval": "greedy accuracy on data sets (the question asked directly)",
           "demo": "the built-in default: arithmetic domain, symbolic teacher, tiny student, all arms, on the CPU",
           "plan": "memory per GPU of a training setup, and whether it fits a card"}
FLAGS = {  # flags beside key=value, only on the commands they belong to
    "sft": ("resume",), "train": ("resume",),
    "demo": ("seeds", "quick", "backend"),
}


def _comments(cls) -> dict:
    """field -> the comment on its line in the class body (the one-line meaning)."""
    out = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:\s*[^=]+=.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _nested_defaults_help(cls, prefix=""):
    """One line per field, nested configs expanded one level, with this command's defaults (they differ per
    command, e.g. TrainConfig.loss) and the comment on the field's line as its meaning."""
    inst = cls()
    lines = []
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            notes = _comments(type(v))
            for g in dataclasses.fields(v):
                lines.append(f"  {prefix}{f.name}.{g.name} (default {getattr(v, g.name)!r})"
                             + (f": {notes[g.name]}" if g.name in notes else ""))
        else:
            notes = _comments(cls)
            lines.append(f"  {prefix}{f.name} (default {v!r})" + (f": {notes[f.name]}" if f.name in notes else ""))
    return lines


def command_parser(name: str) -> argparse.ArgumentParser:
    cls = _config_classes()[name]
    p = argparse.ArgumentParser(prog=f"exgrpo {name}", description=SUMMARY[name] + ".",
                                epilog="config fields (key=value, nested with dots):\n" + "\n".join(_nested_defaults_help(cls)),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with config fields (examples: configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if "resume" in FLAGS.get(name, ()):
        p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    if "seeds" in FLAGS.get(name, ()):
        p.add_argument("--seeds", type=int, default=None, help="seeds to run (means and 95%% intervals)")
        p.add_argument("--quick", action="store_true", help="a few steps of everything (CI)")
        p.add_argument("--backend", default=None, help="generation backend (transformers | vllm)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config fields")
    return p


def top_help() -> str:
    names = list(_config_classes())
    return (__doc__ + "\ncommands:\n" + "\n".join(f"  {n:6s} {SUMMARY[n]}" for n in names)
            + "\n\nexgrpo <command> --help: the command's flags and every config field.")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _config_classes()
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return 0 if argv else 2
    name = argv[0]
    if name not in commands:
        print(f"exgrpo: error: unknown command {name!r}; commands: {', '.join(commands)}", file=sys.stderr)
        return 2
    a = command_parser(name).parse_intermixed_args(argv[1:])
    overrides = list(a.overrides)
    if name == "demo":
        overrides += [f"{k}={v}" for k, v in (("seeds", a.seeds), ("backend", a.backend)) if v is not None]
        if a.quick:
            overrides.append("quick=true")
    try:
        cfg = load_config(commands[name], a.config, overrides)
        if a.print_config:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from exgrpo import commands as cmds
        cmds.run(name, cfg, resume=getattr(a, "resume", False))
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, yaml.YAMLError,
            *commands_errors()) as e:
        if a.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"exgrpo {name}: error: {msg}", file=sys.stderr)
        return 2
    return 0


def commands_errors():
    from exgrpo.commands import UserError
    from exgrpo.ei.teacher import TeacherError
    return (UserError, TeacherError)


if __name__ == "__main__":
    sys.exit(main())
