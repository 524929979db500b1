"""The tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info, the shapes lm-evaluation-harness's
remote tokenizer reads) and the model list."""

from __future__ import annotations

from typing import Any

from ..tokenizer import CHATML_TEMPLATE
from .errors import invalid_param
from .protocol import (DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                       TokenizeResponse, TokenizerInfo, to_jsonable)
from .serving_base import ServingBase
from .serving_chat import chat_messages


class TokenizeServing(ServingBase):
    """Tokenize, detokenize, tokenizer info and models."""

    def models(self) -> dict[str, Any]:
        cards = [ModelCard(id=self.model_name, max_model_len=self.block_size)]
        adapters = getattr(self.engine, "adapters", None)
        for name in (adapters.names if adapters is not None else []):
            cards.append(ModelCard(id=name, root=str(adapters.directories.get(name, "")) or None,
                                   parent=self.model_name, max_model_len=self.block_size))
        return to_jsonable(ModelList(data=cards))

    def model(self, model_id: str) -> dict[str, Any]:
        slot = self.check_model(model_id)
        return self.models()["data"][slot]

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model, required=False)
        if req.messages is None and req.prompt is None:
            raise invalid_param("prompt", "give 'prompt' (text) or 'messages' (chat) to tokenize")
        if req.prompt is not None:
            self.check_text_size(req.prompt, "prompt")
        else:
            for i, m in enumerate(req.messages):
                self.check_text_size(m.text(), f"messages[{i}].content")
        ids = await self.run_cpu(self._tokenize, req)
        return to_jsonable(TokenizeResponse(count=len(ids), max_model_len=self.block_size, tokens=ids,
                                            token_strs=[self.tokenizer.id_to_token(i) or "" for i in ids]))

    def _tokenize(self, req: TokenizeRequest) -> list[int]:
        if req.messages is not None:
            text = self.render_chat(chat_messages(req.messages, False), req.add_generation_prompt)
            self.check_text_size(text, "messages")  # the rendered conversation, before the tokenizer sees it
        else:
            text = req.prompt
        return self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model, required=False)
        self.check_token_ids(req.tokens, "tokens", within_context=False)
        text = await self.run_cpu(self.tokenizer.decode, req.tokens)
        return to_jsonable(DetokenizeResponse(prompt=text))

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer
        return to_jsonable(TokenizerInfo(eos_token=tok.eos_token, bos_token=tok.bos_token, pad_token=tok.pad_token,
                                         chat_template=tok.chat_template or CHATML_TEMPLATE,
                                         model_max_length=self.block_size, vocab_size=tok.vocab_size,
                                         add_bos_token=tok.add_bos))


__all__ = ["TokenizeServing"]
