"""Multi-turn chat: the conversation re-rendered with the chat template each turn (as HF does),
the reply streamed, the history kept. With prompt caching (GenerationConfig.prompt_cache, on by
default) a turn prefills only what the cache does not hold: the previous reply's last token and
the new user message, not the whole conversation.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen3moe.generation.generate import GenerationRun, GenerationStats, resolve_config, stream_run


@dataclass
class ChatSession:
    """`for piece in chat.send("Hi!"): ...`; `chat.history` holds the messages, `chat.stats` the
    last turn's GenerationStats (prefill seconds, cached_tokens, ...). `options`: generate's
    keyword arguments (max_new_tokens, do_sample, ...), applied to every turn."""
    model: Any
    tokenizer: Any
    enable_thinking: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    stats: GenerationStats | None = None

    def __post_init__(self) -> None:
        self.config = resolve_config(self.model, **self.options)  # once: the folder's JSON is read here

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply, which joins the history at the end."""
        self.history.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(self.history, add_generation_prompt=True,
                                                    enable_thinking=self.enable_thinking)
        run = GenerationRun(self.model, np.array([self.tokenizer.encode(prompt)]), None, self.config, self.tokenizer)
        pieces = []
        for piece in stream_run(run, self.tokenizer):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        self.stats = run.stats
