"""Mutation testing for fastcount: does the suite fail when the code is wrong?

Our tests start real servers (`python -m fastcount` in subprocesses), so a mutation must be on disk: the repository is
copied once to a scratch directory, and each mutant is one AST-level change written into that copy, run against a
chosen subset of tests (`pytest -x`, with a timeout), then undone. A mutant is *killed* when the tests fail (or time
out), *survived* when they pass. Mutation operators: comparison flips (< <=, == !=, in / not in, is / is not), + and -
swaps (also in +=), other arithmetic and shift swaps, integer constants +1 / 0<->1, True<->False, `and`<->`or`,
a removed `not`, a negated `if`/`while` condition, removed statements (calls, assignments, augmented assignments),
and `return x` -> `return None`. Logging calls, docstrings and type annotations are not mutated.

    .venv/bin/python tools/mutate.py --module fastcount/store/journal.py --tests tests/test_journal.py
    .venv/bin/python tools/mutate.py --preset all --sample 25 --seed 1 --jobs 2
    .venv/bin/python tools/mutate.py --patch tools/bugs/copy_overwrites.diff --tests tests/test_copy_path.py

`--patch` applies one hand-written bug (a diff) instead and says whether the tests catch it. Not part of `./dev test`:
it runs the tests once per mutant.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", ".fastcount", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}

# Which tests guard which module: the ones that exercise it, fast enough to run once per mutant.
PRESETS: dict[str, list[str]] = {
    "fastcount/store/flusher.py": [
        "tests/test_flusher.py",
        "tests/test_ledger.py",
        "tests/test_copy_path.py",
        "tests/test_recovery_identity.py",
        "tests/test_poisoned_counter.py",
        "tests/test_backpressure.py",
        "tests/test_durability.py",
    ],
    "fastcount/features/increment.py": [
        "tests/test_validation.py",
        "tests/test_pending_counts.py",
        "tests/test_journal.py",
        "tests/test_copy_path.py",
        "tests/test_counting_edges.py",
        "tests/test_flusher.py",
        "tests/test_increment.py",
        "tests/test_http.py",
        "tests/test_backpressure.py",
    ],
    "fastcount/store/journal.py": [
        "tests/test_journal.py",
        "tests/test_recovery_identity.py",
        "tests/test_backpressure.py",
        "tests/test_durability.py::test_sigkill_of_a_worker_loses_nothing_it_answered",
    ],
    "fastcount/server/protocol.py": [
        "tests/test_protocol.py",
        "tests/test_protocol_accounting.py",
        "tests/test_protocol_properties.py",
        "tests/test_http_limits.py",
        "tests/test_http.py",
    ],
}

OPPOSITE_COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
OTHER_BINOP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # position in the module's list of mutants (stable for one version of the source)
    line: int
    description: str


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, timeout
    seconds: float
    detail: str = ""


# -- finding mutants ------------------------------------------------------------------------------------------------

Edit = Callable[[ast.AST], None]


def _is_log_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LOG_METHODS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "log"
    )


def _unmutable(tree: ast.Module) -> set[int]:
    """ids of nodes inside log calls, annotations and docstrings: changing them cannot change a count."""
    skip: set[int] = set()

    def cover(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(inner) for inner in ast.walk(node))

    for node in ast.walk(tree):
        if _is_log_call(node) or (isinstance(node, ast.Expr) and _is_log_call(node.value)):
            cover(node)  # a log call, and the statement that is only that call
        elif isinstance(node, ast.AnnAssign | ast.arg):
            cover(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            cover(node.returns)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                cover(first)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            cover(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__slots__" for target in node.targets
        ):
            cover(node)
    return skip


def _edits(node: ast.AST) -> Iterator[tuple[str, Edit]]:
    """Every mutation of one node, as (description, an edit to apply to that node in a fresh copy of the tree)."""
    if isinstance(node, ast.Compare):
        for position, op in enumerate(node.ops):
            other = OPPOSITE_COMPARE.get(type(op))
            if other is not None:

                def flip(target: ast.AST, position: int = position, other: type[ast.cmpop] = other) -> None:
                    target.ops[position] = other()  # type: ignore[attr-defined]

                yield f"{type(op).__name__} -> {other.__name__}", flip
    elif isinstance(node, ast.BinOp | ast.AugAssign):
        other_op = OTHER_BINOP.get(type(node.op))
        if other_op is not None:

            def swap(target: ast.AST, other_op: type[ast.operator] = other_op) -> None:
                target.op = other_op()  # type: ignore[attr-defined]

            kind = "augmented " if isinstance(node, ast.AugAssign) else ""
            yield f"{kind}{type(node.op).__name__} -> {other_op.__name__}", swap
    elif isinstance(node, ast.BoolOp):
        other_bool: type[ast.boolop] = ast.Or if isinstance(node.op, ast.And) else ast.And

        def swap_bool(target: ast.AST, other_bool: type[ast.boolop] = other_bool) -> None:
            target.op = other_bool()  # type: ignore[attr-defined]

        yield f"{type(node.op).__name__} -> {other_bool.__name__}", swap_bool
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "remove not", lambda target: setattr(target, "_fastcount_drop_not", True)
    elif isinstance(node, ast.Constant):
        value = node.value
        replacement: object = None
        if isinstance(value, bool):
            replacement = not value
        elif isinstance(value, int):
            replacement = {0: 1, 1: 0}.get(value, value + 1)
        if replacement is not None:

            def replace(target: ast.AST, replacement: object = replacement) -> None:
                target.value = replacement  # type: ignore[attr-defined]

            yield f"{value!r} -> {replacement!r}", replace
    if isinstance(node, ast.If | ast.While):

        def negate(target: ast.AST) -> None:
            target.test = ast.UnaryOp(op=ast.Not(), operand=target.test)  # type: ignore[attr-defined]

        yield f"negate {type(node).__name__.lower()} condition", negate
    if isinstance(node, ast.Return) and node.value is not None:
        is_none = isinstance(node.value, ast.Constant) and node.value.value is None
        if not is_none:
            yield "return None", lambda target: setattr(target, "value", ast.Constant(None))
    if isinstance(node, ast.Expr | ast.Assign | ast.AugAssign) and not (
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    ):
        yield "remove statement", lambda target: setattr(target, "_fastcount_remove", True)


class _Apply(ast.NodeTransformer):
    """Carries out the edits that replace a node: a removed `not`, a removed statement."""

    def visit(self, node: ast.AST) -> ast.AST:
        result: ast.AST = super().visit(node)
        if isinstance(result, ast.UnaryOp) and getattr(result, "_fastcount_drop_not", False):
            return result.operand
        if getattr(result, "_fastcount_remove", False):
            return ast.Pass()
        return result


def find_mutants(module: str, source: str) -> list[tuple[Mutant, int, Edit]]:
    """(mutant, index of its node in ast.walk order, the edit) for every mutation of the module."""
    tree = ast.parse(source)
    skip = _unmutable(tree)
    found: list[tuple[Mutant, int, Edit]] = []
    for node_index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for description, edit in _edits(node):
            line = getattr(node, "lineno", 0)
            found.append((Mutant(module, len(found), line, description), node_index, edit))
    return found


def mutated_source(source: str, node_index: int, edit: Edit) -> str:
    tree = ast.parse(source)
    node = list(ast.walk(tree))[node_index]
    edit(node)
    mutated = _Apply().visit(tree)
    ast.fix_missing_locations(mutated)
    return ast.unparse(mutated) + "\n"


# -- running tests --------------------------------------------------------------------------------------------------


def copy_repository(destination: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        return {name for name in names if name in SKIP_DIRS or name.endswith(".pyc")}

    shutil.copytree(ROOT, destination, ignore=ignore, dirs_exist_ok=True)


def run_tests(workdir: Path, tests: list[str], timeout: float, extra: list[str]) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'timeout', seconds, last lines of output). The copy's fastcount comes first on the
    path (PYTHONPATH), before the editable install of the real checkout."""
    scratch_tmp = workdir / ".tmp"  # the run's temporary files, the session's PostgreSQL among them
    scratch_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(scratch_tmp)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests]
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the session we started: pytest and the servers it started
        process.communicate()
        return "timeout", time.monotonic() - started, ""
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # servers a failed test left behind
        except ProcessLookupError:
            pass
        stop_postgres_left_in(scratch_tmp)
    tail = "\n".join(output.decode(errors="replace").strip().splitlines()[-3:])
    return ("survived" if process.returncode == 0 else "killed"), time.monotonic() - started, tail


def stop_postgres_left_in(directory: Path) -> None:
    """A killed run cannot stop its embedded PostgreSQL (a daemon in a session of its own): stop each cluster whose
    data directory is under `directory` (this run's own TMPDIR) by its postmaster's pid, then remove the files."""
    for pid_file in directory.rglob("postmaster.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        except (OSError, ValueError, IndexError):
            continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    for leftover in directory.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def check_imports_from(workdir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    where = subprocess.run(
        [sys.executable, "-c", "import fastcount; print(fastcount.__file__)"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not where.startswith(str(workdir)):
        raise SystemExit(f"the scratch copy's fastcount is not the one imported ({where}); cannot mutate")


# -- modes ----------------------------------------------------------------------------------------------------------


def run_patch(patch: Path, tests: list[str], timeout: float, extra: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="fastcount-bug-") as scratch:
        workdir = Path(scratch)
        copy_repository(workdir)
        check_imports_from(workdir)
        subprocess.run(["patch", "-p1", "--quiet", "-i", str(patch.resolve())], cwd=workdir, check=True)
        status, seconds, tail = run_tests(workdir, tests, timeout, extra)
    caught = status != "survived"
    print(f"{patch.name}: {'caught' if caught else 'NOT CAUGHT'} ({status}, {seconds:.0f}s)\n{tail}")
    return 0 if caught else 1


class MutantRunner:
    """Runs one module's mutants, each in a scratch copy nobody else is using at the time."""

    def __init__(
        self, module: str, source: str, tests: list[str], timeout: float, extra: list[str], copies: list[Path]
    ) -> None:
        self.module = module
        self.source = source
        self.tests = tests
        self.timeout = timeout
        self.extra = extra
        self.free = list(copies)
        self.lock = threading.Lock()

    def one(self, entry: tuple[Mutant, int, Edit]) -> Outcome:
        mutant, node_index, edit = entry
        with self.lock:
            workdir = self.free.pop()
        target = workdir / self.module
        try:
            target.write_text(mutated_source(self.source, node_index, edit))
            status, seconds, tail = run_tests(workdir, self.tests, self.timeout, self.extra)
        finally:
            target.write_text(self.source)
            with self.lock:
                self.free.append(workdir)
        mark = "S" if status == "survived" else "."
        print(f"  {mark} {self.module}:{mutant.line} #{mutant.index} {mutant.description}: {status}", flush=True)
        return Outcome(mutant, status, seconds, tail)


def run_mutants(args: argparse.Namespace) -> int:
    modules: list[str] = list(PRESETS) if args.preset == "all" else args.module
    results: list[Outcome] = []
    report: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="fastcount-mutants-") as scratch:
        base = Path(scratch)
        copies = [base / f"copy{slot}" for slot in range(args.jobs)]
        for workdir in copies:
            copy_repository(workdir)
        check_imports_from(copies[0])
        for module in modules:
            tests = args.tests or PRESETS.get(module)
            if not tests:
                raise SystemExit(f"no tests given for {module} (use --tests)")
            source = (ROOT / module).read_text()
            mutants = find_mutants(module, source)
            chosen = mutants
            if args.index:
                chosen = [entry for entry in mutants if entry[0].index in args.index]
            elif args.sample and args.sample < len(mutants):
                chosen = sorted(random.Random(f"{args.seed}:{module}").sample(mutants, args.sample), key=lambda m: m[1])
            if args.list:
                for mutant, _, _ in chosen:
                    print(f"{module}:{mutant.line} #{mutant.index} {mutant.description}")
                continue
            status, seconds, tail = run_tests(copies[0], tests, args.timeout or 1800.0, args.pytest_args)
            if status != "survived":
                raise SystemExit(f"the tests fail without any mutation ({module}):\n{tail}")
            timeout = args.timeout or max(60.0, 3 * seconds)  # a mutant that hangs the tests counts as killed
            print(f"{module}: {len(chosen)} of {len(mutants)} mutants, tests take {seconds:.0f}s unmutated", flush=True)
            run = MutantRunner(module, source, tests, timeout, args.pytest_args, copies)
            with ThreadPoolExecutor(args.jobs) as pool:
                outcomes = list(pool.map(run.one, chosen))
            results += outcomes
            killed = sum(outcome.status != "survived" for outcome in outcomes)
            report[module] = {
                "mutants": len(mutants),
                "run": len(outcomes),
                "killed": killed,
                "survived": [
                    f"line {o.mutant.line} #{o.mutant.index}: {o.mutant.description}"
                    for o in outcomes
                    if o.status == "survived"
                ],
            }
    if args.list:
        return 0
    print("\nmodule                              killed / run  (of all)")
    for module, entry in report.items():
        print(f"{module:36} {entry['killed']:>4} / {entry['run']:<4} ({entry['mutants']})")
        for survivor in entry["survived"]:  # type: ignore[attr-defined]
            print(f"    survived: {survivor}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", default=[], help="source file to mutate (repeatable)")
    parser.add_argument("--preset", choices=["all"], help="every module of PRESETS with its tests")
    parser.add_argument("--tests", nargs="+", help="tests to run per mutant (default: the module's preset)")
    parser.add_argument("--sample", type=int, default=0, help="run this many mutants per module, chosen at random")
    parser.add_argument("--seed", default="0", help="seed of the sample")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="seconds per test run, past which a mutant counts as killed "
        "(default: 3 times the unmutated run, at least 60)",
    )
    parser.add_argument("--index", type=int, action="append", default=[], help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the (sampled) mutants, run nothing")
    parser.add_argument("--json", help="write the per-module report here")
    parser.add_argument("--patch", type=Path, help="apply this diff instead and report whether the tests catch it")
    parser.add_argument("--pytest-args", nargs="*", default=[], help="more pytest arguments")
    args = parser.parse_args(argv)
    if args.patch:
        if not args.tests:
            parser.error("--patch needs --tests")
        return run_patch(args.patch, args.tests, args.timeout or 600.0, args.pytest_args)
    if not args.module and not args.preset:
        parser.error("give --module or --preset all")
    return run_mutants(args)


if __name__ == "__main__":
    sys.exit(main())
