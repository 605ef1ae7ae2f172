"""Load frozen foundation LMs and reach their blocks, final norm and LM head.

``load_foundation`` returns a causal LM in eval mode with every parameter frozen, and a
tokenizer that pads on the left. The accessors work on any loaded model and dispatch on
``model.config.model_type``: ``gpt_neox`` (Pythia, in ``pythia.py``) and ``llama``
(Llama-2 and SmolLM2, in ``llama2.py``). Example::

    validate_model_arguments("pythia", "70m")  # before any slow work
    model, tokenizer = load_foundation("pythia", "70m")
    block = get_block(model, -1)  # the last GPTNeoXLayer
    info = get_lm_info(model)  # {"hidden_size": 512, "num_hidden_layers": 6, ...}
"""

import json
import logging
import operator
import os
from types import ModuleType

import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from errors import InputError
from foundations import llama2, pythia

logger = logging.getLogger(__name__)

FAMILIES = (pythia, llama2)
LM_NAMES: dict[str, tuple[str, ...]] = {**pythia.LM_NAMES, **llama2.LM_NAMES}
_FAMILY_BY_LM_NAME = {lm_name: family for family in FAMILIES for lm_name in family.LM_NAMES}
_FAMILY_BY_MODEL_TYPE = {family.MODEL_TYPE: family for family in FAMILIES}

WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


def load_foundation(
    lm_name: str,
    lm_size: str,
    lm_path: str | None = None,
    cache_dir: str | None = None,
    num_gpus: int = 0,
    torch_dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen foundation LM in eval mode and its left-padding tokenizer.

    ``lm_path`` is a local folder written by ``save_pretrained`` that replaces the download.
    ``cache_dir`` is the SmolLM2 cache root (see ``llama2.resolve_cache_dir``).
    ``num_gpus`` 0 loads on the CPU, and N >= 1 spreads the model over GPUs 0..N-1 with
    accelerate's ``device_map="auto"``. ``torch_dtype`` None means float32 on the CPU and the
    checkpoint's own dtype on GPUs. Raises InputError for invalid arguments, a folder that
    contains no model, and a Hub download that fails because the Hub is unreachable.
    """
    family = _family_for_lm_name(lm_name, lm_size)
    device_kwargs = _device_map_kwargs(num_gpus)
    model_kwargs = {"dtype": _resolve_dtype(torch_dtype, num_gpus), **device_kwargs}
    if lm_path is not None:
        validate_model_folder(lm_path, lm_name, family.MODEL_TYPE)

    source = lm_path or family.hub_id(lm_name, lm_size) or "the installed package"
    logger.info("loading %s %s from %s", lm_name, lm_size, source)
    try:
        model, tokenizer = family.load(lm_name, lm_size, lm_path, cache_dir, model_kwargs)
    except OSError as err:
        if lm_path is not None or not _is_hub_unreachable(err):
            raise
        raise InputError(
            f"could not download {source} because the Hugging Face Hub is unreachable "
            "or HF_HUB_OFFLINE is set; pass a local model folder with --lm_path"
        ) from err

    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    _set_up_padding(model, tokenizer, lm_name)
    return model, tokenizer


def _family_for_lm_name(lm_name: str, lm_size: str) -> ModuleType:
    if lm_name not in LM_NAMES:
        raise InputError(f"unknown --lm_name {lm_name!r}; valid: {', '.join(sorted(LM_NAMES))}")
    sizes = LM_NAMES[lm_name]
    if lm_size not in sizes:
        raise InputError(f"unknown --lm_size {lm_size!r} for {lm_name}; valid: {', '.join(sizes)}")
    return _FAMILY_BY_LM_NAME[lm_name]


def _resolve_dtype(torch_dtype: torch.dtype | str | None, num_gpus: int) -> torch.dtype | str:
    if torch_dtype is None:
        # CPU runs use float32 because a 1024x1024 float16 matmul took about 170 times as long
        # as float32 (torch 2.13, AMD EPYC). On GPUs "auto" keeps the checkpoint's stored dtype.
        return torch.float32 if num_gpus == 0 else "auto"
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return torch_dtype
    if torch_dtype in DTYPE_NAMES:
        return getattr(torch, torch_dtype)
    raise InputError(
        f"invalid torch_dtype {torch_dtype!r}; valid: None, a torch.dtype, {', '.join(DTYPE_NAMES)}"
    )


def _device_map_kwargs(num_gpus: int) -> dict:
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 0:
        raise InputError(
            f"invalid --num_gpus {num_gpus!r}; valid: an integer >= 0, where 0 means CPU"
        )
    if num_gpus == 0:
        return {}

    available = torch.cuda.device_count()
    if num_gpus > available:
        raise InputError(
            f"--num_gpus {num_gpus} exceeds the {available} visible CUDA GPUs; "
            f"valid: 0..{available}"
        )
    # Without max_memory, accelerate 1.16's "auto" map uses every visible GPU and then the CPU.
    # Listing only GPUs 0..N-1, at their free memory, confines the model to those.
    # NOTE: not yet run on a GPU machine.
    max_memory = {index: torch.cuda.mem_get_info(index)[0] for index in range(num_gpus)}
    return {"device_map": "auto", "max_memory": max_memory}


def validate_model_arguments(lm_name: str, lm_size: str, lm_path: str | None = None) -> None:
    """Raise InputError for an unknown name or size or an invalid ``lm_path``; load nothing.

    Callers run this before reading any data, so that a bad model argument fails in seconds.
    """
    family = _family_for_lm_name(lm_name, lm_size)
    if lm_path is not None:
        validate_model_folder(lm_path, lm_name, family.MODEL_TYPE)


def validate_model_folder(lm_path: str, lm_name: str, model_type: str) -> None:
    """Raise InputError unless ``lm_path`` contains a config, weights and a tokenizer.

    The config's ``model_type`` must also equal ``model_type``, the type that ``lm_name`` needs.
    """
    if not os.path.isdir(lm_path):
        raise InputError(
            f"--lm_path {lm_path!r} is not a directory; pass a folder written by save_pretrained"
        )

    file_names = set(os.listdir(lm_path))
    has_weights = any(name.endswith((".safetensors", ".bin")) for name in file_names)
    if not has_weights and not file_names.intersection(WEIGHT_INDEX_FILES):
        raise InputError(
            f"--lm_path {lm_path!r} contains no model weights (*.safetensors, *.bin or a weight "
            "index); pass a folder written by save_pretrained"
        )
    if "config.json" not in file_names:
        raise InputError(
            f"--lm_path {lm_path!r} contains no config.json; "
            "pass a folder written by save_pretrained"
        )
    if not file_names.intersection(TOKENIZER_FILES):
        raise InputError(
            f"--lm_path {lm_path!r} contains no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into the same folder"
        )

    found_type = _read_model_type(os.path.join(lm_path, "config.json"))
    if found_type != model_type:
        raise InputError(
            f"--lm_path {lm_path!r} contains a model of type {found_type!r}, "
            f"but --lm_name {lm_name} needs type {model_type!r}"
        )


def _read_model_type(config_path: str) -> str | None:
    with open(config_path, encoding="utf-8") as file:
        try:
            config = json.load(file)
        except json.JSONDecodeError as err:
            raise InputError(f"{config_path!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise InputError(f"{config_path!r} does not contain a JSON object")
    return config.get("model_type")


def _is_hub_unreachable(err: BaseException) -> bool:
    """Return whether the exception chain contains huggingface_hub's no-network errors."""
    seen = set()
    current = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _set_up_padding(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, lm_name: str
) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(
                f"the {lm_name} tokenizer has neither a pad token nor an EOS token; "
                "set eos_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding puts the last real token of every row at the final position, where
    # batched generation continues.
    tokenizer.padding_side = "left"

    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id


def _family_for_model(model: nn.Module) -> ModuleType:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise InputError(
            f"unsupported model type {model_type!r}; "
            f"valid: {', '.join(sorted(_FAMILY_BY_MODEL_TYPE))}"
        )
    return family


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the model's transformer blocks in order."""
    return _family_for_model(model).get_blocks(model)


def resolve_layer(model: nn.Module, index: int) -> int:
    """Return ``index`` as a non-negative block index, counting negative values from the end."""
    num_blocks = len(get_blocks(model))
    if isinstance(index, bool):
        raise InputError(f"--hook_memory_layer {index!r} is not an integer")
    try:
        index = operator.index(index)
    except TypeError as err:
        raise InputError(f"--hook_memory_layer {index!r} is not an integer") from err
    if not -num_blocks <= index < num_blocks:
        raise InputError(
            f"--hook_memory_layer {index} is out of range for a model with {num_blocks} blocks; "
            f"valid: {-num_blocks}..{num_blocks - 1}"
        )
    return index % num_blocks


def get_block(model: nn.Module, index: int) -> nn.Module:
    """Return block ``index``, counting negative values from the end."""
    return get_blocks(model)[resolve_layer(model, index)]


def get_final_norm(model: nn.Module) -> nn.Module:
    """Return the norm applied after the last block and before the LM head."""
    return _family_for_model(model).get_final_norm(model)


def get_lm_head(model: nn.Module) -> nn.Module:
    """Return the linear layer that maps hidden states to vocabulary logits."""
    return _family_for_model(model).get_lm_head(model)


def get_base_model(model: nn.Module) -> nn.Module:
    """Return the decoder module that owns ``.layers`` and accepts ``inputs_embeds``."""
    return _family_for_model(model).get_base_model(model)


def get_lm_info(model: nn.Module) -> dict:
    """Return hidden_size, num_hidden_layers, vocab_size and model_type from the model config."""
    _family_for_model(model)
    config = model.config
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "model_type": config.model_type,
    }
