"""An outside reward model for best-of-n: a transformers sequence-classification model with one output.

It reads the question and a response (as a user and an assistant message when its tokenizer has a chat
template, else the two texts after its BOS token) and returns one score; best-of-n keeps the response
scored highest. Its engine calls and tokens count in the run's cost like the generator's.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from icpo_infer.backends import resolve_device, resolve_dtype
from icpo_infer.backends.base import Usage, encode_prompt
from icpo_infer.backends.hf import pack
from icpo_infer.config import check


class RewardModel:
    """Scores (question, response) pairs in batches of at most ``max_batch_tokens`` padded tokens."""

    def __init__(
        self,
        path: str,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_tokens: int = 16384,
        trust_remote_code: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.max_batch_tokens = max_batch_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=resolve_dtype(dtype, self.device),
            device_map=str(self.device),
            trust_remote_code=trust_remote_code,
        ).eval()
        labels = self.model.config.num_labels
        check(
            labels == 1,
            f"--reward-model: '{path}' has {labels} output labels; a reward model has one (num_labels=1).",
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        check(
            self.pad_id is not None, f"--reward-model: '{path}' defines no padding or end-of-sequence token."
        )
        # The model reads each row's score at its last token that is not padding.
        self.model.config.pad_token_id = self.pad_id
        self.usage = Usage()

    def render(self, question: str, response: str) -> str:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return (self.tokenizer.bos_token or "") + f"{question.strip()}\n\n{response.strip()}"

    def score(self, questions: list[str], responses: list[str]) -> list[float]:
        """One score per (question, response) pair: one engine call, however many batches it takes."""
        if len(questions) != len(responses):
            raise ValueError(f"score() got {len(questions)} questions and {len(responses)} responses")
        ids = [
            encode_prompt(self.tokenizer, self.render(q, r))
            for q, r in zip(questions, responses, strict=True)
        ]
        scores: list[float] = [0.0] * len(ids)
        with torch.inference_mode():
            for batch in pack([len(row) for row in ids], self.max_batch_tokens):
                width = max(len(ids[k]) for k in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                for row, k in enumerate(batch):
                    input_ids[row, : len(ids[k])] = torch.tensor(ids[k])
                    attention_mask[row, : len(ids[k])] = 1
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                ).logits
                for row, k in enumerate(batch):
                    scores[k] = logits[row, 0].float().item()
        self.usage.record_scoring(sum(len(row) for row in ids))
        return scores
