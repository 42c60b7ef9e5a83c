"""The umT5 text encoder: official padding (real tokens, then zeros to text_len), the cache, and offloading."""

import pytest
import torch
from transformers import AutoTokenizer

from avatars.liveavatar.encoders.text import TextEncoder, clean_prompt
from avatars.liveavatar.encoders.tiny import TINY_TEXT_DIM, tiny_tokenizer, tiny_umt5
from tests.fixtures.tiny_checkpoints import write_text_encoder

TEXT_LEN = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    write_text_encoder(root / "text_encoder", root / "tokenizer")
    return root / "text_encoder", root / "tokenizer"


def test_states_are_the_prompt_tokens_then_zeros(folders):
    encoder = TextEncoder.from_pretrained(*folders, text_len=TEXT_LEN, dtype=torch.float32)
    prompt = "A  woman smiles &amp; talks\n in the studio"
    states = encoder.encode(prompt)
    assert states.shape == (TEXT_LEN, TINY_TEXT_DIM)

    tokenizer = AutoTokenizer.from_pretrained(str(folders[1]))
    ids = tokenizer("A woman smiles & talks in the studio", add_special_tokens=True).input_ids
    assert ids[-1] == tokenizer.eos_token_id and len(ids) < TEXT_LEN
    # Reference: the encoder run on the prompt's tokens with the padded mask, as the official T5 call does.
    padded = ids + [tokenizer.pad_token_id] * (TEXT_LEN - len(ids))
    mask = [1] * len(ids) + [0] * (TEXT_LEN - len(ids))
    with torch.no_grad():
        reference = encoder.model(
            torch.tensor([padded]), attention_mask=torch.tensor([mask])
        ).last_hidden_state[0]
    torch.testing.assert_close(states[: len(ids)], reference[: len(ids)])
    assert torch.all(states[len(ids) :] == 0) and torch.all(states[: len(ids)].abs().sum(-1) > 0)


def test_long_prompts_are_truncated_to_text_len():
    tokenizer = tiny_tokenizer()
    encoder = TextEncoder(tiny_umt5(len(tokenizer)), tokenizer, text_len=TEXT_LEN)
    states = encoder.encode(" ".join(["portrait"] * 40))
    assert states.shape == (TEXT_LEN, TINY_TEXT_DIM) and torch.all(states.abs().sum(-1) > 0)


def test_results_are_cached_per_prompt_and_the_cache_is_bounded():
    tokenizer = tiny_tokenizer()
    encoder = TextEncoder(tiny_umt5(len(tokenizer)), tokenizer, text_len=TEXT_LEN, max_cached_prompts=2)
    calls = []
    encoder.model.register_forward_hook(lambda *args: calls.append(1))
    first = encoder.encode("a man talks")
    assert encoder.encode("a man talks") is first and len(calls) == 1
    assert not torch.equal(encoder.encode("a girl laughs"), first) and len(calls) == 2
    encoder.encode("a child sings")  # a third prompt: the least recently used one ("a man talks") is dropped
    assert len(calls) == 3 and encoder.cached_prompts == 2
    encoder.encode("a girl laughs")
    assert len(calls) == 3  # still cached
    again = encoder.encode("a man talks")
    assert again is not first and len(calls) == 4
    torch.testing.assert_close(again, first)
    with pytest.raises(ValueError, match="max_cached_prompts"):
        TextEncoder(tiny_umt5(len(tokenizer)), tokenizer, text_len=TEXT_LEN, max_cached_prompts=0)


def test_offload_moves_the_model_for_encoding_and_back(monkeypatch):
    tokenizer = tiny_tokenizer()
    encoder = TextEncoder(tiny_umt5(len(tokenizer)), tokenizer, text_len=TEXT_LEN, offload=True)
    moves = []
    original_to = encoder.model.to

    def recording_to(*args, **kwargs):
        moves.append(str(args[0]))
        return original_to(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "to", recording_to)
    encoder.encode("a woman speaks")
    assert moves == ["cpu", "cpu"]  # to the (CPU here) device for the encode, then back to the CPU
    assert next(encoder.model.parameters()).device.type == "cpu"


def test_prompt_cleaning_and_bad_input():
    assert clean_prompt("  a\t&amp;amp;  b \n") == "a & b"
    tokenizer = tiny_tokenizer()
    encoder = TextEncoder(tiny_umt5(len(tokenizer)), tokenizer, text_len=TEXT_LEN)
    with pytest.raises(ValueError, match="string"):
        encoder.encode(None)
    with pytest.raises(ValueError, match="text_len"):
        TextEncoder(tiny_umt5(len(tokenizer)), tokenizer, text_len=0)
