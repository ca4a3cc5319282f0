"""data.tokenizer: a byte-level BPE trained by `ember data build text --tokenizer bpe` on the train split only;
the stream's packed ids equal Hugging Face `tokenizers` applied to the same documents, and a resume yields
the same next batch."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.data.build import build_text_shards
from ember.data.loader import build_stream
from ember.data.tokenizer import TextTokenizer, bits_per_byte
from ember.errors import UserError
from ember.spec.data import DataSpec
from ember.spec.model import GPTSpec

tokenizers = pytest.importorskip("tokenizers")
VOCAB, SEQ = 320, 24


@pytest.fixture(scope="module")
def bpe_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "shards"
    build_text_shards(out, train_shards=2, max_bytes=300_000, val_fraction=0.3, tokenizer="bpe", vocab_size=VOCAB)
    return out


def data_spec(shards: Path, tokenizer: str) -> DataSpec:
    return DataSpec(train={"urls": f"{shards}/train-{{000000..000001}}.tar"}, val={"urls": f"{shards}/val-000000.tar"},
                    tokenizer=tokenizer, num_slots=1)


def documents(shard: Path) -> list[bytes]:
    with tarfile.open(shard) as tar:
        return [tar.extractfile(member).read() for member in tar.getmembers()]


def test_the_bpe_is_trained_on_the_train_split_and_recorded_beside_the_shards(bpe_shards):
    index = json.loads((bpe_shards / "shards.json").read_text())
    assert index["tokenizer"] == "tokenizer.json"
    assert index["vocab_size"] == VOCAB
    tokenizer = tokenizers.Tokenizer.from_file(str(bpe_shards / "tokenizer.json"))
    assert tokenizer.token_to_id("<|endoftext|>") == 0  # the document separator, as byte 0 is for bytes
    text = "def main():\n    return 0\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_packed_stream_ids_equal_tokenizers_applied_to_the_same_documents(bpe_shards):
    model = GPTSpec(vocab_size=VOCAB, seq_len=SEQ)
    spec = data_spec(bpe_shards, str(bpe_shards / "tokenizer.json"))
    stream = build_stream(spec, model, micro_batch=4, rank=0, world_size=1, split="val")  # one shard, one slot
    rows = torch.cat([stream.next_batch().flatten() for _ in range(30)]).tolist()
    reference = tokenizers.Tokenizer.from_file(str(bpe_shards / "tokenizer.json"))
    expected = [i for doc in documents(bpe_shards / "val-000000.tar") for i in [*reference.encode(doc.decode()).ids, 0]]
    assert len(rows) == 30 * 4 * (SEQ + 1)
    assert rows == expected[: len(rows)]


def test_resume_yields_the_same_next_batch(bpe_shards):
    model = GPTSpec(vocab_size=VOCAB, seq_len=SEQ)
    spec = data_spec(bpe_shards, str(bpe_shards / "tokenizer.json")).model_copy(update={"num_slots": 2})
    first = build_stream(spec, model, micro_batch=3, rank=0, world_size=1)
    for _ in range(7):
        first.next_batch()
    state = json.loads(json.dumps(first.state()))
    expected = [first.next_batch() for _ in range(2)]
    resumed = build_stream(spec, model, micro_batch=3, rank=0, world_size=1)
    resumed.load_state(state)
    for batch in expected:
        assert torch.equal(resumed.next_batch(), batch)
    assert int(batch.max()) >= 256  # merged tokens, not bytes


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(bpe_shards):
    spec = data_spec(bpe_shards, str(bpe_shards / "tokenizer.json"))
    with pytest.raises(UserError, match=f"model.vocab_size: 256 .* set model.vocab_size: {VOCAB}"):
        build_stream(spec, GPTSpec(seq_len=SEQ), micro_batch=2, rank=0, world_size=1)


def test_bits_per_byte_counts_the_text_each_token_stands_for(bpe_shards):
    tokenizer = TextTokenizer(str(bpe_shards / "tokenizer.json"))
    text = documents(bpe_shards / "val-000000.tar")[0]
    ids = tokenizer.document(text)
    assert int(tokenizer.byte_lengths()[ids].sum()) == len(text) + 1  # + the separator, counted as one byte
    assert bits_per_byte(np.log(2), tokens=10, text_bytes=10) == pytest.approx(1.0)
    assert TextTokenizer().decode(list(io.BytesIO("héllo".encode()).read())) == "héllo"


def test_streamed_text_pieces_add_up_to_the_decoded_completion(bpe_shards):
    from ember.generation.decode import encode_prompt, finish_reason
    from ember.serve.completions import ChoiceText

    tokenizer = TextTokenizer(str(bpe_shards / "tokenizer.json"))
    text = "def héllo(wörld):\n    return 'ünïcode' + 1\n"
    tokens = tokenizer.encode(text)
    choice = ChoiceText([], tokenizer)
    pieces = [choice.add(token, "length" if i == len(tokens) - 1 else None) for i, token in enumerate(tokens)]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert encode_prompt(text, tokenizer) == tokens
    assert encode_prompt("", tokenizer) == [0]
    assert finish_reason(tokens, 1, 100, 1000, ["return"], tokenizer) == "stop"


def test_the_bytes_tokenizer_as_a_tokenizers_file_maps_each_byte_to_its_value(tmp_path):
    from ember.data.tokenizer import bytes_tokenizer_json

    (tmp_path / "tokenizer.json").write_text(bytes_tokenizer_json())
    tokenizer = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "def héllo():\n\treturn '\u2603'\n"
    assert tokenizer.encode(text).ids == list(text.encode())
    assert tokenizer.decode(list(text.encode())) == text
