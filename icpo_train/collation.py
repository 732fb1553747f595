"""Trajectory rows as token ids (:func:`tokenize_trajectories`, which counts what it leaves out in a
:class:`TrajectoryStats`) and as training batches (:class:`TrajectoryCollator`): every group member one
left-padded sequence ``prompt + response``; :func:`group_sequences` reads a batch back into each row's
prompt and responses."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from icpo_infer.backends.base import encode_completion, encode_prompt
from icpo_infer.config import check
from icpo_infer.prompts import PromptTemplates
from icpo_train.trajectory_data import GROUP_COLUMNS, TEACHER_COLUMNS, trajectory_prompt

logger = logging.getLogger(__name__)


def _tokenize_row(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    templates: PromptTemplates | None,
    max_length: int | None,
    teacher_columns: list[str],
    distinct: bool,
) -> dict:
    """Prompt and response token ids of one row, keeping the valid members of its group.

    A member is valid when its ref_logp and rewards are finite and prompt + response fits
    ``max_length``; with ``distinct`` a repeat of an earlier member's tokens is not a member. A response
    that does not encode to ``ref_num_tokens`` tokens means the ref_logps score other tokens than the
    ones trained on: an error, never a silent bias.
    """
    where = f"question_id={row['question_id']} round={row['round']}"
    size = len(row["responses"])
    for column in GROUP_COLUMNS:
        check(
            len(row[column]) == size,
            f"--trajectories: row {where}: '{column}' has {len(row[column])} entries for {size} responses; "
            "rebuild the trajectories.",
        )
    prompt_ids = encode_prompt(tokenizer, trajectory_prompt(row, tokenizer, templates))
    encoded = [encode_completion(tokenizer, response) for response in row["responses"]]
    repeats = Counter(map(tuple, encoded)) if distinct else None
    members, completions, seen = [], [], set()
    for j, ids in enumerate(encoded):
        if distinct:
            if tuple(ids) in seen:
                continue
            seen.add(tuple(ids))
        check(
            len(ids) == row["ref_num_tokens"][j],
            f"--trajectories: row {where}, response {j} encodes to {len(ids)} tokens but ref_num_tokens "
            f"says {row['ref_num_tokens'][j]}: its ref_logp scores other tokens. Rebuild the trajectories.",
        )
        finite = all(math.isfinite(row[c][j]) for c in ("ref_logps", "icl_rewards", "gold_rewards"))
        if finite and (max_length is None or len(prompt_ids) + len(ids) <= max_length):
            members.append(j)
            completions.append(ids)
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completions,
        "num_responses": len(seen) if distinct else size,  # the candidate members
        "num_members": len(members),
        **{
            c: [row[c][j] for j in members]
            for c in ("ref_logps", "icl_rewards", "gold_rewards", *teacher_columns)
        },
        "has_answer": [float(bool(row["response_answers"][j])) for j in members],
        # How many of the group's samples each member stands for (distinct members: its repeats).
        "member_counts": [float(repeats[tuple(encoded[j])]) if repeats else 1.0 for j in members],
    }


@dataclass
class TrajectoryStats:
    rows: int  # rows in the dataset
    skipped_groups: int  # rows left out: fewer than min_members valid members
    skipped_members: int  # members left out of their group (non-finite or too long)
    min_members: int  # 2, or 1 for tail-bucket losses (a member and the tail bucket)


def tokenize_trajectories(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    templates: PromptTemplates | None = None,
    max_length: int | None = None,
    tail_bucket: bool = False,
) -> tuple[Dataset, TrajectoryStats]:
    """Token ids of every row and the valid members of its group; groups under 2 members are dropped
    (with a warning that counts them), and none left is an error.

    ``tail_bucket``: members are the distinct responses, and one member (plus the tail) is a group.
    """
    teacher_columns = [c for c in TEACHER_COLUMNS if c in dataset.column_names]
    tokenized = dataset.map(
        _tokenize_row,
        fn_kwargs={
            "tokenizer": tokenizer,
            "templates": templates,
            "max_length": max_length,
            "teacher_columns": teacher_columns,
            "distinct": tail_bucket,
        },
        remove_columns=[c for c in dataset.column_names if c not in ("question_id", "round")],
        keep_in_memory=True,  # no cache files in the trajectories' folder, which is an input
        desc="tokenising trajectories",
    )
    sizes = tokenized["num_members"]
    min_members = 1 if tail_bucket else 2
    stats = TrajectoryStats(
        rows=len(sizes),
        skipped_groups=sum(size < min_members for size in sizes),
        skipped_members=sum(tokenized["num_responses"]) - sum(sizes),
        min_members=min_members,
    )
    if stats.skipped_groups or stats.skipped_members:
        logger.warning(
            "trajectories: skipped %d of %d groups with fewer than %d valid members; left out %d members "
            "(non-finite ref_logp or reward, or longer than max_length=%s)",
            stats.skipped_groups,
            stats.rows,
            min_members,
            stats.skipped_members,
            max_length,
        )
    check(
        stats.skipped_groups < stats.rows,
        f"--trajectories: none of the {stats.rows} groups has {min_members} valid members (finite ref_logps "
        f"and rewards, prompt + response within max_length={max_length}); raise max_length or rebuild.",
    )
    kept = tokenized.select([i for i, size in enumerate(sizes) if size >= min_members])
    return kept.remove_columns(["num_responses", "num_members"]), stats


@dataclass
class TrajectoryCollator:
    """Batches trajectory rows: every group member becomes one sequence ``prompt + response``.

    Sequences are left-padded, as the inference backend scores them, so every response ends at the
    last column and ``completion_mask`` (right-aligned) marks its tokens. Per-member values come as
    ``(rows, G)`` tensors with ``group_mask`` marking the real members of each row.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        sequences = [row["prompt_ids"] + ids for row in rows for ids in row["completion_ids"]]
        completions = [ids for row in rows for ids in row["completion_ids"]]
        width, span = max(map(len, sequences)), max(map(len, completions))
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), span), dtype=torch.bool)
        for n, (sequence, completion) in enumerate(zip(sequences, completions, strict=True)):
            input_ids[n, width - len(sequence) :] = torch.tensor(sequence)
            attention_mask[n, width - len(sequence) :] = 1
            completion_mask[n, span - len(completion) :] = True
        sizes = torch.tensor([len(row["completion_ids"]) for row in rows])
        group_mask = torch.arange(int(sizes.max())) < sizes.unsqueeze(-1)

        def per_member(column: str) -> torch.Tensor:
            values = torch.tensor([v for row in rows for v in row[column]], dtype=torch.float32)
            return torch.zeros(group_mask.shape).masked_scatter(group_mask, values)

        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "group_mask": group_mask,
            "ref_logps": per_member("ref_logps"),
            "icl_rewards": per_member("icl_rewards"),
            "gold_rewards": per_member("gold_rewards"),
            "question_id": [row["question_id"] for row in rows],
            "round": [row["round"] for row in rows],
        }
        # Written by tokenize_trajectories; the teacher's top-k annotation needs no rewards.
        batch.update({c: per_member(c) for c in ("has_answer", "member_counts") if c in rows[0]})
        if "teacher_topk_ids" in rows[0]:
            batch.update(self._teacher_topk(rows, completions, span))
        return batch

    @staticmethod
    def _teacher_topk(rows: list[dict], completions: list[list[int]], span: int) -> dict:
        """The stored teacher columns, right-aligned like ``completion_mask``."""
        top_k = len(rows[0]["teacher_topk_ids"][0][0])
        ids = torch.zeros((len(completions), span, top_k), dtype=torch.long)
        logits = torch.zeros((len(completions), span, top_k))
        has_normalizer = "teacher_logsumexp" in rows[0]
        normalizer = torch.zeros((len(completions), span))
        members = [(row, j) for row in rows for j in range(len(row["completion_ids"]))]
        for n, ((row, j), completion) in enumerate(zip(members, completions, strict=True)):
            ids[n, span - len(completion) :] = torch.tensor(row["teacher_topk_ids"][j])
            logits[n, span - len(completion) :] = torch.tensor(row["teacher_topk_logits"][j])
            if has_normalizer:
                normalizer[n, span - len(completion) :] = torch.tensor(row["teacher_logsumexp"][j])
        columns = {"teacher_topk_ids": ids, "teacher_topk_logits": logits}
        return {**columns, "teacher_logsumexp": normalizer} if has_normalizer else columns


def group_sequences(batch: dict) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Each row's prompt ``(P,)`` and its members' responses, read back from a collated batch."""
    input_ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(-1).tolist()
    completion_lengths = batch["completion_mask"].sum(-1).tolist()
    rows, first = [], 0
    for size in batch["group_mask"].sum(-1).tolist():
        members = range(first, first + size)
        prompt = input_ids[first, width - lengths[first] : width - completion_lengths[first]]
        rows.append((prompt, [input_ids[n, width - completion_lengths[n] :] for n in members]))
        first += size
    return rows
