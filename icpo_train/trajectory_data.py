"""The reflection-trajectory dataset: its columns, how it is loaded and checked, and how a row is prompted.

One row is one (question, round t) example, written by ``icpo-train build-trajectories`` and read by
the trainer:

- ``question_id``, ``question``, ``answer`` (gold), ``answer_type``, ``round`` (1-based);
- ``history``: the attempts shown before round t, each ``{text, answer, reward}`` (empty in round 1);
- the group, one entry per member j, sampled from pi_ref with an EMPTY history: ``responses``,
  ``ref_logps`` (sum of log pi_ref over the response's tokens, EOS included, as ``Backend.score``
  returns it), ``ref_num_tokens``, ``response_answers``, ``gold_rewards`` and ``icl_rewards``
  (R_t(y_j) = sum over history entries s of (2 r_s - 1) [answer(y_j) equivalent to answer(s)]);
- ``tokenizer_fingerprint``: :func:`tokenizer_fingerprint` of the tokenizer that scored the group.

Optional, for the token-level loss without a live teacher (written by
:func:`icpo_train.scoring.add_teacher_topk`): per member and completion token, the teacher's top-k
token ids ``teacher_topk_ids`` and logits ``teacher_topk_logits``, and its full-vocabulary
``teacher_logsumexp`` (which turns the rest of the vocabulary into one tail bucket).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from icpo_infer.config import ConfigError, check
from icpo_infer.prompts import Attempt, PromptTemplates, render_prompt
from icpo_infer.results import TRAJECTORIES_CONFIG_FILE

GROUP_COLUMNS = (
    "responses",
    "ref_logps",
    "ref_num_tokens",
    "response_answers",
    "gold_rewards",
    "icl_rewards",
)
REQUIRED_COLUMNS = (
    "question_id",
    "question",
    "answer",
    "answer_type",
    "round",
    "history",
    *GROUP_COLUMNS,
    "tokenizer_fingerprint",
)
TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logits", "teacher_logsumexp")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of what decides prompt and response tokens: vocabulary, special tokens, chat template.

    Two tokenizers with the same fingerprint turn the same rendered text into the same ids, so
    log-probabilities scored with one are valid targets for a model using the other.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
        "special_tokens": sorted(
            (index, token.content, token.special) for index, token in tokenizer.added_tokens_decoder.items()
        ),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
    }
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def load_trajectories(path: str | Path) -> Dataset:
    """A trajectory dataset saved with ``save_to_disk``, or a Parquet file (or directory of them)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return load_from_disk(str(path))
    parquet = sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.suffix == ".parquet" else []
    check(
        bool(parquet) and all(p.is_file() for p in parquet),
        f"--trajectories: '{path}' is neither a dataset saved with save_to_disk nor Parquet; "
        "build one with `icpo-train build-trajectories --output DIR` and pass DIR.",
    )
    return Dataset.from_parquet([str(p) for p in parquet])


def training_templates(trajectories: str | Path, templates: str | None) -> PromptTemplates | None:
    """The prompt templates to train with: ``templates``, which must be the ones the trajectories were
    built with when their directory records them; without ``templates``, the recorded ones."""
    config_file = Path(trajectories) / TRAJECTORIES_CONFIG_FILE
    if not config_file.is_file():  # Parquet from elsewhere: the caller's word
        return PromptTemplates.from_yaml(templates) if templates else None
    recorded = json.loads(config_file.read_text()).get("templates")
    if recorded is not None and not Path(recorded).is_file():  # moved: the caller's word
        check(
            templates is not None,
            f"templates: the trajectories were built with the templates '{recorded}', which is not there "
            "from here; pass that file with --templates.",
        )
        return PromptTemplates.from_yaml(templates)
    if templates is None and recorded is not None:
        print(f"icpo-train: prompts from the templates the trajectories were built with, '{recorded}'")
        return PromptTemplates.from_yaml(recorded)
    loaded = PromptTemplates.from_yaml(templates) if templates else None
    check(
        (loaded or PromptTemplates())
        == (PromptTemplates.from_yaml(recorded) if recorded else PromptTemplates()),
        f"templates '{templates}' differ from those the trajectories were built with "
        f"({f'{recorded!r}' if recorded else 'the default prompts'}): the model would train on other prompts "
        "than the groups were scored under. Pass the trajectories' templates, or rebuild the trajectories.",
    )
    return loaded


def validate_trajectories(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> None:
    """Reject a dataset that lacks a column or was scored with a tokenizer other than ``tokenizer``'s."""
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    check(
        not missing,
        f"--trajectories: the dataset lacks the column(s) {', '.join(missing)} (required: "
        f"{', '.join(REQUIRED_COLUMNS)}); rebuild it with `icpo-train build-trajectories`.",
    )
    check(len(dataset) > 0, "--trajectories: the dataset has no rows; build trajectories for some questions.")
    teacher = [column for column in TEACHER_COLUMNS[:2] if column in dataset.column_names]
    check(
        len(teacher) in (0, 2),
        f"--trajectories: teacher column {teacher} without its partner; "
        "teacher_topk_ids and teacher_topk_logits come together.",
    )
    expected = tokenizer_fingerprint(tokenizer)
    found = sorted(set(dataset.unique("tokenizer_fingerprint")))
    if found != [expected]:
        raise ConfigError(
            f"--trajectories: tokenizer_fingerprint {', '.join(found)} differs from {expected}, the "
            "fingerprint of the model being trained: the trajectories were scored with another tokenizer "
            "or chat template, so their ref_logps do not score this model's tokens. Rebuild them with "
            "this model (`icpo-train build-trajectories --model ...`) or train the model that built them."
        )


def trajectory_prompt(
    row: dict, tokenizer: PreTrainedTokenizerBase, templates: PromptTemplates | None = None
) -> str:
    """The prompt of round t, rendered exactly as ``icpo-infer`` renders it from the same history."""
    history = [Attempt(entry["text"], entry["answer"], int(entry["reward"])) for entry in row["history"]]
    return render_prompt(tokenizer, row["question"], history, row["answer_type"], templates)
