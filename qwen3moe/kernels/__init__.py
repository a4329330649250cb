"""Optional fused CPU kernels (ops.Custom aot) with a portable composite fallback."""
