"""KV cache types in the plan: a quantized cache before a shorter context, the manifest's measured cost."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
from synthetic_gguf import LLAMA_3_2_1B, write_llama_gguf
from test_planner import machine

from edge_runtime.backends.base import KV_CACHE_TYPES
from edge_runtime.cli.options import KV_CACHE_TYPE_NAMES
from edge_runtime.errors import DoesNotFitError, InvalidConfigError
from edge_runtime.formats.gguf import read_gguf_header
from edge_runtime.models.artifact import Artifact, artifact_from_gguf
from edge_runtime.models.manifest import KV_COSTS_KEY, Manifest, ManifestArtifact, kv_cache_costs, validate_manifest
from edge_runtime.planning.kv_cache import KV_KLD_LIMIT
from edge_runtime.planning.memory import estimate_memory
from edge_runtime.planning.planner import PlanRequest, choose_plan
from edge_runtime.planning.profiles import get_profile

GIB = 1 << 30
PROFILE = "generic-x86-8gb"  # an f16 KV cache by default


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory) -> Artifact:
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "llama-3.2-1b-Q4_0.gguf", **LLAMA_3_2_1B)
    return artifact_from_gguf(path)


def _total(artifact: Artifact, kv: str) -> int:
    """The planner's estimate at the profile's default context with this KV type."""
    profile = get_profile(PROFILE)
    ctx = min(profile.default_ctx, artifact.n_ctx_train or profile.default_ctx)
    return estimate_memory(read_gguf_header(artifact.path), n_ctx=ctx, type_k=kv, type_v=kv, n_batch=profile.n_batch,
                           n_ubatch=profile.n_batch, flash_attn=True, cpu_features=("neon",)).total_bytes


def _device_between(artifact: Artifact, tighter: str, looser: str):
    """A Pi whose budget holds the model with a ``tighter`` KV type but not with ``looser``."""
    budget = (_total(artifact, tighter) + _total(artifact, looser)) // 2
    available = budget + get_profile(PROFILE).headroom_bytes
    return machine(4, available / GIB, flags=("neon",))


def _with_costs(artifact: Artifact, **costs: float) -> Artifact:
    return replace(artifact, quality={KV_COSTS_KEY: {kv: {"kld": kld, "top1_agreement": 0.9}
                                                      for kv, kld in costs.items()}})


def test_the_estimate_shrinks_with_the_kv_type(llama_1b):
    assert _total(llama_1b, "f16") > _total(llama_1b, "q8_0") > _total(llama_1b, "q4_0")


def test_tight_memory_gets_a_q8_0_kv_cache_at_the_full_context(llama_1b):
    profile = get_profile(PROFILE)
    assert profile.kv_cache_type == "f16"
    plan = choose_plan([llama_1b], _device_between(llama_1b, "q8_0", "f16"), profile)
    s = plan.settings
    assert (s.type_k, s.type_v, s.flash_attn) == ("q8_0", "q8_0", True)
    assert s.n_ctx == min(profile.default_ctx, llama_1b.n_ctx_train)  # the context stays
    reason = next(r for r in plan.reasons if r.startswith("kv cache q8_0"))
    assert "flash attention" in reason and "before a shorter context" in reason and "not measured" in reason
    assert plan.memory.total_bytes == _total(llama_1b, "q8_0") <= plan.budget_bytes  # the estimate follows
    assert plan.to_dict()["settings"]["type_k"] == 8  # llama.cpp's id for q8_0


def test_tighter_memory_gets_q4_0(llama_1b):
    plan = choose_plan([llama_1b], _device_between(llama_1b, "q4_0", "q8_0"), get_profile(PROFILE))
    assert (plan.settings.type_k, plan.settings.type_v) == ("q4_0", "q4_0")
    assert any(r.startswith("kv cache q4_0") for r in plan.reasons)
    assert plan.memory.total_bytes == _total(llama_1b, "q4_0")


def test_enough_memory_keeps_the_profiles_kv_type(llama_1b):
    plan = choose_plan([llama_1b], machine(16, 12), get_profile(PROFILE))
    assert plan.settings.type_k == "f16" and not any(r.startswith("kv cache") for r in plan.reasons)


def test_a_measured_cost_is_quoted_and_one_over_the_limit_is_refused(llama_1b):
    profile = get_profile(PROFILE)
    tight = _device_between(llama_1b, "q4_0", "q8_0")  # only q4_0 fits the full context
    measured = _with_costs(llama_1b, q8_0=0.002, q4_0=KV_KLD_LIMIT * 4)
    plan = choose_plan([measured], tight, profile)
    assert plan.settings.type_k == "f16"  # q4_0 refused: the context shrinks instead
    assert plan.settings.n_ctx < min(profile.default_ctx, llama_1b.n_ctx_train)
    assert any("kv cache q4_0 refused" in r and "exceeds" in r for r in plan.reasons)
    assert any(r.startswith("ctx lowered") for r in plan.reasons)

    within = choose_plan([_with_costs(llama_1b, q8_0=0.002)], _device_between(llama_1b, "q8_0", "f16"), profile)
    reason = next(r for r in within.reasons if r.startswith("kv cache q8_0"))
    assert "measured KLD 0.0020" in reason and "top-1 90.0%" in reason


def test_a_kv_type_llama_cpp_cannot_use_is_never_chosen(llama_1b):
    unusable = replace(llama_1b, quality={KV_COSTS_KEY: {"q8_0": {"unsupported": "could not create a context"},
                                                         "q4_0": {"unsupported": "could not create a context"}}})
    plan = choose_plan([unusable], _device_between(llama_1b, "q8_0", "f16"), get_profile(PROFILE))
    assert plan.settings.type_k == "f16" and any(r.startswith("ctx lowered") for r in plan.reasons)
    assert any(r.startswith("kv cache q8_0 refused: llama.cpp cannot use it") for r in plan.reasons)


def test_an_explicit_ctx_or_kv_type_is_planned_as_asked(llama_1b):
    profile = get_profile(PROFILE)
    tight = _device_between(llama_1b, "q8_0", "f16")
    forced = choose_plan([llama_1b], tight, profile, PlanRequest(kv_cache_type="f16"))
    assert forced.settings.type_k == "f16" and any(r.startswith("ctx lowered") for r in forced.reasons)
    ctx = min(profile.default_ctx, llama_1b.n_ctx_train)
    with pytest.raises(DoesNotFitError, match=f"at ctx {ctx}"):
        choose_plan([llama_1b], tight, profile, PlanRequest(ctx=ctx))


def test_the_manifest_carries_kv_costs_and_refuses_malformed_ones():
    entry = {"file": "m-Q4_0.gguf", "format": "gguf", "quant": "Q4_0", "size_bytes": 1, "sha256": "0" * 64,
             "role": "quantized",
             "quality": {"kld_mean": 0.01, KV_COSTS_KEY: {"q8_0": {"kld": 0.001, "top1_agreement": 0.99}}}}
    manifest = Manifest(model="m", source={"name": "m"}, tools={}, artifacts=(ManifestArtifact.from_dict(entry),))
    doc = manifest.to_dict()
    validate_manifest(doc, "manifest.json")
    read_back = Manifest.from_dict(doc).artifacts[0].quality
    assert kv_cache_costs(read_back) == {"q8_0": {"kld": 0.001, "top1_agreement": 0.99}}
    assert kv_cache_costs(None) == {} and kv_cache_costs({"kld_mean": 0.1}) == {}
    bad = {**entry, "quality": {KV_COSTS_KEY: {"q8_0": {"kld": "small"}}}}
    broken = Manifest(model="m", source={"name": "m"}, tools={}, artifacts=(ManifestArtifact.from_dict(bad),))
    with pytest.raises(InvalidConfigError, match=KV_COSTS_KEY):
        validate_manifest(broken.to_dict(), "manifest.json")


# -- the evaluator measures them, the build records them, the planner reads them ---------------------

def test_the_evaluator_measures_each_kv_type_against_f16(smollm2_path, prose_file):
    from edge_runtime.converters.evaluate import kv_type_costs

    costs = kv_type_costs(smollm2_path, text=prose_file, n_ctx=64, n_chunks=1, threads=2)
    assert set(costs) == {"q8_0", "q4_0"}
    for cost in costs.values():
        assert cost["kld"] >= 0 and 0 < cost["top1_agreement"] <= 1
    assert costs["q8_0"]["kld"] <= costs["q4_0"]["kld"]  # fewer bits, more loss


def test_a_build_records_kv_costs_in_the_manifest_and_the_planner_reads_them(smollm2_path, prose_file, tmp_path):
    from edge_runtime.converters.build import BuildRequest, build
    from edge_runtime.models.manifest import read_manifest

    result = build(BuildRequest(source=str(smollm2_path), out=str(tmp_path / "smol"), quants=("Q8_0",),
                                text=str(prose_file), n_ctx=64, n_chunks=1, threads=2, add_to_store=False))
    manifest = read_manifest(result.folder)
    for entry in manifest.artifacts:
        assert set(kv_cache_costs(entry.quality)) == {"q8_0", "q4_0"}, entry.file
    artifact = next(a for a in manifest.runtime_artifacts() if a.quant == "Q8_0")
    plan = choose_plan([artifact], _device_between(artifact, "q8_0", "f16"), get_profile(PROFILE))
    q8 = kv_cache_costs(artifact.quality)["q8_0"]
    if q8["kld"] <= KV_KLD_LIMIT:
        assert plan.settings.type_k == "q8_0"
        assert any(r.startswith("kv cache q8_0") and f"measured KLD {q8['kld']:.4f}" in r for r in plan.reasons)
    else:
        assert plan.settings.type_k == "f16" and any("kv cache q8_0 refused" in r for r in plan.reasons)


def test_heads_a_quant_block_does_not_divide_keep_f16_and_shrink_the_context(tmp_path):
    """phi-2's heads hold 80 values: llama.cpp cannot make a q8_0 or q4_0 cache for them."""
    phi_like = dict(LLAMA_3_2_1B, n_embd=2560, n_head=32, n_ff=10240)
    artifact = artifact_from_gguf(write_llama_gguf(tmp_path / "phi-like-Q4_0.gguf", **phi_like))
    profile = get_profile(PROFILE)
    plan = choose_plan([artifact], _device_between(artifact, "q4_0", "f16"), profile)
    assert (plan.settings.type_k, plan.settings.type_v) == ("f16", "f16")
    assert plan.settings.n_ctx < min(profile.default_ctx, artifact.n_ctx_train)
    assert any("kv cache q8_0 refused: its heads hold 80 (K) and 80 (V) values" in r for r in plan.reasons)


def test_an_asked_kv_cache_type_is_planned_and_run(edgert_cmd):
    assert set(KV_CACHE_TYPE_NAMES) == set(KV_CACHE_TYPES)  # the CLI offers what the backend maps, no more
    done = subprocess.run([*edgert_cmd, "plan", "--kv-cache-type", "q8_0", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    settings = json.loads(done.stdout)["settings"]
    assert (settings["type_k"], settings["type_v"], settings["flash_attn"]) == (8, 8, True)  # llama.cpp's q8_0
    done = subprocess.run([*edgert_cmd, "run", "--kv-cache-type", "q4_0", "--temp", "0", "--max-tokens", "4",
                           "--no-prompt-cache", "Say hello."], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    done = subprocess.run([*edgert_cmd, "plan", "--kv-cache-type", "q3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
