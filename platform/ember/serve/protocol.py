"""The OpenAI request bodies `ember serve` accepts, field by field as vLLM serves them, each one bounded.

Every number has a range and every list and string a length, so that no body that passes validation can
break a rank: seeds fit torch's generator (< 2^63), temperatures under GREEDY_BELOW pick greedily, NaN and
infinities are refused. What depends on the model (the vocabulary, the context) is checked by the routes.
Unknown fields are refused by name, as OpenAI does, rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20
MAX_BATCH_PROMPTS = 64
MAX_STOPS = 8
TokenKey = Annotated[str, StringConstraints(max_length=12)]  # a token id written as a string, as OpenAI has it
Bias = Annotated[float, Field(ge=-100, le=100)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1, max_length=1 << 16)]
Prompt = Annotated[
    str | Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)] | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH_PROMPTS)],
    Field(union_mode="left_to_right"),
]  # fmt: skip


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool | None = Field(None, description="A last chunk with the usage and no choices.")


class SamplingFields(Strict):
    """What completions and chat completions share."""

    model: str | None = Field(None, max_length=256, description="The served model's name (--served-model-name).")
    temperature: float | None = Field(None, ge=0, le=10, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1, description="Sample among the k most likely; -1 or 0: all.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Sampling seed; random when absent.")
    n: int = Field(1, ge=1, le=16, description="Choices per prompt.")
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = Field(
        None, description="Stop once the text contains one of these (left out of the text)."
    )
    stream: bool = Field(False, description="Server-sent events, one per token.")
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    logit_bias: dict[TokenKey, Bias] | None = Field(None, max_length=300, description="Token id -> added to its logit.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="Text (byte-level tokens), a list of texts (a batch), or token ids.")
    max_tokens: int | None = Field(16, ge=0, le=2**31 - 1, description="0 only with echo (prompt log-probs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Log-probs of each token and its top N.")
    echo: bool = Field(False, description="Return the prompt too (with its log-probs when logprobs is set).")
    best_of: int | None = Field(None, ge=1, le=16, description="Only best_of == n is supported.")
    suffix: str | None = Field(None, max_length=1 << 16, description="Not supported (a 400).")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Default: what the context leaves.")
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Takes over max_tokens.")
    logprobs: bool = Field(False, description="Log-probs of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="And of its N most likely rivals.")


class ApiError(Exception):
    """A request refused, answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str = "invalid_value",
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
