#!/usr/bin/env bash
# Reference tooling: HF folder -> GGUF F32 -> Q8_0 and Q4_K_M with the llama.cpp built by build.sh.
#   bash tools/llamacpp/convert.sh /work/data/synth-2l [/work/data/gguf]
# Writes OUT/<folder name>-{F32,Q8_0,Q4_K_M}.gguf (the names bench/quant.py looks for).
set -euo pipefail
HF=${1:?usage: convert.sh HF_FOLDER [OUT_DIR]}
OUT=${2:-/work/data/gguf}
ROOT=${LLAMACPP_ROOT:-/work/data/llamacpp}
REFVENV=${REFVENV:-/work/data/refvenv}
SRC=$(ls -d "$ROOT"/llama_cpp_python-*/ | grep -v '\.tar' | head -1)
stem=$(basename "$HF")
mkdir -p "$OUT"
if [ ! -f "$OUT/$stem-F32.gguf" ]; then
  nice -n 10 "$REFVENV/bin/python" "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$HF" \
    --outtype f32 --outfile "$OUT/$stem-F32.gguf.tmp"
  mv "$OUT/$stem-F32.gguf.tmp" "$OUT/$stem-F32.gguf"
fi
for q in Q8_0 Q4_K_M; do
  if [ ! -f "$OUT/$stem-$q.gguf" ]; then
    nice -n 10 "$ROOT/build/bin/llama-quantize" "$OUT/$stem-F32.gguf" "$OUT/$stem-$q.gguf.tmp" "$q" 2
    mv "$OUT/$stem-$q.gguf.tmp" "$OUT/$stem-$q.gguf"
  fi
done
ls -l "$OUT"/"$stem"-*.gguf
