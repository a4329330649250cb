"""qwen3moe.router"""
