"""qwen3moe.training"""
