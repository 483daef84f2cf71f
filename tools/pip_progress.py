"""`make`'s install step: `pip install -v ARGS` behind a progress bar.

The long part of a first install is llama-cpp-python compiling llama.cpp (minutes on a laptop), and
pip shows nothing but a spinner meanwhile. With -v it passes on the build's own progress (ninja's
`[12/345]`, make's `[ 42%]`); this turns that into a bar, keeps the rest of the log out of the way,
and prints the last lines of it if the install fails. Runs before the project is installed: it needs
only `rich` (the Makefile installs that first).
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

NINJA = re.compile(r"^\s*\[(\d+)/(\d+)\]")
MAKE = re.compile(r"^\s*\[\s*(\d+)%\]")
WHEEL = re.compile(r"Building wheel for (\S+)")


def step(line: str) -> tuple[int, int] | None:
    """(done, total) if `line` is a build tool's progress line."""
    if m := NINJA.match(line):
        return int(m[1]), int(m[2])
    if m := MAKE.match(line):
        return int(m[1]), 100
    return None


def main(args: list[str]) -> int:
    console = Console(stderr=True)
    proc = subprocess.Popen([sys.executable, "-m", "pip", "install", "-v", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=80)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"pip install {' '.join(args)}", total=None)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            if m := WHEEL.search(line):
                progress.update(task, description=f"building {m[1]} (llama.cpp compiles: minutes)", total=None)
            elif (done := step(line)) is not None:
                progress.update(task, completed=done[0], total=done[1])
            elif line.startswith("Successfully installed"):
                progress.update(task, description="installed", completed=1, total=1)
    code = proc.wait()
    if code != 0:
        console.print("".join(tail), markup=False, highlight=False)
        console.print(f"[red]pip install {' '.join(args)} failed ({code})[/]")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
