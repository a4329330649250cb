"""`Qwen3MoeForCausalLM.from_pretrained`'s loader: a GPTQ folder loads quantized as stored
(io/gptq.py), `quantization=` quantizes while loading (io/quantized.py), anything else loads the
float weights (io/hf_checkpoint.py); an FP8 folder is a float folder to all of them (io/fp8.py).
The dispatch lives here, above the three loaders, so none of them imports another's caller (no
import circle).
"""
from __future__ import annotations

from qwen3moe.io.fp8 import fp8_spec
from qwen3moe.io.hf_checkpoint import check_folder, load_pretrained as load_float
from qwen3moe.io.hugepages import use_hugepages
from qwen3moe.io.safetensors_io import CheckpointError


def load_pretrained(cls, path, dtype: str | None = "float32", config=None, quantization=None,
                    group_size: int | None = None, lm_head_bits: int | None = None,
                    activations: str | None = None):
    """Build `cls(config)` without random init and fill it from an HF folder (quantized if asked,
    or as stored for GPTQ folders)."""
    from qwen3moe.layers.dtypes import to_ms_dtype

    directory, config = check_folder(path, config)
    if fp8_spec(directory) is not None:  # read as the float folder it encodes (io/fp8.py)
        config = config.replace(extra={k: v for k, v in config.extra.items() if k != "quantization_config"})
    model = _load_quantized(cls, directory, config, to_ms_dtype(dtype or config.torch_dtype),
                            quantization, group_size, lm_head_bits, activations)
    if model is None:
        model = load_float(cls, directory, dtype=dtype, config=config)
    use_hugepages(model)  # every loader's weights, also the ones MindSpore allocated (io/hugepages.py)
    return model


def _load_quantized(cls, directory, config, param_dtype, quantization, group_size, lm_head_bits, activations):
    """A quantized model when the folder is GPTQ or `quantization` is set, else None
    (lm_head_bits / activations: options of the quantized model, also of a GPTQ folder's, whose
    lm_head is stored float and whose activations are not a property of the stored weights)."""
    from dataclasses import replace

    from qwen3moe.io.gptq import gptq_config, load_gptq
    from qwen3moe.io.quantized import load_quantizing
    from qwen3moe.layers.quant import QuantizationConfig

    qc = QuantizationConfig.of(quantization, group_size, lm_head_bits, activations)
    options = {k: v for k, v in (("lm_head_bits", lm_head_bits), ("activations", activations)) if v is not None}
    stored = gptq_config(config, directory)
    if stored is not None:
        if qc is not None or group_size is not None:  # its group size is the folder's own
            raise CheckpointError(f"{directory}: already quantized ({stored.label}); "
                                  f"load it without quantization= / group_size= (--quantize / --group_size)")
        stored = replace(stored, config=replace(stored.config, **options))
        stored.config.check_runnable()
        return load_gptq(cls, directory, config, stored, param_dtype)
    if qc is None:
        if group_size is not None:
            raise CheckpointError("group_size is only used with quantization='int8'/'int4'")
        if options:
            key, value = next(iter(options.items()))
            raise CheckpointError(f"{key}={value!r} is only used with quantization='int8'/'int4' "
                                  f"(or a GPTQ folder): a float model stays float")
        return None
    qc.check_runnable()
    return load_quantizing(cls, directory, config, qc, param_dtype)
