"""Chat with instruction-tuned checkpoints: their chat template, and a session that keeps its caches.

:class:`ChatTemplate` renders a conversation exactly as transformers' ``apply_chat_template``
does: the checkpoint's Jinja template in jinja2's immutable sandbox (``trim_blocks``,
``lstrip_blocks``, loop controls, ``raise_exception``, ``tojson`` without ASCII escaping,
``strftime_now``), with the special tokens of ``tokenizer_config.json``. Nothing in a template
runs outside the sandbox.

:class:`ChatSession` holds one conversation and one model cache. Each turn renders the whole
conversation, and only the tokens past what the cache already holds go through the model:
the local layers' rings simply continue, so a turn costs its own tokens, not the history.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from swattn.generate import GenerationStats, Sampling, generate

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``), or could not be rendered."""


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: not readable JSON ({exc})") from None


class ChatTemplate:
    """A checkpoint's chat template, rendered in jinja2's sandbox.

    Args:
        source: the Jinja template text.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template sees them.
    """

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"the chat template does not parse: {exc}") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a checkpoint directory, or None if it has none.

        Read from ``chat_template.jinja``, else ``chat_template.json`` (a processor's), else
        ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates:
        the one named ``default``). Special tokens come from ``tokenizer_config.json``, then
        ``special_tokens_map.json``.
        """
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.exists() else {}
        source = None
        if (path / "chat_template.jinja").exists():
            source = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").exists():
            source = _read_json(path / "chat_template.json").get("chat_template")
        else:
            source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
        special: dict[str, str] = {}
        map_file = path / "special_tokens_map.json"
        for origin in (_read_json(map_file) if map_file.exists() else {}, config):
            for key in SPECIAL_TOKEN_KEYS:
                text = _token_text(origin.get(key))
                if text is not None:
                    special[key] = text
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as the model's text, ending with the assistant's turn opened.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            add_generation_prompt: open the assistant's turn (templates that always do ignore it).
            extra: more template variables (``tools``, ``documents``, ...).

        Raises:
            TemplateError: the template refused the conversation, quoting its message.
        """
        from jinja2 import TemplateError as JinjaError

        variables = {**self.special_tokens, **extra, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**variables)
        except TemplateError:
            raise
        except JinjaError as exc:  # including the sandbox's SecurityError
            raise TemplateError(f"the chat template failed: {exc}") from None


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered conversation: the template wrote the BOS, so none is added."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def check_system_supported(template: ChatTemplate) -> None:
    """Raises a one-line :class:`TemplateError` with a hint if the template refuses a system message."""
    try:
        template.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    except TemplateError as exc:
        raise TemplateError(f"this model's chat template refuses a system message ({exc}); put the system text "
                            "at the start of your first message instead") from None


@dataclass
class TurnStats:
    """One turn: tokens prefilled this turn, tokens the cache already held, and the generation's figures."""

    prefilled: int = 0
    reused: int = 0
    generation: GenerationStats = field(default_factory=GenerationStats)


class ChatSession:
    """One conversation with a model, its caches kept across turns.

    Args:
        model: a loaded :class:`~swattn.models.transformer.CausalLM` with a tokenizer.
        template: the checkpoint's :class:`ChatTemplate`.
        system: a system message (checked against the template at once).
        sampling, max_new_tokens, chunk_size: as :func:`swattn.generate.generate`.
    """

    def __init__(self, model, template: ChatTemplate, *, system: str | None = None, sampling: Sampling = Sampling(),
                 max_new_tokens: int = 512, chunk_size: int = 2048):
        if model.tokenizer is None:
            raise ValueError(f"{getattr(model, 'path', 'the model')} has no tokenizer.json")
        if system:
            check_system_supported(template)
        self.model, self.template, self.system = model, template, system
        self.sampling, self.max_new_tokens, self.chunk_size = sampling, max_new_tokens, chunk_size
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (the system message stays) and empties the caches."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.model.new_cache(1)
        self.cached: list[int] = []  # the token ids the cache holds, in order

    def send(self, text: str, on_text: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> tuple[str, TurnStats]:
        """Adds a user message and generates the reply (streamed through ``on_text``).

        Returns:
            (the reply's text, this turn's :class:`TurnStats`). A reply cut short by
            ``should_stop`` stays in the conversation as far as it got.

        Raises:
            TemplateError: the template refused the conversation (the message is not added).
        """
        from swattn.streaming import TextStream

        messages = [*self.messages, {"role": "user", "content": text}]
        full = encode_rendered(self.model.tokenizer, self.template.render(messages))
        reused = len(self.cached)
        if full[:reused] != self.cached or reused >= len(full):
            # the history re-tokenized differently (or a turn was cut during its prefill): a ring
            # cannot forget tokens, so the caches start over from the rendered conversation
            self.cache, self.cached, reused = self.model.new_cache(1), [], 0
        new = full[reused:]
        stream = TextStream(self.model.tokenizer)
        stops = set(self.model.stop_tokens)

        def step(tokens: list[int | None]) -> None:
            token = tokens[0]
            if token is None or token in stops:  # the end token is not part of the reply
                return
            piece = stream.push(token)
            if piece and on_text is not None:
                on_text(piece)

        stats = TurnStats(reused=reused)
        generate(self.model, [new], max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                 stop_tokens=self.model.stop_tokens, chunk_size=self.chunk_size, cache=self.cache, on_step=step,
                 should_stop=should_stop, stats=stats.generation)
        gen = stats.generation
        stats.prefilled = gen.prefilled
        if gen.prefilled < len(new):  # stopped during prefill: no reply, and the message is not kept
            self.cached = full[: reused + gen.prefilled]
            return "", stats
        produced = gen.tokens[0]
        self.cached = full + produced[:-1]  # the last token was chosen but not fed
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(tail)
        reply = stream.text
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply, stats
