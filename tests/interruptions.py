"""Runs interrupted on purpose: between two rounds in process, or by a signal inside a round.

As a script, it runs `icpo-infer` or `icpo-train` with an hf backend that blocks at its first engine
call once a file exists, after printing "blocked": :func:`signalled_run` signals the process there.

usage: python tests/interruptions.py FILE icpo-infer|icpo-train ARGS...
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from icpo_infer.backends.hf import HFBackend
from icpo_infer.results import ChunkState

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"icpo-infer": "icpo_infer.cli", "icpo-train": "icpo_train.cli"}


def interrupt_at_save(monkeypatch, n: int) -> None:
    """The ``n``-th save of a chunk's state is written, then the run is interrupted: between two rounds."""
    save = ChunkState.save
    saves = []

    def save_then_interrupt(self, state):
        save(self, state)
        saves.append(state["round"])
        if len(saves) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(ChunkState, "save", save_then_interrupt)


def signalled_run(
    file: Path, cli: str, args: list[str], signum: signal.Signals
) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, send ``signum`` once it blocks, and return how it ended."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, str(file), cli, *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            lines = [process.stdout.readline()]
            while lines[-1] not in ("blocked\n", ""):
                lines.append(process.stdout.readline())
            if lines[-1]:
                process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines) + stdout, stderr)


def main() -> int:
    file, cli, *args = sys.argv[1:]
    generate = HFBackend.generate

    def blocking_generate(self, *generate_args, **kwargs):
        if Path(file).exists():
            print("blocked", flush=True)
            time.sleep(600)
        return generate(self, *generate_args, **kwargs)

    HFBackend.generate = blocking_generate
    return importlib.import_module(CLIS[cli]).main(args)


if __name__ == "__main__":
    sys.exit(main())
