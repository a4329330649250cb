"""qwen3moe.layers"""
