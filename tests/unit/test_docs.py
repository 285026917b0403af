"""The docs' commands and names, checked against the code (issue 38: docs drift after the move into sub-packages).

Every launch of `prelora_ds.train` written in a shell block of README.md or docs/*.md, in the runbook (the docstring
of prelora_ds/train.py) or in a recipe's header comment goes through `train.preflight` with the environment its
launcher gives rank 0 (world size, torchrun's agent variables; no process group). It must pass (exit 0), or stop at
the one thing this machine lacks, the dataset folder the command names (exit 2: `--data.root /datasets/imagenet` does
not exist). `prelora` sub-commands and the scripts in tools/ are parsed by their own parsers (nothing runs). Module
paths, `Class.attribute` names, recipe fields, recipes, DeepSpeed configs and links the docs name must exist, and
design.md's layout table must list every module of the package.

A command with `...` in it is a fragment (`... --resume`, `timeout 3600 deepspeed ...`), not checked as a command.
Hostfiles the repo does not ship and placeholders in prelora-train's arguments are stood in for by the tables
below, by name; any other placeholder fails.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from prelora_ds import cli
from prelora_ds.config.recipe import SECTIONS
from prelora_ds.config.sections import RunConfig
from prelora_ds.distributed import elastic
from prelora_ds.distributed.supervisor import flag
from prelora_ds.errors import ConfigError
from prelora_ds.testing.harness import REPO, load_tool
from prelora_ds.train import preflight

DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
RUNBOOK = "prelora_ds/train.py"
RECIPES = sorted(f"recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml"))
PACKAGE = REPO / "prelora_ds"
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())

# Hostfiles the docs name that the repo does not ship: the slots per node the text gives them.
UNSHIPPED_HOSTFILES = {
    "H": [1, 1],  # "two nodes, one launcher on each" (the runbook, docs/usage.md)
    "hostfiles/a100_15x4": [4] * 15,  # docs/multinode.md: hostfiles/a100_16x4 less the dead node (the grep above)
}
# Placeholders in prelora-train's own arguments, and the arguments that stand for them here.
PLACEHOLDERS = {
    "<the arm's overrides>": [],  # docs/study.md: each arm's overrides are in the table above the command
}
# Recipe fields the docs name as history, with where and why; each must really be gone.
GONE_FIELDS = {
    "prelora.revived_moments": "docs/study.md: an experiment field, named with the commit its arm ran at",
}
# `section.field` spans that are not recipe fields, with what they are.
NOT_FIELDS = {
    "engine.module": "docs/design.md: the module a DeepSpeed engine wraps",
}
# A rank fails with this when the command's dataset folder is not on this machine: the one expected exit 2.
MISSING_DATA = re.compile(
    r"data\.root='(?P<root>[^']*)' (does not exist or is not a folder|\(data\.dataset=shards\) is not a folder)"
)
# Everything a launcher sets for a rank (cleared before each command, then set as its launcher would).
LAUNCH_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK",
    "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
    "MV2_COMM_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "PRELORA_FAULTS",
)
ENTRIES = {"prelora_ds.train", "prelora-train"}
LAUNCHERS = {"deepspeed", "torchrun", "python", "python3", "mpirun", "mpiexec", "prelora-train"}


# ------------------------------------------------------------------------------------------------ reading the docs
@dataclass(frozen=True)
class Snippet:
    """Code from a doc: a shell line (continuations joined) or an inline code span, and where it starts."""

    where: str  # "docs/multinode.md:120"
    text: str
    shell: bool  # a shell line (a doc's shell block, the runbook, a recipe's comment), not an inline span


def _at(rel: str, line: int) -> str:
    return f"{rel}:{line}"


def _join_continuations(numbered: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines ending in a backslash joined with the next; each keeps the number of its first line."""
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in numbered:
        start, text = pending if pending else (number, "")
        text += " " + line.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1])
        else:
            joined.append((start, text.strip()))
            pending = None
    if pending:
        joined.append((pending[0], pending[1].strip()))
    return joined


def runbook_lines() -> list[tuple[int, str]]:
    """The indented lines of prelora_ds/train.py's docstring (its commands), with their line numbers."""
    module = ast.parse((REPO / RUNBOOK).read_text())
    doc = ast.get_docstring(module, clean=False)
    assert doc, "prelora_ds/train.py lost its runbook docstring"
    first = module.body[0].lineno
    return [(first + i, line) for i, line in enumerate(doc.splitlines()) if line.startswith("  ")]


def fenced_blocks(rel: str) -> tuple[list[tuple[int, str]], str]:
    """(the lines of the doc's shell blocks with their numbers, the doc with every fenced block blanked out)."""
    shell, prose, fence = [], [], None
    for number, line in enumerate((REPO / rel).read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            prose.append("")
        elif fence is None:
            prose.append(line)
        else:
            if fence in ("bash", "sh", "shell"):
                shell.append((number, line))
            prose.append("")
    return shell, "\n".join(prose)


def recipe_lines(rel: str) -> list[tuple[int, str]]:
    """The commands in a recipe's comments: `#   deepspeed ...` and the lines that continue it."""
    comments = [(n, line.removeprefix("#")) for n, line in enumerate((REPO / rel).read_text().splitlines(), 1)
                if line.startswith("#   ")]
    return [(n, t) for n, t in _join_continuations(comments) if t.split()[0] in LAUNCHERS]


def snippets(rel: str) -> list[Snippet]:
    """Every shell line (continuations joined) and inline code span of a doc, or the runbook's or a recipe's lines."""
    if rel == RUNBOOK:
        return [Snippet(_at(rel, n), t, True) for n, t in _join_continuations(runbook_lines())]
    if rel in RECIPES:
        return [Snippet(_at(rel, n), t, True) for n, t in recipe_lines(rel)]
    shell, prose = fenced_blocks(rel)
    found = [Snippet(_at(rel, n), t, True) for n, t in _join_continuations(shell)]
    for m in re.finditer(r"`([^`]+)`", prose):
        found.append(Snippet(_at(rel, prose.count("\n", 0, m.start()) + 1), " ".join(m.group(1).split()), False))
    return found


ALL_SNIPPETS = [s for rel in [*DOCS, RUNBOOK, *RECIPES] for s in snippets(rel)]


def words(text: str) -> tuple[list[str], dict[str, str]]:
    """Shell words (comments dropped) with `<...>` and `$(...)` kept whole as `@n` tokens; returns the tokens' texts."""
    hidden: dict[str, str] = {}

    def hide(m: re.Match) -> str:
        hidden[f"@{len(hidden)}"] = " ".join(m.group(0).split())
        return f" @{len(hidden) - 1} " if m.group(0).startswith("<") else f"@{len(hidden) - 1}"

    text = re.sub(r"<[^<>]+>|\$\([^()]*\)", hide, text)
    return shlex.split(text, comments=True), hidden


def commands(snippet: Snippet) -> list[tuple[list[str], dict[str, str]]]:
    """The simple commands of a snippet (split at &&, ||, ;, |), each with its hidden placeholders; an inline span
    that is not shell (unbalanced quotes: a log line, prose) has none."""
    try:
        tokens, hidden = words(snippet.text)
    except ValueError as exc:
        if snippet.shell:
            raise ValueError(f"{snippet.where}: {exc}: {snippet.text}") from exc
        return []
    found, current = [], []
    for token in [*tokens, ";"]:
        if token in ("&&", "||", ";", "|"):
            if current:
                found.append((current, hidden))
            current = []
        else:
            current.append(token)
    return found


# ------------------------------------------------------------------------------------------------ launch commands
@dataclass(frozen=True)
class Launch:
    """A launch of prelora_ds.train as a doc writes it."""

    where: str
    env: dict[str, str]  # the command's own VAR=value prefix
    launcher: str  # deepspeed, torchrun, mpirun, python, prelora-train
    launcher_args: list[str]  # up to the module or script
    args: list[str]  # what prelora-train parses
    hidden: dict[str, str]


def as_launch(where: str, argv: list[str], hidden: dict[str, str]) -> Launch | None:
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    if not argv or argv[0] not in LAUNCHERS or "..." in argv:
        return None
    entry = next((i for i, w in enumerate(argv) if w in ENTRIES), None)
    if entry is None:
        return None
    return Launch(where, env, argv[0], argv[1:entry], argv[entry + 1:], hidden)


def doc_launches() -> list[Launch]:
    found = []
    for s in ALL_SNIPPETS:
        if s.shell:
            found += [launch for argv, hidden in commands(s) if (launch := as_launch(s.where, list(argv), hidden))]
    return found


LAUNCHES = doc_launches()


def hostfile_slots(name: str, where: str) -> list[int]:
    if name in UNSHIPPED_HOSTFILES:
        return UNSHIPPED_HOSTFILES[name]
    path = REPO / name
    assert path.is_file(), f"{where}: hostfile {name} is neither shipped nor in UNSHIPPED_HOSTFILES"
    lines = [line.split("#")[0].split() for line in path.read_text().splitlines()]
    return [int(w[1].removeprefix("slots=")) for w in lines if w]


def worlds(launch: Launch) -> list[tuple[int, int]]:
    """(ranks on a node, nodes) for every world the launch can have: each node count of torchrun's MIN:MAX."""
    a = launch.launcher_args
    if launch.launcher == "deepspeed":
        per_node, hostfile = flag(a, "--num_gpus", "--num_accelerators"), flag(a, "--hostfile", "-H")
        if hostfile:  # every slot of the file, or --num_gpus on each of its nodes
            slots = hostfile_slots(launch.hidden.get(hostfile, hostfile), launch.where)
            return [(int(per_node) if per_node else slots[0], len(slots))]
        return [(int(per_node or 1), 1)]
    if launch.launcher == "torchrun":
        low, _, high = (flag(a, "--nnodes") or "1").partition(":")
        per_node = int(flag(a, "--nproc_per_node", "--nproc-per-node") or 1)
        return [(per_node, n) for n in range(int(low), int(high or low) + 1)]
    if launch.launcher in ("mpirun", "mpiexec"):
        n = flag(a, "-np", "-n")
        if n:
            return [(int(n), 1)]
        hosts = (flag(a, "-hosts", "-host") or "").split(",")
        return [(int(flag(a, "-ppn") or 1), len(hosts))]
    return [(1, 1)]


def rank_env(launch: Launch, per_node: int, nodes: int) -> dict[str, str]:
    """What the launcher sets for rank 0 (deepspeed's per-node launcher, torchrun's agent, MPICH's mpiexec)."""
    world = str(per_node * nodes)
    if launch.launcher == "deepspeed":
        return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500",
                    CROSS_RANK="0", CROSS_SIZE=str(nodes), LOCAL_SIZE=str(per_node))
    if launch.launcher == "torchrun":
        shared = launch.env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") != "1"  # torch's own rule
        return dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE=world, LOCAL_WORLD_SIZE=str(per_node), GROUP_RANK="0",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", TORCHELASTIC_RUN_ID="docs",
                    TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_USE_AGENT_STORE=str(shared))
    if launch.launcher in ("mpirun", "mpiexec"):
        return dict(PMI_SIZE=world, PMI_RANK="0")
    return {}


def train_args(launch: Launch, out_dir: Path) -> list[str]:
    """prelora-train's arguments with the placeholders stood in for and --output_dir moved under `out_dir`."""
    args: list[str] = []
    for word in launch.args:
        text = launch.hidden.get(word)
        if text is None:
            assert "$" not in word, f"{launch.where}: a shell variable in prelora-train's arguments: {word}"
            args.append(word)
        else:
            assert text in PLACEHOLDERS, f"{launch.where}: placeholder {text} is not in PLACEHOLDERS"
            args += PLACEHOLDERS[text]
    for i, word in enumerate(args):
        if word == "--output_dir":
            args[i + 1] = str(out_dir)
        elif word.startswith("--output_dir="):
            args[i] = f"--output_dir={out_dir}"
    if not any(w.split("=")[0] == "--output_dir" for w in args):
        args += ["--output_dir", str(out_dir)]
    return args


def test_the_docs_have_launch_commands():
    where = {launch.where.split(":")[0] for launch in LAUNCHES}
    assert {"README.md", RUNBOOK, "docs/usage.md", "docs/multinode.md", "docs/data.md", "docs/study.md"} <= where
    assert sum(rel.startswith("recipes/") for rel in where) >= 10  # the ViT recipes' and demo_relora's headers
    assert {launch.launcher for launch in LAUNCHES} >= {"deepspeed", "torchrun", "mpirun", "python"}


def test_every_launch_line_is_understood():
    """A shell line that names the entry point is either a launch the preflight test runs or a `...` fragment."""
    launches = {launch.where for launch in LAUNCHES}
    missed = [
        f"{s.where}: {s.text}" for s in ALL_SNIPPETS
        if s.shell and any(e in s.text.split() for e in ENTRIES) and s.where not in launches and "..." not in s.text
    ]
    assert not missed, "shell lines naming prelora_ds.train that are not read as launches:\n" + "\n".join(missed)


def agent_argv(launch: Launch) -> list[str]:
    """The torchrun agent's arguments, which check_agent reads from the process tree ([] for other launchers)."""
    return [*launch.launcher_args, "-m", "prelora_ds.train", *launch.args] if launch.launcher == "torchrun" else []


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.where)
def test_launch_passes_preflight(launch, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the docs' commands run from the repo root
    monkeypatch.setattr(elastic, "agent_argv", lambda: agent_argv(launch))
    for per_node, nodes in worlds(launch):
        for key in LAUNCH_VARS:
            monkeypatch.delenv(key, raising=False)
        for key, value in {**launch.env, **rank_env(launch, per_node, nodes)}.items():
            monkeypatch.setenv(key, value)
        args = train_args(launch, tmp_path / f"run{per_node * nodes}")
        what = f"{launch.where} on {per_node * nodes} rank(s): prelora-train {shlex.join(args)}"
        try:
            preflight(args)
        except ConfigError as exc:
            missing = MISSING_DATA.search(str(exc))
            root = flag(args, "--data.root")
            assert missing and missing["root"] == root and not Path(root).exists(), f"{what}\n  exit 2: {exc}"


# --------------------------------------------------------------------------------------- prelora and tools/ scripts
class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def captured_parser(main, monkeypatch) -> argparse.ArgumentParser:
    """The parser a `main()` builds, taken at its first parse (nothing after it runs)."""

    def take(self, *args, **kwargs):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", take)
        m.setattr(argparse.ArgumentParser, "parse_known_args", take)
        m.setattr("sys.argv", ["x"])
        try:
            main([]) if "argv" in main.__code__.co_varnames[: main.__code__.co_argcount] else main()
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{main.__module__}.main() did not parse its arguments")


def check_args(parser: argparse.ArgumentParser, prog: str, args: list[str], where: str, full: bool, capsys) -> None:
    """Every option in `args` is the parser's; a whole command (`full`) parses as the script would parse it."""
    options = {o for action in parser._actions for o in action.option_strings}
    unknown = [a.split("=")[0] for a in args if a.startswith("-") and a.split("=")[0] not in options
               and not re.fullmatch(r"-?[\d.]+(e-?\d+)?", a)]
    assert not unknown, f"{where}: {prog} has no option {', '.join(unknown)}"
    if full:
        try:
            parser.parse_args(args)
        except SystemExit as exc:  # 0: --help
            error = capsys.readouterr().err.strip().splitlines()[-1] if exc.code else None
            if error:
                pytest.fail(f"{where}: {prog} {shlex.join(args)}\n  {error}")


def tool_commands() -> list[tuple[str, str, list[str], bool]]:
    """(where, script under tools/, its arguments, whole command) of every `python tools/X.py ...` in the docs."""
    found = []
    for s in ALL_SNIPPETS:
        for argv, hidden in commands(s):
            while argv and argv[0] in ("sudo", "python", "python3", "bash"):
                argv = argv[1:]
            if argv and re.fullmatch(r"tools/\w+\.py", argv[0]) and "..." not in argv:
                # a shell line, or a span written as a command (`python tools/x.py ...`), parses whole
                whole = (s.shell or s.text.startswith(("python", "sudo"))) and not hidden
                found.append((s.where, argv[0], argv[1:], whole))
    return found


def prelora_commands() -> list[tuple[str, str, list[str], bool]]:
    """(where, sub-command, its arguments, whole command) of every `prelora COMMAND ...` in the docs' code."""
    found = []
    for s in ALL_SNIPPETS:
        for argv, hidden in commands(s):
            if len(argv) > 1 and argv[0] == "prelora" and re.fullmatch(r"[a-z][\w-]*", argv[1]):
                whole = s.shell and not hidden and "..." not in argv
                found.append((s.where, argv[1], argv[2:], whole))
    return found


def test_prelora_commands_exist_and_parse(monkeypatch, capsys):
    found = prelora_commands()
    assert len({name for _, name, _, _ in found}) >= 5
    for where, name, args, whole in found:
        assert name in cli.COMMANDS, f"{where}: `prelora {name}` is not a command of `prelora --help`"
        module = importlib.import_module(f"prelora_ds.cli.{cli.COMMANDS[name][0]}")
        check_args(captured_parser(module.main, monkeypatch), f"prelora {name}", args, where, whole, capsys)


def test_tool_commands_name_scripts_and_options_that_exist(monkeypatch, capsys):
    found = tool_commands()
    assert len({script for _, script, _, _ in found}) >= 5
    monkeypatch.syspath_prepend(str(REPO / "tools"))  # the scripts import each other as the scripts' directory
    parsers = {}
    for where, script, args, whole in found:
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        if script not in parsers:
            parsers[script] = captured_parser(load_tool(Path(script).stem).main, monkeypatch)
        check_args(parsers[script], script, args, where, whole, capsys)


def test_run_study_commands_start_the_runs_they_promise(monkeypatch):
    """`python tools/run_study.py ...  # N runs`: N = arms x seeds, as the script counts them."""
    parser = captured_parser(load_tool("run_study").main, monkeypatch)
    promised = [(s, m) for s in ALL_SNIPPETS if s.shell and "tools/run_study.py" in s.text
                for m in [re.search(r"#\s*(\d+) runs", s.text)] if m]
    assert promised, "no `# N runs` comment on a run_study.py command any more: drop this test or the comment"
    for s, m in promised:
        argv = next(a for a, _ in commands(s) if "tools/run_study.py" in a)
        args = parser.parse_args(argv[argv.index("tools/run_study.py") + 1:])
        runs, says = len(args.only) * len(args.seeds), int(m.group(1))
        assert runs == says, f"{s.where}: the command starts {len(args.only)} arm(s) x {len(args.seeds)} seed(s) = " \
                             f"{runs} runs, the comment says {says}"


# --------------------------------------------------------------------------------------------------- named things
def doc_texts() -> list[tuple[str, str]]:
    """(file, text) of every doc, the runbook's docstring (its line numbers as in train.py) and every recipe."""
    texts = [(rel, (REPO / rel).read_text()) for rel in [*DOCS, *RECIPES]]
    lines = (REPO / RUNBOOK).read_text().splitlines()
    end = next(i for i, line in enumerate(lines[1:], 1) if '"""' in line)
    return [*texts, (RUNBOOK, "\n".join(lines[: end + 1]))]


def occurrences(pattern: str) -> list[tuple[str, re.Match]]:
    """(file:line, match) of a pattern over every doc's whole text (prose and code)."""
    found = []
    for rel, text in doc_texts():
        found += [(_at(rel, text.count("\n", 0, m.start()) + 1), m) for m in re.finditer(pattern, text)]
    return found


def is_module(dotted_parts: list[str]) -> bool:
    path = PACKAGE.joinpath(*dotted_parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_module_paths_exist():
    bad = []
    subpackage = "|".join(SUBPACKAGES)
    for where, m in occurrences(rf"(?<![\w/.])(?:prelora_ds/)?((?:{subpackage})/\w+\.py)\b"):
        if not (PACKAGE / m.group(1)).is_file():
            bad.append(f"{where}: {m.group(0)}")
    for where, m in occurrences(r"(?<![\w/.])prelora_ds/[\w/]+\.py\b"):
        if not (REPO / m.group(0)).is_file():
            bad.append(f"{where}: {m.group(0)}")
    for where, m in occurrences(r"(?<![\w/.])prelora_ds(?:\.\w+)+"):
        parts = m.group(0).split(".")[1:]
        module = next((k for k in range(len(parts), 0, -1) if is_module(parts[:k])), 0)
        rest = parts[module:]
        name = ".".join(["prelora_ds", *parts[:module]])
        if len(rest) > 1 or (rest and not hasattr(importlib.import_module(name), rest[0])):
            bad.append(f"{where}: {m.group(0)}")
    for where, m in occurrences(r"(?<![\w/.])(tests|tools)/[\w/]+\.(py|sh)(::\w+\*?)?"):
        path, _, test = m.group(0).partition("::")  # test_x* names a group of tests
        name = rf"{test[:-1]}\w*" if test.endswith("*") else rf"{test}\b"
        if not (REPO / path).is_file() or test and not re.search(rf"(def|class) {name}", (REPO / path).read_text()):
            bad.append(f"{where}: {m.group(0)}")
    assert not bad, "the docs name modules, scripts or tests that do not exist:\n" + "\n".join(bad)


def test_recipes_ds_configs_and_links_exist():
    named = occurrences(r"(?<![\w/])(recipes/[\w.-]+\.yaml|ds_configs/[\w.-]+\.json)")
    bad = [f"{where}: {m.group(0)}" for where, m in named if not (REPO / m.group(0)).is_file()]
    for rel in DOCS:
        text = (REPO / rel).read_text()
        for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", text):
            if "://" not in m.group(1) and not (REPO / rel).parent.joinpath(m.group(1)).exists():
                bad.append(f"{_at(rel, text.count(chr(10), 0, m.start()) + 1)}: link {m.group(1)}")
    assert not bad, "the docs name files that do not exist:\n" + "\n".join(bad)


def recipe_fields() -> dict[str, dict[str, typing.Any]]:
    """section -> field -> type, as the recipe loader knows them."""
    hints = typing.get_type_hints(RunConfig)
    return {s: {f.name: typing.get_type_hints(hints[s])[f.name] for f in dataclasses.fields(hints[s])}
            for s in SECTIONS}


def test_recipe_fields_named_in_the_docs_exist():
    """`--section.field` anywhere, and an inline code span that starts with `section.field`, is a recipe field (or,
    for the second, a module such as `engine.phase_engine`); a mapping field (model.kwargs, engine.lora) takes any
    key."""
    fields = recipe_fields()
    for name in [*GONE_FIELDS, *NOT_FIELDS]:
        section, _, field = name.partition(".")
        assert field not in fields[section], f"{name} is a recipe field: drop it from GONE_FIELDS / NOT_FIELDS"
    sections = "|".join(SECTIONS)
    found = occurrences(rf"(?<![\w-])--({sections})\.(\w+)")
    for s in ALL_SNIPPETS:
        if not s.shell and (m := re.match(rf"({sections})\.(\w+)\b(?!\.\w)", s.text)):
            found.append((s.where, m))
    bad = []
    for where, m in found:
        section, field = m.group(1), m.group(2)
        if field in ("md", "py", "yaml", "json") or f"{section}.{field}" in {**GONE_FIELDS, **NOT_FIELDS}:
            continue
        if field not in fields[section] and not m.group(0).startswith("--") and is_module([section, field]):
            continue
        if field not in fields[section]:
            bad.append(f"{where}: {m.group(0)}")
    assert not bad, "the docs name recipe fields that do not exist:\n" + "\n".join(sorted(set(bad)))


def class_members() -> dict[str, set[str]]:
    """Class name -> the names its body defines (methods, class attributes, dataclass fields, self.x), package-wide."""
    members: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names = members.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(sub.name)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        names.add(sub.attr)
    return members


def test_class_attributes_named_in_the_docs_exist():
    members = class_members()
    bad = []
    for s in ALL_SNIPPETS:
        for m in re.finditer(r"(?<![\w.])([A-Z]\w+)\.(_?[a-z]\w*)\b", s.text):
            if m.group(1) in members and m.group(2) not in members[m.group(1)]:
                bad.append(f"{s.where}: {m.group(0)}")
    assert not bad, "the docs name attributes that the package's classes do not have:\n" + "\n".join(bad)


def layout_table() -> dict[str, set[str]]:
    """docs/design.md's package table: sub-package -> the modules its last column names."""
    table = {}
    for line in (REPO / "docs/design.md").read_text().splitlines():
        m = re.match(r"\| `(\w+)/` \|.*\| (.*) \|$", line)
        if m:
            depth, items, item = 0, [], ""
            for ch in m.group(2):  # split at the commas outside parentheses
                depth += (ch == "(") - (ch == ")")
                if ch == "," and depth == 0:
                    items.append(item)
                    item = ""
                else:
                    item += ch
            items.append(item)
            table[m.group(1)] = {re.search(r"`(\w+)`", i).group(1) for i in items}
    return table


def test_design_layout_table_lists_every_module():
    table = layout_table()
    assert set(table) == set(SUBPACKAGES), "docs/design.md §7: the sub-packages differ from prelora_ds/'s"
    bad = []
    for package, listed in table.items():
        modules = {p.stem for p in (PACKAGE / package).glob("*.py")} - {"__init__", "__main__"}
        if listed != modules:
            bad.append(f"`{package}/`: lists {sorted(listed - modules)}, which do not exist; misses "
                       f"{sorted(modules - listed)}")
    assert not bad, "docs/design.md §7, the layout table:\n" + "\n".join(bad)
