"""`icpo-train build-trajectories`: reflection trajectories for the ICPO trainer.

For every training question:

1. icpo_infer's ICPO loop (``random-icpo`` or ``me-icpo``; history rewards from the gold answer or
   the majority vote) gives the history H_t shown before each round t = 1..R (H_1 is empty). Only
   R - 1 rounds run: the history the loop ends with is H_R. pi_ref runs the loop, or with
   ``history_adapter`` a policy trained from it, so that a second iteration trains on the histories
   that policy builds for itself.
2. ONE group of G responses is sampled from pi_ref(. | question) with an EMPTY history, and each
   response is scored under pi_ref (sum of token log-probs, EOS included, as ``Backend.score``
   returns it), its answer extracted and graded against the gold answer. With ``history_members``
   the attempts of H_R that the sample missed join the group, scored alike: every round's group then
   holds the very responses its history tags, so the loss sees what the history makes likely.
3. Each round t gives one row (schema: :mod:`icpo_train.trajectory_data`), with the in-context reward
   of every group member R_t(y_j) = sum over s in H_t of (2 r_s - 1) [answer(y_j) equivalent to answer(s)].

Questions go through in chunks of ``batch_questions``: per chunk the ICPO loop (one call per phase),
then one generate and one score call for the groups. Each finished question is appended to
``progress.jsonl`` in the output directory and skipped when the command is rerun, and the loop saves
the chunk in progress after every round (``chunk_state.json``), so that an interrupted run loses at
most the round in progress (or the groups being sampled); at the end the
dataset is materialised from that file: ``save_to_disk`` in the output directory (what the trainer's
``--trajectories DIR`` reads), ``trajectories.parquet`` and a dataset card (README.md) with the
generating config. ``log.txt`` collects what the runs printed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset, Features, List, Value
from huggingface_hub import DatasetCard, DatasetCardData

from icpo_infer.backends import make_backend, resolve_context_length
from icpo_infer.backends.base import (
    Backend,
    BackendOptions,
    SamplingParams,
    adapter_problem,
    derive_seed,
    encode_prompt,
)
from icpo_infer.config import ConfigError, check, option, option_like, parse_config, stop_on_sigterm, to_dict
from icpo_infer.data import Problem, load_run_problems
from icpo_infer.grading import extract_answer, is_equivalent
from icpo_infer.icpo import in_chunks, run_method
from icpo_infer.infer_config import RUN_ONLY_FIELDS, InferConfig
from icpo_infer.prompts import Attempt, PromptTemplates, answer_type_of, render_prompt
from icpo_infer.records import QuestionResult
from icpo_infer.results import (
    STATE_FILE,
    TRAJECTORIES_CONFIG_FILE,
    ChunkState,
    append_line,
    prepare_resumable,
    read_results,
)
from icpo_infer.run_log import LOG_FILE, run_log
from icpo_train import trajectory_data
from icpo_train.trajectory_data import tokenizer_fingerprint

PROGRESS_FILE = "progress.jsonl"
CONFIG_FILE = TRAJECTORIES_CONFIG_FILE
PARQUET_FILE = "trajectories.parquet"
CARD_FILE = "README.md"
HISTORY_REWARDS = ("gt", "self")
SELECTIONS = {"random": "random-icpo", "me-icpo": "me-icpo"}  # --selection -> icpo_infer method
# Options that change how the command runs but not the trajectories it writes: a rerun may change them.
RUN_ONLY = RUN_ONLY_FIELDS | {"output"}

FEATURES = Features(
    {
        "question_id": Value("string"),
        "question": Value("string"),
        "answer": Value("string"),
        "answer_type": Value("string"),
        "round": Value("int32"),
        "history": List({"text": Value("string"), "answer": Value("string"), "reward": Value("int32")}),
        "responses": List(Value("string")),
        "ref_logps": List(Value("float64")),
        "ref_num_tokens": List(Value("int32")),
        "response_answers": List(Value("string")),
        "gold_rewards": List(Value("int32")),
        "icl_rewards": List(Value("float64")),
        "tokenizer_fingerprint": Value("string"),
    }
)


@dataclass
class TrajectoryConfig:
    """Everything `icpo-train build-trajectories` takes. The data, ICPO-loop and engine options mean
    what they mean for `icpo-infer run` (same names, defaults and help)."""

    model: str = field(metadata={"help": "Reference model pi_ref (path or Hub id): histories and groups."})
    dataset: str = option_like(InferConfig, "dataset")
    output: str = field(metadata={"help": "Output directory: the dataset, its card and the progress file."})
    history_adapter: str | None = option(
        None,
        "LoRA adapter of --model that runs the ICPO loop instead of pi_ref (iterated ICPO: a trained "
        "policy's own histories); the groups and their log-probs stay pi_ref's.",
    )
    rounds: int = option(3, "Rounds R: rows per question, with the histories H_1 (empty) .. H_R.")
    group_size: int = option(8, "G: responses sampled from pi_ref(. | question) per question.")
    history_reward: str = option("gt", "Rewards in the history: gt (gold answer) or self (majority vote).")
    selection: str = option("me-icpo", "Which candidate enters the history: random or me-icpo.")
    group_temperature: float = option(
        1.0, "Sampling temperature of the group; 1 samples pi_ref itself, as the FW weights assume."
    )
    history_members: bool = option(
        False,
        "Add the history's attempts that the group's sample missed to the group (scored under pi_ref "
        "with an empty history), so that every round's group holds the responses its history tags.",
    )
    backend: str = option_like(InferConfig, "backend")
    split: str | None = option_like(InferConfig, "split")
    limit: int | None = option_like(InferConfig, "limit")
    problem_field: str = option_like(InferConfig, "problem_field")
    answer_field: str = option_like(InferConfig, "answer_field")
    id_field: str = option_like(InferConfig, "id_field")
    skip_invalid: bool = option_like(InferConfig, "skip_invalid")
    k: int = option_like(InferConfig, "k")
    entropy_k: int = option_like(InferConfig, "entropy_k")
    temperature: float = option_like(InferConfig, "temperature")
    top_p: float = option_like(InferConfig, "top_p")
    top_k: int = option_like(InferConfig, "top_k")
    repetition_penalty: float = option_like(InferConfig, "repetition_penalty")
    max_new_tokens: int = option_like(InferConfig, "max_new_tokens")
    context_length: int = option_like(InferConfig, "context_length")
    summary: bool = option_like(InferConfig, "summary")
    summary_max_tokens: int = option_like(InferConfig, "summary_max_tokens")
    summary_temperature: float = option_like(InferConfig, "summary_temperature")
    entropy_penalty: bool = option_like(InferConfig, "entropy_penalty")
    epsilon: float = option_like(InferConfig, "epsilon")
    max_keep: int = option_like(InferConfig, "max_keep")
    templates: str | None = option_like(InferConfig, "templates")
    seed: int = option_like(InferConfig, "seed")
    dtype: str = option_like(InferConfig, "dtype")
    device: str = option_like(InferConfig, "device")
    max_batch_tokens: int = option_like(InferConfig, "max_batch_tokens")
    tensor_parallel_size: int = option_like(InferConfig, "tensor_parallel_size")
    data_parallel_size: int = option_like(InferConfig, "data_parallel_size")
    gpu_memory_utilization: float = option_like(InferConfig, "gpu_memory_utilization")
    kv_cache_gb: float | None = option_like(InferConfig, "kv_cache_gb")
    enforce_eager: bool = option_like(InferConfig, "enforce_eager")
    base_url: list[str] = option_like(InferConfig, "base_url")  # noqa: RUF009 (a field with a list factory)
    api_key_env: str | None = option_like(InferConfig, "api_key_env")
    tokenizer: str | None = option_like(InferConfig, "tokenizer")
    max_concurrency: int = option_like(InferConfig, "max_concurrency")
    score_concurrency: int | None = option_like(InferConfig, "score_concurrency")
    trust_remote_code: bool = option_like(InferConfig, "trust_remote_code")
    batch_questions: int = option_like(InferConfig, "batch_questions")
    overwrite: bool = option(False, "Start over in an output directory that holds trajectories.")

    def __post_init__(self) -> None:
        check(self.rounds >= 1, f"rounds={self.rounds} is invalid; use rounds >= 1.")
        check(
            self.group_size >= 2,
            f"group_size={self.group_size}: the FW loss needs at least 2 group members; use group_size >= 2.",
        )
        check(
            self.history_reward in HISTORY_REWARDS,
            f"history_reward '{self.history_reward}' is unknown; use one of {', '.join(HISTORY_REWARDS)}.",
        )
        check(
            self.selection in SELECTIONS,
            f"selection '{self.selection}' is unknown; use one of {', '.join(SELECTIONS)}.",
        )
        self.group_sampling(max_new_tokens=1, seed=0)  # validates group_temperature
        problem = adapter_problem(self.history_adapter)
        check(
            problem is None,
            f"history_adapter '{self.history_adapter}' {problem}; pass a LoRA adapter of --model to "
            "--history-adapter.",
        )
        self.infer_config()  # validates the options shared with icpo-infer

    def infer_config(self) -> InferConfig:
        """The ICPO loop that yields H_2 .. H_R: R - 1 rounds (its one final sample is not used)."""
        shared = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(InferConfig) if hasattr(self, f.name)
        }
        shared.update(
            output_dir=self.output,
            adapter=self.history_adapter,
            method=SELECTIONS[self.selection],
            reward=self.history_reward,
            rounds=max(self.rounds - 1, 1),
            final_k=1,
        )
        return InferConfig(**shared)

    def group_sampling(self, max_new_tokens: int, seed: int) -> SamplingParams:
        """G samples from pi_ref: no top-p, top-k or repetition penalty, which would change the policy."""
        try:
            return SamplingParams(
                n=self.group_size,
                temperature=self.group_temperature,
                max_new_tokens=max_new_tokens,
                seed=seed,
            )
        except ValueError as err:
            raise ConfigError(f"{err} (set by --group-temperature)") from err


def icl_rewards(answers: Sequence[str | None], history: Sequence[Attempt]) -> list[float]:
    """R_t(y_j) = sum over history entries s of (2 r_s - 1) [answer(y_j) equivalent to answer(s)]."""
    return [
        float(sum(2 * s.reward - 1 for s in history if is_equivalent(answer, s.answer))) for answer in answers
    ]


def sample_groups(
    backend: Backend,
    problems: Sequence[Problem],
    config: TrajectoryConfig,
    templates: PromptTemplates | None,
    extra_members: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, list]]:
    """Per problem, the group columns: G responses to the empty-history prompt, then those of
    ``extra_members`` the sample does not hold, all scored under pi_ref.

    One generate call and one score call for all ``problems``.
    """
    tokenizer = backend.tokenizer
    prompts = [render_prompt(tokenizer, p.problem, [], answer_type_of(p.answer), templates) for p in problems]
    seed = derive_seed(config.seed, "group")
    params = [
        config.group_sampling(
            min(config.max_new_tokens, config.context_length - len(encode_prompt(tokenizer, q))), seed
        )
        for q in prompts
    ]
    responses = [[c.text for c in g.completions] for g in backend.generate(prompts, params)]
    for group, extra in zip(responses, extra_members or [[] for _ in problems], strict=True):
        group.extend(dict.fromkeys(text for text in extra if text not in group))
    flat_prompts = [prompt for prompt, group in zip(prompts, responses, strict=True) for _ in group]
    scores = iter(backend.score(flat_prompts, [text for group in responses for text in group]))
    groups = []
    for problem, texts in zip(problems, responses, strict=True):
        group_scores = [next(scores) for _ in texts]
        answers = [extract_answer(text) for text in texts]
        groups.append(
            {
                "responses": texts,
                "ref_logps": [s.logprob for s in group_scores],
                "ref_num_tokens": [s.num_tokens for s in group_scores],
                "response_answers": answers,
                "gold_rewards": [int(is_equivalent(answer, problem.answer)) for answer in answers],
            }
        )
    return groups


def history_texts(histories: Sequence[Sequence[Attempt]]) -> list[str]:
    """The attempts' texts of a question's last history (which holds every earlier one's)."""
    return [attempt.text for attempt in histories[-1]]


def icpo_histories(result: QuestionResult) -> list[list[Attempt]]:
    """The histories H_1 .. H_R of one question of icpo_infer's ICPO loop."""
    return [record.history for record in result.rounds] + [result.history]


def question_rows(
    problem: Problem, histories: Sequence[Sequence[Attempt]], group: dict[str, list], fingerprint: str
) -> list[dict[str, Any]]:
    """The rows of one question, one per round."""
    return [
        {
            "question_id": problem.id,
            "question": problem.problem,
            "answer": problem.answer,
            "answer_type": answer_type_of(problem.answer),
            "round": t,
            "history": [dataclasses.asdict(attempt) for attempt in history],
            **group,
            "icl_rewards": icl_rewards(group["response_answers"], history),
            "tokenizer_fingerprint": fingerprint,
        }
        for t, history in enumerate(histories, 1)
    ]


def open_output(config: TrajectoryConfig, write: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Prepare the output directory and return the rows of the questions already finished there
    (``write=False``: only check it and read them, changing nothing)."""
    output = Path(config.output)
    prepare_resumable(
        output,
        to_dict(config),
        overwrite=config.overwrite,
        outputs=(PROGRESS_FILE, STATE_FILE, LOG_FILE),
        ignore=RUN_ONLY,
        what="trajectories built",
        flag="--output",
        config_file=CONFIG_FILE,
        write=write,
    )
    if config.overwrite and not write:
        return {}
    return {line["question_id"]: line["rows"] for line in read_results(output / PROGRESS_FILE)}


def dataset_card(config: TrajectoryConfig, dataset: Dataset, skipped: int) -> DatasetCard:
    """README.md of the dataset: what it holds, its schema and the config that generated it."""
    data = DatasetCardData(
        pretty_name="ICPO reflection trajectories",
        tags=["icpo", "reflection-trajectories", "math"],
        configs=[{"config_name": "default", "data_files": PARQUET_FILE}],
    )
    questions = len(set(dataset["question_id"]))
    recipe = {key: value for key, value in to_dict(config).items() if key not in ("output", "overwrite")}
    sections = [
        "# ICPO reflection trajectories",
        f"Built by `icpo-train build-trajectories` with the reference model `{config.model}` from "
        f"`{config.dataset}`: {questions} questions ({skipped} invalid rows skipped), {len(dataset)} rows "
        f"({config.rounds} rounds per question), groups of {config.group_size} responses, histories from "
        f"{SELECTIONS[config.selection]} with {config.history_reward} rewards"
        + (f", run by the adapter `{config.history_adapter}`." if config.history_adapter else "."),
        "## Schema",
        trajectory_data.__doc__.strip(),
        "## Generating config",
        "Save this block as `recipe.yaml` and run "
        "`icpo-train build-trajectories --config recipe.yaml --output DIR` to rebuild the dataset.",
        "```yaml\n" + yaml.safe_dump(recipe, sort_keys=False).strip() + "\n```",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_dataset(config: TrajectoryConfig, rows: list[dict[str, Any]], skipped: int) -> Dataset:
    """The rows as a dataset: ``save_to_disk`` in the output directory, Parquet and card beside it."""
    output = Path(config.output)
    dataset = Dataset.from_list(rows, features=FEATURES)
    dataset.save_to_disk(str(output))
    partial = output / f".{PARQUET_FILE}.partial"
    dataset.to_parquet(str(partial))
    os.replace(partial, output / PARQUET_FILE)
    dataset_card(config, dataset, skipped).save(output / CARD_FILE)
    return dataset


def build_trajectories(config: TrajectoryConfig, backend: Backend | None = None) -> Path:
    """Build (or resume) the trajectory dataset of ``config`` and return its directory.

    Pass ``backend`` to reuse a loaded reference model.
    """
    problems, skipped = load_run_problems(config)
    config = resolve_context_length(config)
    # Nothing is written until the inputs are checked and the model has loaded.
    todo = [p for p in problems if p.id not in open_output(config, write=False)]
    templates = PromptTemplates.from_yaml(config.templates) if config.templates else None
    if todo and backend is None:
        options = BackendOptions.from_config(config)
        options.enable_lora = config.history_adapter is not None  # vllm serves it per call
        backend = make_backend(config.backend, options)
    for p in todo:  # refuse before any work when a bare question cannot fit the context
        prompt = render_prompt(backend.tokenizer, p.problem, [], answer_type_of(p.answer), templates)
        check(
            len(encode_prompt(backend.tokenizer, prompt)) < config.context_length,
            f"question {p.id} alone fills context_length={config.context_length}; raise --context-length.",
        )
    done = open_output(config)
    with run_log(config.output):

        def finish(chunk: Sequence[Problem], histories: Sequence[list[list[Attempt]]]) -> None:
            extra = [history_texts(h) for h in histories] if config.history_members else None
            groups = sample_groups(backend, chunk, config, templates, extra)
            fingerprint = tokenizer_fingerprint(backend.tokenizer)
            for problem, group, question_histories in zip(chunk, groups, histories, strict=True):
                rows = question_rows(problem, question_histories, group, fingerprint)
                append_line(Path(config.output) / PROGRESS_FILE, {"question_id": problem.id, "rows": rows})
                done[problem.id] = rows

        if config.rounds == 1:  # no ICPO loop: every history is empty
            for chunk in in_chunks(todo, config.batch_questions):
                finish(chunk, [[[]] for _ in chunk])
        elif todo:
            by_id = {p.id: p for p in todo}
            run_method(
                backend,
                problems,
                config.infer_config(),
                done_ids=done,
                on_chunk=lambda results: finish(
                    [by_id[r.id] for r in results], list(map(icpo_histories, results))
                ),
                state=ChunkState(Path(config.output) / STATE_FILE),
                # The loop's rounds 1..R-1 build the histories H_2..H_R of the R rounds.
                desc=f"{'history H_2' if config.rounds == 2 else f'histories H_2..H_{config.rounds}'} "
                f"({SELECTIONS[config.selection]})",
            )
        write_dataset(config, [row for p in problems for row in done[p.id]], skipped)
    return Path(config.output)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(TrajectoryConfig, argv, prog="icpo-train build-trajectories")
    with stop_on_sigterm():
        output = build_trajectories(config)
    with run_log(output):
        print(f"trajectories: {output} (load with datasets.load_from_disk, or {output / PARQUET_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
