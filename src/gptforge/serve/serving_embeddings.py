"""POST /v1/embeddings: one vector per input from the model's hidden states.

Pooling (docs/serve.md): the output of the final norm (the hidden state the LM head reads) at the LAST
token of each input, L2-normalized, by default. The model is causal, so the last position is the only one
that has attended to the whole input; a mean over positions mixes in states that saw only a prefix (the
first token's state knows one token). Last-token pooling is what decoder-based embedding models (E5-Mistral,
GTE-Qwen) and vLLM's default for them use. `--embedding-pooling mean` averages the final norm's output over
the input's tokens instead. Vectors have length 1, as OpenAI's do, so a dot product is the cosine similarity.

Batching: the inputs of a request, sorted by length, go through the model in micro-batches of at most
`MAX_BATCH_TOKENS` padded tokens; each micro-batch runs on the engine thread between two decode steps
(`Engine.run_between_steps`), so embeddings never race generation for the model and streams keep flowing.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Optional

import torch
from fastapi import Request

from .errors import invalid_param
from .protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, to_jsonable
from .serving_base import ServingBase

MAX_BATCH_TOKENS = 4096  # padded tokens per forward: bounds memory and the pause a micro-batch puts on decoding
POOLINGS = ("last", "mean")


def pooled_embeddings(model: torch.nn.Module, batch: list[list[int]], pooling: str) -> torch.Tensor:
    """(B, C) float32 unit vectors for token-id inputs: the final norm's output pooled per input.

    Right padding needs no attention mask: causal attention never lets a real token see a later pad."""
    lengths = torch.tensor([len(ids) for ids in batch])
    ids = torch.zeros((len(batch), int(lengths.max())), dtype=torch.long)  # (B, T)
    for i, row in enumerate(batch):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    captured: dict[str, torch.Tensor] = {}
    hook = model.blocks[-1].register_forward_hook(lambda module, args, out: captured.__setitem__("x", out))
    try:
        with torch.inference_mode():
            model(ids, last_only=True)  # the LM head runs on one position only; the hook keeps every position
            hidden = model.norm_f(captured["x"]).float()  # (B, T, C)
    finally:
        hook.remove()
    if pooling == "last":
        vectors = hidden[torch.arange(len(batch)), lengths - 1]  # (B, C)
    else:
        real = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()  # (B, T)
        vectors = (hidden * real[..., None]).sum(1) / lengths[:, None].float()
    return torch.nn.functional.normalize(vectors, dim=-1)


def micro_batches(inputs: list[list[int]], max_tokens: int = MAX_BATCH_TOKENS) -> list[list[int]]:
    """Indices of `inputs` grouped by similar length so that rows x longest stays within `max_tokens`."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = len(inputs[i])  # sorted: the newest is the longest
        if current and (len(current) + 1) * longest > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class EmbeddingServing(ServingBase):
    """The embeddings endpoint."""

    def __init__(self, *args: Any, pooling: str = "last", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"embedding pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.dimensions = self.engine.model.config.n_embd

    async def create(self, body: EmbeddingRequest, request: Request, key_id: str) -> dict[str, Any]:
        """The response dict: one embedding per input, in input order."""
        self.check_model(body.model, adapters=False)
        if body.dimensions is not None and body.dimensions != self.dimensions:
            raise invalid_param("dimensions", f"this model's embeddings have {self.dimensions} dimensions; "
                                "shortening them is not supported")
        raw = self._input_list(body.input)
        for i, item in enumerate(raw):
            param = "input" if len(raw) == 1 else f"input[{i}]"
            if isinstance(item, str):
                if not item:
                    raise invalid_param(param, "an input must not be empty")
                self.check_text_size(item, param)
            else:
                self.check_token_ids(item, param)
        self.rate_limiter.admit_request(key_id)
        inputs = await self.run_cpu(self._tokenize, raw)
        tokens = sum(len(x) for x in inputs)
        self.rate_limiter.admit_tokens(key_id, tokens)
        loop = asyncio.get_running_loop()
        futures = []
        groups = micro_batches(inputs)
        for group in groups:
            batch = [inputs[i] for i in group]
            futures.append(asyncio.wrap_future(self.engine.run_between_steps(
                lambda batch=batch: pooled_embeddings(self.engine.model, batch, self.pooling)), loop=loop))
        vectors: list[Optional[torch.Tensor]] = [None] * len(inputs)
        for group, result in zip(groups, await asyncio.gather(*futures)):
            for row, i in enumerate(group):
                vectors[i] = result[row]
        data = [EmbeddingData(index=i, embedding=self._encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
        usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        request.state.usage = {"prompt_tokens": tokens, "completion_tokens": 0}
        return to_jsonable(EmbeddingResponse(data=data, model=self.model_name, usage=usage))

    @staticmethod
    def _input_list(value: Any) -> list:
        if isinstance(value, str):
            return [value]
        if not value:
            raise invalid_param("input", "input must not be empty")
        return [value] if isinstance(value[0], int) else list(value)

    def _tokenize(self, raw: list) -> list[list[int]]:
        out = []
        for i, item in enumerate(raw):
            ids = self.encode(item) if isinstance(item, str) else list(item)
            if len(ids) > self.block_size:
                param = "input" if len(raw) == 1 else f"input[{i}]"
                raise invalid_param(param, f"{len(ids)} tokens exceed the model's context of {self.block_size}")
            out.append(ids)
        return out

    @staticmethod
    def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
        if encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
            return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
        return vector.tolist()


__all__ = ["EmbeddingServing", "pooled_embeddings", "micro_batches", "POOLINGS"]
