"""CLIP's byte-level BPE tokenizer, as Stable Diffusion feeds it to the text encoder.

Both SD families use the same 49408-entry vocabulary (OpenAI CLIP's, bundled with open_clip, so
nothing is downloaded). Every prompt becomes exactly `max_length` (77) ids:

    [BOS 49406] [up to 75 BPE ids] [EOS 49407] [pad, pad, ...]

They differ only in the pad id: SD 1.x (transformers CLIPTokenizer, padding="max_length") pads with
EOS 49407; SD 2.x (open_clip.tokenize) pads with 0, the id of "!". With the causal mask the pad id
never changes the prompt tokens' states, but the UNet cross-attends to all 77 positions, so the
wrong pad id does change images: always take it from the text config (`Tokenizer.from_config`).

Text cleaning is open_clip's, i.e. OpenAI CLIP's: `ftfy.fix_text`, HTML-unescape twice, collapse
whitespace, lowercase. The transformers 4.x slow CLIPTokenizer that SD 1.x shipped with does the
same minus the HTML-unescape (when ftfy is installed); the transformers 5 CLIPTokenizer (Rust
backend) only does NFC, whitespace and lowercase. All give the same ids for ordinary prompts
(tests check this against transformers 5) and differ only where ftfy repairs text: HTML entities
("&amp;"), curly quotes, mojibake ("cafÃ©"), ligatures, full-width letters. The literal strings
"<start_of_text>"/"<end_of_text>" inside a prompt are read as BOS/EOS here (as are
"<|startoftext|>"/"<|endoftext|>" in transformers); keep them out of prompts.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.text_encoder import TextEncoderConfig

BOS_TOKEN_ID = 49406  # "<start_of_text>"
EOS_TOKEN_ID = 49407  # "<end_of_text>", also SD 1.x's pad


class Tokenizer:
    """Prompt(s) -> LongTensor (B, max_length) of CLIP token ids, padded with `pad_token_id`.

    `encode` / `token_count` expose the raw BPE ids (no BOS/EOS), e.g. to check that a DreamBooth
    identifier such as "sks" is a single, rare token.
    """

    def __init__(self, max_length: int = 77, pad_token_id: int = EOS_TOKEN_ID):
        # Imported here, not at module top: importing the open_clip package loads its whole model
        # zoo (several seconds); only building a tokenizer should pay for that.
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        self._bpe = SimpleTokenizer(bpe_path=default_bpe(), clean="lower")
        if (self._bpe.sot_token_id, self._bpe.eot_token_id) != (BOS_TOKEN_ID, EOS_TOKEN_ID):
            raise RuntimeError(f"open_clip's bundled vocabulary has BOS/EOS ids "
                               f"{self._bpe.sot_token_id}/{self._bpe.eot_token_id}, expected "
                               f"{BOS_TOKEN_ID}/{EOS_TOKEN_ID}: not the CLIP vocabulary SD was trained with")
        if max_length < 2:
            raise ValueError(f"Tokenizer max_length must leave room for BOS and EOS, got {max_length}")
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"Tokenizer pad_token_id {pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    @classmethod
    def from_config(cls, text_config: "TextEncoderConfig") -> "Tokenizer":
        """The tokenizer matching a text encoder: its context length and its family's pad id."""
        return cls(max_length=text_config.max_length, pad_token_id=text_config.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return self._bpe.vocab_size

    @property
    def bos_token_id(self) -> int:
        return BOS_TOKEN_ID

    @property
    def eos_token_id(self) -> int:
        return EOS_TOKEN_ID

    def encode(self, text: str) -> list[int]:
        """BPE ids of one cleaned, lowercased text, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._bpe.encode(text)

    def token_count(self, text: str) -> int:
        """How many BPE tokens `text` takes (BOS/EOS not counted); a prompt fits if this is <= max_length - 2."""
        return len(self.encode(text))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one id sequence; BOS is dropped and decoding stops at the first EOS (so padding,
        whatever its id, is never decoded)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == BOS_TOKEN_ID:
            ids = ids[1:]
        if EOS_TOKEN_ID in ids:
            ids = ids[: ids.index(EOS_TOKEN_ID)]
        return self._bpe.decode(ids).strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """One prompt or a list of prompts -> int64 tensor (B, max_length) on the CPU.

        Row = BOS, the prompt's ids, EOS, then pad_token_id. A prompt longer than max_length - 2
        tokens keeps its first max_length - 2 and still ends in EOS, with a warning naming it.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2  # BOS and EOS take two of the positions
        rows = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > room:
                dropped = self._bpe.decode(ids[room:]).strip()
                warnings.warn(f"prompt {prompt!r} has {len(ids)} tokens; truncated to its first {room} "
                              f"(CLIP's {self.max_length} positions include BOS and EOS), dropping {dropped!r}",
                              stacklevel=2)
                ids = ids[:room]
            rows[i, : len(ids) + 2] = torch.tensor([BOS_TOKEN_ID, *ids, EOS_TOKEN_ID])
        return rows
