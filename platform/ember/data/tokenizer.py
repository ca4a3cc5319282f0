"""Text tokenizers: `bytes` (tokens 0..255, ember's default) or a Hugging Face `tokenizers` file, such as the
byte-level BPE `ember data build text --tokenizer bpe` trains on the train split.

Both end a document with token 0: byte 0 never occurs in text, and the BPE's only special token,
`<|endoftext|>`, is trained first so it gets id 0. A shard holds raw text either way; the stream tokenizes each
document when it reads it, so the cursor's offset inside a document counts tokens and a resume, which
tokenizes the same document again, lands on the same token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ember.errors import UserError

BYTES = "bytes"
TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
SEPARATOR = 0


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme: every byte is a base token, so any text encodes) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 (256 bytes + end of text)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def bytes_tokenizer_json() -> str:
    """ember's `bytes` tokenizer as a `tokenizers` file (token id = byte value, no merges), so a byte model
    exported to Hugging Face decodes with AutoTokenizer like any other."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_level_table().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


@functools.lru_cache(maxsize=8)
def _load(path: str):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise UserError(f"data.tokenizer: {path} does not exist; build it with `ember data build text --tokenizer bpe`")
    return Tokenizer.from_file(path)


@dataclass(frozen=True)
class TextTokenizer:
    """One tokenizer for the stream, generation and serving; `path` None means bytes. Picklable (a path)."""

    path: str | None = None

    @classmethod
    def from_spec(cls, value: str) -> TextTokenizer:
        return cls(None if value == BYTES else str(value))

    @property
    def vocab_size(self) -> int:
        return 256 if self.path is None else _load(self.path).get_vocab_size()

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's tokens; an empty prompt starts from the separator, as training's sampler does."""
        return self.encode(text) or [SEPARATOR]

    def encode(self, text: str) -> list[int]:
        if self.path is None:
            return list(text.encode("utf-8"))
        return _load(self.path).encode(text).ids

    def decode(self, tokens: list[int]) -> str:
        if self.path is None:
            return bytes(t for t in tokens if 0 < t < 256).decode("utf-8", errors="replace")
        return _load(self.path).decode([t for t in tokens if t != SEPARATOR])

    def document(self, data: bytes) -> np.ndarray:
        """A document's tokens ended by the separator (what a text row packs)."""
        ids = _load(self.path).encode(data.decode("utf-8", errors="replace")).ids
        return np.asarray([*ids, SEPARATOR], dtype=np.int32)

    def byte_lengths(self) -> np.ndarray:
        """Bytes of text each token stands for (the separator counts 1, as the byte model's does). A byte-level
        token's string has one character per byte (GPT-2's byte-to-unicode map)."""
        if self.path is None:
            return np.ones(256, dtype=np.int64)
        tokenizer = _load(self.path)
        lengths = [len(tokenizer.id_to_token(i) or "") for i in range(tokenizer.get_vocab_size())]
        lengths[SEPARATOR] = 1
        return np.asarray(lengths, dtype=np.int64)


def bits_per_byte(nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """Held-out loss in bits per byte of text: comparable across tokenizers (a byte model's is nats / ln 2)."""
    return nats_per_token * tokens / max(text_bytes, 1) / math.log(2)


def checkpoint_copies(spec) -> dict[str, Path]:
    """The tokenizer file every checkpoint of a run carries (none for bytes), so it decodes anywhere."""
    tokenizer = getattr(spec.data, "tokenizer", BYTES)
    return {} if tokenizer == BYTES else {TOKENIZER_FILE: Path(tokenizer)}


def checkpoint_tokenizer(checkpoint: Path, spec) -> TextTokenizer:
    """The tokenizer a checkpoint's text was trained with: its own copy, else the spec's data.tokenizer."""
    copy = Path(checkpoint) / TOKENIZER_FILE
    if copy.is_file():
        return TextTokenizer(str(copy))
    return TextTokenizer.from_spec(spec.data.tokenizer)
