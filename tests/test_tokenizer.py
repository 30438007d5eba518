"""Tokenizer: exact ids, padding per family, truncation, batches, identifier helpers, and agreement
with transformers' CLIPTokenizer built offline from the same bundled vocabulary."""
import gzip
import warnings

import pytest
import torch

from model.text_encoder import TextEncoderConfig
from model.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, Tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", as SD 1.x's CLIPTokenizer gives it

ORDINARY_PROMPTS = [
    "a photo of a cat",
    "",
    "An Image of a SKS  crack\n on a   magnetic tile.",
    "an image of a sks with a blowhole crack, 4k, highly detailed!!",
    "Hello, World!",
    "1234 defects; 5.5mm wide (approx.)",
    "it's the tile's edge, we'll see",
    "café naïve Ünïcode",
    "tab\tseparated\twords",
]


@pytest.fixture(scope="module")
def sd1():
    return Tokenizer.from_config(TextEncoderConfig.tiny())


@pytest.fixture(scope="module")
def sd2():
    return Tokenizer.from_config(TextEncoderConfig.tiny_sd2())


def test_sd1_pads_with_eos(sd1):
    ids = sd1("a photo of a cat")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == CAT_IDS + [49407] * 70


def test_sd2_pads_with_zero(sd2):
    ids = sd2("a photo of a cat")
    assert ids.shape == (1, 77)
    assert ids[0].tolist() == CAT_IDS + [0] * 70


def test_from_config_follows_the_family():
    assert Tokenizer.from_config(TextEncoderConfig.clip_l()).pad_token_id == 49407
    assert Tokenizer.from_config(TextEncoderConfig.openclip_h()).pad_token_id == 0
    assert Tokenizer.from_config(TextEncoderConfig.clip_l()).max_length == 77


def test_empty_prompt_is_bos_eos_then_pad(sd1, sd2):
    # The unconditional prompt of classifier-free guidance.
    assert sd1("")[0, :3].tolist() == [BOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID]
    assert sd2("")[0, :3].tolist() == [BOS_TOKEN_ID, EOS_TOKEN_ID, 0]


def test_batch_rows_equal_single_prompts(sd2):
    batch = sd2(ORDINARY_PROMPTS)
    assert batch.shape == (len(ORDINARY_PROMPTS), 77)
    for row, prompt in zip(batch, ORDINARY_PROMPTS):
        assert torch.equal(row, sd2(prompt)[0])


def test_long_prompt_is_truncated_with_warning_keeping_eos(sd1, sd2):
    long_prompt = "a crack " * 60  # 120 tokens
    assert sd1.token_count(long_prompt) == 120
    for tokenizer, pad in ((sd1, EOS_TOKEN_ID), (sd2, 0)):
        with pytest.warns(UserWarning, match=r"has 120 tokens; truncated to its first 75") as record:
            ids = tokenizer([long_prompt, "a photo of a cat"])
        assert len(record) == 1 and "a crack a crack" in str(record[0].message)  # names the prompt
        assert ids.shape == (2, 77)
        assert ids[0, 0].item() == BOS_TOKEN_ID and ids[0, -1].item() == EOS_TOKEN_ID
        assert ids[0, 1:-1].tolist() == sd1.encode(long_prompt)[:75]
        assert ids[1].tolist() == CAT_IDS + [pad] * 70  # the short prompt in the same batch is untouched


def test_exactly_75_tokens_fits_without_warning(sd1):
    prompt = "crack " * 75
    assert sd1.token_count(prompt) == 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = sd1(prompt)
    assert ids[0, -1].item() == EOS_TOKEN_ID and EOS_TOKEN_ID not in ids[0, 1:-1].tolist()


def test_identifier_helpers(sd1):
    # DreamBooth's rare identifier must be one token, distinct from the class noun's tokens.
    assert sd1.encode("sks") == [48136]
    assert sd1.token_count("sks") == 1
    assert sd1.encode("an image of a sks") == [550, 2867, 539, 320, 48136]
    assert sd1.token_count("a photo of a cat") == 5
    assert sd1.decode(sd1("An image of a SKS crack")[0]) == "an image of a sks crack"
    assert sd1.vocab_size == 49408


def test_cleaning_lowercases_collapses_whitespace_and_unescapes_html(sd1):
    assert sd1.encode("  A   Photo\nOF a CAT ") == sd1.encode("a photo of a cat")
    assert sd1.encode("scratch &amp; dent") == sd1.encode("scratch & dent")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pad_token_id"):
        Tokenizer(pad_token_id=49408)
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(max_length=1)
    with pytest.raises(TypeError, match="str"):
        Tokenizer()([3])


def _transformers_tokenizer_from_bundled_vocab():
    """transformers' CLIPTokenizer over open_clip's vocabulary file (no download): the special
    tokens only differ in spelling ("<|endoftext|>" vs "<end_of_text>"), not in id."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    # The file's first line is a header; CLIP uses the next 49152 - 256 - 2 merges (vocab size 49408).
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def test_agrees_with_transformers_clip_tokenizer(sd1):
    reference = _transformers_tokenizer_from_bundled_vocab()
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (49406, 49407, 49407)
    prompts = ORDINARY_PROMPTS + ["a scratch on a metal surface, " * 20]  # the last one is truncated
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = sd1(prompts)
    assert ours.tolist() == expected
