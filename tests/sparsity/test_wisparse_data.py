"""Text pools: disjoint document split, tokenisation into sequences, sources, rank sharding."""

import json

import pytest
import torch

from vp_lightning.sparsity.data import (
    ShardSampler,
    WiSparseTextData,
    load_documents,
    split_documents,
    tokenize_pool,
)
from vp_lightning.sparsity.errors import SparsityConfigError
from vp_lightning.sparsity.loading import ByteTokenizer

FRACTIONS = {"calibration": 0.5, "fitness": 0.2, "evaluation": 0.3}


def test_pydoc_topics_split_into_disjoint_pools_by_key():
    documents = load_documents()
    assert len(documents) > 50
    pools = split_documents(documents, FRACTIONS, seed=0)
    keys = {name: {key for key, _ in docs} for name, docs in pools.items()}
    assert keys["calibration"].isdisjoint(keys["evaluation"])
    assert keys["calibration"].isdisjoint(keys["fitness"])
    assert keys["fitness"].isdisjoint(keys["evaluation"])
    assert set().union(*keys.values()) == {key for key, _ in documents}
    total = sum(len(text) for _, text in documents)
    for name, docs in pools.items():
        share = sum(len(text) for _, text in docs) / total
        assert abs(share - FRACTIONS[name]) < 0.1, (name, share)
    # deterministic, and independent of the input order
    assert split_documents(list(reversed(documents)), FRACTIONS, seed=0) == pools
    assert split_documents(documents, FRACTIONS, seed=1) != pools


def test_split_rejects_bad_fractions():
    docs = [("a", "x"), ("b", "y"), ("c", "z")]
    with pytest.raises(ValueError, match="sum to 1"):
        split_documents(docs, {"calibration": 0.5, "fitness": 0.2, "evaluation": 0.2})
    with pytest.raises(ValueError, match="cannot fill"):
        split_documents(docs[:2], FRACTIONS)


def test_tokenize_pool_cuts_fixed_length_sequences():
    docs = [("a", "abcdefg"), ("b", "hij")]  # stream "abcdefg\n\nhij\n\n" = 14 bytes
    ids = tokenize_pool(docs, ByteTokenizer(), sequence_length=4, max_sequences=None)
    assert ids.shape == (3, 4)
    assert bytes(ids.flatten().tolist()) == b"abcdefg\n\nhij"
    capped = tokenize_pool(docs, ByteTokenizer(), sequence_length=4, max_sequences=2)
    assert torch.equal(capped, ids[[0, 2]])  # evenly spaced: first and last
    with pytest.raises(ValueError, match="fewer than one sequence"):
        tokenize_pool(docs, ByteTokenizer(), sequence_length=100, max_sequences=None)


def test_local_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "one.txt").write_text("first document")
    lines = [json.dumps({"body": f"record {i}"}) for i in range(3)]
    (tmp_path / "many.jsonl").write_text("\n".join(lines) + "\n")
    docs = load_documents([str(tmp_path / "one.txt"), str(tmp_path / "many.jsonl")], text_field="body")
    assert [text for _, text in docs] == ["first document", "record 0", "record 1", "record 2"]
    assert len({key for key, _ in docs}) == 4
    with pytest.raises(SparsityConfigError, match="text_field"):
        load_documents([str(tmp_path / "many.jsonl")])
    with pytest.raises(FileNotFoundError):
        load_documents([str(tmp_path / "missing.txt")])


def test_shard_sampler_covers_every_sequence_once():
    data = list(range(7))
    shards = [list(ShardSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(ShardSampler(data, 2, r)) for r in range(2)] == [4, 3]


def test_datamodule_pools_and_loader():
    data = WiSparseTextData(tokenizer="bytes", sequence_length=64, calibration_sequences=6,
                            fitness_sequences=2, evaluation_sequences=3, batch_size=4)
    data.setup("fit")
    assert data.pool("calibration").shape == (6, 64)
    assert data.pool("fitness").shape == (2, 64)
    assert data.pool("evaluation").shape == (3, 64)
    assert set(data.pool_documents("calibration")).isdisjoint(data.pool_documents("evaluation"))
    batches = list(data.train_dataloader())
    assert [b.shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat(batches), data.pool("calibration"))
    assert data.pool_fingerprint("calibration") != data.pool_fingerprint("evaluation")
    with pytest.raises(KeyError):
        data.pool("train")
