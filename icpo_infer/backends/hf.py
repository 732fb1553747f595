"""The transformers backend: batched generation and scoring on CPU or CUDA, LoRA adapters through PEFT.

Batches are packed from rows (one row = one sample of one prompt), longest first, so that rows x
(longest prompt + new tokens) stays under ``BackendOptions.max_batch_tokens``. transformers'
``num_return_sequences`` only repeats each prompt row before decoding; repeating the rows here
does the same work and lets the ``n`` samples of a long prompt spread over several batches.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Iterator

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from icpo_infer.backends import encode_prompts, params_per_prompt, resolve_device, resolve_dtype
from icpo_infer.backends.base import (
    BackendOptions,
    Completion,
    Generation,
    SamplingParams,
    Score,
    Usage,
    derive_seed,
    encode_completion,
)
from icpo_infer.config import check


class HFBackend:
    """A transformers causal LM (local path or Hub id), optionally with PEFT LoRA adapters.

    Adapters: ``adapter=PATH`` on a call runs that adapter (loaded once, cached by path, so save new
    weights under a new path); ``adapter=None`` runs ``options.adapter`` when one was given, else the
    base model. Same semantics as the vLLM backend. ``options.extra`` goes to ``from_pretrained``
    (e.g. ``attn_implementation``).
    """

    def __init__(self, options: BackendOptions) -> None:
        check(options.max_batch_tokens >= 1, "--max-batch-tokens: use a positive number of tokens.")
        self.options = options
        self.device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            options.model, trust_remote_code=options.trust_remote_code
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            options.model,
            dtype=dtype,
            device_map=str(self.device),
            trust_remote_code=options.trust_remote_code,
            **options.extra,
        ).eval()
        self.usage = Usage()
        # The model stops at its generation config's EOS ids (chat models list several); the tokenizer's
        # EOS is what encode_completion appends, so it ends a completion too.
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids = sorted(i for i in eos_ids if i is not None)
        check(bool(self.eos_ids), f"--model: '{options.model}' defines no end-of-sequence token.")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self._adapter_names: dict[str, str] = {}
        self._adapters_loaded = 0
        if options.adapter is not None:
            self._load_adapter(options.adapter)

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        adapter: str | None = None,
    ) -> list[Generation]:
        """``n`` completions per prompt, all prompts in one engine call (one ``usage`` record)."""
        per_prompt = params_per_prompt(prompts, params)
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        completions: list[list[Completion | None]] = [[None] * p.n for p in per_prompt]
        # Rows (prompt i, sample j) with equal sampling parameters, n and seed aside, share batches;
        # each row draws from its own stream (see _RowSampler).
        groups: dict[SamplingParams, list[tuple[int, int]]] = {}
        for i, p in enumerate(per_prompt):
            groups.setdefault(p.replace(n=1, seed=None), []).extend((i, j) for j in range(p.n))
        seeds = [
            [None if p.seed is None else derive_seed(p.seed, prompt, j) for j in range(p.n)]
            for prompt, p in zip(prompts, per_prompt, strict=True)
        ]
        with self._adapter(adapter), torch.inference_mode():
            for group_params, group_rows in groups.items():
                lengths = [len(prompt_ids[i]) + group_params.max_new_tokens for i, _ in group_rows]
                for batch in pack(lengths, self.options.max_batch_tokens):
                    batch_rows = [group_rows[k] for k in batch]
                    outputs = self._generate_batch(
                        [prompt_ids[i] for i, _ in batch_rows],
                        group_params,
                        [seeds[i][j] for i, j in batch_rows],
                    )
                    for (i, j), tokens in zip(batch_rows, outputs, strict=True):
                        completions[i][j] = self._completion(tokens, group_params)
        generations = [
            Generation(len(ids), samples) for ids, samples in zip(prompt_ids, completions, strict=True)
        ]
        self.usage.record(generations)
        return generations

    def score(self, prompts: list[str], completions: list[str], adapter: str | None = None) -> list[Score]:
        """Sum of log pi(token | prefix) over each completion's tokens (its EOS included), teacher-forced."""
        if len(prompts) != len(completions):
            raise ValueError(f"score() got {len(prompts)} prompts and {len(completions)} completions")
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        completion_ids = [encode_completion(self.tokenizer, c) for c in completions]
        scores: list[Score | None] = [None] * len(prompts)
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        with self._adapter(adapter), torch.inference_mode():
            for batch in pack(lengths, self.options.max_batch_tokens):
                logprobs = self._score_batch(
                    [prompt_ids[k] for k in batch], [completion_ids[k] for k in batch]
                )
                for k, logprob in zip(batch, logprobs, strict=True):
                    scores[k] = Score(logprob, len(completion_ids[k]))
        self.usage.record_scoring(sum(lengths))
        return scores

    def _left_padded(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def _generate_batch(
        self, prompt_ids: list[list[int]], params: SamplingParams, seeds: list[int | None]
    ) -> list[list[int]]:
        """The new tokens of each row (EOS and any padding after the row stopped included).

        ``seeds``: each row's sampling seed (None: torch's global generator).
        """
        inputs = self._left_padded(prompt_ids)
        kwargs = {
            "max_new_tokens": params.max_new_tokens,
            "repetition_penalty": params.repetition_penalty,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.pad_id,
            "do_sample": False,  # sampling, when asked for, is _RowSampler's: generate() then takes its pick
        }
        if params.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(params, seeds)])
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        output = self.model.generate(**inputs, **kwargs)
        return output[:, inputs["input_ids"].shape[1] :].tolist()

    def _completion(self, tokens: list[int], params: SamplingParams) -> Completion:
        """What a row's new tokens mean: it ended at EOS, at a stop string, or ran out of max_new_tokens.

        Rows that stopped early are padded afterwards (possibly with the EOS id), so the stop string is
        looked for first, within the tokens before the first EOS.
        """
        eos_at = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        body = tokens if eos_at is None else tokens[:eos_at]
        if params.stop:
            stop_end = first_stop(self.tokenizer, body, params.stop)
            if stop_end is not None:
                text = self._decode(body[:stop_end])
                cut = min(text.find(s) for s in params.stop if s in text)
                return Completion(text[:cut], stop_end, finished=True)
        if eos_at is not None:
            return Completion(self._decode(body), eos_at + 1, finished=True)
        return Completion(self._decode(body), len(tokens), finished=False)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _score_batch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        inputs = self._left_padded([p + c for p, c in zip(prompt_ids, completion_ids, strict=True)])
        # With left padding every completion ends at the last column, so only the last logits are needed;
        # positions must then come from the mask, as generate() computes them.
        keep = max(len(c) for c in completion_ids) + 1
        position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**inputs, position_ids=position_ids, logits_to_keep=keep).logits
        logprobs = []
        for row, ids in enumerate(completion_ids):
            # logits at column t predict the token at column t + 1; the last column predicts past the end.
            row_logits = logits[row, keep - 1 - len(ids) : keep - 1].float()
            targets = torch.tensor(ids, device=row_logits.device).unsqueeze(-1)
            logprobs.append(row_logits.log_softmax(-1).gather(-1, targets).sum().item())
        return logprobs

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        """Run the block with ``adapter`` (default: ``options.adapter``) active, or the bare base model."""
        path = adapter if adapter is not None else self.options.adapter
        if path is not None:
            name = self._load_adapter(path)  # may wrap self.model in a PeftModel
            self.model.set_adapter(name)
            yield
        elif isinstance(self.model, PeftModel):
            with self.model.disable_adapter():
                yield
        else:
            yield

    def close(self) -> None:
        """Drop the model now, so a caller that keeps this object (or trains beside it) gets its memory back."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release(self, adapter: str) -> None:
        """Drop a per-call adapter's weights; ``options.adapter`` stays loaded."""
        if adapter == self.options.adapter or adapter not in self._adapter_names:
            return
        name = self._adapter_names.pop(adapter)
        if self._adapter_names:
            # Another adapter becomes active first: PEFT's disable_adapter() looks the active one up, and a
            # deleted active adapter is only replaced with a warning (each call sets its own anyway).
            self.model.set_adapter(next(iter(self._adapter_names.values())))
            self.model.delete_adapter(name)
        else:  # a PeftModel without adapters cannot run: unwrap the base model instead
            self.model = self.model.unload()

    def _load_adapter(self, path: str) -> str:
        """The PEFT name of the adapter saved at ``path``, loading it on first use."""
        if path not in self._adapter_names:
            # PEFT names are module keys (no dots or slashes); a count of loads, never reused after a release.
            self._adapters_loaded += 1
            name = f"adapter_{self._adapters_loaded}"
            with warnings.catch_warnings():
                # An adapter of a tied lm_head: PEFT warns about merging and converting it, which this
                # backend never does.
                warnings.filterwarnings("ignore", "Model has `tie_word_embeddings=True`", UserWarning, "peft")
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(path, adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self._adapter_names[path] = name
        return self._adapter_names[path]


class _RowSampler(LogitsProcessor):
    """Samples each row's next token from the row's own random stream; generate() decodes greedily after it.

    transformers' sampling draws a whole batch from torch's global generator, so a row's sample would
    depend on the rows batched with it. Here a seeded row draws from its own generator only, as vLLM
    draws each seeded request, and keeps its samples however the prompts are batched. The filters are
    transformers' own, in its order (temperature, top-k, top-p), after the repetition penalty.
    """

    def __init__(self, params: SamplingParams, seeds: list[int | None]) -> None:
        warpers = [TemperatureLogitsWarper(params.temperature)] if params.temperature != 1 else []
        if params.top_k > 0:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generators = [None if seed is None else torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cdf = self.warpers(input_ids, scores).float().softmax(-1).cumsum(-1)
        uniforms = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(cdf.device)
        # Inverse CDF: the first token whose cumulative mass exceeds u * total, always one with mass > 0.
        tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with len(batch) x longest <= budget (at least one each)."""
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def first_stop(tokenizer, tokens: list[int], stop: tuple[str, ...]) -> int | None:
    """The fewest leading tokens whose text contains a stop string, or None (binary search over prefixes)."""

    def contains(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return any(s in text for s in stop)

    if not contains(len(tokens)):
        return None
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if contains(middle):
            high = middle
        else:
            low = middle + 1
    return low
