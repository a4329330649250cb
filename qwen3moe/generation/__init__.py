"""qwen3moe.generation"""
