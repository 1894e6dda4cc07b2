"""Training: ``swattn train`` (data, tokenizer, presets, the loop)."""
