"""Chat templates: a conversation to token ids, with a loss weight of 1 on assistant tokens.

`data.chat_template` picks one:

- "builtin": jtrain's own, for any tokenizer (the byte tokenizer included). After BOS, turns
  `System: ...`, `User: ...`, `Assistant: ...` are separated by a blank line and every
  assistant turn ends with EOS; BOS and EOS are ids, never text:
  `<BOS>User: {prompt}\\n\\nAssistant: {response}<EOS>`.
- "tokenizer": the `chat_template` of `tokenizer_config.json` (or `chat_template.jinja`) in
  the directory `data.tokenizer` names.
- a path to a Jinja file.

Jinja templates render as `transformers.apply_chat_template` renders them: a sandboxed
environment with trim_blocks, lstrip_blocks and loop controls; `messages`, `bos_token`,
`eos_token`, `add_generation_prompt`, `raise_exception`, `strftime_now` and a `tojson` that
does not escape HTML. They need a Hugging Face tokenizer, which encodes the special tokens
written in the text (`<|im_end|>`) to their ids.

Which tokens are the assistant's: the conversation is rendered prefix by prefix. For assistant
message k, render(messages[:k], add_generation_prompt=True) is all text before it and
render(messages[:k + 1]) all text through it; the text between is its content and its
end-of-turn marker (whitespace after the marker stays template text). Each rendering must be a
prefix of the next and of the whole conversation's; a template that rewrites earlier turns
(e.g. drops old reasoning) fails that check and the conversation is skipped as a bad record.
The pieces are tokenized one by one, so a response starts at a token boundary and the prompt's
ids are exactly those generation feeds the model (the prompt rendered alone, tokenized).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jtrain.data import tokenizers

BUILTIN, FROM_TOKENIZER = "builtin", "tokenizer"
ROLES = ("system", "user", "assistant")
Message = dict[str, str]  # {"role": one of ROLES, "content": non-empty text}
Piece = tuple[str | int, bool]  # (text, or one token id; True = assistant tokens, trained on)
_PROBE = ({"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi there."})


class RenderError(ValueError):
    """A conversation the template cannot render; the record is skipped and counted."""


class BuiltinTemplate:
    """jtrain's template: `Role: content` turns after BOS; assistant turns end with EOS."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.bos_id, self.stop_id = int(tokenizer.bos_id), int(tokenizer.eos_id)

    def pieces(self, messages: Sequence[Message]) -> list[Piece]:
        """The conversation as pieces; assistant content and its EOS are the trained ones."""
        out: list[Piece] = [(self.bos_id, False)]
        for i, message in enumerate(messages):
            role = message["role"]
            out.append((("\n\n" if i else "") + f"{role.capitalize()}: ", False))
            if role == "assistant":
                out += [(message["content"], True), (self.stop_id, True)]
            else:
                out.append((message["content"], False))
        return out

    def prompt_pieces(self, messages: Sequence[Message]) -> list[Piece]:
        """The conversation followed by the header of the assistant's reply, for generation."""
        return self.pieces(messages) + [("\n\nAssistant: " if messages else "Assistant: ", False)]


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):
        """Accepts transformers' `{% generation %}` markers; they render their body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class JinjaTemplate:
    """A Jinja chat template (Hugging Face style); assistant spans found prefix by prefix."""

    def __init__(self, source: str, specials: dict[str, str], stop_id: int, origin: str):
        import jinja2

        self.origin = origin
        self._specials = specials  # bos_token / eos_token strings, as transformers passes them
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"{origin}:{err.lineno}: {err.message}") from None
        self.stop_id = stop_id

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`; RenderError if the template refuses them."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self._specials,
            )
        except Exception as err:  # noqa: BLE001 - template code failing on one conversation
            raise RenderError(f"the chat template ({self.origin}) failed: {err}") from None

    def pieces(self, messages: Sequence[Message]) -> list[Piece]:
        """The rendered conversation cut into template text and assistant spans."""
        full = self.render(messages)
        out: list[Piece] = []
        at = 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (len(before) >= at and through.startswith(before) and full.startswith(through)):
                raise RenderError(
                    f"the chat template ({self.origin}) renders assistant turn {k} differently "
                    "once later turns follow, so its tokens cannot be found; use a template "
                    "that renders a conversation prefix by prefix (data.chat_template)"
                )
            end = len(through.rstrip())
            if end <= len(before):
                raise RenderError(f"the chat template ({self.origin}) drops assistant turn {k}")
            out += [(full[at : len(before)], False), (full[len(before) : end], True)]
            at = end
        out.append((full[at:], False))
        return [piece for piece in out if piece[0]]

    def prompt_pieces(self, messages: Sequence[Message]) -> list[Piece]:
        """The conversation rendered with the generation prompt, for sampling a reply."""
        return [(self.render(messages, add_generation_prompt=True), False)]


Template = BuiltinTemplate | JinjaTemplate


def encode(pieces_list: Sequence[Sequence[Piece]], tokenizer) -> list[tuple[np.ndarray, ...]]:
    """Returns (int32 ids, uint8 loss weights) of each conversation's pieces."""
    texts = [p for pieces in pieces_list for p, _ in pieces if isinstance(p, str)]
    encoded = iter(tokenizer.encode_batch(texts, add_bos=False, add_eos=False) if texts else [])
    out = []
    for pieces in pieces_list:
        ids = [next(encoded) if isinstance(p, str) else np.array([p], np.int32) for p, _ in pieces]
        weights = [
            np.full(i.size, trained, np.uint8) for i, (_, trained) in zip(ids, pieces, strict=True)
        ]
        ids_n = np.concatenate(ids).astype(np.int32, copy=False)
        weights_n = np.concatenate(weights)
        weights_n[:1] = 0  # the first token is never a target: nothing comes before it
        out.append((ids_n, weights_n))
    return out


def _error(template: str, problem: str) -> ValueError:
    return ValueError(
        f"data.chat_template={template!r}: {problem}. Allowed: {BUILTIN!r} (jtrain's own, any "
        f"tokenizer), {FROM_TOKENIZER!r} (the chat_template in the tokenizer_config.json of "
        "the directory data.tokenizer names) or the path of a Jinja file."
    )


def _tokenizer_template(template: str, tokenizer_spec: str) -> tuple[str, str]:
    """(source, origin) of the chat template stored beside the tokenizer."""
    path = Path(tokenizers.local_path(tokenizer_spec))
    if not path.exists():
        raise _error(template, f"data.tokenizer={tokenizer_spec!r} is not a tokenizer directory")
    directory = path if path.is_dir() else path.parent
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise _error(template, f"cannot read {config_path}: {err}") from None
        source = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if isinstance(source, str) and source.strip():
            return source, str(config_path)
    jinja_path = directory / "chat_template.jinja"  # where newer transformers save it
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    raise _error(
        template,
        f"{config_path} has no chat_template (nor is there a {jinja_path.name}); set "
        f"data.chat_template={BUILTIN!r} or to a Jinja file",
    )


def _stop_id(template: JinjaTemplate, tokenizer) -> int:
    """The id that ends an assistant turn: the last token of the probe's assistant span."""
    spans = [p for p, trained in template.pieces(_PROBE) if trained]
    if not spans or _PROBE[1]["content"] not in spans[0]:
        raise RenderError(f"it does not render the assistant message of {list(_PROBE)}")
    if spans[0].endswith(_PROBE[1]["content"]):
        return int(tokenizer.eos_id)  # no end-of-turn marker: EOS is the best stop
    return int(tokenizer.encode(spans[0], add_bos=False, add_eos=False)[-1])


@functools.lru_cache(maxsize=16)
def load(template: str, tokenizer_spec: str) -> Template:
    """Returns the template `data.chat_template` names; a ValueError names a bad value."""
    if not isinstance(template, str) or not template.strip():
        raise _error(template, "it must be a non-empty string")
    tokenizer = tokenizers.get_tokenizer(tokenizer_spec)
    if template == BUILTIN:
        return BuiltinTemplate(tokenizer)
    if template == FROM_TOKENIZER:
        source, origin = _tokenizer_template(template, tokenizer_spec)
    else:
        path = Path(template).expanduser()
        if not path.is_file():
            raise _error(template, "it is neither a template name nor an existing file")
        source, origin = path.read_text(encoding="utf-8"), str(path)
    if not isinstance(tokenizer, tokenizers.HuggingFaceTokenizer):
        raise _error(
            template,
            f"a Jinja template writes special tokens as text, which only a Hugging Face "
            f"tokenizer encodes, but data.tokenizer={tokenizer_spec!r} is not one; use "
            f"{BUILTIN!r}",
        )
    # As transformers does: the special tokens that the tokenizer's config files name.
    specials = {
        f"{role}_token": token
        for role, (token, _) in tokenizers._configured_tokens(tokenizer.path.parent).items()
    }
    try:
        jinja = JinjaTemplate(source, specials, int(tokenizer.eos_id), origin)
        jinja.stop_id = _stop_id(jinja, tokenizer)
    except ValueError as err:
        raise _error(template, str(err)) from None
    return jinja


def prompt_ids(template: Template, tokenizer, prompt: str) -> np.ndarray:
    """The ids of `prompt` as a user turn followed by the assistant header (for sampling)."""
    return encode([template.prompt_pieces([{"role": "user", "content": prompt}])], tokenizer)[0][0]
