"""Tiny configurations of every architecture the analysis supports (2 layers, width 32),
shared by the architecture tests and bench/bench_series.py."""

TINY_SIZES = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "llama": dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "bloom": dict(n_layer=2, hidden_size=32, n_head=4),
}
TINY_SIZES["qwen2"] = TINY_SIZES["llama"]
TINY_SIZES["olmo"] = TINY_SIZES["olmo2"] = {
    k: v for k, v in TINY_SIZES["llama"].items() if k != "num_key_value_heads"
}
