"""The planner on hand-built devices (a Pi, a CUDA laptop: what this machine cannot be)."""

from __future__ import annotations

import json
import subprocess

import pytest
from synthetic_gguf import LLAMA_3_2_1B, Q, write_llama_gguf

from edge_runtime.backends.base import Availability
from edge_runtime.device.info import CpuInfo, DeviceInfo, GpuInfo, MemoryInfo
from edge_runtime.errors import BackendUnavailableError, DoesNotFitError
from edge_runtime.models.artifact import Artifact, artifact_from_gguf
from edge_runtime.planning.planner import PlanRequest, choose_plan
from edge_runtime.planning.profiles import get_profile, load_profiles, match_profile

GIB = 1 << 30
LLAMA_CPU = Availability(name="llama.cpp", available=True, version="0.3.36", devices=("CPU",))
LLAMA_CUDA = Availability(name="llama.cpp", available=True, version="0.3.36", devices=("CPU", "CUDA"),
                          gpu_offload=True)
NO_ONNX = Availability(name="onnx", available=False, reason="onnxruntime is not installed",
                       install_hint='pip install "edge-runtime[onnx]"')


def machine(total_gib: float, available_gib: float, *, cores: int = 4, flags=("neon", "dotprod"),
            arch="aarch64", gpus=(), llama=LLAMA_CPU, extra_backends=()) -> DeviceInfo:
    return DeviceInfo(
        cpu=CpuInfo(model="test cpu", arch=arch, physical_cores=cores, logical_cores=cores,
                    performance_cores=cores, flags=tuple(flags)),
        memory=MemoryInfo(total_bytes=int(total_gib * GIB), available_bytes=int(available_gib * GIB)),
        gpus=tuple(gpus), backends=(llama, *extra_backends),
    )


def nvidia(total_gib: float, free_gib: float) -> GpuInfo:
    return GpuInfo(vendor="nvidia", name="GeForce RTX 4060 Laptop GPU", api="cuda",
                   memory_total_bytes=int(total_gib * GIB), memory_free_bytes=int(free_gib * GIB),
                   compute_capability="8.9")


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory) -> Artifact:
    path = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "llama-3.2-1b-Q4_0.gguf", **LLAMA_3_2_1B)
    return artifact_from_gguf(path)


@pytest.fixture(scope="module")
def llama_1b_ladder(tmp_path_factory) -> list[Artifact]:
    folder = tmp_path_factory.mktemp("ladder")
    return [artifact_from_gguf(write_llama_gguf(folder / f"llama-3.2-1b-{q.name}.gguf", qtype=q, **LLAMA_3_2_1B))
            for q in (Q.Q8_0, Q.Q4_0, Q.F16)]


@pytest.fixture
def smollm2_artifact(smollm2_path) -> Artifact:
    return artifact_from_gguf(smollm2_path)


def test_pi4_2gb_refuses_an_8192_context_for_a_1b_model_and_says_which_fits(llama_1b):
    pi4 = machine(1.8, 1.1, flags=("neon",))  # Raspberry Pi OS with its desktop running
    profile = get_profile("raspberry-pi-4-2gb")
    with pytest.raises(DoesNotFitError) as info:
        choose_plan([llama_1b], pi4, profile, PlanRequest(ctx=8192))
    error = info.value
    assert "budget" in error.message and "GiB" in error.message or "MiB" in error.message
    suggested = int(error.hint.split("--ctx ")[1].split()[0])
    assert 256 <= suggested < 8192
    plan = choose_plan([llama_1b], pi4, profile, PlanRequest(ctx=suggested))
    assert plan.settings.n_ctx == suggested
    assert plan.memory.total_bytes <= plan.budget_bytes


def test_a_default_context_is_lowered_to_fit_instead_of_refused(llama_1b):
    pi4 = machine(1.8, 1.1, flags=("neon",))  # Raspberry Pi OS with its desktop running
    profile = get_profile("raspberry-pi-4-2gb")
    plan = choose_plan([llama_1b], pi4, profile)
    assert plan.settings.n_ctx <= profile.default_ctx
    assert plan.memory.total_bytes <= plan.budget_bytes


def test_laptop_with_8gb_vram_offloads_every_layer(llama_1b):
    laptop = machine(16, 12, cores=8, arch="x86_64", flags=("avx2", "fma", "f16c"),
                     gpus=[nvidia(8, 7.5)], llama=LLAMA_CUDA)
    profile = match_profile(laptop)
    assert profile.id == "laptop-x86-nvidia-8gb"
    plan = choose_plan([llama_1b], laptop, profile)
    assert plan.settings.n_gpu_layers == LLAMA_3_2_1B["n_layer"] + 1
    assert plan.memory.vram_bytes > 0
    assert any("gpu layers" in r for r in plan.reasons)


def test_too_little_free_vram_gives_a_partial_offload(llama_1b):
    laptop = machine(16, 12, cores=8, arch="x86_64", flags=("avx2", "fma", "f16c"),
                     gpus=[nvidia(8, 0.9)], llama=LLAMA_CUDA)
    plan = choose_plan([llama_1b], laptop, get_profile("laptop-x86-nvidia-8gb"))
    assert 0 < plan.settings.n_gpu_layers < LLAMA_3_2_1B["n_layer"] + 1
    assert plan.memory.vram_bytes <= 0.9 * GIB - (512 << 20)


def test_a_cpu_only_llama_build_never_offloads(llama_1b):
    laptop = machine(16, 12, cores=8, arch="x86_64", flags=("avx2",), gpus=[nvidia(8, 7.5)], llama=LLAMA_CPU)
    plan = choose_plan([llama_1b], laptop, get_profile("laptop-x86-nvidia-8gb"))
    assert plan.settings.n_gpu_layers == 0 and plan.memory.vram_bytes == 0


def test_a_machine_without_onnxruntime_is_never_planned_onto_it(smollm2_artifact, tmp_path):
    onnx_artifact = Artifact(path=str(tmp_path / "model-int4-onnx"), format="onnx", name="model", quant="int4")
    device = machine(16, 12, cores=8, arch="x86_64", flags=("avx2",), extra_backends=(NO_ONNX,))
    profile = get_profile("laptop-x86-16gb").__class__(**{**get_profile("laptop-x86-16gb").__dict__,
                                                         "backends": ("onnx", "llama.cpp")})
    plan = choose_plan([onnx_artifact, smollm2_artifact], device, profile)
    assert plan.backend == "llama.cpp"
    assert any(r.backend == "onnx" and "not available" in r.why for r in plan.rejected)
    with pytest.raises(BackendUnavailableError, match="onnx"):
        choose_plan([onnx_artifact, smollm2_artifact], device, profile, PlanRequest(backend="onnx"))


def test_the_ladder_picks_the_profiles_preferred_quant_that_fits(llama_1b_ladder):
    pi5 = machine(7.9, 6.5)
    profile = get_profile("raspberry-pi-5-8gb")
    plan = choose_plan(llama_1b_ladder, pi5, profile)
    assert plan.artifact.quant == "Q4_0"  # first rung of the Pi's gguf ladder
    laptop = machine(15.5, 12, cores=8, arch="x86_64", flags=("avx2",))
    plan = choose_plan(llama_1b_ladder, laptop, get_profile("laptop-x86-16gb"))
    assert plan.artifact.quant == "Q8_0" or plan.artifact.quant.upper().startswith("Q4")


def test_a_bigger_rung_that_does_not_fit_is_rejected_with_the_numbers(llama_1b_ladder):
    small = machine(2.0, 1.6)
    profile = get_profile("raspberry-pi-4-2gb")
    ladder_first = profile.quant_ladder("gguf")
    plan = choose_plan(llama_1b_ladder, small, profile, PlanRequest(ctx=512))
    assert plan.artifact.quant.lower() in [q.lower() for q in ladder_first]
    rejected_f16 = [r for r in plan.rejected if r.artifact and "F16" in r.artifact]
    assert all("needs" in r.why for r in rejected_f16)


@pytest.mark.parametrize("profile_id", sorted(load_profiles(include_user=False)))
def test_every_profile_plans_the_embedded_model(profile_id, smollm2_artifact):
    profile = get_profile(profile_id)
    device = machine(16, 12, cores=4)
    plan = choose_plan([smollm2_artifact], device, profile)
    assert plan.backend == "llama.cpp"
    assert plan.settings.n_ctx == min(profile.default_ctx, 8192)
    assert plan.settings.type_k == profile.kv_cache_type
    assert plan.settings.n_threads == (profile.threads or 4)
    assert plan.settings.n_batch == profile.n_batch
    assert plan.memory.total_bytes > smollm2_artifact.size_bytes * 0.9
    json.dumps(plan.to_dict())


def test_explicit_ctx_is_honoured_up_to_the_training_context(smollm2_artifact):
    device = machine(16, 12)
    plan = choose_plan([smollm2_artifact], device, get_profile("generic"), PlanRequest(ctx=100_000))
    assert plan.settings.n_ctx == 8192
    plan = choose_plan([smollm2_artifact], device, get_profile("generic"), PlanRequest(ctx=6000, threads=3))
    assert plan.settings.n_ctx == 6000 and plan.settings.n_threads == 3


def test_plan_json_from_the_cli(edgert_cmd):
    res = subprocess.run([*edgert_cmd, "plan", "--json", "--ctx", "1024"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["backend"] == "llama.cpp" and doc["settings"]["n_ctx"] == 1024
    assert set(doc["settings"]) == {"n_ctx", "n_threads", "n_threads_batch", "n_batch", "n_ubatch",
                                    "n_gpu_layers", "flash_attn", "type_k", "type_v", "use_mmap"}
    memory = doc["memory"]
    assert memory["total_bytes"] == sum(memory[k] for k in ("weights_bytes", "kv_bytes", "compute_bytes",
                                                            "overhead_bytes"))
    assert doc["reasons"] and isinstance(doc["rejected"], list)


def test_plan_cli_does_not_fit_is_one_line_with_a_hint(edgert_cmd, tmp_path):
    big = write_llama_gguf(tmp_path / "big-Q4_0.gguf", **{**LLAMA_3_2_1B, "n_layer": 400})
    res = subprocess.run([*edgert_cmd, "plan", "--model", str(big)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stderr.startswith("error: nothing fits") and "Traceback" not in res.stderr
