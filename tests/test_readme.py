"""Every CPU command the README shows runs as written, in its order, with tiny stand-ins.

The stand-ins: the tiny test model for each Hub model, the benchmark files of ../shared/data for the
benchmark names (the Hub is out of reach), a temporary folder for runs/, the transformers backend for
vLLM (its commands are the same; tests/test_vllm_workflows.py runs them on the engine), and a few
flags appended for size (one question, two samples, eight new tokens, one training step). A command
that changes here, a flag that is renamed or a recipe that moves makes this test fail.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from conftest import benchmark_file
from script_modules import load_script

from icpo_infer.cli import main as icpo_infer_main
from icpo_train.cli import main as icpo_train_main

ROOT = Path(__file__).resolve().parents[1]
# Commands outside this test: installs and the suite itself (make, pip, pytest), and the SmolLM2 model
# directory and its study (tests/test_smollm2.py and tests/test_pipeline.py run them).
NOT_HERE = ("make ", "pip ", "python -m pytest", "python -m icpo_train.e2e.smollm2", "icpo-train pipeline")
SMALL = ["--limit", "1", "--k", "2", "--entropy-k", "2", "--final-k", "2", "--max-new-tokens", "8"]
SMALL += ["--summary-max-tokens", "8", "--backend", "hf", "--device", "cpu"]


def readme_commands() -> list[str]:
    """The README's shell commands: indented code lines, comments dropped, continuations joined."""
    commands, pending = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("    "):
            pending = None
            continue
        text = re.sub(r"\s#.*$", "", line).strip()
        text = f"{pending} {text}" if pending is not None else text
        pending = text[:-1].strip() if text.endswith("\\") else None
        if pending is None:
            commands.append(text)
    return [c for c in commands if re.match(r"(icpo-|python |accelerate |make |pip )", c)]


def test_the_readme_shows_the_commands_this_test_runs():
    runs = [c for c in readme_commands() if not c.startswith(NOT_HERE)]
    programs = [" ".join(shlex.split(c)[:2]) for c in runs]
    assert programs == [
        "icpo-infer run",
        "icpo-infer show",
        "icpo-infer compare",
        "icpo-infer compare",
        "python scripts/reproduce.py",
        "icpo-train build-trajectories",
        "accelerate launch",
        "python scripts/eval_checkpoints.py",
        "python scripts/publish_adapter.py",
    ]


def stand_ins(command: str, model: Path, runs: Path) -> list[str]:
    words = shlex.split(command)
    replaced = []
    for word in words:
        if word.startswith("Qwen/"):
            word = str(model)
        elif word in ("aime24", "amc"):
            word = str(benchmark_file({"aime24": "aime2024", "amc": "amc"}[word]))
        elif word == "vllm" and replaced[-1] == "--backend":
            word = "hf"
        elif word.startswith("runs/"):
            word = str(runs / word.removeprefix("runs/")).replace("checkpoint-500", "checkpoint-1")
        replaced.append(word)
    return replaced


def test_every_cpu_command_of_the_readme_runs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the commands name recipes relative to the checkout
    runs = tmp_path / "runs"
    commands = [stand_ins(c, tiny_model_dir, runs) for c in readme_commands() if not c.startswith(NOT_HERE)]
    scripts = {name: load_script(name) for name in ("reproduce", "eval_checkpoints", "publish_adapter")}
    for words in commands:
        program, args = " ".join(words[:2]), words[2:]
        if program == "icpo-infer run":
            code = icpo_infer_main([words[1], *args, *SMALL])
            # `compare` below reads a trained model's run: the same evaluation stands in for it.
            other = [runs / "icpo" / "me-icpo" if a == str(runs / "base" / "me-icpo") else a for a in args]
            assert icpo_infer_main(["run", *map(str, other), *SMALL]) == 0
        elif program.startswith("icpo-infer"):
            code = icpo_infer_main(words[1:])
        elif program == "python scripts/reproduce.py":
            recipe = ["--model", str(tiny_model_dir), "--dataset", str(benchmark_file("aime2024"))]
            code = scripts["reproduce"].main([*args, *recipe, *SMALL])
        elif program == "icpo-train build-trajectories":
            loop = [a for i, a in enumerate(SMALL) if "--final-k" not in SMALL[max(i - 1, 0) : i + 1]]
            code = icpo_train_main([*words[1:], *loop, "--group-size", "2"])  # no final samples there
        elif program == "accelerate launch":  # the launcher is tested apart (tests/test_lsa_accelerate.py)
            train = args[args.index("train") :]
            small = ["--model_name_or_path", str(tiny_model_dir), "--max_steps", "1", "--save_steps", "1"]
            code = icpo_train_main([*train, *small, "--bf16", "false", "--gradient_checkpointing", "false"])
        elif program == "python scripts/eval_checkpoints.py":
            code = scripts["eval_checkpoints"].main([*args, *SMALL])
        else:  # publish_adapter: the tiny model is no Hub model, so the card names a stand-in for it
            code = scripts["publish_adapter"].main([*args, "--base-model", "icpo-org/tiny-model"])
        assert code == 0, (words, capsys.readouterr().err[-2000:])
    assert "dry run: would create or update the public model repository" in capsys.readouterr().out
