"""qwen3moe.io"""
