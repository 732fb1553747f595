"""`icpo-train build-trajectories` end to end: real hf backend, tiny model taught to answer in \\boxed{}."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch
from boxed_model import teach_boxed_answers, teaching_prompts
from conftest import fixture_problems
from datasets import Dataset, load_from_disk
from huggingface_hub import DatasetCard
from interruptions import interrupt_at_save, signalled_run
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from icpo_infer.backends import make_backend
from icpo_infer.backends.base import BackendOptions, encode_completion, encode_prompt
from icpo_infer.backends.hf import HFBackend
from icpo_infer.config import ConfigError, parse_config
from icpo_infer.data import load_problems
from icpo_infer.grading import extract_answer, is_equivalent
from icpo_infer.icpo import run_method
from icpo_infer.prompts import Attempt, PromptTemplates, render_prompt
from icpo_infer.results import STATE_FILE, TRAJECTORIES_CONFIG_FILE
from icpo_train.cli import main as icpo_train_main
from icpo_train.trajectories import (
    FEATURES,
    PARQUET_FILE,
    PROGRESS_FILE,
    TrajectoryConfig,
    build_trajectories,
    icl_rewards,
)
from icpo_train.trajectory_data import (
    GROUP_COLUMNS,
    REQUIRED_COLUMNS,
    load_trajectories,
    tokenizer_fingerprint,
    training_templates,
    validate_trajectories,
)

QUESTIONS = 3
ROUNDS = 3
GROUP = 4
# A few seconds on CPU: short answers, small samples, one kept entry per bucket.
FAST = {
    "k": 3,
    "entropy_k": 2,
    "temperature": 1.0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 8,
    "summary_max_tokens": 8,
    "context_length": 2048,
    "max_keep": 1,
    "device": "cpu",
    "seed": 0,
}


# Questions answered 5, 6 and 1; the taught model mostly answers 5, so the first question's group has
# correct members and the others' have wrong ones.
QUESTIONS_USED = fixture_problems()[:QUESTIONS]
QUESTION_IDS = [row["id"] for row in QUESTIONS_USED]


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return QUESTIONS_USED


@pytest.fixture(scope="module")
def dataset_file(questions, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in questions))
    return path


@pytest.fixture(scope="module")
def boxed_model_dir(tiny_model_dir, questions, tmp_path_factory) -> Path:
    prompts = [row["problem"] for row in questions]
    return teach_boxed_answers(tiny_model_dir, tmp_path_factory.mktemp("boxed"), prompts)


def make_config(model_dir: Path, dataset: Path, output: Path, **overrides) -> TrajectoryConfig:
    options = {"rounds": ROUNDS, "group_size": GROUP, "limit": QUESTIONS, **FAST, **overrides}
    return TrajectoryConfig(model=str(model_dir), dataset=str(dataset), output=str(output), **options)


@pytest.fixture(scope="module")
def built(boxed_model_dir, dataset_file, tmp_path_factory) -> tuple[TrajectoryConfig, Dataset]:
    config = make_config(boxed_model_dir, dataset_file, tmp_path_factory.mktemp("traj"))
    output = build_trajectories(config)
    return config, load_trajectories(output)


def test_features_are_the_schema_columns():
    assert tuple(FEATURES) == REQUIRED_COLUMNS


def test_rows_follow_the_schema_and_validate(built, boxed_model_dir):
    _, dataset = built
    tokenizer = AutoTokenizer.from_pretrained(boxed_model_dir)
    validate_trajectories(dataset, tokenizer)
    assert dataset["question_id"] == [qid for qid in QUESTION_IDS for _ in range(ROUNDS)]
    assert dataset["round"] == list(range(1, ROUNDS + 1)) * QUESTIONS
    assert set(dataset["tokenizer_fingerprint"]) == {tokenizer_fingerprint(tokenizer)}
    for row in dataset:
        for column in GROUP_COLUMNS:
            assert len(row[column]) == GROUP, column
        assert all(lp < 0 for lp in row["ref_logps"]) and all(n >= 1 for n in row["ref_num_tokens"])
        assert row["response_answers"] == [extract_answer(text) for text in row["responses"]]
        assert row["gold_rewards"] == [int(is_equivalent(a, row["answer"])) for a in row["response_answers"]]
    # The taught model answers, so the checks above are not vacuous.
    assert any(a is not None for a in dataset["response_answers"][0])
    assert any(1 in row["gold_rewards"] for row in dataset) and any(
        0 in row["gold_rewards"] for row in dataset
    )


def test_history_grows_from_empty_and_the_group_is_shared_by_the_rounds(built):
    _, dataset = built
    for q in range(QUESTIONS):
        rows = [dataset[q * ROUNDS + t] for t in range(ROUNDS)]
        assert rows[0]["history"] == []
        assert all(row["responses"] == rows[0]["responses"] for row in rows)
        assert all(row["ref_logps"] == rows[0]["ref_logps"] for row in rows)
        for row in rows:
            assert all(entry["reward"] in (0, 1) and entry["answer"] is not None for entry in row["history"])


def test_icl_rewards_match_a_hand_computation(built):
    _, dataset = built
    nonzero = 0
    for row in dataset:
        for answer, reward in zip(row["response_answers"], row["icl_rewards"], strict=True):
            by_hand = 0
            for entry in row["history"]:
                if answer is not None and is_equivalent(answer, entry["answer"]):
                    by_hand += 1 if entry["reward"] == 1 else -1
            assert reward == by_hand
            nonzero += reward != 0
    assert nonzero > 0  # the check above is not vacuous


def test_histories_are_those_of_the_icpo_loop_with_gold_rewards(built, boxed_model_dir):
    """H_1..H_{R-1} are the histories icpo-infer's loop shows before its rounds, H_R the one it ends with."""
    config, dataset = built
    infer = config.infer_config()
    assert (infer.method, infer.reward, infer.rounds, infer.final_k) == ("me-icpo", "gt", ROUNDS - 1, 1)
    problems, _ = load_problems(config.dataset, limit=QUESTIONS)
    backend = make_backend("hf", BackendOptions(model=str(boxed_model_dir), device="cpu"))
    for q, result in enumerate(run_method(backend, problems, infer)):
        expected = [record.history for record in result.rounds] + [result.history]
        stored = dataset.select(range(q * ROUNDS, (q + 1) * ROUNDS))["history"]
        assert stored == [[dataclasses.asdict(a) for a in history] for history in expected]
        for entry in stored[-1]:  # gt: reward 1 exactly for correct answers
            assert entry["reward"] == int(is_equivalent(entry["answer"], result.answer))


@pytest.fixture(scope="module")
def sevens_adapter(boxed_model_dir, questions, tmp_path_factory) -> Path:
    """A LoRA adapter that makes the boxed model answer 7 (the bare model mostly answers 5)."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(boxed_model_dir)
    with warnings.catch_warnings():
        # The adapter is never merged nor converted, what PEFT warns about when it adapts a tied lm_head.
        warnings.filterwarnings("ignore", "Model has `tie_word_embeddings=True`", UserWarning, "peft")
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(boxed_model_dir, dtype=torch.float32),
            # lm_head: on attention alone the 32-wide model's digit barely moves (log-prob of 7: -3.2).
            LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "lm_head"]),
        )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    answer = encode_completion(tokenizer, "\\boxed{7}")
    prompts = [
        encode_prompt(tokenizer, p) for p in teaching_prompts(tokenizer, [q["problem"] for q in questions])
    ]
    for step in range(60):
        prompt = prompts[step % len(prompts)]
        labels = torch.tensor([[-100] * len(prompt) + answer])
        model(input_ids=torch.tensor([prompt + answer]), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("sevens")
    model.save_pretrained(directory, save_embedding_layers=True)  # lm_head is adapted: what "auto" picks
    return directory


def test_a_history_adapter_builds_the_histories_and_pi_ref_the_groups(
    built, boxed_model_dir, dataset_file, sevens_adapter, tmp_path
):
    _, bare = built
    adapted = load_trajectories(
        build_trajectories(
            make_config(boxed_model_dir, dataset_file, tmp_path, history_adapter=str(sevens_adapter))
        )
    )
    # The same seeded samples of pi_ref, scored by pi_ref; only their in-context rewards follow the history.
    for column in ("responses", "ref_logps", "ref_num_tokens", "response_answers", "gold_rewards"):
        assert adapted[column] == bare[column], column

    def history_answers(dataset: Dataset) -> list[str]:
        return [entry["answer"] for row in dataset for entry in row["history"]]

    assert history_answers(adapted).count("7") > len(history_answers(adapted)) / 2
    assert history_answers(bare).count("7") < len(history_answers(bare)) / 2
    assert f"run by the adapter `{sevens_adapter}`" in DatasetCard.load(tmp_path / "README.md").text


def test_history_members_add_the_attempts_the_sample_missed_scored_under_pi_ref(
    boxed_model_dir, dataset_file, tmp_path
):
    def build(output: Path, **options) -> Dataset:
        # History texts truncated to 3 tokens, which no sampled response is: the checks are not vacuous.
        config = make_config(
            boxed_model_dir,
            dataset_file,
            output,
            summary=False,
            summary_max_tokens=3,
            group_size=2,
            **options,
        )
        return load_trajectories(build_trajectories(config))

    bare, dataset = build(tmp_path / "bare"), build(tmp_path / "members", history_members=True)
    tokenizer = AutoTokenizer.from_pretrained(boxed_model_dir)
    validate_trajectories(dataset, tokenizer)
    backend = make_backend("hf", BackendOptions(model=str(boxed_model_dir), device="cpu"))
    added = 0
    for q in range(QUESTIONS):
        rows = dataset.select(range(q * ROUNDS, (q + 1) * ROUNDS)).to_list()
        sampled = bare[q * ROUNDS]["responses"]
        texts = [entry["text"] for entry in rows[-1]["history"]]
        extra = list(dict.fromkeys(text for text in texts if text not in sampled))
        for row, bare_row in zip(rows, bare.select(range(q * ROUNDS, (q + 1) * ROUNDS)), strict=True):
            assert row["history"] == bare_row["history"]  # the same seeded loop
            assert row["responses"] == sampled + extra  # the sample first, each attempt once
            assert row["ref_logps"][:2] == bare_row["ref_logps"]
        prompt = render_prompt(tokenizer, rows[0]["question"], [], rows[0]["answer_type"])
        scores = backend.score([prompt] * len(extra), extra)
        assert rows[0]["ref_logps"][2:] == pytest.approx([s.logprob for s in scores])
        for row in rows:
            history = [Attempt(**entry) for entry in row["history"]]
            assert row["response_answers"] == [extract_answer(text) for text in row["responses"]]
            assert row["icl_rewards"] == icl_rewards(row["response_answers"], history)
        added += len(extra)
    assert added > 0  # the sample missed some attempts: the check is not vacuous


@pytest.mark.parametrize(
    ("history_adapter", "problem"),
    [("boxed", "it is a full model, not a LoRA adapter"), ("missing", "is no directory, nor a Hub repo id")],
)
def test_a_history_adapter_that_cannot_load_is_a_config_error(
    boxed_model_dir, dataset_file, tmp_path, history_adapter, problem
):
    path = {"boxed": boxed_model_dir, "missing": tmp_path / "adapters" / "icpo"}[history_adapter]
    with pytest.raises(
        ConfigError, match=rf"history_adapter '{re.escape(str(path))}' .*{problem}.*--history-adapter"
    ):
        make_config(boxed_model_dir, dataset_file, tmp_path, history_adapter=str(path))


def test_dataset_is_saved_to_disk_as_parquet_with_a_card(built):
    config, dataset = built
    output = Path(config.output)
    assert load_from_disk(str(output))["question_id"] == dataset["question_id"]
    parquet = Dataset.from_parquet(str(output / PARQUET_FILE))
    assert parquet.to_list() == dataset.to_list()
    card = DatasetCard.load(output / "README.md")
    assert card.data.configs == [{"config_name": "default", "data_files": PARQUET_FILE}]
    assert f"group_size: {GROUP}" in card.text and "history_reward: gt" in card.text
    assert f"{QUESTIONS} questions" in card.text


def test_rerun_skips_finished_questions_and_extends(
    boxed_model_dir, dataset_file, questions, tmp_path, monkeypatch
):
    def build(limit: int) -> list[dict]:
        build_trajectories(make_config(boxed_model_dir, dataset_file, tmp_path, rounds=1, limit=limit))
        return load_trajectories(tmp_path).to_list()

    before = build(limit=2)
    prompts = []
    generate = HFBackend.generate

    def recording_generate(self, batch, params, adapter=None):
        prompts.extend(batch)
        return generate(self, batch, params, adapter)

    monkeypatch.setattr(HFBackend, "generate", recording_generate)
    assert build(limit=2) == before
    assert prompts == []  # nothing left to do: the model is not even asked

    after = build(limit=3)
    assert after[:2] == before and len(after) == 3
    assert prompts and all(questions[2]["problem"] in prompt for prompt in prompts)  # only the new question
    lines = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == list(QUESTION_IDS)


def test_rerun_with_other_settings_is_refused(boxed_model_dir, dataset_file, tmp_path):
    build_trajectories(make_config(boxed_model_dir, dataset_file, tmp_path, rounds=1, limit=1))
    with pytest.raises(ConfigError, match="group_size"):
        build_trajectories(
            make_config(boxed_model_dir, dataset_file, tmp_path, rounds=1, limit=1, group_size=3)
        )


def test_one_round_has_only_empty_histories(boxed_model_dir, dataset_file, tmp_path):
    build_trajectories(make_config(boxed_model_dir, dataset_file, tmp_path, rounds=1, limit=2))
    dataset = load_trajectories(tmp_path)
    assert dataset["round"] == [1, 1] and dataset["history"] == [[], []]
    assert all(r == [0.0] * GROUP for r in dataset["icl_rewards"])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--group-size", "1", "group_size"),
        ("--history-reward", "oracle", "history_reward"),
        ("--selection", "best", "selection"),
        ("--rounds", "0", "rounds"),
        ("--group-temperature", "-1", "group-temperature"),
        ("--entropy-k", "1", "entropy_k"),
    ],
)
def test_bad_options_are_config_errors(flag, value, message):
    argv = ["--model", "m", "--dataset", "d.jsonl", "--output", "out", flag, value]
    with pytest.raises(ConfigError, match=message):
        parse_config(TrajectoryConfig, argv)


def test_cli_builds_from_flags(boxed_model_dir, problems_file, tmp_path, capsys):
    argv = [
        "build-trajectories",
        "--model",
        str(boxed_model_dir),
        "--dataset",
        str(problems_file),
    ]
    argv += [
        "--output",
        str(tmp_path),
        "--rounds",
        "2",
        "--group-size",
        "2",
        "--limit",
        "1",
        "--backend",
        "hf",
    ]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]
    assert icpo_train_main(argv) == 0
    assert len(load_trajectories(tmp_path)) == 2
    out, err = capsys.readouterr()
    assert str(tmp_path) in out
    # The progress bar names what its one loop round builds, and the question in flight.
    assert "history H_2 (me-icpo)" in err and "0/1 questions done, 1 in progress: round 1/1" in err
    assert icpo_train_main([*argv[:-1], "--history-reward", "oracle"]) == 2
    assert "history_reward" in capsys.readouterr().err


def test_a_mistyped_flag_names_the_closest_one(tmp_path, capsys):
    argv = [
        "build-trajectories",
        "--model",
        "m",
        "--dataset",
        "d",
        "--output",
        str(tmp_path),
        "--group-sise",
        "4",
    ]
    assert icpo_train_main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown option '--group-sise'. Did you mean '--group-size'?" in err and "Traceback" not in err


def test_an_interrupted_build_resumes_from_the_round_after_the_last_saved_one(
    built, boxed_model_dir, dataset_file, tmp_path, capsys, monkeypatch
):
    config = make_config(boxed_model_dir, dataset_file, tmp_path, batch_questions=2)
    interrupt_at_save(monkeypatch, 3)  # 2 rounds per chunk: the second chunk's first round
    with pytest.raises(KeyboardInterrupt):
        build_trajectories(config)
    assert len((tmp_path / PROGRESS_FILE).read_text().splitlines()) == 2
    assert json.loads((tmp_path / STATE_FILE).read_text())["round"] == 1
    monkeypatch.undo()
    capsys.readouterr()
    build_trajectories(config)
    assert (
        f"resuming: 2/{QUESTIONS} questions done, 1 of 2 rounds done for the next 1"
        in capsys.readouterr().err
    )
    resumed, whole = load_trajectories(tmp_path).to_list(), built[1].to_list()
    for a, b in zip(
        resumed, whole, strict=True
    ):  # scored in batches of another shape: the last digits differ
        assert a.pop("ref_logps") == pytest.approx(b.pop("ref_logps"), abs=1e-5)
    assert resumed == whole and not (tmp_path / STATE_FILE).exists()


def test_a_build_killed_inside_a_round_loses_only_that_round(built, boxed_model_dir, dataset_file, tmp_path):
    options = {"rounds": ROUNDS, "group_size": GROUP, "limit": QUESTIONS, **FAST}
    argv = ["build-trajectories", "--model", str(boxed_model_dir), "--dataset", str(dataset_file)]
    argv += ["--output", str(tmp_path), *(f"--{key}={value}" for key, value in options.items())]
    ended = signalled_run(tmp_path / STATE_FILE, "icpo-train", argv, signal.SIGKILL)
    assert ended.returncode == -signal.SIGKILL, ended.stderr[-3000:]
    assert json.loads((tmp_path / STATE_FILE).read_text())["round"] == 1
    assert not (tmp_path / PROGRESS_FILE).exists()
    assert icpo_train_main(argv) == 0
    assert load_trajectories(tmp_path).to_list() == built[1].to_list()


def test_training_takes_the_templates_the_trajectories_were_built_with(tmp_path, capsys):
    terse, other = tmp_path / "terse.yaml", tmp_path / "other.yaml"
    terse.write_text("problem: 'Q: {question}'\n")
    other.write_text("problem: 'Question: {question}'\n")
    built_with = {}
    for name, templates in (("terse", str(terse)), ("default", None)):
        built_with[name] = tmp_path / name
        built_with[name].mkdir()
        (built_with[name] / TRAJECTORIES_CONFIG_FILE).write_text(json.dumps({"templates": templates}))

    assert training_templates(built_with["terse"], None) == PromptTemplates.from_yaml(terse)
    assert str(terse) in capsys.readouterr().out  # said, not silent
    assert training_templates(built_with["terse"], str(terse)) == PromptTemplates.from_yaml(terse)
    assert training_templates(built_with["default"], None) is None
    with pytest.raises(
        ConfigError, match=rf"templates '{re.escape(str(other))}' differ .*'{re.escape(str(terse))}'"
    ):
        training_templates(built_with["terse"], str(other))
    with pytest.raises(
        ConfigError, match="differ from those the trajectories were built with \\(the default"
    ):
        training_templates(built_with["default"], str(other))
    terse.unlink()
    with pytest.raises(ConfigError, match="which is not there from here; pass that file with --templates"):
        training_templates(built_with["terse"], None)
    # Parquet from elsewhere records nothing: the caller's templates.
    assert training_templates(tmp_path, str(other)) == PromptTemplates.from_yaml(other)
