"""Streamed text equals the decoded text byte for byte, with byte-fallback and byte-level tokenizers."""

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from swattn.streaming import TextStream

TEXTS = ["价格是 5 €", "emoji 🙂🚀 done", "€€€", " hello world", "naïve café — déjà vu", "漢字かな交じり文"]


def gemma_like_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE with byte fallback, as Gemma's and Mistral's: rare characters become <0xNN> tokens."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "n", "a", "i", "c", "f", "v", "u", "j", "▁h", "ll", "▁w",
                  "价", "格", "是", "5", "x"]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "h"), ("l", "l"), ("▁", "w")], byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def byte_level_tokenizer() -> Tokenizer:
    from swattn.training.data import train_tokenizer

    return train_tokenizer(["hello world, naïve café " * 20, "def f(x):\n    return x\n" * 20], 300)


@pytest.mark.parametrize("make", [gemma_like_tokenizer, byte_level_tokenizer])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_decoded_text(make, text):
    tok = make()
    ids = tok.encode(text, add_special_tokens=False).ids
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    final = stream.finish()
    decoded = tok.decode(ids)
    assert "".join(pieces) + final == decoded
    assert not any("\ufffd" in p for p in pieces)  # an incomplete character is held back, never replaced


@pytest.mark.parametrize("make", [gemma_like_tokenizer, byte_level_tokenizer])
def test_the_texts_really_split_characters_across_tokens(make):
    tok = make()
    ids = tok.encode("€", add_special_tokens=False).ids
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])  # decoding token by token would break it
    if make is gemma_like_tokenizer:
        assert [tok.id_to_token(i) for i in ids][-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]


def test_an_unfinished_character_at_the_end_comes_out_as_decode_renders_it():
    tok = gemma_like_tokenizer()
    ids = tok.encode("a€", add_special_tokens=False).ids[:-1]  # generation stopped mid-character
    stream = TextStream(tok)
    streamed = "".join(stream.push(i) for i in ids)
    assert streamed + stream.finish() == tok.decode(ids)
