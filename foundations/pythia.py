"""Load Pythia (GPT-NeoX) foundation models and reach their blocks, final norm and LM head.

The deduplicated Pythia models come from the Hugging Face Hub at their final training
checkpoint, revision ``step143000``. Example::

    model, tokenizer = load("pythia", "70m", lm_path=None, cache_dir=None, model_kwargs={})
    blocks = get_blocks(model)  # 6 GPTNeoXLayer modules for 70m

Callers normally go through ``foundations.load_foundation``, which validates the inputs,
freezes the model and sets up padding.
"""

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

MODEL_TYPE = "gpt_neox"
SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
LM_NAMES = {"pythia": SIZES}
REVISION = "step143000"


def hub_id(lm_name: str, lm_size: str) -> str:
    """Return the Hub repository id of a Pythia size, e.g. ``EleutherAI/pythia-70m-deduped``."""
    return f"EleutherAI/pythia-{lm_size}-deduped"


def load(
    lm_name: str, lm_size: str, lm_path: str | None, cache_dir: str | None, model_kwargs: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Pythia model and its tokenizer from ``lm_path``, or from the Hub when it is None.

    ``cache_dir`` is unused because the Hub download goes to the Hugging Face cache.
    ``model_kwargs`` go to ``from_pretrained`` (dtype, device_map, max_memory).
    """
    if lm_path is None:
        source, revision = hub_id(lm_name, lm_size), REVISION
    else:
        source, revision = lm_path, None

    # The small tokenizer loads first, so a missing network or Hub access fails before any
    # weight download starts.
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, **model_kwargs)
    return model, tokenizer


def get_blocks(model: PreTrainedModel) -> nn.ModuleList:
    return model.gpt_neox.layers


def get_final_norm(model: PreTrainedModel) -> nn.Module:
    return model.gpt_neox.final_layer_norm


def get_lm_head(model: PreTrainedModel) -> nn.Module:
    """Return the output projection, ``lm_head`` since transformers 5 and ``embed_out`` before.

    Pythia checkpoints store it as ``embed_out``, and transformers 5 renames it while loading.
    """
    if hasattr(model, "lm_head"):
        return model.lm_head
    return model.embed_out


def get_base_model(model: PreTrainedModel) -> nn.Module:
    """Return the GPTNeoXModel that owns ``.layers`` and accepts ``inputs_embeds``."""
    return model.gpt_neox
