"""InferConfig: every option of `icpo-infer run`, checked when the config is built; the method and
reward names it accepts; and the options that may change when a run resumes (:data:`RUN_ONLY_FIELDS`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from icpo_infer.backends import BACKENDS
from icpo_infer.backends.base import SamplingParams, adapter_problem, location_problem
from icpo_infer.config import CollectRepeated, ConfigError, check, option
from icpo_infer.prompts import PromptTemplates

ICPO_METHODS = ("random-icpo", "me-icpo")
METHODS = ("single", "majority", "best-of-n", "self-refine", *ICPO_METHODS)
ROUND_METHODS = ("self-refine", *ICPO_METHODS)  # methods whose answers change over rounds
REWARDS = ("self", "gt")


@dataclass
class InferConfig:
    """Everything `icpo-infer run` takes; recipes in recipes/infer/ set these fields."""

    model: str = field(metadata={"help": "Model path or Hub id."})
    dataset: str = field(
        metadata={"help": "Local .json/.jsonl/.parquet file, a Hub dataset id, or aime24, amc, math500."}
    )
    output_dir: str = field(metadata={"help": "Where results.jsonl, metrics.json and the plot go."})
    adapter: str | None = option(None, "LoRA adapter path to apply to the model.")
    merge_adapter: bool = option(
        False,
        "hf, vllm: run --adapter merged into the model's weights (written to a temporary directory) instead "
        "of as LoRA: on the CPU vLLM engine a LoRA request costs several times the base model's time.",
    )
    split: str | None = option(None, "Dataset split (Hub datasets).")
    limit: int | None = option(None, "Only the first N questions.")
    problem_field: str = option("problem", "Dataset field holding the question.")
    answer_field: str = option("answer", "Dataset field holding the gold answer.")
    id_field: str = option("id", "Dataset field holding the question id (row index when absent).")
    skip_invalid: bool = option(False, "Skip (and count) rows without a problem or answer.")
    method: str = option("me-icpo", f"One of {', '.join(METHODS)}.")
    reward_model: str | None = option(
        None,
        "best-of-n: a transformers sequence-classification model (path) that picks the sample "
        "instead of the mean token log-probability.",
    )
    reward: str = option("self", "self: majority-vote pseudo-reward; gt: ground-truth reward (ablation).")
    rounds: int = option(3, "Rounds of in-context refinement (self-refine: of feedback and refinement).")
    k: int = option(
        16,
        "Responses sampled per question and round (single/majority/best-of-n: the samples; self-refine: the chains).",
    )
    entropy_k: int = option(16, "Responses sampled per probe prompt to score a candidate's entropy.")
    final_k: int = option(16, "Responses sampled from the final prompt (mean@k, maj@k, pass@k).")
    temperature: float = option(0.6, "Sampling temperature for answers and probes.")
    top_p: float = option(0.95, "Nucleus sampling threshold.")
    top_k: int = option(0, "Top-k filter (0: off).")
    repetition_penalty: float = option(1.1, "Repetition penalty (1: off).")
    max_new_tokens: int = option(5000, "Answer length: at most this many new tokens per response.")
    context_length: int | None = option(
        None,
        "Prompt + response budget in tokens; history is trimmed to fit. Default: the model's limit (its "
        "max_position_embeddings, or the servers' max_model_len); a larger value is an error.",
    )
    summary: bool = option(True, "Summarise candidates (--no-summary: use the truncated response).")
    summary_max_tokens: int = option(500, "Summary length in tokens (also the truncation without summaries).")
    summary_temperature: float = option(0.05, "Sampling temperature of the summaries.")
    feedback_max_tokens: int = option(1024, "self-refine: length of a feedback in tokens.")
    entropy_penalty: bool = option(True, "Add log2(entropy_k) * invalid fraction to a probe's entropy.")
    epsilon: float = option(0.0, "me-icpo: probability of picking a random candidate instead.")
    max_keep: int = option(5, "Most entries per bucket; an overfull bucket evicts one.")
    templates: str | None = option(None, "YAML file overriding the prompt wording.")
    seed: int = option(0, "Seed of every random choice and every sampling request.")
    backend: str = option("hf", f"One of {', '.join(BACKENDS)}.")
    dtype: str = option("auto", "Model dtype (auto: bf16 where supported).")
    device: str = option("auto", "hf backend device.")
    max_batch_tokens: int = option(16384, "hf backend: token budget of one generation batch.")
    tensor_parallel_size: int = option(1, "vllm backend: tensor parallel size.")
    data_parallel_size: int = option(1, "vllm backend: data parallel size.")
    gpu_memory_utilization: float = option(0.9, "vllm backend: fraction of GPU memory to use.")
    kv_cache_gb: float | None = option(
        None,
        "vllm backend: GiB of KV cache (default: what --gpu-memory-utilization leaves on a GPU, 4 on a CPU).",
    )
    enforce_eager: bool = option(
        False, "vllm backend: no torch.compile or CUDA graphs: the engine starts in seconds, decodes slower."
    )
    base_url: list[str] = field(
        default_factory=list,
        metadata={
            "help": "openai backend: URL of an OpenAI-compatible server (e.g. http://host:8000/v1); repeat "
            "the flag to spread the requests over several servers.",
            "action": CollectRepeated,
        },
    )
    api_key_env: str | None = option(
        None, "openai backend: environment variable holding the servers' API key (never written anywhere)."
    )
    tokenizer: str | None = option(
        None, "openai backend: local tokenizer (path or Hub id) of the served model (default: --model)."
    )
    max_concurrency: int = option(64, "openai backend: most requests in flight, over all servers.")
    score_concurrency: int | None = option(
        None,
        "openai backend: most scoring requests in flight per server (default: no cap but --max-concurrency). "
        "1 for vLLM's CPU build started with --enable-lora, whose prompt log-probs fail on two requests in "
        "one engine step and take the server down.",
    )
    trust_remote_code: bool = option(False, "Run the model repository's own code (only for repos you trust).")
    batch_questions: int = option(
        64,
        "Questions per chunk (each phase is one engine call over a chunk). The samples do not depend on "
        "it; an interrupted run keeps its finished questions and the finished rounds of the chunk in progress.",
    )
    overwrite: bool = option(False, "Start over in an output dir that holds results.")

    def __post_init__(self) -> None:
        check(self.method in METHODS, f"method '{self.method}' is unknown; use one of {', '.join(METHODS)}.")
        check(
            self.backend in BACKENDS,
            f"backend '{self.backend}' is unknown; use one of {', '.join(BACKENDS)}.",
        )
        check(
            self.backend != "openai" or self.base_url,
            "--backend openai needs a server: pass --base-url http://HOST:PORT/v1 (repeat it for several).",
        )
        check(
            self.backend == "openai" or not self.base_url,
            f"--base-url is for --backend openai; the {self.backend} backend loads the model itself.",
        )
        check(self.max_concurrency >= 1, f"max_concurrency={self.max_concurrency} is invalid; use 1 or more.")
        check(
            self.score_concurrency is None or self.score_concurrency >= 1,
            f"score_concurrency={self.score_concurrency} is invalid; use 1 or more, or leave it out.",
        )
        check(self.reward in REWARDS, f"reward '{self.reward}' is unknown; use one of {', '.join(REWARDS)}.")
        for name in (
            "rounds",
            "k",
            "entropy_k",
            "final_k",
            "max_new_tokens",
            "summary_max_tokens",
            "feedback_max_tokens",
            "max_keep",
            "batch_questions",
        ):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; use {name} >= 1.")
        check(
            self.context_length is None or self.context_length >= 1,
            f"context_length={self.context_length} is invalid; use context_length >= 1 or leave it out.",
        )
        check(
            self.limit is None or self.limit >= 1,
            f"limit={self.limit} is invalid; use limit >= 1 or leave it out.",
        )
        check(
            self.method != "me-icpo" or self.entropy_k >= 2,
            f"entropy_k={self.entropy_k}: one probe sample always has entropy 0; use entropy_k >= 2 for me-icpo.",
        )
        check(0 <= self.epsilon <= 1, f"epsilon={self.epsilon} is invalid; use 0 <= epsilon <= 1.")
        check(
            self.reward_model is None or self.method == "best-of-n",
            f"reward_model is set but method is '{self.method}'; only best-of-n uses --reward-model.",
        )
        problem = self.reward_model and location_problem(self.reward_model)
        check(
            not problem,
            f"reward_model '{self.reward_model}' {problem}; pass a sequence-classification model's path.",
        )
        for summary in (False, True):  # SamplingParams validates the sampling fields
            self.sampling(n=1, max_new_tokens=1, seed=0, summary=summary)
        if self.templates is not None:  # a bad templates file fails now, not after the model loads
            PromptTemplates.from_yaml(self.templates)
        check(
            not self.merge_adapter or self.backend in ("hf", "vllm"),
            f"merge_adapter applies to the hf and vllm backends, not '{self.backend}'; a server serves its "
            "adapters as it was started.",
        )
        problem = adapter_problem(self.adapter)
        check(
            problem is None,
            f"adapter '{self.adapter}' {problem}; --adapter takes a LoRA adapter of --model (a fully "
            "fine-tuned model goes in --model, and --adapter is left out).",
        )

    @property
    def eval_k(self) -> int:
        """How many samples mean@k, maj@k and pass@k are taken over."""
        return self.final_k if self.method in ICPO_METHODS else self.k

    def sampling(self, n: int, max_new_tokens: int, seed: int, summary: bool = False) -> SamplingParams:
        """Sampling parameters of one request (summaries use their own temperature)."""
        try:
            return SamplingParams(
                n=n,
                temperature=self.summary_temperature if summary else self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_new_tokens=max_new_tokens,
                repetition_penalty=self.repetition_penalty,
                seed=seed,
            )
        except ValueError as err:
            options = (
                f"--{'summary-' if summary else ''}temperature, --top-p, --top-k or --repetition-penalty"
            )
            raise ConfigError(f"{err} (set by {options})") from err


# Options that change how a run executes but not what it measures: a run may resume with new values.
RUN_ONLY_FIELDS = frozenset(
    {
        "limit",
        "skip_invalid",
        "output_dir",
        "merge_adapter",
        "overwrite",
        "batch_questions",
        "device",
        "max_batch_tokens",
        "tensor_parallel_size",
        "data_parallel_size",
        "gpu_memory_utilization",
        "kv_cache_gb",
        "enforce_eager",
        "base_url",
        "api_key_env",
        "max_concurrency",
        "score_concurrency",
    }
)
