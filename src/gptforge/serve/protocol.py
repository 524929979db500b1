"""Pydantic schemas of the OpenAI-compatible API.

Request fields follow the order of the OpenAI API reference; fields that OpenAI does not have are
grouped at the end under "extensions". Responses are built with these models so `/docs` shows them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Documented limits on request shapes (docs/serve.md): checked while parsing, before any tokenization.
MAX_STOP_STRINGS = 16  # OpenAI allows 4; a generous cap keeps stop matching cheap
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_PROMPTS = 1024  # prompts in one /v1/completions request (each becomes n sequences)


def _valid_unicode(value: str) -> str:
    """Refuse strings that cannot be UTF-8 encoded (lone surrogates such as "\\ud800", legal in JSON)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains an unpaired surrogate (\\u{ord(value[exc.start]):04x}) at position "
                         f"{exc.start}; text must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenIds = list[int]
# "content_filter": the moderation policy (--moderation) blocked the prompt or the output.
FinishReason = Literal["stop", "length", "content_filter"]
Stop = Optional[Union[Annotated[Text, Field(max_length=MAX_STOP_LENGTH)],
                      Annotated[list[Annotated[Text, Field(max_length=MAX_STOP_LENGTH)]],
                                Field(max_length=MAX_STOP_STRINGS)]]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"] = "text"


class CompletionRequest(BaseModel):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    prompt: Union[Text, Annotated[list[Text], Field(max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]]
    best_of: Optional[int] = Field(None, ge=1)
    echo: bool = False
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[Text, float]] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_tokens: Optional[int] = Field(16, ge=0)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-2**63, le=2**63 - 17)  # + choice index stays in int64
    stop: Stop = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    suffix: Optional[Text] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[Text] = None
    # ---- extensions (not in OpenAI's API) ----
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    token_healing: bool = False  # re-choose a text prompt's last token (gptforge.healing); not with echo


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[Text, list[TextPart]]] = None
    name: Optional[Text] = None

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: Text
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[Text, float]] = None
    logprobs: bool = False
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: Optional[ResponseFormat] = None
    seed: Optional[int] = Field(None, ge=-2**63, le=2**63 - 17)  # + choice index stays in int64
    stop: Stop = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[Text] = None
    # ---- extensions (not in OpenAI's API) ----
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Optional[FinishReason] = None
    index: int
    logprobs: Optional[CompletionLogprobs] = None
    text: str


class CompletionResponse(BaseModel):
    id: str
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    bytes: Optional[list[int]] = None
    logprob: float


class ChatTokenLogprob(BaseModel):
    token: str
    bytes: Optional[list[int]] = None
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class AssistantMessage(BaseModel):
    content: Optional[str] = None
    role: Literal["assistant"] = "assistant"


class ChatChoice(BaseModel):
    finish_reason: Optional[FinishReason] = None
    index: int
    logprobs: Optional[ChoiceLogprobs] = None
    message: AssistantMessage


class ChatCompletionResponse(BaseModel):
    id: str
    choices: list[ChatChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: Optional[Usage] = None


class Delta(BaseModel):
    content: Optional[str] = None
    role: Optional[Literal["assistant"]] = None


class ChatChunkChoice(BaseModel):
    delta: Delta
    finish_reason: Optional[FinishReason] = None
    index: int
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChatChunkChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    object: Literal["model"] = "model"
    owned_by: str = "gptforge"
    max_model_len: Optional[int] = None  # extension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints (the shapes lm-evaluation-harness's remote tokenizer reads) ----------

class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[Text] = None
    prompt: Optional[Text] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[Text] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    tokenizer_class: str = "PreTrainedTokenizerFast"
    eos_token: Optional[str] = None
    bos_token: Optional[str] = None
    pad_token: Optional[str] = None
    chat_template: Optional[str] = None
    model_max_length: int
    vocab_size: int


def to_jsonable(model: BaseModel) -> dict[str, Any]:
    """Response model -> dict (None kept: OpenAI clients expect e.g. `logprobs: null`)."""
    return model.model_dump(mode="json")
