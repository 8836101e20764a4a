"""Embeddings from an encoder with its own pooling (a tiny BERT with random weights, written here, on
real llama.cpp): CLS pooling, BERT's CLS and SEP, and the trial in a child that an unseen one gets."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_embeddings import _edgert, _one_by_one

from edge_runtime.backends.base import Settings
from edge_runtime.backends.llamacpp import LlamaCppBackend


def write_tiny_bert(path: Path, *, n_embd: int = 32, n_layer: int = 2, n_ctx: int = 64) -> Path:
    """A BERT GGUF as llama.cpp's converter writes one (WordPiece vocabulary, CLS pooling), tiny and random."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "s",
             *("\u2581" + w for w in ("hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "."))]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("tiny-bert")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(4 * n_embd)
    writer.add_block_count(n_layer)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.CLS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(words)
    writer.add_token_types([gguf.TokenType.CONTROL if w.startswith("[") else gguf.TokenType.NORMAL for w in words])
    writer.add_token_type_count(2)
    for add, token in ((writer.add_pad_token_id, 0), (writer.add_unk_token_id, 1), (writer.add_bos_token_id, 2),
                       (writer.add_eos_token_id, 3), (writer.add_sep_token_id, 3), (writer.add_mask_token_id, 4)):
        add(token)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)

    def tensor(name: str, *shape: int, ones: bool = False) -> None:
        data = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.2).astype(np.float32)
        writer.add_tensor(name, data)

    tensor("token_embd.weight", len(words), n_embd)
    tensor("token_types.weight", 2, n_embd)
    tensor("position_embd.weight", n_ctx, n_embd)
    tensor("token_embd_norm.weight", n_embd, ones=True)
    tensor("token_embd_norm.bias", n_embd)
    for i in range(n_layer):
        for name, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_output", n_embd, n_embd), ("ffn_up", 4 * n_embd, n_embd),
                                 ("ffn_down", n_embd, 4 * n_embd)):
            tensor(f"blk.{i}.{name}.weight", rows, cols)
            tensor(f"blk.{i}.{name}.bias", rows)
        for name in ("attn_output_norm", "layer_output_norm"):
            tensor(f"blk.{i}.{name}.weight", n_embd, ones=True)
            tensor(f"blk.{i}.{name}.bias", n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf")


def test_an_encoder_is_pooled_its_own_way_with_cls_and_sep(tiny_bert):
    with LlamaCppBackend.load_embedder(str(tiny_bert), Settings(n_ctx=64, n_threads=2)) as bert:
        assert bert.pooling_name == "cls" and bert.n_embd == 32 and bert.n_ctx == 64
        assert bert.tokenize("hello world") == [2, 6, 7, 3]  # [CLS] hello world [SEP]
        texts = ["hello world", "the cat sat on the mat.", "dogs"]
        result = bert.embed(texts)
        np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(result.vectors, _one_by_one(bert, texts), atol=1e-4)
        assert result.token_counts == (4, 9, 4)


def test_an_encoder_trusted_to_embed_is_not_tried_again_but_still_tried_before_generating(tiny_bert, tmp_path,
                                                                                       monkeypatch):
    from test_trust import no_more_trials

    from edge_runtime.backends import open_artifact, open_embedder
    from edge_runtime.errors import ModelFormatError
    from edge_runtime.models import trust
    from edge_runtime.models.artifact import artifact_from_gguf

    copy = tmp_path / "bert-copy.gguf"
    copy.write_bytes(tiny_bert.read_bytes() + b"\0" * 32)  # other bytes than any other test's file: never tried
    artifact = artifact_from_gguf(copy)
    sha = trust.recorded_sha256(copy)
    assert not trust.check_artifact(artifact, need_sha256=True, purpose="embeddings").trusted
    open_embedder(artifact, Settings(n_ctx=64, n_threads=2)).close()  # tried in a child first
    assert trust.check_artifact(artifact, need_sha256=True, purpose="embeddings").trusted
    assert not trust.check_artifact(artifact, need_sha256=True).trusted
    no_more_trials(monkeypatch)  # any further trial now fails at once
    with open_embedder(artifact, Settings(n_ctx=64, n_threads=2)) as bert:  # remembered: no second child
        assert bert.embed(["hello"]).vectors.shape == (1, 32)
    with pytest.raises(ModelFormatError, match="did not finish within 0 s"):  # generating needs its own trial
        open_artifact(artifact, Settings(n_ctx=64, n_threads=2))
    assert sha not in json.loads((trust.home() / trust.RECORD_NAME).read_text())["trusted"]


def test_edgert_embed_vets_an_unseen_encoder_in_a_child_and_embeds_with_it(edgert_cmd, tiny_bert):
    doc = _edgert(edgert_cmd, "embed", "--model", str(tiny_bert), "--json", "hello world", "the cat")
    assert doc.returncode == 0, doc.stderr
    data = json.loads(doc.stdout)
    assert data["pooling"] == "cls" and data["dimensions"] == 32 and len(data["embeddings"]) == 2
    assert data["token_counts"] == [4, 4]
    # Embedding cleanly trusts it for nothing else: generating with an encoder aborts llama.cpp,
    # which the chat path's own trial in a child turns into one line.
    run = _edgert(edgert_cmd, "run", "--model", str(tiny_bert), "--max-tokens", "2", "hello")
    assert run.returncode == 1 and run.stderr.startswith("error: ") and "crashed" in run.stderr
