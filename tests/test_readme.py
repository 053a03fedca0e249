"""Every command of the README, and of the recipes' headers, runs as a newcomer types it.

The README's fenced blocks run in order in one fresh folder: Python blocks in one namespace (as in a
notebook), shell lines as processes, so whatever a later step needs (runs/tiny, the movie LM) is
made by an earlier step of the README itself. Then each recipe's header commands run there too.
What differs from a user's run is the budget only: `BUDGET` appends flags per verb (the last flag
wins) and `PYTHON_BUDGET` shrinks the Python blocks' loops, so each command costs seconds; `SKIPPED`
names the lines that are not run, and why. Servers (`llmkit serve`) are started, answer /health, and
stay up for the client code that follows them.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {
    "make demo": "the main job itself: CI runs it, and this test runs its `llmkit speedrun` with a small budget",
    "make test": "this suite",
    "make llamacpp": "installed by CI before the tests",
}
BUDGET = {  # appended to a command that runs this verb
    "speedrun": ["--budget-minutes", "0.35", "--max-docs-per-source", "200", "--vocab-size", "512", "--context", "32",
                 "--batch-size", "2", "--compile", "false", "--reserve-minutes", "0.1", "--eval-every", "0",
                 "--eval-batches", "2", "--sample-tokens", "8", "--warmup-steps", "2"],
    "pretrain": ["--max-steps", "2", "--eval-every", "0", "--eval-batches", "2", "--save-every", "0",
                 "--batch-size", "2"],
    "finetune": ["--max-steps", "2", "--max-examples", "8", "--max-val-examples", "4", "--batch-size", "4", "--max-len", "48",
                 "--eval-every", "0", "--warmup-steps", "0"],
    "reward": ["--max-steps", "2", "--train-pairs", "16", "--eval-pairs", "8", "--eval-every", "0"],
    "dpo": ["--max-steps", "2", "--train-pairs", "16", "--eval-pairs", "8", "--eval-every", "0"],
    "ppo": ["--iterations", "1", "--rollout-size", "4", "--mini-batch", "2", "--ppo-epochs", "1",
            "--response-tokens", "4", "--eval-prompts", "4"],
    "distill": ["--max-steps", "2", "--eval-every", "0", "--eval-batches", "2", "--batch-size", "2"],
    "eval": ["--limit", "2"],
    "llmkit.eval.lm_eval": ["--limit", "2"],
    "generate": ["-n", "8"],
    "chat": ["-n", "8"],
    "tokenizer": ["--vocab-size", "512"],
    "prepare": ["--max-docs-per-source", "400"],
    "sweep": ["--sizes", "1x32", "--sizes", "1x64", "--tokens", "4096", "--tokens", "8192", "--tokens", "16384",
              "--vocab-size", "512", "--eval-batches", "2", "--batch-size", "4", "--context", "32", "--warmup-steps", "1"],
    "embed": [],
    "serve": ["--compile", "false"],  # compiling the decode step costs a minute or more per server on a cold cache
}
PYTHON_BUDGET = {"limit=100": "limit=4", '"The cat sat on the mat. " * 200': '"The cat sat on the mat. " * 40'}
STDIN = {"chat": "Hi!\n"}  # a terminal chat ends at end of input
SFT_ROWS = "\n".join('{"instruction": "Say hi.", "output": "Hi!"}' for _ in range(24)) + "\n"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w+)\n(.*?)^```", text, re.M | re.S)


def shell_commands(code: str) -> list[list[str]]:
    return [argv for line in code.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def recipe_commands(recipe: Path) -> list[list[str]]:
    """The commands a recipe's header comment shows: `#   llmkit ...` lines, and `llmkit ... recipes/<this
    file>` in backticks (other backticked names are prose)."""
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    lines = re.findall(r"^#\s{2,}((?:llmkit|torchrun|python) .*)$", header, re.M)
    quoted = [c for c in re.findall(r"`((?:llmkit|torchrun) [^`]+)`", header) if f"recipes/{recipe.name}" in c]
    return [shlex.split(c, comments=True) for c in [*lines, *quoted]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """A fresh folder with the repository's recipes/ and tests/data, running commands as a user would."""

    def __init__(self, folder: Path):
        self.folder, self.servers, self.done, self.seconds = folder, {}, [], {}
        (folder / "recipes").symlink_to(ROOT / "recipes")
        (folder / "tests").symlink_to(ROOT / "tests")
        (folder / "my.jsonl").write_text(SFT_ROWS)  # the README's "your data"
        (folder / "texts.txt").write_text("A sentence.\nAnother one.\n")
        self.ports = {"8000": str(free_port()), "8080": str(free_port())}

    def localize(self, text: str) -> str:
        for port, free in self.ports.items():
            text = text.replace(port, free)
        return text

    def run(self, argv: list[str]) -> None:
        line = " ".join(argv)
        if line in SKIPPED:
            return
        program = {"llmkit": [sys.executable, "-m", "llmkit"], "python": [sys.executable],
                   "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[argv[0]]
        verb = next((w for w in argv[1:] if w in BUDGET), None)
        command = [*program, *argv[1:], *BUDGET.get(verb, [])]
        if "serve" in argv[1:2]:
            return self.serve(command, line)
        started = time.perf_counter()
        out = subprocess.run(command, cwd=self.folder, input=STDIN.get(verb, ""), capture_output=True, text=True,
                             timeout=900)
        self.seconds[line] = time.perf_counter() - started
        assert out.returncode == 0, f"`{line}` exited with {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        self.done.append(line)

    def serve(self, command: list[str], line: str) -> None:
        port = command[command.index("--port") + 1] if "--port" in command else self.ports["8000"]
        if "--port" not in command:
            command += ["--port", port]
        if port in self.servers:
            self.stop(port)
        log = open(self.folder / f"serve-{port}.log", "w")
        proc = subprocess.Popen(command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        self.servers[port] = proc
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, \
                    f"`{line}` did not come up:\n{(self.folder / f'serve-{port}.log').read_text()[-3000:]}"
                time.sleep(0.5)
        self.done.append(line)

    def stop(self, port: str) -> None:
        proc = self.servers.pop(port)
        proc.terminate()
        proc.wait(30)

    def close(self) -> None:
        for port in list(self.servers):
            self.stop(port)


@pytest.mark.slow
def test_every_readme_and_recipe_command_runs(tmp_path, monkeypatch):
    """...and every file they write gets the umask's permissions (0640 under umask 027: a server running as
    another user of the group can read a checkpoint), not mkstemp's 0600."""
    umask = os.umask(0o027)
    ws = Workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        for number, (language, code) in enumerate(fenced_blocks(ws.localize((ROOT / "README.md").read_text()))):
            if language == "bash":
                for argv in shell_commands(code):
                    ws.run(argv)
            elif language == "python":
                for old, new in PYTHON_BUDGET.items():
                    code = code.replace(old, new)
                exec(compile(code, f"README.md, block {number}", "exec"), namespace)  # noqa: S102
            else:
                raise AssertionError(f"README.md block {number} is ```{language}: expected bash or python")
        readme = set(ws.done)
        for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
            commands = recipe_commands(recipe)
            assert commands, f"{recipe.name} shows no command in its header"
            for argv in commands:
                if " ".join(argv) not in readme:
                    ws.run(argv)
    finally:
        ws.close()
        os.umask(umask)
        for line, seconds in sorted(ws.seconds.items(), key=lambda x: -x[1])[:25]:  # shown with -s or on failure
            print(f"{seconds:6.1f} s  {line}")
    assert len(ws.done) >= 40, ws.done
    written = [p for p in tmp_path.rglob("*") if not p.is_symlink()]  # recipes/ and tests/ are links
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in written
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)}
    assert not modes and len(written) > 200, modes
