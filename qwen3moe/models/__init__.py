"""qwen3moe.models"""
