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
MAX_LOOKUP = 64  # prompt-lookup draft tokens per verify pass (each one widens the pass)
MAX_LOOKUP_NGRAM = 16


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
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
Stop = Optional[Union[Annotated[Text, Field(max_length=MAX_STOP_LENGTH)],
                      Annotated[list[Annotated[Text, Field(max_length=MAX_STOP_LENGTH)]],
                                Field(max_length=MAX_STOP_STRINGS)]]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the reply must match (always enforced, `strict` or not)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Annotated[Text, Field(max_length=64)] = "response"
    description: Optional[Text] = None
    schema_: Optional[Union[dict[str, Any], bool]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[JSONSchemaFormat] = None


class StructuredOutputs(BaseModel):
    """Extension (vLLM's names): constrain the output to exactly one of these."""

    model_config = ConfigDict(extra="forbid")

    json_: Optional[Union[dict[str, Any], bool]] = Field(None, alias="json")  # a JSON schema
    regex: Optional[Text] = None
    choice: Optional[list[Text]] = None
    grammar: Optional[Text] = None  # a Lark grammar (llguidance's dialect)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Optional[Text] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: Text = ""
    type: Literal["function"] = "function"
    function: FunctionCall


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
    structured_outputs: Optional[StructuredOutputs] = None
    prompt_lookup_num_tokens: Optional[int] = Field(None, ge=0, le=MAX_LOOKUP)  # None: the server's --prompt-lookup
    max_matching_ngram_size: Optional[int] = Field(None, ge=1, le=MAX_LOOKUP_NGRAM)


class InfillExtra(BaseModel):
    """One context chunk of `/infill`'s input_extra (editor plugins also send e.g. `time`, ignored)."""

    model_config = ConfigDict(extra="ignore")

    filename: Text = "tmp"
    text: Text = ""


class InfillRequest(BaseModel):
    """POST /infill, llama.cpp server's fill-in-the-middle endpoint (its field names and defaults).

    Accepted for compatibility with no effect here: samplers (the order is fixed), cache_prompt, id_slot,
    t_max_prompt_ms and t_max_predict_ms (llama.cpp's time limits), penalty_last_n.
    """

    model_config = ConfigDict(extra="ignore")

    input_prefix: Text = ""
    input_suffix: Text = ""
    input_extra: list[InfillExtra] = Field(default_factory=list, max_length=MAX_PROMPTS)
    prompt: Text = ""  # the text right before the cursor: joins the prefix
    n_predict: int = Field(-1, ge=-1)  # -1: as much as the context allows
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int = Field(-1, ge=-2**63, le=2**64 - 1)  # -1 (or 0xFFFFFFFF, llama.cpp's default): random
    stop: Stop = None
    stream: bool = False
    n_indent: int = Field(0, ge=0)  # stop before a new line indented less than this many columns
    return_tokens: bool = False
    prompt_lookup_num_tokens: Optional[int] = Field(None, ge=0, le=MAX_LOOKUP)  # None: the server's --prompt-lookup
    max_matching_ngram_size: Optional[int] = Field(None, ge=1, le=MAX_LOOKUP_NGRAM)
    response_fields: Optional[list[Text]] = None  # only these (paths such as "timings/prompt_n") are returned
    model: Optional[Text] = None
    samplers: Optional[list[Text]] = None
    cache_prompt: bool = True
    id_slot: int = -1
    t_max_prompt_ms: int = -1
    t_max_predict_ms: int = -1
    penalty_last_n: int = 64


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[Text, list[TextPart]]] = None
    name: Optional[Text] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant turn that called tools
    tool_call_id: Optional[Text] = None  # a tool turn: the call it answers

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
    parallel_tool_calls: bool = True
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: Optional[ResponseFormat] = None
    seed: Optional[int] = Field(None, ge=-2**63, le=2**63 - 17)  # + choice index stays in int64
    stop: Stop = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    tools: Optional[list[ChatTool]] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: Optional[Text] = None
    # ---- extensions (not in OpenAI's API) ----
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    structured_outputs: Optional[StructuredOutputs] = None
    prompt_lookup_num_tokens: Optional[int] = Field(None, ge=0, le=MAX_LOOKUP)  # None: the server's --prompt-lookup
    max_matching_ngram_size: Optional[int] = Field(None, ge=1, le=MAX_LOOKUP_NGRAM)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


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
    tool_calls: Optional[list[ToolCall]] = None


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


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class Delta(BaseModel):
    content: Optional[str] = None
    role: Optional[Literal["assistant"]] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


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


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="ignore")

    input: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                 Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    model: Text
    dimensions: Optional[int] = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[Text] = None


class EmbeddingData(BaseModel):
    embedding: Union[list[float], str]  # base64: little-endian float32 bytes, as OpenAI sends them
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    data: list[EmbeddingData]
    model: str
    object: Literal["list"] = "list"
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    object: Literal["model"] = "model"
    owned_by: str = "gptforge"
    root: Optional[str] = None  # extension (vLLM's): what the model is, a LoRA adapter's directory
    parent: Optional[str] = None  # extension (vLLM's): the base model of a LoRA adapter
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


# ---- POST /v1/feedback (a gptforge extension; see serving_feedback.py) ---------------------------------

MAX_FEEDBACK_TEXT = 100_000  # characters of an edited answer or a supplied completion


class FeedbackRequest(BaseModel):
    """A rating of an answer, a choice between two answers and/or a better answer, about a response (`id`)
    the server generated recently, or about content given here (`messages` or `prompt`, and `completions`)."""

    model_config = ConfigDict(extra="forbid")

    id: Optional[Annotated[Text, Field(min_length=1, max_length=128)]] = None  # the response's id
    choice_index: int = Field(0, ge=0, le=1023)  # the answer rated or edited
    rating: Optional[Literal[-1, 1]] = None  # 1 thumbs up, -1 thumbs down
    chosen_index: Optional[int] = Field(None, ge=0, le=1023)  # the better of the choices...
    rejected_index: Optional[int] = Field(None, ge=0, le=1023)  # ...and the worse (default: the other of two)
    edited: Optional[Annotated[Text, Field(min_length=1, max_length=MAX_FEEDBACK_TEXT)]] = None  # a better answer
    comment: Optional[Annotated[Text, Field(max_length=4000)]] = None
    # Without an id: the content the feedback is about.
    model: Optional[Text] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]] = None
    prompt: Optional[Annotated[Text, Field(max_length=MAX_FEEDBACK_TEXT)]] = None
    completions: Optional[Annotated[list[Annotated[Text, Field(max_length=MAX_FEEDBACK_TEXT)]],
                                    Field(min_length=1, max_length=16)]] = None


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: int
    response_id: Optional[str] = None
    model: str
    kinds: list[Literal["rating", "comparison", "edit"]]
