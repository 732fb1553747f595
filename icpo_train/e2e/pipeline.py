"""`icpo-train pipeline`: the end-to-end proof that ICPO training improves test-time self-improvement.

    icpo-train pipeline --config recipes/e2e/tiny.yaml --output_dir DIR [--stages STAGE ...]

Stages, run for every seed in ``DIR/seed-N/``, each skipped with one line saying so when its output
exists (an interrupted run resumes where it stopped):

- ``data``: the task's train / validation / test splits: sums of spelled-out digits
  (:mod:`icpo_train.e2e.synthetic`) or one-digit arithmetic facts (:mod:`icpo_train.e2e.arithmetic`);
- ``pretrain``: the base model, a tiny Llama trained from scratch (:mod:`icpo_train.e2e.pretrain`), or
  nothing when ``base_model`` names a pretrained model to start from;
- ``trajectories``: reflection trajectories of the base model on the validation questions
  (:mod:`icpo_train.trajectories`, resumable per question);
- ``train``: LoRA adapters trained on those trajectories with the same data and budget: ``icpo``
  (the Fisher-weighted response-level loss) and the baselines ``sft`` and ``mse``; with
  ``iterations`` > 1, each adapter's next iteration (``icpo2``, ...) is a fresh adapter trained on
  trajectories whose histories the previous one built (the same pi_ref groups);
- ``evaluate``: the base model and every adapter of every iteration on the test questions with ``single``,
  ``majority`` and ``me-icpo`` through the ``hf`` or ``vllm`` backend (:func:`icpo_infer.cli.run`,
  resumable per question), each adapter as a LoRA request on the trajectories' engine or, with
  ``merge_adapters``, merged into the base weights (``seed-N/merged/``) in an engine of its own;
- ``report``: over all seeds, ``DIR/report.json``, the table of :func:`format_report` and the plot
  ``DIR/accuracy_vs_round.png``.

``DIR/log.txt`` collects what the runs printed; ``DIR/seed-N/timings.json`` the wall seconds of each
stage, added up over the runs that completed it (a run stopped inside a stage records nothing for it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from icpo_infer.backends import DTYPES, make_backend
from icpo_infer.backends.base import Backend, BackendOptions
from icpo_infer.backends.merged import merge_adapter
from icpo_infer.cli import run as run_inference
from icpo_infer.config import check, option, option_like, parse_config, to_dict
from icpo_infer.data import load_problems
from icpo_infer.infer_config import InferConfig
from icpo_infer.prompts import PromptTemplates
from icpo_infer.report import accuracy_limits
from icpo_infer.results import METRICS_FILE, write_json_atomic
from icpo_infer.run_log import run_log
from icpo_infer.stats import difference_with_interval, paired_comparison
from icpo_train.e2e import arithmetic, synthetic
from icpo_train.e2e.arithmetic import ArithmeticTaskConfig
from icpo_train.e2e.pretrain import PretrainConfig, pretrain
from icpo_train.e2e.synthetic import SyntheticTaskConfig, write_splits
from icpo_train.icpo_config import ICPOConfig
from icpo_train.trainer import ICPOTrainer
from icpo_train.trajectories import PARQUET_FILE, TrajectoryConfig, build_trajectories

TASKS = ("spelled-sums", "arithmetic")
STAGES = ("data", "pretrain", "trajectories", "train", "evaluate", "report")
LOSS_OF_MODEL = {"icpo": "fw", "sft": "sft", "mse": "mse"}  # adapters and the trainer loss of each
MODELS = ("base", *LOSS_OF_MODEL)
EVAL_METHODS = ("single", "majority", "me-icpo")
REPORT_FILE = "report.json"
PLOT_FILE = "accuracy_vs_round.png"
TIMINGS_FILE = "timings.json"


@dataclass
class PipelineConfig(SyntheticTaskConfig, PretrainConfig):
    """The task, the base model and its pretraining (inherited fields), and every later stage.

    The ICPO-loop options (k, rounds, sampling, summaries) are shared by the trajectories and the
    evaluation, as in a real deployment.
    """

    output_dir: str | None = option(None, "Where every stage writes (one seed-N folder per seed).")
    num_seeds: int = option(1, "Seeds seed, seed+1, ...: each reruns every stage, data included.")
    stages: list[str] = field(
        default_factory=lambda: list(STAGES), metadata={"help": f"Stages to run, among {', '.join(STAGES)}."}
    )
    models: list[str] = field(
        default_factory=lambda: list(MODELS),
        metadata={"help": f"Models to train and evaluate, among {', '.join(MODELS)}."},
    )
    templates: str | None = option(
        None, "YAML prompt wording, used by every stage (recipes/e2e/templates.yaml)."
    )
    task: str = option(
        "spelled-sums",
        "The task family: spelled-sums (sums of spelled-out digits; the *_size and operand fields) or "
        "arithmetic (one-digit facts in several phrasings; the *_facts fields).",
    )
    train_facts: int = option_like(ArithmeticTaskConfig, "train_facts")
    validation_facts: int = option_like(ArithmeticTaskConfig, "validation_facts")
    test_facts: int = option_like(ArithmeticTaskConfig, "test_facts")
    base_model: str | None = option(
        None,
        "A pretrained model (directory or Hub id) to start from instead of pretraining one: the pretrain "
        "stage is skipped and the pretraining fields are unused.",
    )
    # Trajectories.
    trajectory_rounds: int = option(4, "Rounds R of the trajectories: histories H_1 (empty) .. H_R.")
    group_size: int = option(8, "G: responses sampled from pi_ref per trajectory question.")
    group_temperature: float = option_like(TrajectoryConfig, "group_temperature")
    history_members: bool = option_like(TrajectoryConfig, "history_members")
    # The defaults build histories as the evaluation does; see docs/e2e-findings.md.
    history_reward: str = option("self", "History rewards of the trajectories: self (majority) or gt.")
    selection: str = option("me-icpo", "Which candidate enters a trajectory history: random or me-icpo.")
    # ICPO loop, trajectories and evaluation alike.
    rounds: int = option(3, "Evaluation rounds of me-icpo.")
    k: int = option_like(InferConfig, "k", 8)
    entropy_k: int = option_like(InferConfig, "entropy_k", 4)
    final_k: int = option_like(InferConfig, "final_k", 8)
    temperature: float = option_like(InferConfig, "temperature", 1.0)
    top_p: float = option_like(InferConfig, "top_p", 1.0)
    max_new_tokens: int = option_like(InferConfig, "max_new_tokens", 8)
    summary: bool = option(False, "Summarise history entries (tiny models cannot: --no-summary).")
    summary_max_tokens: int = option_like(InferConfig, "summary_max_tokens", 8)
    max_keep: int = option_like(InferConfig, "max_keep")
    # Training, the same for icpo and the baselines.
    train_steps: int = option(150, "Optimizer steps of every adapter.")
    train_batch_size: int = option(8, "Trajectory rows per step.")
    learning_rate: float = option(
        3e-4, "LoRA learning rate (constant); from 1e-3 up the tiny models lose much accuracy."
    )
    eta: float = option(
        2.0, "Step size of the in-context policy update in the target z* = log pi_ref + eta R."
    )
    tail_bucket: bool = option(
        False,
        "icpo and mse: match exact distributions over the group's distinct answers plus one tail bucket "
        "(the trainer's tail_bucket) instead of the group-restricted softmax.",
    )
    fisher_at: str = option(
        "target",
        "icpo: where the FW loss evaluates its Fisher weights, target or policy (the trainer's fisher_at).",
    )
    # The target of every adapter (icpo, mse; sft trains on the responses it rewards).
    gt_coef: float = option_like(ICPOConfig, "gt_coef")
    reward_scale: str = option_like(ICPOConfig, "reward_scale")
    no_answer_penalty: float = option_like(ICPOConfig, "no_answer_penalty")
    tail_reward: str = option_like(ICPOConfig, "tail_reward")
    anchor_coef: float = option_like(ICPOConfig, "anchor_coef")
    logprob_reduction: str = option_like(ICPOConfig, "logprob_reduction")
    shared_prefix: bool = option_like(ICPOConfig, "shared_prefix")
    lr_scheduler_type: str = option(
        "constant", "Learning-rate schedule of every adapter (transformers' names)."
    )
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha.")
    lora_target_modules: list[str] = option_like(ICPOConfig, "lora_target_modules")  # noqa: RUF009
    bf16: bool | None = option_like(ICPOConfig, "bf16")
    iterations: int = option(
        1,
        "Build-then-train iterations: from the second on, each adapter's trajectories take their histories "
        "from its previous iteration (the groups stay pi_ref's) and a fresh adapter is trained on them.",
    )
    # Evaluation and engine.
    eval_methods: list[str] = field(
        default_factory=lambda: list(EVAL_METHODS),
        metadata={"help": f"Evaluation methods, among {', '.join(EVAL_METHODS)}."},
    )
    backend: str = option(
        "hf", "Engine of the trajectories and the evaluation: hf or vllm (one engine serves every adapter)."
    )
    device: str = option_like(InferConfig, "device")
    max_batch_tokens: int = option_like(InferConfig, "max_batch_tokens")
    batch_questions: int = option_like(InferConfig, "batch_questions", 100)
    kv_cache_gb: float | None = option_like(InferConfig, "kv_cache_gb")
    enforce_eager: bool = option_like(InferConfig, "enforce_eager", True)
    merge_adapters: bool = option(
        False,
        "Evaluate each adapter merged into the base weights, in an engine of its own, instead of as LoRA "
        "requests on the trajectories' engine (vLLM's CPU engine serves LoRA requests 4-10x slower).",
    )
    eval_reward: str = option(
        "self",
        "Rewards of the evaluation's ME-ICPO histories: self (majority vote, no gold needed: the deployed "
        "setting) or gt (tagged by the gold answer: externally observed rewards).",
    )
    eval_dtype: str = option(
        "auto",
        "dtype of the evaluation engines; other than auto, every model is evaluated in an engine of its "
        "own (the trajectories keep auto: their ref_logps are the trainer's targets). On CPUs with "
        "AVX512-BF16, bfloat16 generates about twice as fast as float32.",
    )

    def __post_init__(self) -> None:
        SyntheticTaskConfig.__post_init__(self)
        PretrainConfig.__post_init__(self)
        check(self.output_dir is not None, "output_dir is required: pass --output_dir DIR.")
        check(self.num_seeds >= 1, f"num_seeds={self.num_seeds}: use at least 1 seed.")
        for name, values, valid in [
            ("stages", self.stages, STAGES),
            ("models", self.models, MODELS),
            ("eval_methods", self.eval_methods, EVAL_METHODS),
        ]:
            unknown = [value for value in values if value not in valid]
            check(not unknown, f"{name}: unknown {unknown}; choose among {', '.join(valid)}.")
        check(bool(self.models), "models is empty; name at least one of " + ", ".join(MODELS) + ".")
        check(self.task in TASKS, f"task '{self.task}' is unknown; use one of {', '.join(TASKS)}.")
        if self.task == "arithmetic":
            self.arithmetic_config()  # checks the split sizes against the facts the family holds
            validation, test = self.validation_facts, self.test_facts
        else:
            validation, test = self.validation_size, self.test_size
        check(validation > 0, "the validation split is empty: the trajectories need validation questions.")
        check(test > 0, "the test split is empty: the evaluation needs test questions.")
        if self.base_model:
            self.base_model = os.path.expanduser(self.base_model)
        check(self.train_steps >= 1, f"train_steps={self.train_steps}: use at least 1 step.")
        check(self.iterations >= 1, f"iterations={self.iterations}: use at least 1 iteration.")
        check(self.backend in ("hf", "vllm"), f"backend '{self.backend}' is unknown; use hf or vllm.")
        check(
            self.eval_dtype == "auto" or self.eval_dtype in DTYPES,
            f"eval_dtype '{self.eval_dtype}' is unknown; use auto, {', '.join(DTYPES)}.",
        )
        if self.templates is not None:
            PromptTemplates.from_yaml(self.templates)  # a bad templates file fails before any work
        # The other stages' configs validate their own fields: build them once now.
        self.trajectory_config(Path(self.output_dir))
        self.infer_config(Path(self.output_dir), "me-icpo")
        self.train_config(Path(self.output_dir), "icpo")

    def arithmetic_config(self) -> ArithmeticTaskConfig:
        return ArithmeticTaskConfig(
            seed=self.seed,
            train_facts=self.train_facts,
            validation_facts=self.validation_facts,
            test_facts=self.test_facts,
        )

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_seeds)]

    def icpo_loop(self) -> dict[str, Any]:
        """Options shared by the trajectories' ICPO loop and the evaluation."""
        return {
            "k": self.k,
            "entropy_k": self.entropy_k,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,
            "repetition_penalty": 1.0,  # the model's own distribution; digits repeat legitimately
            "max_new_tokens": self.max_new_tokens,
            "context_length": self.context_length,
            "summary": self.summary,
            "summary_max_tokens": self.summary_max_tokens,
            "max_keep": self.max_keep,
            "templates": self.templates,
            "seed": self.seed,
            "backend": self.backend,
            "device": self.device,
            "max_batch_tokens": self.max_batch_tokens,
            "batch_questions": self.batch_questions,
            "kv_cache_gb": self.kv_cache_gb,
            "enforce_eager": self.enforce_eager,
        }

    def base_path(self, run: Path) -> Path:
        """The base model: ``base_model`` when given, else the one the pretrain stage writes."""
        return Path(self.base_model) if self.base_model else run / "base"

    def adapter_name(self, model: str, iteration: int) -> str:
        """What ``model`` is called at ``iteration``: icpo, then icpo2, icpo3, ... (base stays base)."""
        return model if model == "base" or iteration == 1 else f"{model}{iteration}"

    @property
    def evaluated_models(self) -> list[str]:
        """The base model, then every iteration's adapters: the models of eval/ and the report."""
        adapters = [m for m in self.models if m != "base"]
        iterations = range(1, self.iterations + 1)
        return [m for m in self.models if m == "base"] + [
            self.adapter_name(m, i) for i in iterations for m in adapters
        ]

    def trajectory_config(self, run: Path, model: str = "base", iteration: int = 1) -> TrajectoryConfig:
        """Iteration 1: the base model's trajectories, shared by every adapter. Later iterations: those
        whose histories ``model``'s adapter of the previous iteration builds."""
        history_adapter, output = None, run / "trajectories"
        if iteration > 1:
            history_adapter = str(run / "adapters" / self.adapter_name(model, iteration - 1))
            output = run / f"trajectories-{self.adapter_name(model, iteration)}"
        return TrajectoryConfig(
            model=str(self.base_path(run)),
            history_adapter=history_adapter,
            dataset=str(run / "data" / "validation.jsonl"),
            output=str(output),
            rounds=self.trajectory_rounds,
            group_size=self.group_size,
            group_temperature=self.group_temperature,
            history_members=self.history_members,
            history_reward=self.history_reward,
            selection=self.selection,
            **self.icpo_loop(),
        )

    def train_config(self, run: Path, model: str, iteration: int = 1) -> ICPOConfig:
        loss = LOSS_OF_MODEL[model]
        return ICPOConfig(
            output_dir=str(_partial(run / "adapters" / self.adapter_name(model, iteration))),
            model_name_or_path=str(self.base_path(run)),
            trajectories=self.trajectory_config(run, model, iteration).output,
            templates=self.templates,
            loss_type=loss,
            eta=self.eta,
            gt_coef=self.gt_coef,
            reward_scale=self.reward_scale,
            no_answer_penalty=self.no_answer_penalty,
            tail_bucket=self.tail_bucket and loss != "sft",
            tail_reward=self.tail_reward if loss != "sft" else "zero",
            anchor_coef=self.anchor_coef if loss != "sft" else 0.0,  # sft has no target to anchor
            fisher_at=self.fisher_at if loss == "fw" else "target",
            logprob_reduction=self.logprob_reduction,
            shared_prefix=self.shared_prefix,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            lora_target_modules=list(self.lora_target_modules),
            bf16=self.bf16,
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            per_device_train_batch_size=self.train_batch_size,
            max_steps=self.train_steps,
            logging_steps=max(1, self.train_steps // 5),
            save_strategy="no",  # an interrupted adapter is retrained: it takes a minute
            report_to="none",
            seed=self.seed,
        )

    def infer_config(self, run: Path, method: str, model: str = "base") -> InferConfig:
        weights, adapter = str(self.base_path(run)), None
        if model != "base" and self.merge_adapters:
            weights = str(run / "merged" / model)
        elif model != "base":
            adapter = str(run / "adapters" / model)
        return InferConfig(
            model=weights,
            adapter=adapter,
            dataset=str(run / "data" / "test.jsonl"),
            output_dir=str(run / "eval" / model / method),
            method=method,
            reward=self.eval_reward,
            rounds=self.rounds,
            final_k=self.final_k,
            dtype=self.eval_dtype,
            **self.icpo_loop(),
        )


def _partial(path: Path) -> Path:
    """Where a stage builds ``path`` before renaming it into place: ``path`` exists only when complete."""
    return path.with_name(path.name + ".partial")


@contextmanager
def _building(path: Path) -> Iterator[Path]:
    partial = _partial(path)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    partial.rename(path)


class _SeedRun:
    """The stages of one seed in ``DIR/seed-N``."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.dir = Path(config.output_dir) / f"seed-{config.seed}"
        self.base_dir = config.base_path(self.dir)
        self.trajectory_dir = self.dir / "trajectories"
        self._backend: Backend | None = None  # the base model, shared by trajectories and evaluation

    def say(self, message: str) -> None:
        print(f"[seed {self.config.seed}] {message}", flush=True)

    def run(self, stages: Sequence[str]) -> None:
        try:
            for stage in STAGES[:-1]:
                if stage not in stages or (stage == "pretrain" and self.config.base_model):
                    continue  # with a given base model there is nothing to pretrain
                start = time.perf_counter()
                if getattr(self, stage)():
                    self.record_time(stage, time.perf_counter() - start)
                else:
                    self.say(f"{stage}: nothing to do, reusing what an earlier run left in {self.dir}")
        finally:
            if self._backend is not None:
                self._backend.close()  # a vLLM engine holds its memory until stopped

    def record_time(self, stage: str, seconds: float) -> None:
        path = self.dir / TIMINGS_FILE
        timings = json.loads(path.read_text()) if path.is_file() else {}
        write_json_atomic(path, {**timings, stage: round(timings.get(stage, 0.0) + seconds, 1)})

    def require(self, path: Path, stage: str) -> None:
        check(path.exists(), f"{path} is missing: run the '{stage}' stage first (--stages {stage} ...).")

    def require_base(self) -> None:
        if not self.config.base_model:  # a given base model is checked when the backend loads it
            self.require(self.base_dir, "pretrain")

    # -- stages: each returns whether it did any work -------------------------------------------

    def data(self) -> bool:
        if all((self.dir / "data" / f"{split}.jsonl").is_file() for split in ("train", "validation", "test")):
            return False
        self.say(f"data: writing the {self.config.task} splits")
        if self.config.task == "arithmetic":
            splits = arithmetic.generate_splits(self.config.arithmetic_config())
        else:
            fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(SyntheticTaskConfig)}
            splits = synthetic.generate_splits(SyntheticTaskConfig(**fields))
        write_splits(splits, self.dir / "data")
        return True

    def pretrain(self) -> bool:
        if self.base_dir.is_dir():
            return False
        self.require(self.dir / "data" / "train.jsonl", "data")
        self.say(f"pretrain: a tiny Llama from scratch, {self.config.pretrain_steps} steps")
        problems, _ = load_problems(str(self.dir / "data" / "train.jsonl"))
        fields = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(PretrainConfig)}
        templates = PromptTemplates.from_yaml(self.config.templates) if self.config.templates else None
        with _building(self.base_dir) as partial:
            pretrain(problems, PretrainConfig(**fields), partial, templates)
        return True

    def base_backend(self) -> Backend:
        if self._backend is None:
            trajectories = self.config.trajectory_config(self.dir)  # runs the base model, as evaluation does
            options = BackendOptions.from_config(trajectories)
            # Adapters per call: evaluated as LoRA requests, or building their next iteration's histories.
            adapters = any(model != "base" for model in self.config.models)
            options.enable_lora = adapters and (self.config.iterations > 1 or not self.config.merge_adapters)
            self._backend = make_backend(self.config.backend, options)
        return self._backend

    def trajectories(self) -> bool:
        if (self.trajectory_dir / PARQUET_FILE).is_file():
            return False
        self.require_base()
        self.say("trajectories: ICPO-loop histories and pi_ref groups on the validation questions")
        build_trajectories(self.config.trajectory_config(self.dir), self.base_backend())
        return True

    def train(self) -> bool:
        config, ran = self.config, False
        for iteration in range(1, config.iterations + 1):
            for model in [m for m in config.models if m != "base"]:
                name = config.adapter_name(model, iteration)
                if (self.dir / "adapters" / name).is_dir():
                    continue
                if iteration == 1:
                    self.require(self.trajectory_dir / PARQUET_FILE, "trajectories")
                else:  # its previous iteration is trained: the loop goes iteration by iteration
                    previous = config.adapter_name(model, iteration - 1)
                    self.say(f"train: trajectories whose histories the {previous} adapter builds")
                    build_trajectories(
                        config.trajectory_config(self.dir, model, iteration), self.base_backend()
                    )
                self.say(f"train: {name} adapter (loss {LOSS_OF_MODEL[model]}), {config.train_steps} steps")
                with _building(self.dir / "adapters" / name) as partial:
                    trainer = ICPOTrainer(config.train_config(self.dir, model, iteration))
                    trainer.train()
                    trainer.save_model(str(partial))
                ran = True
        return ran

    def evaluate(self) -> bool:
        num_questions = _test_questions(self.dir)
        ran = False
        for model in self.config.evaluated_models:
            todo = [
                method
                for method in self.config.eval_methods
                if _finished(self.dir / "eval" / model / method) != num_questions
            ]
            if not todo:
                continue
            if model == "base":
                self.require_base()
            else:
                self.require(self.dir / "adapters" / model, "train")
            backend = self.eval_backend(model)
            try:
                for method in todo:
                    self.say(f"evaluate: {model} with {method}")
                    run_inference(self.config.infer_config(self.dir, method, model), backend)
            finally:
                if backend is not self._backend:
                    backend.close()
            ran = True
        return ran

    def eval_backend(self, model: str) -> Backend:
        """The trajectories' engine, which runs adapters as LoRA requests; or, with ``merge_adapters`` or
        an ``eval_dtype``, an engine of the model's own, its adapter merged into the base weights."""
        config = self.config
        if config.eval_dtype == "auto" and (model == "base" or not config.merge_adapters):
            return self.base_backend()
        if self._backend is not None:  # its memory is the next engine's
            self._backend.close()
            self._backend = None
        if model != "base" and config.merge_adapters:
            merged = self.dir / "merged" / model
            if not merged.is_dir():
                self.say(f"evaluate: merging the {model} adapter into the base weights")
                with _building(merged) as partial:
                    merge_adapter(self.base_dir, self.dir / "adapters" / model, partial)
        options = BackendOptions.from_config(config.infer_config(self.dir, "single", model))
        return make_backend(config.backend, options)


def _test_questions(seed_dir: Path) -> int:
    """The number of a seed's test questions, which its evaluations must all finish."""
    return len(load_problems(str(seed_dir / "data" / "test.jsonl"))[0])


def _finished(run_dir: Path) -> int:
    """Questions finished in an icpo-infer output directory (0 when it has no metrics yet)."""
    path = run_dir / METRICS_FILE
    return json.loads(path.read_text())["num_questions"] if path.is_file() else 0


# -- report -------------------------------------------------------------------------------------


def _model_metrics(run_dir: Path, methods: Sequence[str]) -> dict[str, Any]:
    """The report entry of one model and seed, from its icpo-infer metrics."""

    def metrics(method: str) -> dict[str, Any] | None:
        path = run_dir / method / METRICS_FILE
        return json.loads(path.read_text()) if method in methods and path.is_file() else None

    single, majority, me_icpo = metrics("single"), metrics("majority"), metrics("me-icpo")
    return {
        # Rounds 1..R then the final samples, as icpo-infer plots them.
        "mean_per_round": [*me_icpo["mean_per_round"], me_icpo["mean@k"]] if me_icpo else None,
        "maj_per_round": [*me_icpo["maj_per_round"], me_icpo["maj@k"]] if me_icpo else None,
        "self_improvement": me_icpo["self_improvement"] if me_icpo else None,
        "single": single["mean@k"] if single else None,
        "majority": majority["maj@k"] if majority else None,
    }


def _aggregate(values: list[Any], reduce) -> Any:
    """Element-wise ``reduce`` over seeds of numbers or lists of numbers (None stays None)."""
    if any(v is None for v in values):
        return None
    if isinstance(values[0], list):
        return [reduce(list(column)) for column in zip(*values, strict=True)]
    return reduce(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def build_report(config: PipelineConfig) -> dict[str, Any]:
    """report.json: per model the mean over seeds, per seed the values, and the standard deviations."""
    root = Path(config.output_dir)
    per_seed = {
        str(seed): {
            model: _model_metrics(root / f"seed-{seed}" / "eval" / model, config.eval_methods)
            for model in config.evaluated_models
        }
        for seed in config.seeds
    }
    keys = ("mean_per_round", "maj_per_round", "self_improvement", "single", "majority")

    def across(model: str, key: str, reduce) -> Any:
        return _aggregate([per_seed[str(s)][model][key] for s in config.seeds], reduce)

    comparisons = {}
    icpo = config.adapter_name("icpo", config.iterations)  # the last iterations compared
    for other in ("base", "sft", "mse"):
        if "icpo" in config.models and other in config.models and "me-icpo" in config.eval_methods:
            other_last = config.adapter_name(other, config.iterations)
            gaps = [
                per_seed[str(s)][icpo]["self_improvement"] - per_seed[str(s)][other_last]["self_improvement"]
                for s in config.seeds
            ]
            me_icpo = [
                [root / f"seed-{s}" / "eval" / m / "me-icpo" for s in config.seeds]
                for m in (other_last, icpo)
            ]
            comparisons[f"icpo-{other}"] = {
                "models": [icpo, other_last],
                "self_improvement_gap": statistics.mean(gaps),
                "std": _std(gaps),
                # ICPO minus the other in points, paired by seed and question, as `icpo-infer compare` gives it
                "paired": paired_comparison(*me_icpo),
            }
    timings = {}
    for seed in config.seeds:
        path = root / f"seed-{seed}" / TIMINGS_FILE
        timings[str(seed)] = json.loads(path.read_text()) if path.is_file() else {}
    num_questions = {str(seed): _test_questions(root / f"seed-{seed}") for seed in config.seeds}
    return {
        "models": {
            m: {key: across(m, key, statistics.mean) for key in keys} for m in config.evaluated_models
        },
        "seeds": {
            "values": config.seeds,
            "std": {m: {key: across(m, key, _std) for key in keys} for m in config.evaluated_models},
            "per_seed": per_seed,
        },
        "comparisons": comparisons,  # paired over seeds: ICPO's self-improvement minus the other's, last iterations
        "num_questions": num_questions,  # per seed: a task's splits may differ in size
        "k": config.final_k,
        "rounds": config.rounds,
        "eval_reward": config.eval_reward,
        "timings_s": timings,
        "report": str(root / REPORT_FILE),
        "plot": str(root / PLOT_FILE),
        "config": to_dict(config),
    }


def questions_label(report: dict[str, Any]) -> str:
    """The report's number of test questions: "57", or "51 to 57" when seeds differ."""
    low, high = min(report["num_questions"].values()), max(report["num_questions"].values())
    return str(low) if low == high else f"{low} to {high}"


def plot_report(report: dict[str, Any], path: str | Path) -> Figure:
    """mean@k and maj@k of me-icpo against round for every model, mean and std over seeds."""
    figure = Figure(figsize=(9, 3.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    labels = [str(r) for r in range(1, report["rounds"] + 1)] + ["final"]
    plotted = [0.0]
    for values in report["models"].values():
        for key in ("mean_per_round", "maj_per_round"):
            plotted += values[key] or []
    for ax, key, title in zip(axes, ("mean_per_round", "maj_per_round"), ("mean@k", "maj@k"), strict=True):
        for i, (model, values) in enumerate(report["models"].items()):
            if values[key] is not None:
                std = report["seeds"]["std"][model][key]
                ax.errorbar(labels, values[key], yerr=std, marker="o", capsize=3, color=f"C{i}", label=model)
        ax.set(xlabel="round", title=f"ME-ICPO {title} (k={report['k']})", ylim=accuracy_limits(plotted))
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    seeds = len(report["seeds"]["values"])
    figure.suptitle(
        f"{questions_label(report)} test questions, history rewards {REWARD_SETTINGS[report['eval_reward']]}, "
        f"mean ± std over {seeds} seed(s)"
    )
    figure.savefig(path, dpi=120)
    return figure


def format_report(report: dict[str, Any]) -> str:
    """The results table: percentages, mean ± std over seeds."""
    seeds = report["seeds"]

    def cell(model: str, key: str, index: int | None = None) -> str:
        value, std = report["models"][model][key], seeds["std"][model][key]
        if value is None:
            return "-"
        if index is not None:
            value, std = value[index], std[index]
        return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if len(seeds["values"]) > 1 else "")

    rounds = report["rounds"]
    columns = [
        ("single", "single", None),
        ("majority", "majority", None),
        *[(f"round {r}", "mean_per_round", r - 1) for r in range(1, rounds + 1)],
        ("final", "mean_per_round", rounds),
        ("final maj", "maj_per_round", rounds),
        ("self-impr.", "self_improvement", None),
    ]
    rows = [[model] + [cell(model, key, index) for _, key, index in columns] for model in report["models"]]
    header = ["model"] + [title for title, _, _ in columns]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    k = report["k"]
    title = (
        f"Accuracy (%) on {questions_label(report)} test questions, k={k}: single = mean@{k} without history, "
        f"majority = maj@{k}, round r / final = ME-ICPO mean@{k} with history rewards "
        f"{REWARD_SETTINGS[report['eval_reward']]}; seeds {seeds['values']}"
    )

    comparisons = []
    for c in report["comparisons"].values():
        icpo, other = c["models"]
        comparisons.append(
            f"ICPO{'' if icpo == 'icpo' else f' ({icpo})'} minus {other}, points [paired bootstrap 95% "
            f"interval]: final {difference_with_interval(c['paired'], 'final_accuracy_diff')}, self-improvement "
            f"{difference_with_interval(c['paired'], 'self_improvement_diff')}"
            + (
                f"; self-improvement gap ± {100 * c['std']:.1f} over seeds"
                if len(seeds["values"]) > 1
                else ""
            )
        )
    return "\n".join([title, *lines, *comparisons])


REWARD_SETTINGS = {
    "self": "by majority vote (self-rewards, no gold)",
    "gt": "by the gold answer (external rewards)",
}
MODEL_LEGEND = {
    "base": "the pretrained model, no adapter",
    "icpo": "LoRA adapter trained with the Fisher-weighted ICPO loss to act on its history's rewards",
    "sft": "same data and budget, cross-entropy on the answers its history rewards (baseline)",
    "mse": "ICPO's target without the Fisher weights (ablation)",
}


def format_legend(report: dict[str, Any]) -> str:
    """What the rows and columns of :func:`format_report`'s table mean, for a reader new to ICPO."""
    k, rounds = report["k"], report["rounds"]
    rows = {}
    for model in report["models"]:
        kind = model.rstrip("0123456789")  # icpo2 is icpo's second iteration
        rows[model] = (
            MODEL_LEGEND[kind]
            if model == kind
            else f"{kind} trained again on the histories its iteration {int(model[len(kind) :]) - 1} built"
        )
    rows |= {
        "single": f"share of {k} answers sampled without a history that are right (mean@{k})",
        "majority": f"is the most frequent of those {k} answers right? (maj@{k}, self-consistency)",
        "round 1": "ME-ICPO's first round, empty history: single again, other samples",
    }
    if rounds > 1:
        rows[f"round 2..{rounds}"] = (
            "the prompt shows earlier answers tagged reward 1/0 " + REWARD_SETTINGS[report["eval_reward"]]
        )
    rows |= {
        "final": f"{k} answers sampled after the last round; final maj: is their most frequent right?",
        "self-impr.": "final - round 1, in points: the gain from the model's own history (ICPO aims to raise it)",
    }
    width = max(len(name) for name in rows)
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in rows.items())


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the selected stages for every seed; returns the report when 'report' is one of them, else {}."""
    root = Path(config.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    with run_log(root):
        for seed in config.seeds:
            _SeedRun(dataclasses.replace(config, seed=seed)).run(config.stages)
        if "report" not in config.stages:
            return {}
        for seed in config.seeds:
            for model in config.evaluated_models:
                for method in config.eval_methods:
                    _require_finished(root / f"seed-{seed}" / "eval" / model / method)
        report = build_report(config)
        write_json_atomic(root / REPORT_FILE, report)
        plot_report(report, root / PLOT_FILE)
        return report


def _require_finished(run_dir: Path) -> None:
    check(
        (run_dir / METRICS_FILE).is_file(),
        f"{run_dir / METRICS_FILE} is missing: run the 'evaluate' stage first (--stages evaluate report).",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = parse_config(PipelineConfig, argv, prog="icpo-train pipeline")
    report = run_pipeline(config)
    if report:
        with run_log(config.output_dir):
            print(format_report(report))
            print(f"report: {report['report']}\nplot: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
