#!/usr/bin/env bash
# Reference tooling only (never imported by the library, never run by CI): builds llama.cpp from the
# llama-cpp-python PyPI sdist into /work/data/llamacpp, and a separate venv /work/data/refvenv holding
# what its convert_hf_to_gguf.py needs (gguf from the vendored gguf-py, torch, transformers).
#   bash tools/llamacpp/build.sh            # both steps
#   bash tools/llamacpp/build.sh build      # only llama.cpp
#   bash tools/llamacpp/build.sh venv       # only the conversion venv
set -euo pipefail
ROOT=${LLAMACPP_ROOT:-/work/data/llamacpp}
REFVENV=${REFVENV:-/work/data/refvenv}
PY=${PY:-python3.11}
step=${1:-all}

src_dir() { ls -d "$ROOT"/llama_cpp_python-*/ 2>/dev/null | grep -v '\.tar' | head -1; }

build() {
  mkdir -p "$ROOT"
  if [ -z "$(src_dir)" ]; then
    "$PY" -m pip download --no-binary :all: --no-deps llama-cpp-python -d "$ROOT"
    tar -xzf "$ROOT"/llama_cpp_python-*.tar.gz -C "$ROOT"
  fi
  local src; src=$(src_dir)
  # LLAMACPP_NATIVE=0: the AVX-512 set by name with AMX off. On the Intel VM of RESULTS run 12 a
  # native build dies with SIGILL at `tilezero` in tinygemm_kernel_amx (Q8_0 / Q4_K matmuls), though
  # a program that requests the tile state (arch_prctl ARCH_REQ_XCOMP_PERM) runs AMX there.
  local isa=(-DGGML_NATIVE=ON)
  if [ "${LLAMACPP_NATIVE:-1}" = 0 ]; then
    isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
         -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  fi
  cmake -S "$src/vendor/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" -DLLAMA_CURL=OFF
  (cd "$ROOT/build" && nice -n 10 make -j2 llama-bench llama-batched-bench llama-quantize llama-perplexity)
  ls -l "$ROOT/build/bin"
}

venv() {
  local src; src=$(src_dir)
  [ -x "$REFVENV/bin/python" ] || "$PY" -m venv "$REFVENV"
  "$REFVENV/bin/pip" install --quiet torch==2.13.0 transformers==5.24.0 sentencepiece numpy safetensors
  "$REFVENV/bin/pip" install --quiet "$src/vendor/llama.cpp/gguf-py"
}

case "$step" in
  all) build; venv ;;
  build) build ;;
  venv) venv ;;
  *) echo "usage: $0 [all|build|venv]" >&2; exit 2 ;;
esac
