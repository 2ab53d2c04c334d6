"""Request and response bodies of the HTTP API, in OpenAI's shapes (with vLLM's extensions top_k,
ignore_eos and return_token_ids, and LoRAX's adapter_id).

Requests refuse unknown fields, and OpenAI fields the server does not implement are accepted only at their
neutral value, so nothing a client asks for is silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_TEXT_CHARS = 1 << 22  # no single string field is longer (the body limit, --max-request-bytes, comes first)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any 64-bit seed, signed or not (as vLLM and torch take them)
# Requests are strict: "16" is not an int, "yes" not a bool, true not a token id (pydantic would coerce them).
STRICT = ConfigDict(extra="forbid", strict=True)


def _valid_text(v: str) -> str:
    """Text must be valid Unicode: a lone surrogate ("\\ud800" in JSON) cannot be tokenized or echoed."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return v


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_valid_text)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


def _omit_none(**kw):
    """A field left out of the JSON when None (extensions, and deltas that carry only what changed)."""
    return Field(None, exclude_if=lambda v: v is None, **kw)


MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: Text = Field(..., max_length=64)
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (default), any JSON object, or JSON following a schema."""

    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with (and only with) type "json_schema"')
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of json (a schema), json_object, regex, choice."""

    model_config = STRICT
    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: Text | None = Field(None, max_length=10_000)
    choice: list[Text] | None = Field(None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "regex", "choice") if getattr(self, k) is not None] + (
            ["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, json_object, regex, choice")
        return self


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = STRICT

    model: Text | None = Field(None, description="the base model's name, or an adapter id")
    adapter_id: Text | None = Field(None, description="adapter to apply (takes precedence over model)")
    cache_salt: Text | None = Field(None, min_length=1, description="prefix-cache isolation: only requests with "
                                    "the same salt (and the same adapter version) share cached prompt blocks")
    max_tokens: int | None = Field(None, ge=1, le=2**31, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="0 or -1 = off")
    stop: Text | list[Text] | None = Field(None, validate_default=True, description="stop strings (not included in the text)")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="any 64-bit integer; same seed, same output")
    n: int = Field(1, ge=1, le=16)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = Field(False, description="add prompt_token_ids and token_ids to every choice")
    user: Text | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, description="OpenAI: minus this for every token already generated")
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, description="OpenAI: minus this times each token's count so far")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="vLLM: >1 discourages tokens of the prompt and output")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, -100..100")
    min_tokens: int = Field(0, ge=0, le=2**31, description="vLLM: no end-of-sequence or stop token before this many")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64, description="vLLM: token ids that end the request")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema (structured output)")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM: json, json_object, regex or choice")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        """OpenAI fields we do not implement are accepted at their neutral value only, never ignored."""
        if self.logit_bias and len(self.logit_bias) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        if self.logit_bias and not all(k.isascii() and k.isdigit() and len(k) < 10 for k in self.logit_bias):
            raise ValueError("logit_bias keys must be token ids written as strings, e.g. {\"50256\": -100}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        if self.structured_outputs is not None and self.response_format is not None and \
                self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        if self.grammar_requested() and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured output (the grammar ends the text)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream=true")
        return self

    def grammar_requested(self) -> bool:
        return self.structured_outputs is not None or (
            self.response_format is not None and self.response_format.type != "text")


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]] = Field(
        ..., description="text or token ids, or a list of them")
    max_tokens: int | None = Field(16, ge=0, le=2**31, description="most tokens to generate (null: 16; 0 with echo "
                                                                  "or prompt_logprobs: the prompt's logprobs only)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    echo: bool = Field(False, description="the prompt before the completion (with its logprobs when logprobs is set)")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM: each prompt token's logprob "
                                                                                 "and this many alternatives")
    best_of: int | None = None
    suffix: Text | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="only null or [] (tools are a chat feature)")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only null or "none"')

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(x, (str, list)) and not x for x in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.max_tokens == 0 and not (self.echo or self.prompt_logprobs is not None):
            raise ValueError("max_tokens 0 needs echo or prompt_logprobs")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of must equal n")
        if self.tools:
            raise ValueError("tools are a chat feature: use /v1/chat/completions")
        if self.tool_choice not in (None, "none"):
            raise ValueError('tool_choice is a chat feature: use /v1/chat/completions')
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments (none: any object)")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = STRICT
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    model_config = STRICT
    name: FunctionName
    arguments: Text = Field(..., description="the arguments as a JSON text")


class ToolCall(BaseModel):
    """A call the assistant made (in a response, and in the history a client sends back)."""

    model_config = STRICT
    id: Text = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=128, description="assistant messages: the calls made")
    tool_call_id: Text | None = Field(None, max_length=256, description="tool messages: the call answered")

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages need tool_call_id (and only they take it)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = Field(True, description="vLLM: open the assistant's turn after the messages")
    continue_final_message: bool = Field(False, description="vLLM: continue the last (assistant) message, unclosed")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM: extra variables for the chat template")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='none | auto (default with tools) | required | {"type": "function", "function": {"name"}}')
    parallel_tool_calls: bool = Field(True, description="false: at most one call per answer")

    @model_validator(mode="after")
    def _tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        if self.tool_choice not in (None, "none") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.calls_tools() and self.grammar_requested():
            raise ValueError("give tools or response_format/structured_outputs, not both")
        if self.calls_tools() and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with tools (the tool-call grammar ends the answer)")
        return self

    def calls_tools(self) -> bool:
        """Whether the answer may carry tool calls (tools given and tool_choice not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message needs add_generation_prompt=false and a last assistant message")
        reserved = {"messages", "add_generation_prompt", "continue_final_message", "tokenize", "tools"}
        if self.chat_template_kwargs and reserved & set(self.chat_template_kwargs):
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved & set(self.chat_template_kwargs))}")
        return self


# ---- responses ------------------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not recomputed)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None: the first prompt token of an echo
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, dict] | None] | None = _omit_none()
    prompt_token_ids: list[int] | None = _omit_none()
    token_ids: list[int] | None = _omit_none()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = _omit_none()


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = _omit_none()
    token_ids: list[int] | None = _omit_none()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = _omit_none()
    arguments: str | None = _omit_none()


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = _omit_none()
    type: Literal["function"] | None = _omit_none()
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[ToolCallDelta] | None = _omit_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = _omit_none()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class AdapterInfoOut(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    method: str
    rank: int
    bytes: int
    sha256: str
    description: str | None = None
    owner: str | None = None  # the tenant that owns it
    visibility: Literal["private", "public"] = "private"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "svdserve"
    root: str
    parent: str | None = None
    method: str | None = None
    rank: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
