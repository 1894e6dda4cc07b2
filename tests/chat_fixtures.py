"""A tiny instruction checkpoint for chat tests: a random Gemma 2 with a character tokenizer and Gemma 2's template."""

import json
import string
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def char_tokenizer() -> Tokenizer:
    """Gemma's special tokens, then one token per printable character: any text of them round-trips exactly."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation + "\n":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Replace("▁", " ")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_chat_checkpoint(out: Path, template: str = "google-gemma-2-2b-it.jinja", seed: int = 0) -> Path:
    """Saves a random tiny Gemma 2 (fp32) with the tokenizer, template and Gemma's two stop tokens."""
    tok = char_tokenizer()
    cfg = transformers.Gemma2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    sliding_window=8, max_position_embeddings=4096, query_pre_attn_scalar=16,
                                    pad_token_id=0, eos_token_id=[1, 5], bos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.Gemma2ForCausalLM._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": {"content": "<pad>", "special": True},
        "chat_template": (TEMPLATES / template).read_text()}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 5]}))
    return out
