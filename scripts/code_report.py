"""Size figures for the Python packages, to compare a change's before and after.

``python scripts/code_report.py`` reports on the working tree; ``--rev REV`` on a commit (its packages are
extracted with ``git archive`` into a temporary folder, the checkout is not touched). For each of
ai_service, gateway, db and library (tests are not counted): files, lines, functions, and every function
or method longer than ``--over`` lines (default 50) with file:line and length, longest first.
``--duplicates`` also counts the pairs the ``duplicates`` command finds in those packages.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("ai_service", "gateway", "db", "library")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class LongFunction:
    path: str
    line: int
    name: str
    length: int


def _functions(tree: ast.AST) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its dotted name (Class.method, outer.inner)."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((prefix + child.name, child))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def report(root: Path, over: int) -> tuple[dict[str, tuple[int, int, int]], list[LongFunction]]:
    """Per package (files, lines, functions), and the functions longer than ``over`` lines."""
    totals: dict[str, tuple[int, int, int]] = {}
    long: list[LongFunction] = []
    for package in PACKAGES:
        files = lines = functions = 0
        for path in sorted((root / package).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            files += 1
            lines += len(source.splitlines())
            found = _functions(ast.parse(source, filename=str(path)))
            functions += len(found)
            for name, node in found:
                length = (node.end_lineno or node.lineno) - node.lineno + 1  # from `def` to its last line
                if length > over:
                    long.append(LongFunction(str(path.relative_to(root)), node.lineno, name, length))
        totals[package] = (files, lines, functions)
    long.sort(key=lambda f: (-f.length, f.path, f.line))
    return totals, long


def extract(rev: str, into: Path) -> None:
    """The packages as they are at ``rev`` (only those that exist there)."""
    present = [p for p in PACKAGES if _git("ls-tree", "--name-only", rev, p).strip()]
    archive = subprocess.run(["git", "archive", rev, *present], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def copy_working_tree(into: Path) -> None:
    """The packages' tracked and untracked-but-not-ignored files, as the working tree has them."""
    listed = _git("ls-files", "--cached", "--others", "--exclude-standard", "--", *PACKAGES).splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)


def duplicate_pairs(root: Path) -> str:
    """The first line of ``duplicates`` run on the packages: how many pairs it found, in how many files."""
    result = subprocess.run(
        ["duplicates", "--repo", str(root), "--most", "1", "--seconds", "120"], capture_output=True, text=True
    )
    return (result.stdout.splitlines() or [result.stderr.strip() or "no output"])[0]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="report on this commit instead of the working tree")
    parser.add_argument("--over", type=int, default=50, help="list functions longer than this many lines")
    parser.add_argument("--duplicates", action="store_true", help="also count `duplicates` pairs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="code-report-") as tmp:
        tree = Path(tmp)
        # Both sides are read from a plain folder, so `duplicates` sees the same kind of tree before and after.
        if args.rev:
            extract(args.rev, tree)
        else:
            copy_working_tree(tree)
        totals, long = report(tree, args.over)
        pairs = duplicate_pairs(tree) if args.duplicates else None
    label = args.rev or "working tree"
    print(f"code report: {label} ({', '.join(PACKAGES)}; tests not counted)")
    for package, (files, lines, functions) in totals.items():
        print(f"  {package:<11} {files:4d} files {lines:7d} lines {functions:5d} functions")
    files, lines, functions = (sum(t[i] for t in totals.values()) for i in range(3))
    print(f"  {'total':<11} {files:4d} files {lines:7d} lines {functions:5d} functions")
    print(f"functions over {args.over} lines: {len(long)}")
    for f in long:
        print(f"  {f.length:4d}  {f.path}:{f.line}  {f.name}")
    if pairs is not None:
        print("duplicates:", re.sub(r"\s+", " ", pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
