"""CLI sub-commands; see qwen3moe/cli.py."""
