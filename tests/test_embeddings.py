"""Embeddings on real llama.cpp (SmolLM2, mean-pooled): the engine, /v1/embeddings through the openai SDK,
Ollama's /api/embed, /api/tags and /api/show through the ollama client, `edgert embed` and
`edgert serve --embedding-model`. An encoder with its own pooling (BERT): test_embedding_encoders.py."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import llama_cpp as _c
import numpy as np
import ollama
import openai
import pytest

from edge_runtime.backends.base import Settings
from edge_runtime.backends.llamacpp import LlamaCppBackend
from edge_runtime.backends.llamacpp.embeddings import SEQUENCES_PER_DECODE, InputTooLongError
from edge_runtime.errors import InvalidRequestError
from edge_runtime.local_server import LOOPBACK, free_port, running_server
from edge_runtime.server.state import ServerConfig

TEXTS = ["The capital of France is Paris.", "A cat sleeps on the warm windowsill.",
         "Quarterly revenue grew by twelve percent.", "Hello"]
N_CTX = 128


@pytest.fixture(scope="module")
def embedder(smollm2_path):
    with LlamaCppBackend.load_embedder(str(smollm2_path), Settings(n_ctx=N_CTX, n_threads=2)) as engine:
        yield engine


def _one_by_one(engine, inputs):
    return np.stack([engine.embed([item]).vectors[0] for item in inputs])


# -- the engine -----------------------------------------------------------------------------------

def test_a_chat_model_is_mean_pooled_into_unit_vectors(embedder):
    assert embedder.pooling_name == "mean" and embedder.n_ctx == N_CTX
    result = embedder.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), embedder.n_embd) and result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.token_counts == tuple(len(embedder.tokenize(t)) for t in TEXTS)
    assert result.total_tokens == sum(result.token_counts)
    # Different texts, different directions.
    similarity = result.vectors @ result.vectors.T
    assert (similarity[~np.eye(len(TEXTS), dtype=bool)] < 0.999).all()


def test_the_same_text_gives_the_same_vector(embedder):
    first = embedder.embed(TEXTS[:1]).vectors[0]
    np.testing.assert_array_equal(first, embedder.embed(TEXTS[:1]).vectors[0])
    # Beside another sequence in the same decode the sums run in another order: equal to rounding.
    np.testing.assert_allclose(first, embedder.embed([TEXTS[0], TEXTS[0]]).vectors[1], atol=1e-6)


def test_batched_equals_one_by_one_across_several_decodes(embedder):
    # More inputs than one decode holds (sequences and tokens both), so the groups split.
    inputs = [f"{TEXTS[i % len(TEXTS)]} Item number {i}." for i in range(SEQUENCES_PER_DECODE + 5)]
    assert sum(len(embedder.tokenize(t)) for t in inputs) > N_CTX
    batched = embedder.embed(inputs).vectors
    single = _one_by_one(embedder, inputs)
    # Most rows agree to rounding. Where an input sits in the shared cache changes the order of
    # some sums, and a quantized model's activations can round one step the other way: then the
    # vector moves by up to ~3e-3 per number, still the same direction (cosine > 0.9999). A
    # sequence that saw another's tokens, or a wrong pooling, moves far more (cosine < 0.999).
    assert (np.abs(batched - single).max(axis=1) < 1e-5).sum() > len(inputs) // 2
    assert (np.einsum("ij,ij->i", batched, single) > 0.9999).all()
    assert np.abs(batched - single).max() < 1e-2


def test_token_lists_embed_like_their_text(embedder):
    tokens = embedder.tokenize(TEXTS[1])
    np.testing.assert_allclose(embedder.embed([tokens]).vectors[0], embedder.embed([TEXTS[1]]).vectors[0],
                               atol=1e-6)


def test_dimensions_cut_and_normalise_again(embedder):
    full = embedder.embed(TEXTS).vectors
    cut = embedder.embed(TEXTS, dimensions=64).vectors
    assert cut.shape == (len(TEXTS), 64)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    for bad in (0, embedder.n_embd + 1):
        with pytest.raises(InvalidRequestError, match=f"between 1 and {embedder.n_embd}"):
            embedder.embed(TEXTS, dimensions=bad)


def test_an_input_longer_than_the_context_is_named_or_cut(embedder):
    long = "word " * (N_CTX + 20)
    n_tokens = len(embedder.tokenize(long))
    with pytest.raises(InputTooLongError, match=f"input 1 is {n_tokens} tokens .* holds {N_CTX}"):
        embedder.embed(["short", long])
    cut = embedder.embed(["short", long], truncate=True)
    assert cut.token_counts[1] == N_CTX
    head = embedder.embed(["short", embedder.tokenize(long)[:N_CTX]]).vectors[1]
    np.testing.assert_allclose(cut.vectors[1], head, atol=1e-6)


@pytest.mark.parametrize("bad, words", [([""], "input 0 is empty"), ([[1, 2], [10**9]], "input 1 holds token"),
                                        ([[-1]], "input 0 holds token -1")])
def test_empty_inputs_and_foreign_tokens_are_refused(embedder, bad, words):
    with pytest.raises(InvalidRequestError, match=words):
        embedder.embed(bad)


def test_beside_a_chat_model_of_the_same_file_it_shares_the_weights(smollm2, smollm2_path, embedder):
    from edge_runtime.backends.base import SamplingParams

    shared = LlamaCppBackend.load_embedder(str(smollm2_path), Settings(n_ctx=N_CTX, n_threads=2), beside=smollm2)
    try:
        assert shared.native_model is smollm2.native_model
        np.testing.assert_allclose(shared.embed(TEXTS).vectors, embedder.embed(TEXTS).vectors, atol=1e-5)
        # Beside the chat scheduler's decodes it takes half the threads; alone, all it was given.
        assert (_c.llama_n_threads(shared._context.ptr), _c.llama_n_threads_batch(shared._context.ptr)) == (1, 1)
        assert (_c.llama_n_threads(embedder._context.ptr), _c.llama_n_threads_batch(embedder._context.ptr)) == (2, 2)
    finally:
        shared.close()
    # Closing the embedder left the chat model's weights alone.
    events = list(smollm2.generate(smollm2.tokenize("The sky is"), SamplingParams(max_tokens=3, temperature=0)))
    assert events[-1].finish_reason in ("stop", "length")


# -- the server: /v1/embeddings and Ollama's /api/embed ---------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_path):
    """A server whose embedding model is its chat model (the weights shared)."""
    from test_server_safety import serving, smollm2_loader

    def load_embedder(chat):
        return LlamaCppBackend.load_embedder(str(smollm2_path), Settings(n_ctx=N_CTX, n_threads=2), beside=chat)

    config = ServerConfig(model_id="smollm2", parallel=1, queue_size=4, embedding_model_id="smollm2-embed")
    with serving(config, smollm2_loader(smollm2_path, n_ctx=N_CTX, n_parallel=1), load_embedder=load_embedder) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_openai_sdk_decodes_base64_to_the_engine_vectors(client, embedder):
    expected = embedder.embed(TEXTS).vectors
    reply = client.embeddings.create(model="smollm2-embed", input=TEXTS)  # the SDK asks for base64
    assert [d.index for d in reply.data] == list(range(len(TEXTS))) and reply.object == "list"
    assert reply.model == "smollm2-embed"
    np.testing.assert_allclose(np.array([d.embedding for d in reply.data]), expected, atol=1e-5)
    total = sum(len(embedder.tokenize(t)) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == total
    floats = client.embeddings.create(model="default", input=TEXTS[0], encoding_format="float")
    assert len(floats.data) == 1
    np.testing.assert_allclose(floats.data[0].embedding, reply.data[0].embedding, atol=1e-7)


def test_openai_token_arrays_and_dimensions(client, embedder):
    tokens = embedder.tokenize(TEXTS[2])
    one = client.embeddings.create(model="default", input=tokens, encoding_format="float")
    many = client.embeddings.create(model="default", input=[tokens, tokens[:3]], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, many.data[0].embedding, atol=1e-6)
    assert one.usage.prompt_tokens == len(tokens) and many.usage.prompt_tokens == len(tokens) + 3
    cut = client.embeddings.create(model="default", input=TEXTS, dimensions=32)
    vectors = np.array([d.embedding for d in cut.data])
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(vectors, embedder.embed(TEXTS, dimensions=32).vectors, atol=1e-5)


@pytest.mark.parametrize("body, status, param, words", [
    ({"input": "x", "dimensions": 577}, 400, "dimensions", "between 1 and 576"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions", "between 1 and 576"),
    ({"input": ["short", "word " * (N_CTX + 1)]}, 400, "input", "input 1 is"),
    ({"input": []}, 400, "input", "not empty"),
    ({"input": ""}, 400, "input", "input 0 is empty"),
    ({"input": ["a", 3]}, 400, "input", "array of strings"),
    ({"input": [[1, 2], [49152]]}, 400, "input", "outside the vocabulary"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "truncate": True}, 400, "truncate", "not a field"),
    ({}, 400, "input", "required"),
])
def test_bad_embedding_requests_are_400s_naming_the_field(server, body, status, param, words):
    reply = httpx.post(f"{server}/v1/embeddings", json={"model": "default", **body}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_an_input_too_long_is_a_bad_request_in_the_sdk_and_a_404_model(client):
    with pytest.raises(openai.BadRequestError, match="input 0 is"):
        client.embeddings.create(model="default", input="word " * (N_CTX + 5))
    with pytest.raises(openai.NotFoundError, match="smollm2-embed"):
        client.embeddings.create(model="smollm2", input="hello")
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2", "smollm2-embed"]


def test_the_chat_model_still_answers_beside_the_embeddings(client):
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_ollama_embed_and_the_older_embeddings(server, embedder):
    client = ollama.Client(host=server, timeout=120)
    reply = client.embed(model="smollm2-embed", input=TEXTS[:2])
    np.testing.assert_allclose(np.array(reply.embeddings), embedder.embed(TEXTS[:2]).vectors, atol=1e-5)
    assert reply.model == "smollm2-embed" and reply.prompt_eval_count == embedder.embed(TEXTS[:2]).total_tokens
    assert reply.total_duration > 0
    single = client.embed(model="smollm2-embed:latest", input=TEXTS[0], dimensions=16)
    np.testing.assert_allclose(single.embeddings[0], embedder.embed(TEXTS[:1], dimensions=16).vectors[0], atol=1e-5)
    # Longer than the context: cut by default, a 400 with truncate=False.
    long = "word " * (N_CTX + 10)
    cut = client.embed(model="default", input=long)
    np.testing.assert_allclose(cut.embeddings[0], embedder.embed([long], truncate=True).vectors[0], atol=1e-5)
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="default", input=long, truncate=False)
    assert refused.value.status_code == 400 and "input 0 is" in refused.value.error
    old = client.embeddings(model="smollm2-embed", prompt=TEXTS[3])
    np.testing.assert_allclose(old.embedding, embedder.embed(TEXTS[3:]).vectors[0], atol=1e-5)
    assert client.embeddings(model="default", prompt="").embedding == []


def test_ollama_lists_and_shows_the_embedding_model(server, embedder):
    client = ollama.Client(host=server, timeout=60)
    assert [m.model for m in client.list().models] == ["smollm2:latest", "smollm2-embed:latest"]
    listed = httpx.get(f"{server}/api/tags", timeout=60).json()["models"]
    assert [m["capabilities"] for m in listed] == [["completion", "tools"], ["embedding"]]
    assert listed[1]["size"] == listed[0]["size"] > 0  # the same SmolLM2 file
    shown = client.show("smollm2-embed")
    assert shown.capabilities == ["embedding"] and shown.details.family == "llama"
    assert f"num_ctx {N_CTX}" in " ".join(shown.parameters.split())
    assert shown.modelinfo["llama.context_length"] == embedder.info.n_ctx_train
    assert client.show("smollm2:latest").capabilities == ["completion", "tools"]
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3")
    assert missing.value.status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"model": "default", "input": []}, 200, None),
    ({"model": "default", "input": ""}, 200, None),
    ({"model": "default", "input": ["a", 1]}, 400, "invalid input type"),
    ({"model": "llama3", "input": "a"}, 404, "model 'llama3' not found"),
    ({"model": "default", "input": "a", "truncate": "yes"}, 400, "'truncate' must be a boolean"),
])
def test_ollama_embed_edges(server, body, status, words):
    reply = httpx.post(f"{server}/api/embed", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    if words is None:
        assert reply.json() == {"model": "default", "embeddings": []}
    else:
        assert words in reply.json()["error"]


def test_a_server_without_an_embedding_model_says_how_to_get_one(smollm2_path):
    from test_server_safety import serving, smollm2_loader

    config = ServerConfig(model_id="smollm2", parallel=1, queue_size=4)
    with serving(config, smollm2_loader(smollm2_path, n_ctx=N_CTX, n_parallel=1)) as base:
        reply = httpx.post(f"{base}/v1/embeddings", json={"model": "default", "input": "hi"}, timeout=60)
        assert reply.status_code == 404 and "--embedding-model" in reply.json()["error"]["message"]
        reply = httpx.post(f"{base}/api/embed", json={"model": "default", "input": "hi"}, timeout=60)
        assert reply.status_code == 404 and "--embedding-model" in reply.json()["error"]


# -- the commands -------------------------------------------------------------------------------

def _edgert(edgert_cmd, *args, stdin=None):
    return subprocess.run([*edgert_cmd, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_edgert_embed_prints_a_line_per_text_and_json(edgert_cmd, embedder):
    plain = _edgert(edgert_cmd, "embed", "--ctx", str(N_CTX), "--threads", "2", *TEXTS[:2])
    assert plain.returncode == 0, plain.stderr
    rows = np.array([[float(x) for x in line.split()] for line in plain.stdout.splitlines()])
    expected = embedder.embed(TEXTS[:2]).vectors
    assert rows.shape == expected.shape
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    doc = _edgert(edgert_cmd, "embed", "--ctx", str(N_CTX), "--json", "--dimensions", "8", TEXTS[0])
    assert doc.returncode == 0, doc.stderr
    data = json.loads(doc.stdout)
    assert data["pooling"] == "mean" and data["dimensions"] == 8 and "SmolLM2" in data["model"]
    assert data["token_counts"] == [len(embedder.tokenize(TEXTS[0]))]
    np.testing.assert_allclose(data["embeddings"], embedder.embed(TEXTS[:1], dimensions=8).vectors, atol=1e-5)
    piped = _edgert(edgert_cmd, "embed", "--ctx", str(N_CTX), "--threads", "2", stdin=f"{TEXTS[0]}\n\n{TEXTS[1]}\n")
    assert piped.returncode == 0 and piped.stdout == plain.stdout


def test_the_embedding_context_is_its_own_modest_one_not_the_chat_plans(edgert_cmd):
    from edge_runtime.cli.embed import EMBEDDING_CTX

    default = _edgert(edgert_cmd, "embed", "--threads", "2", "--json", "hello")
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout)["context"] == EMBEDDING_CTX == 512  # the chat plan's is 8192 here
    longer = _edgert(edgert_cmd, "embed", "--threads", "2", "--ctx", "1024", "--json", "hello")
    assert longer.returncode == 0 and json.loads(longer.stdout)["context"] == 1024
    too_long = _edgert(edgert_cmd, "embed", "--threads", "2", "word " * 600)
    assert too_long.returncode == 1 and "the embedding context holds 512" in too_long.stderr


def test_the_embedding_memory_estimate_counts_its_context_and_unshared_weights(smollm2_path):
    from edge_runtime.cli.embed import embedding_memory_bytes, embedding_plan
    from edge_runtime.formats.gguf import read_gguf_header

    plan = embedding_plan(None, None, 2)
    assert plan.settings.n_ctx == 512
    header = read_gguf_header(plan.artifact.path)
    shared = embedding_memory_bytes(plan, shared=True)
    own = embedding_memory_bytes(plan, shared=False)
    # Shared: the context alone, at least the logits of a full decode (measured: a 480-token input
    # takes SmolLM2's `edgert embed` from 220 to 407 MB at the peak), far under the weights.
    logits = 512 * header.n_vocab * 8
    assert logits <= shared < logits + 100 * 2**20
    assert own - shared >= header.weights_bytes * 0.9  # its own copy of the weights counts too
    # Quadratic in the context: at the chat plan's 8192 it would be more than 16 times as much.
    assert embedding_memory_bytes(embedding_plan(None, 8192, 2), shared=True) > 16 * shared


def test_edgert_embed_refuses_a_long_text_in_one_line(edgert_cmd):
    long = _edgert(edgert_cmd, "embed", "--ctx", "32", "short", "word " * 40)
    assert long.returncode == 1 and long.stdout == ""
    assert re.match(r"error: input 1 is \d+ tokens but the embedding context holds 32\n", long.stderr)
    assert "Traceback" not in long.stderr
    cut = _edgert(edgert_cmd, "embed", "--ctx", "32", "--truncate", "--json", "word " * 40)
    assert cut.returncode == 0 and json.loads(cut.stdout)["token_counts"] == [32]


def test_serve_with_an_embedding_model_answers_embeddings_and_chat(edgert_cmd, embedder):
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    argv = [*edgert_cmd, "serve", "--port", str(port), "--ctx", str(N_CTX), "--threads", "2", "--parallel", "1",
            "--embedding-model", "smollm2"]
    with running_server(argv, f"{base}/health", timeout=180):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        served = client.embeddings.create(model="default", input=TEXTS[:2])
        np.testing.assert_allclose([d.embedding for d in served.data], embedder.embed(TEXTS[:2]).vectors, atol=1e-5)
        assert served.model in [m.id for m in client.models.list().data]
        # The same file serves chat and embeddings: one Ollama model that can do both.
        listed = ollama.Client(host=base, timeout=60).list().models
        assert len(listed) == 1 and listed[0].model == f"{served.model}:latest"
        chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")
