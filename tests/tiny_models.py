"""Tiny random GPT-NeoX and Llama models and a word-level tokenizer for CPU tests.

They stand in for Pythia and Llama-2: same classes and block layout, a few thousand parameters.

Example:
    model = build_llama_like(); tokenizer = build_word_tokenizer(["the", "cat"])
"""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 100
HIDDEN_SIZE = 32


def build_pythia_like(num_layers: int = 3) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=False,  # as in the Pythia checkpoints
    )
    return GPTNeoXForCausalLM(config)


def build_llama_like(num_layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


DEFAULT_WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog")


def build_word_tokenizer(words=DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over `words` with an EOS token but no pad token."""
    words = ["[UNK]", "[EOS]", *words]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")




def save_tiny_model(folder, family: str, words=DEFAULT_WORDS, num_layers: int = 3) -> str:
    """Save a tiny `family` model ("gpt_neox" or "llama") and a word tokenizer into `folder`."""
    model = build_pythia_like(num_layers) if family == "gpt_neox" else build_llama_like(num_layers)
    model.save_pretrained(folder)
    build_word_tokenizer(words).save_pretrained(folder)
    return str(folder)
