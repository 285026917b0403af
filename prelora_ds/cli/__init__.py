"""`prelora`: the user's tools, installed with the package (as DeepSpeed ships `ds_report`).

  prelora replay RUN_DIR --delta_w 1 5 --delta_l 1 5 --num_windows 2 3
  prelora plot RUN_DIR
  prelora compare RUN_DIR... --out compare.png
  prelora time-to-accuracy PRELORA_RUN... --baseline FULL_RUN...
  prelora pack-shards SRC OUT --workers 16
  prelora check-hostfile HOSTFILE --node_rank N
  prelora sharpness RUN_DIR --step 300

`prelora COMMAND --help` shows a command's options. A command's module is imported only when that command runs
(`prelora --help` and `prelora replay` never import matplotlib). `python -m prelora_ds.cli ...` is the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PLOT_EXTRA = "pip install 'prelora_ds[plot]'"

# name -> (module under prelora_ds.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "replay": ("replay", "replay a run's PreLoRA switch decision at other thresholds (from windows.json)"),
    "plot": ("plot", "PNG figures of one run: norms, layer changes, ranks, LoRA norms, throughput, loss/top-1"),
    "compare": ("compare", "compare finished runs: a markdown table and a PNG"),
    "time-to-accuracy": ("time_to_accuracy", "PreLoRA runs against full training by seed: wall time to full's "
                         "final top-1 - 1, step times (table, JSON, PNG)"),
    "pack-shards": ("pack_shards", "pack an ImageFolder into tar shards for data.dataset: shards"),
    "check-hostfile": ("check_hostfile", "check a deepspeed hostfile on the node about to start"),
    "sharpness": ("sharpness", "a checkpoint's Hessian top eigenvalue on the target layers, raw and Adam-scaled"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help states every option's default: argparse's value, or the help's own words where it says "default"
    (the commands and the benchmarks in tools/)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


class CommandError(Exception):
    """A command cannot run: `main` prints `prelora <command>: error: <message>` on one line and returns 2."""


def require_matplotlib():
    """matplotlib set to the Agg backend; CommandError naming the `plot` extra when it is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise CommandError(f"matplotlib is not installed; {PLOT_EXTRA}") from exc
    matplotlib.use("Agg")
    return matplotlib


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prelora",
        description="PreLoRA tools: run `prelora COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, (_, summary) in COMMANDS.items():
        # no options here: every argument after the command goes to the command's own parser (its --help too)
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    module_name, _ = COMMANDS[args.command]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
        return int(module.main(rest) or 0)
    except CommandError as exc:
        print(f"prelora {args.command}: error: {exc}", file=sys.stderr)
        return 2
