"""Qwen3 tokenizer: the HF `tokenizers` backend plus `tokenizer_config.json`, with HF-exact chat templates.

No MindSpore import: this module is usable by data tools and the CLI without a device.

* `Tokenizer.from_pretrained(folder)` reads `tokenizer.json` (required) and `tokenizer_config.json`
  (special tokens, chat template, added tokens); `chat_template.jinja`, when present, wins over the
  config's template, as in transformers 5.x.  eos/pad fall back to `generation_config.json`, then
  `config.json`, only when the tokenizer config names none.
* `Tokenizer.default()` is the bundled real Qwen3 tokenizer (`qwen3moe/assets/qwen3-tokenizer`).
* `apply_chat_template` renders with the environment transformers builds in
  `chat_template_utils._compile_jinja_template`: `ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True, extensions=[loopcontrols])`, a `tojson` filter that is `json.dumps` with
  `ensure_ascii=False` (jinja's own escapes HTML and sorts nothing), and the globals `raise_exception`
  and `strftime_now`.  The template scope is `{**special_tokens_map, **kwargs}` plus `messages`,
  `tools`, `documents`, `add_generation_prompt` (as `apply_chat_template` passes it).
* `StreamDecoder` turns ids fed one at a time into text pieces that never end inside a UTF-8
  character.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import tokenizers

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.io.jsonfile import read_json_object

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "qwen3-tokenizer"
REPLACEMENT_CHAR = "\ufffd"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Message = Mapping[str, Any]


class TokenizerError(Qwen3MoeError, ValueError):
    """A tokenizer folder that cannot be used; the message is one line naming the folder."""


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError)


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    """eos_token_id may be an int or a list of ints in generation_config/config; take the first."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _raise_exception(message: str) -> None:
    import jinja2.exceptions

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF overrides jinja's tojson: no HTML escaping, non-ASCII kept, indent/separators exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> Any:
    """Compile `source` in the environment transformers uses (cached: templates are long to parse)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _select_template(template: Any, name: str | None, has_tools: bool, where: str) -> str:
    """tokenizer_config may hold one template or a list of named ones (HF: "default", "tool_use")."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
        if name is None:
            name = "tool_use" if has_tools and "tool_use" in named else "default"
        if name in named:
            return named[name]
        raise TokenizerError(f"{where}: no chat template named {name!r} (have {sorted(named)})")
    raise TokenizerError(f"{where}: has no chat_template")


class Tokenizer:
    """A byte-level BPE tokenizer with HF `PreTrainedTokenizerFast` semantics for the parts we use.

    `vocab_size` follows HF: the base vocabulary WITHOUT added tokens (Qwen3: 151643); `len(tok)`
    counts added tokens too (Qwen3: 151669).  The model's embedding may be larger (151936 rows).
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None,
                 name_or_path: str = "<memory>", fallback_ids: Mapping[str, int | None] | None = None,
                 chat_template: Any = None) -> None:
        self._tok = backend
        self.config: dict[str, Any] = dict(config or {})
        self.name_or_path = name_or_path
        self._fallback_ids = dict(fallback_ids or {})
        self.chat_template: Any = chat_template if chat_template is not None else self.config.get("chat_template")
        self._sync_added_tokens()
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content = _token_content(self.config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        self.additional_special_tokens: list[str] = [
            c for c in (_token_content(t) for t in self.config.get("additional_special_tokens") or []) if c
        ]

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding tokenizer.json (+ tokenizer_config.json, optional)."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a folder (expected one holding tokenizer.json)")
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json (a fast-tokenizer file is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"{tok_file}: not a usable tokenizer ({exc})") from None
        cfg_file = folder / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        jinja_file = folder / "chat_template.jinja"
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        return cls(backend, config, str(folder), _fallback_ids(folder, config), template)

    @classmethod
    def default(cls) -> Tokenizer:
        """The bundled Qwen3 tokenizer (cached: loading the 11 MB JSON takes ~0.3 s)."""
        return _default_tokenizer()

    def _sync_added_tokens(self) -> None:
        """Make the backend agree with `added_tokens_decoder` (id -> AddedToken dict).

        tokenizer.json normally already holds them; HF appends missing ones, which only lands them at
        the configured id when that id is the next free one, so anything else is an inconsistent folder.
        """
        decoder = self.config.get("added_tokens_decoder") or {}
        for key in sorted(decoder, key=int):
            spec = decoder[key]
            content, want = spec.get("content"), int(key)
            have = self._tok.token_to_id(content)
            if have == want:
                continue
            if have is None and want == self._tok.get_vocab_size(with_added_tokens=True):
                token = tokenizers.AddedToken(
                    content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                    rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                    special=spec.get("special", True))
                if spec.get("special", True):
                    self._tok.add_special_tokens([token])
                else:
                    self._tok.add_tokens([token])
                continue
            raise TokenizerError(f"{self.name_or_path}: added token {content!r} is id {have} in tokenizer.json "
                                 f"but {want} in tokenizer_config.json")

    # ------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def _special_id(self, key: str) -> int | None:
        content = self.special_tokens.get(key)
        if content is not None:
            return self._tok.token_to_id(content)
        return self._fallback_ids.get(key)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """HF's map: set named special tokens plus `additional_special_tokens` (chat template scope)."""
        out: dict[str, Any] = dict(self.special_tokens)
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every added token flagged special (what skip_special_tokens drops)."""
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # --------------------------------------------------------- encode/decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their ids (split_special_tokens=False).

        `add_special_tokens` only controls the post-processor template (Qwen3 has none: no BOS).
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: bytes joined then UTF-8 decoded with U+FFFD for invalid/incomplete sequences.

        Ids the vocabulary lacks (e.g. padded embedding rows >= len(self)) decode to nothing, as in HF.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------- chat template
    def apply_chat_template(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            enable_thinking: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None, **kwargs: Any) -> Any:
        """Render a conversation (or a batch of them) with the chat template, as transformers does.

        Returns the text, or its ids (encoded with add_special_tokens=False, as HF) when `tokenize`.
        `enable_thinking=False` makes Qwen3's template pre-fill an empty `<think>\\n\\n</think>\\n\\n`.
        `chat_template` is either template source or the name of one of several named templates.
        """
        source = self._template_source(chat_template, tools is not None)
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                raise TypeError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        batched = bool(messages) and not isinstance(messages[0], Mapping)
        chats = list(messages) if batched else [messages]
        scope = {**self.special_tokens_map, "enable_thinking": enable_thinking, **kwargs}
        compiled = compile_chat_template(source)
        rendered = [compiled.render(messages=_plain_messages(chat), tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt, **scope) for chat in chats]
        out: list[Any] = [self.encode(r) for r in rendered] if tokenize else rendered
        return out if batched else out[0]

    def _template_source(self, chat_template: str | None, has_tools: bool) -> str:
        # A string with template syntax is source; otherwise it names one of the stored templates.
        if chat_template is not None and ("{{" in chat_template or "{%" in chat_template):
            return chat_template
        if self.chat_template is None:
            raise TokenizerError(f"{self.name_or_path}: tokenizer has no chat_template")
        return _select_template(self.chat_template, chat_template, has_tools, self.name_or_path)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab={len(self)}, eos={self.eos_token!r})"


def _plain_messages(chat: Any) -> list[Any]:
    """Accept a Conversation-like object (`.messages`) like HF; copy so templates can't mutate input."""
    if hasattr(chat, "messages"):
        chat = chat.messages
    return [dict(m) if isinstance(m, Mapping) else m for m in chat]


def _fallback_ids(folder: Path, config: Mapping[str, Any]) -> dict[str, int | None]:
    """eos/pad/bos ids from generation_config.json then config.json, for configs naming no token."""
    out: dict[str, int | None] = {}
    wanted = [k for k in ("eos_token", "pad_token", "bos_token") if _token_content(config.get(k)) is None]
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if not wanted or not path.is_file():
            continue
        data = _read_json(path)
        for key in list(wanted):
            value = _first_id(data.get(f"{key}_id"))
            if value is not None:
                out[key] = value
                wanted.remove(key)
    return out


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)


class SupportsDecode(Protocol):
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...


class StreamDecoder:
    """Incremental detokeniser: feed ids one at a time, get text pieces safe to print.

    The standard offsets scheme (HF TGI / vLLM): keep `prefix_offset <= read_offset <= len(ids)`.
    On each new id decode `ids[prefix_offset:read_offset]` (P) and `ids[prefix_offset:]` (N).  If N
    is longer than P and does not end in U+FFFD, emit `N[len(P):]` and advance
    `prefix_offset, read_offset = read_offset, len(ids)`; otherwise hold (the last bytes are a
    partial UTF-8 character, or a skipped special token added no text).  Decoding from a small prefix
    window instead of from 0 keeps each step O(window) and lets context-dependent decoders see the
    previous token.  `flush()` emits whatever is held (a truly truncated character comes out as
    U+FFFD, exactly as `decode(all ids)` renders it), so `"".join(pieces) + flush() == decode(ids)`.
    """

    def __init__(self, tokenizer: SupportsDecode, skip_special_tokens: bool = False) -> None:
        self._decode: Callable[[list[int]], str] = (
            lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return the concatenated pieces."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Emit held text at end of stream (incomplete bytes render as U+FFFD, like decode)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]
