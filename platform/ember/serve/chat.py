"""Chat templates as Hugging Face tokenizers apply them: Jinja2 in a sandbox, given at serve time.

template = ChatTemplate.read(Path("chatml.jinja"))          # UserError if missing or not Jinja
text = template.render(messages)                              # messages: [{"role", "content"}, ...]
"""

from __future__ import annotations

from pathlib import Path

from ember.errors import UserError
from ember.serve.protocol import ApiError, ChatMessage


class ChatTemplate:
    def __init__(self, source: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # what transformers uses
        environment.globals["raise_exception"] = _raise
        try:
            self.template, self.source = environment.from_string(source), source
        except TemplateError as exc:
            raise ValueError(str(exc)) from exc

    @classmethod
    def read(cls, path: Path) -> ChatTemplate:
        if not path.is_file():
            raise UserError(f"--chat-template {path}: no such file")
        try:
            return cls(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"--chat-template {path}: not a Jinja2 template ({exc})") from exc

    def render(self, messages: list[ChatMessage]) -> str:
        from jinja2 import TemplateError

        turns = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in messages]
        try:
            return self.template.render(messages=turns, add_generation_prompt=True, bos_token="", eos_token="")
        except (TemplateError, TypeError, ValueError) as exc:  # the template refused these messages
            raise ApiError(400, f"the chat template refused these messages: {exc}", "messages") from exc


def _raise(message: str) -> None:
    raise ValueError(message)
