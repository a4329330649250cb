"""qwen3moe.parallel"""
