"""Publish a trained ICPO LoRA adapter to the Hugging Face Hub, with a model card.

    python scripts/publish_adapter.py --checkpoint runs/qwen-1.5b/checkpoint-500 --repo-id ORG/NAME \\
        [--private] [--recipe recipes/icpo/qwen2.5-math-1.5b.yaml] [--training-data ORG/TRAJECTORIES] \\
        [--base-eval runs/eval/base --adapter-eval runs/eval/checkpoint-500] [--dry-run]

The card (README.md, written into the checkpoint directory) names the base model (from
adapter_config.json), the training settings as the run saved them (icpo_config.json in the run
directory: the recipe with its command-line overrides; else the --recipe file), the training data
(the run's trajectories and how they were built, unless --training-data names them), and, given two
`icpo-infer run` output directories of the same evaluation, tabulates accuracy (mean@k, maj@k, pass@k) and self-improvement
of the base model against the adapter; the adapter's figures also go into the Hub's model-index
metadata. Only the adapter, its tokenizer files and the card are uploaded: never optimizer states,
RNG states or pickled training arguments.

The token comes from huggingface_hub's usual places (the HF_TOKEN environment variable or
`hf auth login`); this script never reads or writes it itself. `--dry-run` touches neither the
network nor the checkpoint: it prints the repository, the commit message, the exact files and the card.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from icpo_infer.backends.base import ADAPTER_CONFIG
from icpo_infer.config import ConfigError, check
from icpo_infer.infer_config import RUN_ONLY_FIELDS
from icpo_infer.report import load_metrics
from icpo_infer.results import TRAINING_CONFIG_FILE, TRAJECTORIES_CONFIG_FILE

CARD_FILE = "README.md"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")
ALLOW_PATTERNS = [
    *ADAPTER_FILES,
    CARD_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
# Fields in which a base-model and an adapter evaluation may differ and still measure the same thing.
EVAL_IDENTITY_FIELDS = frozenset({"adapter", "output_dir"}) | RUN_ONLY_FIELDS
# What the card shows of the run's saved config: the loss, its target and the optimisation.
CARD_TRAINING_FIELDS = (
    "loss_level",
    "loss_type",
    "eta",
    "reward_scale",
    "gt_coef",
    "no_answer_penalty",
    "tail_bucket",
    "tail_reward",
    "fisher_at",
    "anchor_coef",
    "logprob_reduction",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "seed",
)
TABLE_ROWS = (
    ("mean@{k} (final)", "mean@k"),
    ("maj@{k} (final)", "maj@k"),
    ("pass@{k} (final)", "pass@k"),
    ("mean@{k} (round 1)", "round1"),
    ("self-improvement (final - round 1)", "self_improvement"),
)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a Hub repository id rather than a local path."""
    if Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_adapter_config(checkpoint: Path) -> dict[str, Any]:
    for name in ADAPTER_FILES:
        check(
            (checkpoint / name).is_file(),
            f"--checkpoint: '{checkpoint}' has no {name}; pass a directory saved by the ICPO trainer "
            "(e.g. runs/NAME/checkpoint-500) that holds a safetensors LoRA adapter.",
        )
    return json.loads((checkpoint / ADAPTER_CONFIG).read_text())


def resolve_base_model(adapter_config: dict[str, Any], override: str | None) -> str:
    base_model = override or adapter_config.get("base_model_name_or_path") or ""
    check(
        is_hub_id(base_model),
        f"--base-model: the adapter's base model is '{base_model}', which is not a Hub model id; "
        "pass --base-model ORG/NAME, the Hub id of the model it was trained on.",
    )
    return base_model


def load_evaluations(
    base_dir: str | None, adapter_dir: str | None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The two runs' metrics.json, checked to measure the same thing; None when no evaluation is given."""
    check(
        (base_dir is None) == (adapter_dir is None),
        "--base-eval and --adapter-eval come together: pass both `icpo-infer run` output directories or neither.",
    )
    if base_dir is None:
        return None
    base, adapter = load_metrics([base_dir, adapter_dir])
    differ = sorted(
        key
        for key in set(base["config"]) | set(adapter["config"])
        if key not in EVAL_IDENTITY_FIELDS and base["config"].get(key) != adapter["config"].get(key)
    )
    check(
        not differ,
        f"--base-eval and --adapter-eval measure different things (they differ in {', '.join(differ)}); "
        "evaluate both with the same settings, only --adapter differing.",
    )
    check(
        base["num_questions"] == adapter["num_questions"],
        f"--base-eval covers {base['num_questions']} questions and --adapter-eval {adapter['num_questions']}; "
        "let both runs finish on the same questions.",
    )
    return base, adapter


def _metric(metrics: dict[str, Any], key: str) -> float:
    return metrics["mean_per_round"][0] if key == "round1" else metrics[key]


def _dataset_name(config: dict[str, Any]) -> str:
    return config["dataset"] if is_hub_id(config["dataset"]) else Path(config["dataset"]).stem


def evaluation_section(base: dict[str, Any], adapter: dict[str, Any]) -> str:
    """Markdown: what was evaluated, and a base-vs-adapter table in percent."""
    config, k = adapter["config"], adapter["k"]
    rows = [key for key in TABLE_ROWS if key[1] != "round1" or adapter["mean_per_round"]]
    lines = [
        f"`icpo-infer run` with `--method {config['method']} --reward {config['reward']} "
        f"--rounds {config['rounds']}` on {_dataset_name(config)} ({adapter['num_questions']} questions, "
        f"k = {k}, temperature {config['temperature']}, seed {config['seed']}). Accuracy in percent.",
        "",
        "| metric | base model | adapter | difference |",
        "|---|---:|---:|---:|",
    ]
    for title, key in rows:
        before, after = 100 * _metric(base, key), 100 * _metric(adapter, key)
        lines.append(f"| {title.format(k=k)} | {before:.1f} | {after:.1f} | {after - before:+.1f} |")
    return "\n".join(lines)


def eval_results(adapter: dict[str, Any]) -> list[EvalResult]:
    """The adapter's evaluation as model-index entries."""
    config, k = adapter["config"], adapter["k"]
    dataset = _dataset_name(config)
    setting = f"{config['method']}, {config['rounds']} rounds, reward {config['reward']}"
    common = {
        "task_type": "text-generation",
        "task_name": "Mathematical reasoning",
        "dataset_type": dataset,
        "dataset_name": dataset,
        "dataset_split": config.get("split"),
    }
    return [
        EvalResult(
            metric_type="accuracy",
            metric_name=f"mean@{k} ({setting})",
            metric_value=adapter["mean@k"],
            **common,
        ),
        EvalResult(
            metric_type="self_improvement",
            metric_name=f"self-improvement, mean@{k} final - round 1 ({setting})",
            metric_value=adapter["self_improvement"],
            **common,
        ),
    ]


def training_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config the run ran with, as `icpo-train train` saved it (resolved: recipe and command line)
    in the run directory: the checkpoint's parent, or the checkpoint itself for the final adapter."""
    for directory in (checkpoint, checkpoint.parent):
        if (directory / TRAINING_CONFIG_FILE).is_file():
            return json.loads((directory / TRAINING_CONFIG_FILE).read_text())
    return None


def trajectories_summary(trajectories: str) -> str | None:
    """One line on how the trajectories were built (their build_config.json), or None if not recorded."""
    built = Path(trajectories) / TRAJECTORIES_CONFIG_FILE
    if not built.is_file():
        return None
    config = json.loads(built.read_text())
    return (
        f"`icpo-train build-trajectories` with `{config['model']}` on `{config['dataset']}`: "
        f"{config['rounds']} rounds, groups of {config['group_size']} at temperature "
        f"{config['group_temperature']}, histories from {config['selection']} with {config['history_reward']} "
        f"rewards"
    )


def build_card(
    checkpoint: Path,
    repo_id: str,
    base_model: str,
    recipe: Path | None = None,
    training_data: str | None = None,
    evaluations: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> ModelCard:
    """The model card of the adapter in ``checkpoint``."""
    adapter_config = read_adapter_config(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    ran = training_config(checkpoint)
    if training_data is None and ran is not None:
        training_data = ran["trajectories"]
    built = trajectories_summary(training_data) if training_data else None
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["icpo", "lora", "peft", "math", "in-context-learning"],
        datasets=[training_data] if training_data and is_hub_id(training_data) else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(evaluations[1]) if evaluations else None,
    )
    targets = adapter_config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    training = [
        f"- Base model: [{base_model}](https://huggingface.co/{base_model})",
        f"- LoRA: rank {adapter_config.get('r')}, alpha {adapter_config.get('lora_alpha')}, "
        f"dropout {adapter_config.get('lora_dropout')}, target modules {targets}",
        f"- Training data: {training_data or 'not recorded'}" + (f" ({built})" if built else ""),
    ]
    if state.get("global_step") is not None:
        training.append(f"- Steps: {state['global_step']} (checkpoint `{checkpoint.name}`)")
    if ran is not None:
        settings = {key: ran[key] for key in CARD_TRAINING_FIELDS if key in ran}
        training += [
            "",
            f"Training settings, as the run saved them (`{TRAINING_CONFIG_FILE}`: the recipe with its "
            "command-line overrides):",
            "",
            "```yaml",
            yaml.safe_dump(settings, sort_keys=False).strip(),
            "```",
        ]
    elif recipe is not None:
        training += ["", f"Recipe (`{recipe.name}`):", "", "```yaml", recipe.read_text().strip(), "```"]
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"A LoRA adapter for [{base_model}](https://huggingface.co/{base_model}) trained with In-Context "
        "Policy Optimization (ICPO, arXiv 2603.01335): Fisher-weighted logit matching on reflection "
        "trajectories, so that the model improves more from its own earlier attempts, tagged with rewards, "
        "at test time (ME-ICPO).",
        "## Usage",
        "```bash\n"
        f"icpo-infer run --model {base_model} --adapter {repo_id} --method me-icpo "
        "--dataset DATA.jsonl --output-dir runs/eval\n```",
        "## Training",
        "\n".join(training),
        "## Evaluation",
        evaluation_section(*evaluations) if evaluations else "Not evaluated.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def upload_files(checkpoint: Path) -> list[str]:
    """Exactly the files ``upload_folder`` sends with :data:`ALLOW_PATTERNS` (the card included)."""
    present = {path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*") if path.is_file()}
    return sorted(filter_repo_objects(present | {CARD_FILE}, allow_patterns=ALLOW_PATTERNS))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="publish_adapter.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="Directory holding the LoRA adapter.")
    parser.add_argument("--repo-id", required=True, help="Hub repository to create or update: ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--base-model", help="Hub id of the base model (default: from adapter_config.json).")
    parser.add_argument("--recipe", type=Path, help="The training recipe (YAML), shown in the card.")
    parser.add_argument("--training-data", help="Hub id (or description) of the trajectory dataset.")
    parser.add_argument("--base-eval", help="`icpo-infer run` output directory of the base model.")
    parser.add_argument("--adapter-eval", help="`icpo-infer run` output directory of the adapter.")
    parser.add_argument("--commit-message", help="Default: names the checkpoint.")
    parser.add_argument("--dry-run", action="store_true", help="Print what would be uploaded; no network.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check(
            is_hub_id(args.repo_id), f"--repo-id: '{args.repo_id}' is not a Hub repository id; use ORG/NAME."
        )
        check(args.checkpoint.is_dir(), f"--checkpoint: '{args.checkpoint}' is not a directory.")
        check(
            args.recipe is None or args.recipe.is_file(),
            f"--recipe: '{args.recipe}' does not exist; pass the YAML recipe the adapter was trained with.",
        )
        if args.recipe is not None:
            yaml.safe_load(args.recipe.read_text())  # a broken recipe would make an unreadable card
        base_model = resolve_base_model(read_adapter_config(args.checkpoint), args.base_model)
        evaluations = load_evaluations(args.base_eval, args.adapter_eval)
    except (ConfigError, yaml.YAMLError) as err:
        print(f"publish_adapter.py: error: {err}", file=sys.stderr)
        return 2

    card = build_card(args.checkpoint, args.repo_id, base_model, args.recipe, args.training_data, evaluations)
    files = upload_files(args.checkpoint)
    message = args.commit_message or f"Upload ICPO LoRA adapter ({args.checkpoint.name})"
    visibility = "private" if args.private else "public"
    if args.dry_run:
        print(f"dry run: would create or update the {visibility} model repository {args.repo_id}")
        print(f"commit message: {message}")
        print("files:")
        for name in files:
            source = args.checkpoint / name
            size = "generated" if name == CARD_FILE else f"{source.stat().st_size} bytes"
            print(f"  {name} ({size})")
        print(f"\n{CARD_FILE}:\n{card.content}")
        return 0

    card.save(args.checkpoint / CARD_FILE)
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=args.repo_id,
        folder_path=args.checkpoint,
        allow_patterns=ALLOW_PATTERNS,
        commit_message=message,
        repo_type="model",
    )
    print(f"uploaded {len(files)} files to {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
