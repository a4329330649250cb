#!/usr/bin/env bash
# WikiText-103 -> jsonl (one article per line) -> Megatron .bin/.idx with a Hugging Face tokenizer.
#   examples/preprocess_wikitext.sh WIKI_TOKENS_FILE TOKENIZER_DIR OUT_PREFIX [WORKERS]
# e.g. examples/preprocess_wikitext.sh wikitext-103/wiki.train.tokens path/to/Qwen3-30B-A3B data/wiki103 2
# then train with data_path: ['1', 'data/wiki103_text_document'] (the prefix without .bin/.idx).
set -euo pipefail
tokens=${1:?wiki.*.tokens file}; tokdir=${2:?tokenizer folder}; prefix=${3:?output prefix}; workers=${4:-1}
start=$(date +%s)
qwen3moe wikitext-to-jsonl --input "$tokens" --output "$prefix.jsonl"
qwen3moe preprocess --input "$prefix.jsonl" --output-prefix "$prefix" --tokenizer-dir "$tokdir" \
  --append-eod --workers "$workers"
echo "done in $(( $(date +%s) - start )) s: ${prefix}_text_document.bin/.idx"
