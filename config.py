"""Training configuration: one dataclass whose fields are the command-line flags of train_guidance.py.

Every flag is validated in `__post_init__`, before any model or data is loaded, so that a typo fails
in seconds with a one-line `InputError`. The parser is generated from the fields, so the help text
lives next to the default.

`--resume RUN_DIR` is a parser flag, not a field: the run's saved config.json replaces the defaults.
Next to it, `--num_epochs` may be raised, and the flags in RESUME_RELOCATABLE may change because they
locate files and devices and do not change what is trained. Any other flag must repeat the saved value.

Example:
    config = GuidanceConfig.from_args(["--lm_name", "smollm2", "--lm_size", "135m"])
    command_line = parse_command_line(["--resume", "outputs/run_000", "--num_epochs", "800"])
"""

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from document_memories import DOCUMENT_KEY_MODULE_TYPES, KEY_ACTIVATIONS, LM_ACTIVATIONS
from errors import InputError
from foundations import LM_NAMES
from utils import GUIDANCE_LOSSES, NEGATIVE_KEY_TYPES
from wikitext import WIKITEXT_CONFIGS

LR_SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "tf32", "bf16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")

# Fields that must be at least 1, and fields that must be non-negative.
POSITIVE_INTS = (
    "max_labels", "segment_length", "max_segements", "max_length", "batch_size", "num_epochs",
    "hook_memory_dim", "key_dim", "save_freq", "num_accumulation_steps",
    "eval_prompts_per_document", "eval_prompt_words", "eval_new_tokens", "eval_landscape_points", "eval_top_k",
)
NON_NEGATIVE_NUMBERS = (
    "lr", "guidance", "target_negative_ce", "perturb_std", "grad_clip_coeff", "num_warmup_steps",
    "weight_decay", "num_gpus", "eval_landscape_documents", "eval_l0_threshold", "eval_landscape_margin",
)
# numpy accepts seeds in 0..2**32 - 1 only, the narrowest range of the RNGs that --seed seeds.
MAX_SEED = 2**32 - 1
# Flags that may differ from the saved config.json under --resume: they locate the model, the data
# and the devices. Moving to other devices keeps the run going but not bit-identical.
RESUME_RELOCATABLE = ("lm_path", "lm_cache_dir", "data_path", "data_cache_dir", "num_gpus", "device")
CHOICES = {
    "key_activation": KEY_ACTIVATIONS,
    "lm_act": LM_ACTIVATIONS,
    "document_key_module_type": DOCUMENT_KEY_MODULE_TYPES,
    "negative_key_type": NEGATIVE_KEY_TYPES,
    "guidance_loss": GUIDANCE_LOSSES,
    "lr_scheduler": LR_SCHEDULERS,
    "precision": PRECISIONS,
    "activation_cache_dtype": CACHE_DTYPES,
    "wikitext_config": WIKITEXT_CONFIGS,
}


def flag(default, help_text, **extra):
    """Return a dataclass field whose metadata carries the argparse help text."""
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class GuidanceConfig:
    """Resolved settings of one training run; saved as config.json in the run folder."""

    # language model
    lm_name: str = flag("pythia", "model family: pythia, llama2_hf, llama2_chat_hf or smollm2")
    lm_size: str = flag("1b", "model size, e.g. 70m..12b for pythia, 7b/13b for llama2, 135m for smollm2")
    lm_path: str | None = flag(None, "local model folder to load instead of the Hugging Face Hub")
    lm_cache_dir: str | None = flag(None, "cache folder for downloaded or converted model weights")
    num_gpus: int = flag(0, "0 runs on the CPU; N >= 1 splits the blocks over N GPUs")
    device: str = flag("auto", "device for inputs and memory: auto, cpu, cuda or cuda:N")
    precision: str = flag("fp32", "fp32; tf32 (TF32 matmuls on GPU); bf16 (bf16 autocast on GPU)")

    # data
    data_path: str | None = flag(None, "WikiText-format .txt file, folder of .txt files, or .jsonl; default: the Hub")
    wikitext_config: str = flag("wikitext-103-v1", "Hub configuration of EleutherAI/wikitext_document_level")
    data_cache_dir: str | None = flag(None, "cache folder for the Hub dataset")
    max_labels: int = flag(10, "number of documents to memorise, picked at random with --seed")
    segment_length: int = flag(128, "segment length in words; segments overlap by half")
    max_segements: int = flag(10, "maximum segments per document (alias --max_segments)",
                              aliases=("--max_segments",))
    max_length: int = flag(256, "maximum tokens per segment; longer segments are truncated")

    # document memory
    hook_memory_layer: int = flag(15, "index of the block whose output gets the memory; negative counts from the end")
    hook_memory_dim: int = flag(32, "number of memory entries")
    key_dim: int = flag(2, "dimension of the fixed random DocRep of each document")
    key_activation: str = flag("tanh", "activation of the document selection: " + ", ".join(KEY_ACTIVATIONS))
    lm_act: str = flag("gelu", "activation inside the memory: " + ", ".join(LM_ACTIVATIONS))
    document_key_module_type: str = flag("linear", "DocRep-to-selection map: linear or nonlinear (MLP)")

    # guidance
    guidance: float = flag(0.1, "guidance weight alpha of the negative-DocRep term")
    target_negative_ce: float = flag(4.5, "target CE tau under a negative DocRep, in nats")
    guidance_loss: str = flag("code", "code: CE+ + alpha*min((CE- - tau)^2, CE+); paper: CE+ + alpha*|tau - CE-|")
    negative_key_type: str = flag("other", "negative DocRep: other document's, random, zero or perturbed own")
    perturb_std: float = flag(0.1, "standard deviation of the noise for --negative_key_type perturb")

    # optimisation
    lr: float = flag(1e-3, "AdamW learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    batch_size: int = flag(16, "segments per optimiser micro-batch")
    num_epochs: int = flag(500, "passes over all segments")
    num_accumulation_steps: int = flag(1, "micro-batches per optimiser step")
    grad_clip_coeff: float = flag(5.0, "maximum gradient norm; 0 disables clipping")
    num_warmup_steps: int = flag(0, "linear warm-up steps of the learning rate")
    lr_scheduler: str = flag("constant", "learning-rate schedule after warm-up: constant, linear or cosine")
    no_activation_cache: bool = flag(False, "run the full hooked model every step instead of caching the memory block's output")
    activation_cache_dtype: str = flag("float32", "dtype of the cached block outputs in CPU memory: float32, float16 or bfloat16")

    # bookkeeping
    seed: int = flag(1, "seed of document choice, DocReps, memory init and batch order")
    save_freq: int = flag(10, "epochs between checkpoints and selection-figure frames")
    save_dir: str = flag("outputs", "folder under which each run gets a new numbered folder")

    # evaluation
    eval_prompts_per_document: int = flag(2, "segments per document whose opening words are generation prompts")
    eval_prompt_words: int = flag(16, "words at the start of a segment that form a generation prompt")
    eval_new_tokens: int = flag(16, "tokens generated greedily per prompt and scored against the true continuation")
    eval_l0_threshold: float = flag(0.01, "absolute value above which a document-selection entry counts in L0")
    eval_landscape_documents: int = flag(2, "documents drawn in the perplexity landscape (key_dim 2 only); 0 skips it")
    eval_landscape_points: int = flag(9, "grid points per axis of the perplexity landscape")
    eval_landscape_margin: float = flag(0.5, "margin added around the trained DocReps by the landscape grid")
    eval_top_k: int = flag(10, "tokens listed per document by the logit lens")

    def __post_init__(self):
        self._check_types()
        for name in POSITIVE_INTS:
            value = getattr(self, name)
            if value < 1:
                raise InputError(f"--{name} {value} is invalid; it must be at least 1")
        for name in NON_NEGATIVE_NUMBERS:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"--{name} {value} is invalid; it must be a finite number >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"--seed {self.seed} is invalid; it must be in 0..{MAX_SEED}")
        self._check_choices()
        if self.negative_key_type == "other" and self.max_labels < 2:
            raise InputError(f"--negative_key_type other needs at least 2 documents, but --max_labels is "
                             f"{self.max_labels}; raise --max_labels or use random, zero or perturb")

    def _check_types(self) -> None:
        """Reject values of the wrong type, which a hand-edited config.json can contain."""
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            expected = _field_kind(spec)
            valid = {
                "bool": isinstance(value, bool),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                "str": isinstance(value, str),
                "str or null": value is None or isinstance(value, str),
            }[expected]
            if not valid:
                raise InputError(f"--{spec.name} {value!r} is invalid; it must be of type {expected}")

    def _check_choices(self) -> None:
        if self.lm_name not in LM_NAMES:
            raise InputError(f"unknown --lm_name '{self.lm_name}'; valid: {', '.join(sorted(LM_NAMES))}")
        sizes = LM_NAMES[self.lm_name]
        if self.lm_size not in sizes:
            raise InputError(f"unknown --lm_size '{self.lm_size}' for {self.lm_name}; valid: {', '.join(sizes)}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"unknown --{name} '{value}'; valid: {', '.join(allowed)}")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise InputError(f"unknown --device '{self.device}'; valid: auto, cpu, cuda, cuda:N")

    @classmethod
    def build_parser(cls, suppress_defaults: bool = False) -> argparse.ArgumentParser:
        """Build an argparse parser with one flag per field, plus --resume.

        With `suppress_defaults`, a flag that is not on the command line is absent from the parsed
        namespace, which tells the flags given next to --resume from the defaults.
        """
        parser = OneLineErrorParser(
            description="Train document-wise memories with guidance on a frozen causal LM.",
        )
        for spec in dataclasses.fields(cls):
            names = [f"--{spec.name}", *spec.metadata.get("aliases", ())]
            help_text = f"{spec.metadata['help']} (default: {spec.default})"
            default = argparse.SUPPRESS if suppress_defaults else spec.default
            if _field_kind(spec) == "bool":
                parser.add_argument(*names, dest=spec.name, action="store_true", default=default,
                                    help=help_text)
                continue
            parser.add_argument(*names, dest=spec.name, type=_parse_type(spec), default=default,
                                help=help_text)
        parser.add_argument(
            "--resume", metavar="RUN_DIR", default=argparse.SUPPRESS if suppress_defaults else None,
            help="continue the run in RUN_DIR from its last checkpoint with its saved config.json; "
                 "--num_epochs may be raised and --" + ", --".join(RESUME_RELOCATABLE)
                 + " may change, every other flag must repeat the saved value",
        )
        return parser

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "GuidanceConfig":
        """Parse and validate command-line flags; raise InputError on an invalid value."""
        return parse_command_line(argv).config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path, **extra) -> None:
        """Write the config, plus `extra` entries such as the chosen documents, as JSON.

        The file is written next to `path` and renamed over it, so a kill never leaves half a file.
        """
        path = Path(path)
        temporary = path.with_name(f"{path.name}.tmp")
        temporary.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> "GuidanceConfig":
        """Read a config.json written by `save`, ignoring the extra entries; raise InputError if invalid."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise InputError(f"{path} not found; pass a run folder written by train_guidance.py") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path} cannot be read as JSON ({err})") from err
        if not isinstance(data, dict):
            raise InputError(f"{path} does not contain a JSON object")
        names = {spec.name for spec in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except InputError as err:
            raise InputError(f"{path}: {err}") from err

    def with_resume_flags(self, explicit_flags: dict, source: Path) -> "GuidanceConfig":
        """Return this saved config with the flags given next to --resume applied.

        Raises InputError for a lowered --num_epochs and for any other changed flag that is not in
        RESUME_RELOCATABLE. `source` is the config.json named in the message.
        """
        changes = {}
        for name, value in explicit_flags.items():
            saved_value = getattr(self, name)
            if value == saved_value:
                continue
            if name == "num_epochs" and value < saved_value:
                raise InputError(f"--num_epochs {value} is below the {saved_value} epochs in {source}; "
                                 "with --resume it may only be raised")
            if name != "num_epochs" and name not in RESUME_RELOCATABLE:
                raise InputError(f"--{name} {value} conflicts with {saved_value} in {source}; with --resume "
                                 "only --num_epochs (raised) and --" + ", --".join(RESUME_RELOCATABLE)
                                 + " may change")
            changes[name] = value
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CommandLine:
    """Parsed command line: the run's settings and, with --resume, the run folder to continue."""

    config: GuidanceConfig
    resume_dir: Path | None = None


def parse_command_line(argv: list[str] | None = None) -> CommandLine:
    """Parse and validate the flags; with --resume, start from the run's saved config.json.

    Raises InputError for an invalid value, a folder without config.json or a conflicting flag.
    """
    namespace = vars(GuidanceConfig.build_parser().parse_args(argv))
    resume = namespace.pop("resume")
    if resume is None:
        return CommandLine(GuidanceConfig(**namespace))

    resume_dir = Path(resume)
    if not resume_dir.is_dir():
        raise InputError(f"--resume {resume!r} is not a folder; pass a run folder such as outputs/run_000")
    explicit_flags = vars(GuidanceConfig.build_parser(suppress_defaults=True).parse_args(argv))
    del explicit_flags["resume"]
    config_path = resume_dir / "config.json"
    saved = GuidanceConfig.load(config_path)
    return CommandLine(saved.with_resume_flags(explicit_flags, config_path), resume_dir)


class OneLineErrorParser(argparse.ArgumentParser):
    """Argument parser that raises InputError for a bad flag instead of printing its usage and exiting.

    The command line then reports it like every other invalid input: one line and exit status 2.
    """

    def error(self, message):
        raise InputError(message)


def _field_kind(spec) -> str:
    """Return "bool", "int", "float", "str" or "str or null" for a field's annotation."""
    type_name = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
    for kind in ("bool", "int", "float"):
        if kind in type_name:
            return kind
    return "str or null" if "None" in type_name else "str"


def _parse_type(spec):
    """Return the argparse converter for a field; `str | None` fields accept 'none' as None."""
    return {"int": int, "float": float, "str or null": _optional_str}.get(_field_kind(spec), str)


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("", "none") else text
