"""Code lines of the library: uniemox_jax/, data_pipelines/ and configs/, without blank lines,
comments or docstrings (what docs/benchmarks.md, "Code lines", counts).

  python benchmarks/code_lines.py                 # the working tree
  python benchmarks/code_lines.py --rev 04e74da   # a commit (read with git show)
  python benchmarks/code_lines.py --per_file      # the largest files first
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import subprocess
import tokenize
from typing import Dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("uniemox_jax", "data_pipelines", "configs")
_NOT_CODE = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENDMARKER)


def code_lines(source: str) -> int:
  """The lines that hold a token of code, docstrings (of modules, classes, functions) left out."""
  docstrings = set()
  for node in ast.walk(ast.parse(source)):
    body = getattr(node, "body", None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
  lines = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type not in _NOT_CODE:
      lines.update(range(token.start[0], token.end[0] + 1))
  return len(lines - docstrings)


def sources(rev: str = "") -> Dict[str, str]:
  """{path: text} of the library's Python files, in the working tree or at `rev`."""
  if not rev:
    return {os.path.relpath(os.path.join(d, f), ROOT): open(os.path.join(d, f)).read()
            for p in PACKAGES for d, _, files in os.walk(os.path.join(ROOT, p))
            for f in files if f.endswith(".py")}
  names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, *PACKAGES], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split()
  return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
          for n in names if n.endswith(".py")}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rev", default="", help="a git revision (default: the working tree)")
  p.add_argument("--per_file", action="store_true", help="also each file's count")
  args = p.parse_args(argv)
  counts = {path: code_lines(text) for path, text in sources(args.rev).items()}
  if args.per_file:
    for path, n in sorted(counts.items(), key=lambda kv: -kv[1]):
      print(f"{n:6d}  {path}")
  print(f"{sum(counts.values())} code lines in {len(counts)} files "
        f"({args.rev or 'working tree'})")


if __name__ == "__main__":
  main()
