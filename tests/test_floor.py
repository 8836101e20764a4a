"""The decode floor of any model on a device class (planning/floor.py), from the figures profiles cite.

Devices are hand-built ``DeviceInfo``s matched to their shipped profile; the models are the real
embedded SmolLM2 (its bytes read per token worked out by the bench's roofline from its header)
and published model sizes. Each expected value is computed by hand in the comment beside it,
from the profile's figures, and set against the published measurement the profile cites: a
healthy device of the class clears its floor.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edge_runtime.device.info import BoardInfo, CpuInfo, DeviceInfo, GpuInfo, MemoryInfo, OsInfo
from edge_runtime.planning.floor import DecodeFloor, ModelFloor, decode_floor
from edge_runtime.planning.profiles import DeviceProfile, load_profiles, match_profile

GIB = 1024**3
# Llama-3.1-8B-Instruct Q4_K_M: 8.03B parameters; per token it reads its 4.92 GB file less the
# token embeddings it only looks a row up in (128256 x 4096 at Q4_K, ~0.3 GB): ~4.6 GB.
LLAMA_8B = {"bytes_per_token": 4.6e9, "n_params": 8_030_000_000}
# Qwen2.5-1.5B Q4_K_M (the Jetson's cited run): 1.54B parameters, ~1.0 GB read per token.
QWEN_1_5B = {"bytes_per_token": 1.0e9, "n_params": 1_540_000_000}
# Llama-3.2-3B Q4_K_M (the Pi 4's cited run): 3.21B parameters, ~2.0 GB read per token.
LLAMA_3B = {"bytes_per_token": 2.0e9, "n_params": 3_210_000_000}

PI5 = DeviceInfo(cpu=CpuInfo(model="Cortex-A76", arch="aarch64", flags=("dotprod", "fp16", "neon")),
                 memory=MemoryInfo(total_bytes=int(7.9 * GIB)),
                 board=BoardInfo(model="Raspberry Pi 5 Model B Rev 1.0", family="raspberry-pi"),
                 os=OsInfo(system="Linux"))  # fmt: skip
PI4 = DeviceInfo(cpu=CpuInfo(model="Cortex-A72", arch="aarch64", flags=("neon",)),
                 memory=MemoryInfo(total_bytes=int(3.7 * GIB)),
                 board=BoardInfo(model="Raspberry Pi 4 Model B Rev 1.4", family="raspberry-pi"),
                 os=OsInfo(system="Linux"))  # fmt: skip
JETSON = DeviceInfo(cpu=CpuInfo(model="Cortex-A78AE", arch="aarch64", flags=("dotprod", "fp16", "neon")),
                    memory=MemoryInfo(total_bytes=int(7.3 * GIB)),
                    board=BoardInfo(model="NVIDIA Jetson Orin Nano Developer Kit", family="jetson"),
                    gpus=(GpuInfo(vendor="nvidia", name="Jetson Orin Nano integrated GPU", api="cuda",
                                  memory_total_bytes=int(7.3 * GIB), unified_memory=True,
                                  compute_capability="8.7"),),
                    os=OsInfo(system="Linux"))  # fmt: skip
LAPTOP = DeviceInfo(cpu=CpuInfo(model="Intel N150", arch="x86_64", flags=("avx", "avx2", "f16c", "fma", "sse3")),
                    memory=MemoryInfo(total_bytes=int(15.3 * GIB)), os=OsInfo(system="Linux"))  # fmt: skip


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "edgert-home"))  # no user profiles


@pytest.fixture(scope="module")
def smollm2_traffic(smollm2_path: Path) -> dict[str, float]:
    """The embedded SmolLM2's bytes read per token and parameters, as the bench works them out."""
    from edge_runtime.bench.roofline import weights_read_per_token
    from edge_runtime.formats.gguf import read_gguf_header

    header = read_gguf_header(smollm2_path)
    return {"bytes_per_token": weights_read_per_token(header), "n_params": header.n_params}


def profile_of(info: DeviceInfo, expected_id: str) -> DeviceProfile:
    profile = match_profile(info, load_profiles(include_user=False))
    assert profile.id == expected_id
    return profile


def test_the_embedded_model_reads_what_the_hand_computation_assumes(smollm2_traffic: dict[str, float]) -> None:
    # The hand-computed floors below take SmolLM2-135M Q4_1 at 96.58 MB and 134.5M parameters.
    assert smollm2_traffic == {"bytes_per_token": 96_577_380, "n_params": 134_515_008}


def test_pi5_floor_for_smollm2_is_latency_bound(smollm2_traffic: dict[str, float]) -> None:
    floor = profile_of(PI5, "raspberry-pi-5-8gb").floor
    est = decode_floor(floor, **smollm2_traffic)
    assert est is not None and est.bound == "latency"
    # memory 9e9 / 96.58e6 = 93.19; compute 75e9 / (2 x 134.5e6) = 278.8; latency 1000 / 12 = 83.33
    assert est.ceilings["memory"] == pytest.approx(93.19, abs=0.01)
    assert est.ceilings["compute"] == pytest.approx(278.78, abs=0.01)
    assert est.ceilings["latency"] == pytest.approx(83.33, abs=0.01)
    assert est.tok_s == pytest.approx(0.6 * 83.333, abs=0.01)  # 50.0 tok/s
    assert "latency" in est.how and "12 ms" in est.how


def test_pi5_floor_for_an_8b_model_is_memory_bound() -> None:
    floor = profile_of(PI5, "raspberry-pi-5-8gb").floor
    est = decode_floor(floor, **LLAMA_8B, name="Llama-3.1-8B-Instruct", quant="Q4_K_M")
    assert est is not None and est.bound == "memory"
    # memory 9e9 / 4.6e9 = 1.957 tok/s (compute 75e9 / 16.06e9 = 4.67, latency 83.3); x 0.6 = 1.174
    assert est.tok_s == pytest.approx(1.174, abs=0.001)
    # The profile cites a Pi 5 8GB decoding it at 1.99 tok/s (geerlingguy/ollama-benchmark):
    # a healthy Pi clears the floor, one reaching under 60 % of that does not.
    assert est.tok_s < 1.99 and est.tok_s > 0.55 * 1.99
    assert "9 GB/s ÷ 4,600 MB per token" in est.how


def test_every_pi5_size_shares_the_class_figures() -> None:
    base = profile_of(PI5, "raspberry-pi-5-8gb").floor
    for gib, profile_id in ((3.9, "raspberry-pi-5-4gb"), (15.8, "raspberry-pi-5-16gb")):
        floor = profile_of(replace(PI5, memory=MemoryInfo(total_bytes=int(gib * GIB))), profile_id).floor
        assert (floor.bandwidth_gbs, floor.compute_gflops, floor.min_token_ms, floor.efficiency) == (
            base.bandwidth_gbs, base.compute_gflops, base.min_token_ms, base.efficiency)


def test_pi4_floor_for_a_3b_model_is_below_the_published_run() -> None:
    floor = profile_of(PI4, "raspberry-pi-4-4gb").floor
    est = decode_floor(floor, **LLAMA_3B)
    assert est is not None and est.bound == "memory"
    # memory 4.5e9 / 2.0e9 = 2.25 (compute 20e9 / 6.42e9 = 3.12, latency 28.6); x 0.5 = 1.125
    assert est.tok_s == pytest.approx(1.125, abs=0.001)
    assert est.tok_s < 1.60  # the Pi 400 run the profile cites


def test_jetson_floor_for_smollm2_and_a_1_5b_model(smollm2_traffic: dict[str, float]) -> None:
    floor = profile_of(JETSON, "jetson-orin-nano-8gb").floor
    assert floor.processor == "gpu"
    small = decode_floor(floor, **smollm2_traffic)
    # memory 68e9 / 96.58e6 = 704; compute 1e12 / 269e6 = 3717; latency 1000 / 6 = 166.7; x 0.25
    assert small is not None and small.bound == "latency"
    assert small.tok_s == pytest.approx(41.67, abs=0.01)
    assert small.tok_s < 190.5  # SmolLM-135M on an Orin Nano Super (hybridgroup/yzma)
    big = decode_floor(floor, **QWEN_1_5B)
    # memory 68e9 / 1.0e9 = 68 (compute 1e12 / 3.08e9 = 325, latency 166.7); x 0.25 = 17
    assert big is not None and big.bound == "memory"
    assert big.tok_s == pytest.approx(17.0, abs=0.001)
    assert big.tok_s < 32.1  # the cited Orin Nano Super run (paiml/realizar#120)


def test_laptop_floor_for_smollm2_and_an_8b_model(smollm2_traffic: dict[str, float]) -> None:
    floor = profile_of(LAPTOP, "laptop-x86-16gb").floor
    small = decode_floor(floor, **smollm2_traffic)
    # memory 20e9 / 96.58e6 = 207.1 (compute 100e9 / 269e6 = 371.7, latency 1000 / 4 = 250); x 0.5
    assert small is not None and small.bound == "memory"
    assert small.tok_s == pytest.approx(103.54, abs=0.01)
    big = decode_floor(floor, **LLAMA_8B)
    # memory 20e9 / 4.6e9 = 4.348 (compute 100e9 / 16.06e9 = 6.23); x 0.5 = 2.174
    assert big is not None and big.tok_s == pytest.approx(2.174, abs=0.001)
    assert big.tok_s < 3.59  # the N150 mini PC run the profile cites (geerlingguy/ollama-benchmark)


def test_compute_binds_where_the_cores_are_weak() -> None:
    floor = DecodeFloor(bandwidth_gbs=10.0, compute_gflops=20.0, min_token_ms=8.0, efficiency=0.5, cores=2,
                        core_class="SSE-only x86", processor="cpu", source="test")
    est = decode_floor(floor, bytes_per_token=0.77e9, n_params=1_240_000_000)
    # memory 10e9 / 0.77e9 = 12.99; compute 20e9 / 2.48e9 = 8.065; x 0.5 = 4.03
    assert est is not None and est.bound == "compute"
    assert est.tok_s == pytest.approx(4.032, abs=0.001)
    # Without a parameter count the compute ceiling is left out, not guessed.
    assert decode_floor(floor, bytes_per_token=0.77e9, n_params=None).bound == "memory"


def test_a_model_override_replaces_the_formula_for_that_model_only() -> None:
    override = ModelFloor(model="Llama-3.2-3B-Instruct", format="gguf", quant="Q4_0", decode_tok_s=3.0,
                          n_ctx=2048, source="measured")
    floor = DecodeFloor(9.0, 75.0, 12.0, 0.6, 4, "Cortex-A76", "cpu", "test", (override,))
    own = decode_floor(floor, **LLAMA_3B, name="Llama-3.2-3B-Instruct", path="/m/llama-3.2-3b-instruct-Q4_0.gguf",
                       quant="Q4_0")
    assert own is not None and (own.bound, own.tok_s) == ("model", 3.0)
    other_quant = decode_floor(floor, **LLAMA_3B, name="Llama-3.2-3B-Instruct", quant="Q4_K_M")
    assert other_quant is not None and other_quant.bound == "memory"
    assert other_quant.tok_s == pytest.approx(0.6 * 4.5, abs=0.001)  # 9e9 / 2.0e9 = 4.5


def test_unknowable_floors_say_so() -> None:
    floor = profile_of(PI5, "raspberry-pi-5-8gb").floor
    assert decode_floor(floor, bytes_per_token=None, n_params=134_515_008) is None
    # A bench result written before profiles stated class figures holds one model's floor only.
    old = DecodeFloor.from_dict({"model": "Llama-3.2-3B-Instruct", "format": "gguf", "quant": "Q4_0",
                                 "decode_tok_s": 3.0, "n_ctx": 2048, "source": "estimate"})
    assert not old.has_figures and old.summary == "no class figures"
    assert decode_floor(old, **LLAMA_8B, name="Llama-3.1-8B-Instruct", quant="Q4_K_M") is None
    assert DecodeFloor.from_dict(floor.to_dict()) == floor  # what bench.json records reads back


@pytest.mark.parametrize("profile_id", sorted(p.stem for p in (Path(__file__).resolve().parent.parent
                                                                / "profiles").glob("*.toml")))
def test_every_profile_gives_the_embedded_model_a_floor(profile_id: str, smollm2_traffic: dict[str, float]) -> None:
    floor = load_profiles(include_user=False)[profile_id].floor
    est = decode_floor(floor, **smollm2_traffic)
    assert est is not None and est.tok_s > 0 and est.bound in ("memory", "compute", "latency")
