"""Device profiles: every shipped file validates, malformed files give clear errors, matching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_runtime.device.info import BoardInfo, CpuInfo, DeviceInfo, GpuInfo, MemoryInfo, OsInfo, detect
from edge_runtime.errors import InvalidConfigError
from edge_runtime.planning.profiles import (
    DeviceProfile,
    explain_match,
    format_match,
    format_profile,
    format_profile_table,
    get_profile,
    load_profiles,
    match_profile,
    rank_profiles,
    user_profiles_dir,
)

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
SHIPPED = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
GIB = 1024**3
PI5_FLAGS = ("dotprod", "fp16", "neon")
X86_FLAGS = ("avx", "avx2", "f16c", "fma", "sse3", "ssse3")


@pytest.fixture()
def shipped() -> dict[str, DeviceProfile]:
    return load_profiles(include_user=False)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # User profiles come from $EDGERT_HOME/profiles; never read the developer's own config.
    home = tmp_path / "edgert-home"
    monkeypatch.setenv("EDGERT_HOME", str(home))
    return home


# --- shipped profiles --------------------------------------------------------------------------


def test_the_issue_device_classes_are_shipped(shipped: dict[str, DeviceProfile]) -> None:
    expected = {
        "raspberry-pi-4-2gb", "raspberry-pi-4-4gb", "raspberry-pi-4-8gb", "raspberry-pi-5-4gb",
        "raspberry-pi-5-8gb", "raspberry-pi-5-16gb", "jetson-orin-nano-8gb", "laptop-x86-8gb",
        "laptop-x86-16gb", "laptop-x86-nvidia-8gb", "apple-m2-8gb", "apple-m2-16gb",
        "generic-x86-8gb", "generic",
    }  # fmt: skip
    assert expected <= set(shipped)
    assert len(shipped) >= 10


@pytest.mark.parametrize("profile_id", SHIPPED)
def test_every_shipped_profile_validates(profile_id: str, shipped: dict[str, DeviceProfile]) -> None:
    p = shipped[profile_id]
    assert p.path and p.path.endswith(f"{profile_id}.toml")
    assert p.description and p.backends and p.backends[0] == "llama.cpp"
    assert p.quant_ladder("gguf"), "every profile ranks GGUF quants"
    assert 0 < p.default_ctx <= p.max_ctx
    assert p.n_batch > 0 and p.headroom_bytes > 0
    assert p.floor.has_figures and p.floor.source.startswith("estimate")
    assert p.floor.compute_gflops and p.floor.cores and 0 < (p.floor.efficiency or 0) <= 1
    # Where the numbers come from is written next to them.
    assert (PROFILES_DIR / f"{profile_id}.toml").read_text().startswith("#")
    # JSON round trip (what `edgert profiles list --json` prints).
    assert DeviceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_arm_boards_prefer_q4_0_and_avx2_laptops_q4_k_m(shipped: dict[str, DeviceProfile]) -> None:
    for pid in ("raspberry-pi-4-2gb", "raspberry-pi-5-8gb", "generic"):
        assert shipped[pid].quant_ladder("gguf")[0] == "Q4_0"
    for pid in ("laptop-x86-8gb", "laptop-x86-16gb", "laptop-x86-nvidia-8gb"):
        assert shipped[pid].quant_ladder("gguf")[0] == "Q4_K_M"
    assert shipped["laptop-x86-nvidia-8gb"].gpu_offload
    assert not shipped["raspberry-pi-5-8gb"].gpu_offload
    assert shipped["generic"].threads is None  # "auto"


# --- malformed profiles ------------------------------------------------------------------------

GENERIC = (PROFILES_DIR / "generic.toml").read_text()


def write_user_profile(home: Path, name: str, text: str) -> Path:
    folder = home / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def variant(old: str, new: str, profile_id: str = "mine") -> str:
    assert old in GENERIC
    return GENERIC.replace(old, new).replace('id = "generic"', f'id = "{profile_id}"')


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("max_ctx = 8192\n", "",
         ["key 'settings.max_ctx'", "expected an integer >= default_ctx", "missing"]),
        ("n_batch = 256", 'n_batch = "big"',
         ["key 'settings.n_batch'", "a positive integer", "got string 'big'"]),
        ("threads = \"auto\"", "threads = 0", ["key 'settings.threads'", '"auto" or a positive integer']),
        ("max_ctx = 8192", "max_ctx = 1024", ["key 'settings.max_ctx'", "default_ctx (2048)"]),
        ("kv_cache_type = \"f16\"", "kv_cache_type = \"f8\"", ["key 'settings.kv_cache_type'", "q8_0"]),
        ("headroom_mib = 512", "headroom_mib = -1", ["key 'memory.headroom_mib'", "MiB >= 0"]),
        ('order = ["llama.cpp", "onnx", "tflite"]', 'order = ["llamacpp"]',
         ["key 'backends.order'", "llama.cpp, onnx, tflite"]),
        ("gpu_offload = false", "gpu_offload = \"no\"", ["key 'settings.gpu_offload'", "true or false"]),
        ("efficiency = 0.5", "efficiency = 1.5", ["key 'floor.efficiency'", "at most 1"]),
        ("[match]\n", "[match]\nram_min_gb = 4\n", ["unknown key 'match.ram_min_gb'", "ram_min_gib"]),
        ("[match]\n", "[match]\nboard = '(unclosed'\n", ["key 'match.board'", "regular expression"]),
        ("[match]\n", "[match]\nram_min_gib = 8\nram_max_gib = 4\n",
         ["key 'match.ram_max_gib'", "above ram_min_gib"]),
        ("[match]\n", "[match]\narch = \"x86_64\"\n", ["key 'match.arch'", "list of architectures"]),
        ("[match]\n", "[match]\ngpu_vendor = \"nvdia\"\n", ["key 'match.gpu_vendor'", "nvidia"]),
        ('onnx = ["int4", "int8", "fp16", "f32"]', 'mlc = ["q4f16"]', ["unknown key 'quant.mlc'", "gguf"]),
        ('gguf = [', 'gguf = [] #', ["key 'quant.gguf'", "non-empty list"]),
        ("priority = 0", "priority = true", ["key 'priority'", "an integer"]),
    ],
)
def test_malformed_profile_names_file_key_and_expectation(
    isolated_home: Path, old: str, new: str, expected: list[str]
) -> None:
    path = write_user_profile(isolated_home, "mine", variant(old, new))
    with pytest.raises(InvalidConfigError) as err:
        load_profiles()
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message
    assert err.value.hint and "generic.toml" in err.value.hint


def test_a_value_where_a_table_belongs(isolated_home: Path) -> None:
    text = variant("[memory]\n", "[old_memory]\n").replace("priority = 0\n", "priority = 0\nmemory = 512\n")
    write_user_profile(isolated_home, "mine", text)
    with pytest.raises(InvalidConfigError, match="key 'memory': expected a table, got integer 512"):
        load_profiles()


def test_bad_toml_is_a_clear_error(isolated_home: Path) -> None:
    path = write_user_profile(isolated_home, "broken", 'id = "broken"\n[settings\nn_batch = 1\n')
    with pytest.raises(InvalidConfigError, match="not valid TOML") as err:
        load_profiles()
    assert str(path) in str(err.value)
    assert "line 2" in str(err.value)


def test_profile_id_must_match_its_file_name(isolated_home: Path) -> None:
    write_user_profile(isolated_home, "pi-at-home", GENERIC.replace('id = "generic"', 'id = "other"'))
    with pytest.raises(InvalidConfigError, match=r"key 'id': expected the file name .*'pi-at-home'"):
        load_profiles()


# --- user profiles -----------------------------------------------------------------------------


def test_user_profile_overrides_shipped_one(isolated_home: Path) -> None:
    text = (PROFILES_DIR / "raspberry-pi-5-8gb.toml").read_text()
    path = write_user_profile(isolated_home, "raspberry-pi-5-8gb",
                              text.replace("default_ctx = 4096", "default_ctx = 2048"))  # fmt: skip
    assert user_profiles_dir() == isolated_home / "profiles"
    profiles = load_profiles()
    assert profiles["raspberry-pi-5-8gb"].default_ctx == 2048
    assert profiles["raspberry-pi-5-8gb"].path == str(path)
    assert load_profiles(include_user=False)["raspberry-pi-5-8gb"].default_ctx == 4096


def test_user_profile_adds_a_device_class(isolated_home: Path, tmp_path: Path) -> None:
    text = variant("[match]\n", "[match]\nboard = 'Orange Pi 5'\n", "orange-pi-5")
    write_user_profile(isolated_home, "orange-pi-5", text.replace("priority = 0", "priority = 100"))
    info = DeviceInfo(board=BoardInfo(model="Orange Pi 5 Plus"), cpu=CpuInfo(arch="aarch64"))
    assert match_profile(info).id == "orange-pi-5"
    # An explicit folder wins over $EDGERT_HOME.
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert "orange-pi-5" not in load_profiles(other)


def test_get_profile_unknown_id_lists_known_ones(shipped: dict[str, DeviceProfile]) -> None:
    assert get_profile("raspberry-pi-5-8gb", shipped).id == "raspberry-pi-5-8gb"
    with pytest.raises(InvalidConfigError, match="unknown profile 'pi6'") as err:
        get_profile("pi6", shipped)
    assert err.value.hint and "raspberry-pi-5-8gb" in err.value.hint


# --- matching hand-built devices ---------------------------------------------------------------


def pi(model: str, ram_gib: float) -> DeviceInfo:
    return DeviceInfo(
        cpu=CpuInfo(model="Cortex-A76", arch="aarch64", flags=PI5_FLAGS),
        memory=MemoryInfo(total_bytes=int(ram_gib * GIB)),
        board=BoardInfo(model=model, family="raspberry-pi"),
        os=OsInfo(system="Linux"),
    )


def x86(ram_gib: float, flags: tuple[str, ...] = X86_FLAGS, gpus: tuple[GpuInfo, ...] = ()) -> DeviceInfo:
    return DeviceInfo(
        cpu=CpuInfo(model="Intel Core i7-1260P", arch="x86_64", flags=flags),
        memory=MemoryInfo(total_bytes=int(ram_gib * GIB)),
        gpus=gpus,
        os=OsInfo(system="Linux"),
    )


def mac(ram_gib: float) -> DeviceInfo:
    return DeviceInfo(
        cpu=CpuInfo(model="Apple M2", arch="aarch64", flags=("dotprod", "fp16", "i8mm", "neon")),
        memory=MemoryInfo(total_bytes=int(ram_gib * GIB)),
        gpus=(GpuInfo(vendor="apple", name="Apple M2 GPU", api="metal", unified_memory=True,
                      memory_total_bytes=int(ram_gib * GIB)),),  # fmt: skip
        os=OsInfo(system="Darwin"),
    )


def rtx(vram_gib: float | None) -> GpuInfo:
    total = None if vram_gib is None else int(vram_gib * GIB)
    return GpuInfo(vendor="nvidia", name="NVIDIA GeForce RTX 4060 Laptop GPU", api="cuda",
                   memory_total_bytes=total, memory_free_bytes=total)  # fmt: skip


JETSON = DeviceInfo(
    cpu=CpuInfo(model="Cortex-A78AE", arch="aarch64", flags=PI5_FLAGS),
    memory=MemoryInfo(total_bytes=int(7.3 * GIB)),
    board=BoardInfo(model="NVIDIA Jetson Orin Nano Developer Kit", family="jetson", release="R36.3.0"),
    gpus=(GpuInfo(vendor="nvidia", name="Jetson Orin Nano integrated GPU", api="cuda",
                  memory_total_bytes=int(7.3 * GIB), unified_memory=True,
                  compute_capability="8.7"),),  # fmt: skip
    os=OsInfo(system="Linux"),
)


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (pi("Raspberry Pi 4 Model B Rev 1.5", 1.8), "raspberry-pi-4-2gb"),
        (pi("Raspberry Pi 4 Model B Rev 1.4", 3.7), "raspberry-pi-4-4gb"),
        (pi("Raspberry Pi 400 Rev 1.0", 3.7), "raspberry-pi-4-4gb"),
        (pi("Raspberry Pi 4 Model B Rev 1.4", 7.6), "raspberry-pi-4-8gb"),
        (pi("Raspberry Pi 5 Model B Rev 1.0", 3.9), "raspberry-pi-5-4gb"),
        (pi("Raspberry Pi 5 Model B Rev 1.0", 7.9), "raspberry-pi-5-8gb"),
        (pi("Raspberry Pi Compute Module 5 Rev 1.0", 7.9), "raspberry-pi-5-8gb"),
        (pi("Raspberry Pi 5 Model B Rev 1.1", 15.8), "raspberry-pi-5-16gb"),
        (JETSON, "jetson-orin-nano-8gb"),
        (x86(7.6), "laptop-x86-8gb"),
        (x86(15.3), "laptop-x86-16gb"),
        (x86(62.0), "laptop-x86-16gb"),
        (x86(15.3, gpus=(rtx(8.0),)), "laptop-x86-nvidia-8gb"),
        (x86(7.6, gpus=(rtx(4.0),)), "laptop-x86-8gb"),  # too little VRAM for the GPU class
        (x86(15.3, gpus=(rtx(None),)), "laptop-x86-16gb"),  # VRAM unknown without NVML
        (mac(8.0), "apple-m2-8gb"),
        (mac(16.0), "apple-m2-16gb"),
        (x86(7.8, flags=("sse3", "ssse3", "sse4_1", "sse4_2")), "generic-x86-8gb"),  # no AVX2
        (x86(3.8), "generic"),
        (pi("Raspberry Pi 3 Model B Plus Rev 1.3", 0.9), "generic"),
        (DeviceInfo(cpu=CpuInfo(arch="riscv64"), memory=MemoryInfo(total_bytes=4 * GIB)), "generic"),
        (DeviceInfo(), "generic"),
    ],
)
def test_match_profile(info: DeviceInfo, expected: str, shipped: dict[str, DeviceProfile]) -> None:
    assert match_profile(info, shipped).id == expected


def test_match_explains_itself(shipped: dict[str, DeviceProfile]) -> None:
    best = explain_match(pi("Raspberry Pi 5 Model B Rev 1.0", 7.9), shipped)
    assert best.matched and best.profile.id == "raspberry-pi-5-8gb"
    assert best.reasons[0].startswith("✓ board Raspberry Pi 5 Model B Rev 1.0 matches")
    assert "✓ RAM 7.9 GiB ≥ 6 and < 12 GiB" in best.reasons
    ranked = rank_profiles(pi("Raspberry Pi 5 Model B Rev 1.0", 7.9), shipped)
    assert [m.profile.id for m in ranked if m.matched] == ["raspberry-pi-5-8gb", "generic"]
    pi4 = next(m for m in ranked if m.profile.id == "raspberry-pi-4-8gb")
    assert pi4.failed and "does not match" in pi4.failed[0]
    nvidia = explain_match(x86(15.3, gpus=(rtx(None),)), shipped)
    gpu_class = next(m for m in rank_profiles(x86(15.3, gpus=(rtx(None),)), shipped)
                     if m.profile.id == "laptop-x86-nvidia-8gb")  # fmt: skip
    assert nvidia.profile.id == "laptop-x86-16gb"
    assert "✗ VRAM unknown (install nvidia-ml-py to read it)" in gpu_class.failed


def test_detected_fixture_machines_match_their_profiles(tmp_path: Path) -> None:
    data = Path(__file__).parent / "data" / "device"
    for machine_dir, expected in (("pi5-8gb", "raspberry-pi-5-8gb"), ("pi4-2gb", "raspberry-pi-4-2gb"),
                                  ("jetson-orin-nano-8gb", "jetson-orin-nano-8gb"),
                                  ("x86-laptop-16gb", "laptop-x86-16gb")):  # fmt: skip
        root = tmp_path / machine_dir
        shutil.copytree(data / machine_dir, root)
        assert match_profile(detect(root)).id == expected


def test_this_machine_matches_some_profile() -> None:
    assert match_profile(detect(probe_backends=False)).id in load_profiles()


def test_profile_set_without_a_catch_all_can_fail(shipped: dict[str, DeviceProfile]) -> None:
    only_pi = {"raspberry-pi-5-8gb": shipped["raspberry-pi-5-8gb"]}
    with pytest.raises(InvalidConfigError, match="no profile matches"):
        match_profile(DeviceInfo(), only_pi)


# --- tables ------------------------------------------------------------------------------------


def test_tables(shipped: dict[str, DeviceProfile]) -> None:
    table = format_profile_table(shipped, current_id="raspberry-pi-5-8gb")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ID", "PRIO", "BACKENDS"]
    assert len(lines) == len(shipped) + 1
    assert any(line.startswith("*") and "raspberry-pi-5-8gb" in line for line in lines)

    shown = format_profile(shipped["raspberry-pi-5-8gb"])
    assert "quant gguf   Q4_0 > IQ4_NL" in shown
    assert "threads      auto (physical performance cores)" in shown
    assert "estimate:" in shown

    text = format_match(rank_profiles(pi("Raspberry Pi 5 Model B Rev 1.0", 7.9), shipped))
    assert text.splitlines()[0] == "profile   raspberry-pi-5-8gb"
    assert "also      generic: matches, lower priority or less specific" in text
    assert "not       raspberry-pi-5-16gb: RAM 7.9 GiB is below 12 GiB" in text


def test_profiles_are_hashable(shipped: dict[str, DeviceProfile]) -> None:
    assert len({hash(p) for p in shipped.values()}) == len(shipped)
