"""Prompts -> JSON-ready results: prompt reading, left-padded batching, batched generation.

The text-in / text-out layer over generate.py that `qwen3moe generate`, `qwen3moe run --run_mode
predict` and parallel generation (parallel/generate.py) share. A `GenerateRequest` holds
the seed's predict options (run_mindformer names); problems are `GenerationError`s naming the
argument. Nothing here prints: streamed text goes to an `on_text` callback.
Shapes: B batch (prompts per call), S padded prompt length.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwen3moe.errors import Qwen3MoeError
from qwen3moe.generation.config import GENERATION_CONFIG_NAME, GenerationConfig
from qwen3moe.generation.errors import GenerationError

# GenerationConfig fields a request may set (None: the model folder's generation_config.json)
OPTION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
               "repetition_penalty", "presence_penalty", "seed", "stop_strings", "prefill_chunk_size",
               "kv_cache_dtype", "prompt_cache")


@dataclass
class GenerateRequest:
    """What to generate: the model folder, the prompts and the decoding options."""
    pretrained_model_dir: str
    predict_data: str                   # a prompt, or a .txt file with one prompt per line
    predict_batch_size: int = 1
    chat: bool = False                  # wrap each prompt in the chat template (user turn)
    enable_thinking: bool = True        # with chat: Qwen3 thinking mode
    stream: bool = False                # text pieces to the on_text callback (batch 1 only)
    ignore_eos: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # OPTION_KEYS -> value or None
    dtype: str = "float32"              # weights in memory: float32, bfloat16, auto (the folder's)
    quantize: str | None = None         # int8 / int4 projections, quantized while loading
    group_size: int | None = None       # int4 group size
    activations: str = "float32"        # with quantize (or a GPTQ folder): int8 = the opt-in int8-activation kernels
    lm_head_bits: int | None = None     # with quantize (or a GPTQ folder): the lm_head's 8 (default) or 6 bits

    def quantization(self):
        """from_pretrained's quantization: None, or a QuantizationConfig of the flags."""
        from qwen3moe.layers.quant import QuantizationConfig

        if self.quantize is None:  # a GPTQ folder's options: load_options()
            return None
        return QuantizationConfig.from_name(self.quantize, self.group_size, self.activations,
                                            8 if self.lm_head_bits is None else self.lm_head_bits)

    def folder_options(self) -> dict:
        """from_pretrained's keywords for a folder loaded without --quantize (a GPTQ folder takes
        them; a float folder refuses them in one line): what was set of --group_size,
        --lm_head_bits and --activations (float32, the default, is not an option)."""
        if self.quantize is not None:
            return {}
        return {k: v for k, v in (("group_size", self.group_size), ("lm_head_bits", self.lm_head_bits),
                                  ("activations", None if self.activations == "float32" else self.activations))
                if v is not None}

    def param_dtype(self, config):
        """The MindSpore storage dtype of --dtype for the model of `config` (auto: its torch_dtype)."""
        from qwen3moe.layers.dtypes import to_ms_dtype

        return to_ms_dtype(config.torch_dtype if self.dtype == "auto" else self.dtype)

    def check(self) -> tuple[Path, GenerationConfig]:
        """(the model folder, the merged decoding options: generation_config()), after the checks
        that need no model."""
        folder = Path(self.pretrained_model_dir)
        if not (folder / "config.json").is_file():
            raise GenerationError(f"--pretrained_model_dir {folder}: not a model folder (no config.json)")
        if self.predict_batch_size < 1:
            raise GenerationError(f"--predict_batch_size must be >= 1, got {self.predict_batch_size}")
        if self.stream and self.predict_batch_size != 1:
            raise GenerationError("--stream needs --predict_batch_size 1")
        return folder, self.generation_config()

    def generation_config(self) -> GenerationConfig:
        """The options over the folder's generation_config.json (else config.json's special ids),
        merged as resolve_config merges them for a model loaded from the folder; reads no weights.
        A bad value is a GenerationError naming the option (--top_p ...), or the file and the
        options when a value of the file conflicts with them (temperature 0 with --do_sample)."""
        folder = Path(self.pretrained_model_dir)
        unknown = sorted(set(self.options) - set(OPTION_KEYS))
        if unknown:
            raise GenerationError(f"unknown generate option(s) {', '.join(unknown)}; expected {', '.join(OPTION_KEYS)}")
        try:
            base = GenerationConfig.from_pretrained(folder)
        except ValueError as exc:  # names the file
            raise GenerationError(str(exc)) from None
        given = {k: v for k, v in self.options.items() if v is not None}
        try:
            return base.replace(**given, ignore_eos=True if self.ignore_eos else None)
        except ValueError as exc:  # GenerationConfig.validate: "<field> must be ..."
            field_name = str(exc).split(" ", 1)[0]
            if field_name in given:
                raise GenerationError(f"--{exc}") from None
            # the defaults and config.json's ids pass alone: the value is the file's
            flags = ", ".join(f"--{k}" for k in given)
            raise GenerationError(f"{folder / GENERATION_CONFIG_NAME}: {exc} (with {flags})") from None


def read_prompts(data: str) -> list[str]:
    """`data` itself, or the non-empty lines of a .txt file."""
    if data.endswith(".txt"):
        path = Path(data)
        if not path.is_file():
            raise GenerationError(f"--predict_data {data}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerationError(f"--predict_data {data}: unreadable ({type(exc).__name__})") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise GenerationError(f"--predict_data {data}: no prompts (the file has no non-empty line)")
        return prompts
    if not data.strip():
        raise GenerationError("--predict_data is empty: give a prompt or a .txt file")
    return [data]


def load(req: GenerateRequest, build: Callable[[Path], Any] | None = None):
    """(tokenizer, model, GenerationConfig) of the request's folder and options; `build(folder)`
    makes the model instead of from_pretrained (parallel/generate.py: this rank's shards)."""
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    folder, cfg = req.check()
    try:
        tok = Tokenizer.from_pretrained(folder)
        if build is None:
            model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=None if req.dtype == "auto" else req.dtype,
                                                        quantization=req.quantization(), **req.folder_options())
        else:
            model = build(folder)
    except Qwen3MoeError:
        raise
    except (ValueError, OSError) as exc:
        raise GenerationError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return tok, model, cfg


def encode_left_padded(tok: Any, prompts: list[str], pad: int, chat: bool = False,
                       enable_thinking: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask [B, S] (decoder-only batches pad on the left)."""
    if chat:
        rows = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, enable_thinking=enable_thinking) for p in prompts]
    else:
        rows = [tok.encode(p) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise GenerationError("--predict_data: a prompt encodes to no tokens")
    S = max(len(r) for r in rows)
    ids = np.full((len(rows), S), pad, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for b, r in enumerate(rows):
        ids[b, S - len(r):], mask[b, S - len(r):] = r, 1
    return ids, mask


def generate_batch(model: Any, tok: Any, cfg: Any, prompts: list[str], req: GenerateRequest,
                   on_text: Callable[[str], None] | None = None, split: Any = None) -> tuple[list[dict], Any]:
    """One result dict per prompt (prompt, completion, token counts, tokens/s) and the run's
    GenerationStats. With req.stream, `on_text` receives the text pieces as they are decoded.
    With a `split` (generate.RowSplit: data-parallel ranks share the batch), the results of this
    process's rows only."""
    from qwen3moe.generation.generate import GenerationRun
    from qwen3moe.generation.streaming import StopStringStream

    ids, mask = filled_batch(tok, cfg, prompts, req)
    run = GenerationRun(model, ids, mask, cfg, tok, split=split)
    stream = StopStringStream(tok, cfg.stop_strings, skip_special_tokens=True) if req.stream else None
    for nxt_B in run.steps():
        if stream is not None and on_text is not None:
            on_text(stream.push(int(nxt_B[0])))
    if stream is not None and on_text is not None:
        on_text(stream.flush() + "\n")
    return row_results(run, prompts, tok), run.stats


def filled_batch(tok: Any, cfg: Any, prompts: list[str], req: GenerateRequest) -> tuple[np.ndarray, np.ndarray]:
    """The batch's left-padded ids and mask [predict_batch_size, S]: a short last batch is filled
    with copies of its last prompt, so it reuses the compiled (B, ...) graphs."""
    filled = prompts + [prompts[-1]] * (req.predict_batch_size - len(prompts))
    return encode_left_padded(tok, filled, cfg.effective_pad_token_id or 0, req.chat, req.enable_thinking)


def row_results(run: Any, prompts: list[str], tok: Any) -> list[dict]:
    """A finished GenerationRun's result dicts, one per real prompt among its rows."""
    out, S, st = run.output(), run.ids.shape[1], run.stats
    seconds = st.prefill_s + st.decode_s
    results = []
    for b, prompt in enumerate(prompts[run.first:run.first + out.shape[0]]):
        new = out[b, S:S + st.new_tokens[b]]
        results.append({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True),
                        "prompt_tokens": int(run.mask[b].sum()), "completion_tokens": int(st.new_tokens[b]),
                        "tokens_per_s": round(st.new_tokens[b] / seconds, 3) if seconds else None})
    return results


def generate_batches(model: Any, tok: Any, cfg: Any, prompts: list[str], req: GenerateRequest,
                     on_text: Callable[[str], None] | None = None, split: Any = None
                     ) -> Iterator[tuple[list[dict], Any]]:
    """(results, stats) for each batch of req.predict_batch_size prompts, in prompt order (with a
    `split`, this process's rows of each batch)."""
    for i in range(0, len(prompts), req.predict_batch_size):
        yield generate_batch(model, tok, cfg, prompts[i:i + req.predict_batch_size], req, on_text, split)
