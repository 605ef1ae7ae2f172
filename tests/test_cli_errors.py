"""Bad command-line input: exit status 2, one `error:` line naming the value, no traceback, no run folder.

Most cases call `train_guidance.main` in this process. The ones in SUBPROCESS_CASES also run
`python train_guidance.py` as a real process with the Hub switched off, so the real command's
output is checked too.

Example:
    python -m pytest -q tests/test_cli_errors.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_guidance
from tiny_models import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away")
NUM_DOCUMENTS = 4
NUM_LAYERS = 3
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}



# tiny models run faster on one thread, see conftest.py
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), "gpt_neox", WORDS, num_layers=NUM_LAYERS)


@pytest.fixture
def data_path(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"title": f"doc {index}", "text": " ".join(WORDS[index:] + WORDS[:index])})
             for index in range(NUM_DOCUMENTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def save_dir(tmp_path):
    return tmp_path / "outputs"


def base_args(model_dir, data_path, save_dir) -> list[str]:
    """Return flags of a valid tiny CPU run; a case appends the one bad flag, which wins."""
    return ["--lm_name", "pythia", "--lm_size", "70m", "--lm_path", str(model_dir),
            "--data_path", str(data_path), "--save_dir", str(save_dir), "--hook_memory_layer", "-1",
            "--max_labels", "2", "--segment_length", "4", "--max_segements", "2", "--num_epochs", "1"]


def run_main(argv, capsys) -> tuple[int, str]:
    status = train_guidance.main(argv)
    return status, capsys.readouterr().err


def run_cli(argv, tmp_path) -> tuple[int, str]:
    # HF_HOME in tmp_path hides any cached Hub files, so "offline" really means no copy at all.
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "train_guidance.py", *argv], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    return completed.returncode, completed.stderr


def assert_rejected(status: int, stderr: str, save_dir: Path, fragments) -> None:
    lines = stderr.strip().splitlines()
    assert status == 2
    assert "Traceback" not in stderr
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[-1]
    assert not save_dir.exists()


# Flags rejected by GuidanceConfig before anything is loaded: (flags, fragments of the message).
CONFIG_CASES = {
    "unknown lm_name": (["--lm_name", "gpt9"],
                        ["unknown --lm_name 'gpt9'", "valid: llama2_chat_hf, llama2_hf, pythia, smollm2"]),
    "unknown lm_size": (["--lm_size", "3b"], ["unknown --lm_size '3b' for pythia", "valid: 70m, 160m"]),
    "hook_memory_dim 0": (["--hook_memory_dim", "0"], ["--hook_memory_dim 0 is invalid", "at least 1"]),
    "key_dim 0": (["--key_dim", "0"], ["--key_dim 0 is invalid", "at least 1"]),
    "batch_size 0": (["--batch_size", "0"], ["--batch_size 0 is invalid", "at least 1"]),
    "segment_length 0": (["--segment_length", "0"], ["--segment_length 0 is invalid", "at least 1"]),
    "max_segements 0": (["--max_segements", "0"], ["--max_segements 0 is invalid", "at least 1"]),
    "max_segments alias -1": (["--max_segments", "-1"], ["--max_segements -1 is invalid", "at least 1"]),
    "max_labels 0": (["--max_labels", "0"], ["--max_labels 0 is invalid", "at least 1"]),
    "num_epochs 0": (["--num_epochs", "0"], ["--num_epochs 0 is invalid", "at least 1"]),
    "negative lr": (["--lr", "-0.001"], ["--lr -0.001 is invalid", "finite number >= 0"]),
    "nan lr": (["--lr", "nan"], ["--lr nan is invalid", "finite number >= 0"]),
    "negative guidance": (["--guidance", "-0.5"], ["--guidance -0.5 is invalid", "finite number >= 0"]),
    "negative target": (["--target_negative_ce", "-1"],
                        ["--target_negative_ce -1.0 is invalid", "finite number >= 0"]),
    "unknown key activation": (["--key_activation", "softmax"],
                               ["unknown --key_activation 'softmax'", "valid: tanh, relu"]),
    "unknown lm activation": (["--lm_act", "softmax"], ["unknown --lm_act 'softmax'", "valid: gelu, relu"]),
    "unknown negative type": (["--negative_key_type", "shuffle"],
                              ["unknown --negative_key_type 'shuffle'", "valid: other, random, zero, perturb"]),
    "unknown loss form": (["--guidance_loss", "hinge"], ["unknown --guidance_loss 'hinge'", "valid: code, paper"]),
    "unknown module type": (["--document_key_module_type", "conv"],
                            ["unknown --document_key_module_type 'conv'", "valid: linear, nonlinear"]),
    "other with one document": (["--negative_key_type", "other", "--max_labels", "1"],
                                ["--negative_key_type other needs at least 2 documents",
                                 "--max_labels is 1"]),
    "negative seed": (["--seed", "-1"], ["--seed -1 is invalid", "0..4294967295"]),
    "non-integer batch size": (["--batch_size", "many"], ["--batch_size", "invalid int value: 'many'"]),
    "eval_new_tokens 0": (["--eval_new_tokens", "0"], ["--eval_new_tokens 0 is invalid", "at least 1"]),
    "negative l0 threshold": (["--eval_l0_threshold", "-0.1"],
                              ["--eval_l0_threshold -0.1 is invalid", "finite number >= 0"]),
}


@pytest.mark.parametrize("flags, fragments", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_invalid_flag_rejected(flags, fragments, model_dir, data_path, save_dir, capsys):
    status, stderr = run_main(base_args(model_dir, data_path, save_dir) + flags, capsys)

    assert_rejected(status, stderr, save_dir, fragments)
    assert len(stderr.strip().splitlines()) == 1


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


# Data files rejected as soon as they are read: (file name, content, fragments of the message).
DATA_CASES = {
    "empty file": ("empty.jsonl", b"\n  \n", ["empty.jsonl", "is empty"]),
    "not utf-8": ("latin1.txt", b" = Caf\xe9 = \n text\n", ["latin1.txt", "is not UTF-8 text"]),
    "wikitext without heading": ("plain.txt", b"just prose\n", ["plain.txt", "no top-level heading"]),
    "jsonl line not json": ("bad.jsonl", b'{"text": "the cat"}\n{"text": \n',
                            ["bad.jsonl", "line 2 is not valid JSON"]),
    "jsonl line without text": ("notext.jsonl", b'{"title": "the cat"}\n',
                                ["notext.jsonl", "line 1 has no non-empty string field 'text'"]),
}


@pytest.mark.parametrize("name, content, fragments", list(DATA_CASES.values()), ids=list(DATA_CASES))
def test_invalid_data_rejected(name, content, fragments, model_dir, tmp_path, save_dir, capsys):
    path = write_file(tmp_path / name, content)

    status, stderr = run_main(base_args(model_dir, path, save_dir), capsys)

    assert_rejected(status, stderr, save_dir, fragments)


def test_missing_data_path_rejected(model_dir, tmp_path, save_dir, capsys):
    missing = tmp_path / "absent.jsonl"

    status, stderr = run_main(base_args(model_dir, missing, save_dir), capsys)

    assert_rejected(status, stderr, save_dir, ["--data_path", "absent.jsonl", "not found"])


def test_unreadable_data_rejected(model_dir, data_path, save_dir, capsys, monkeypatch):
    # chmod cannot make a file unreadable for root, so the read itself is made to fail.
    def read_bytes(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    status, stderr = run_main(base_args(model_dir, data_path, save_dir), capsys)

    assert_rejected(status, stderr, save_dir, ["docs.jsonl", "permission denied"])


def test_more_labels_than_documents_rejected(model_dir, data_path, save_dir, capsys):
    flags = base_args(model_dir, data_path, save_dir) + ["--max_labels", "9"]

    status, stderr = run_main(flags, capsys)

    assert_rejected(status, stderr, save_dir,
                    ["--max_labels 9 is more than the 4 documents loaded", "valid: 1..4"])


def test_model_folder_without_weights_rejected(model_dir, data_path, tmp_path, save_dir, capsys):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for file in Path(model_dir).iterdir():
        if not file.name.endswith(".safetensors"):
            (folder / file.name).write_bytes(file.read_bytes())
    flags = base_args(model_dir, data_path, save_dir) + ["--lm_path", str(folder)]

    status, stderr = run_main(flags, capsys)

    assert_rejected(status, stderr, save_dir, ["no_weights", "contains no model weights"])
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("layer", ["3", "-4"])
def test_layer_out_of_range_rejected(layer, model_dir, data_path, save_dir, capsys):
    flags = base_args(model_dir, data_path, save_dir) + ["--hook_memory_layer", layer]

    status, stderr = run_main(flags, capsys)

    assert_rejected(status, stderr, save_dir, [f"--hook_memory_layer {layer} is out of range",
                                               "model with 3 blocks", "valid: -3..2"])


def test_save_dir_under_a_file_rejected(model_dir, data_path, tmp_path, capsys):
    blocker = write_file(tmp_path / "taken", b"a file")
    save_dir = blocker / "outputs"

    status, stderr = run_main(base_args(model_dir, data_path, save_dir), capsys)

    assert_rejected(status, stderr, save_dir, ["--save_dir", "is a file"])
    assert blocker.read_bytes() == b"a file"


# Real processes: the flags follow base_args and win; "{bad_data}" becomes a .jsonl file that is not JSON.
SUBPROCESS_CASES = {
    "unknown lm_name": (["--lm_name", "gpt9"], ["unknown --lm_name 'gpt9'"]),
    "batch_size 0": (["--batch_size", "0"], ["--batch_size 0 is invalid"]),
    "layer out of range": (["--hook_memory_layer", "7"], ["--hook_memory_layer 7 is out of range"]),
    "jsonl line not json": (["--data_path", "{bad_data}"], ["line 1 is not valid JSON"]),
    "hub model offline": (["--lm_path", "none"],
                          ["EleutherAI/pythia-70m-deduped", "pass a local model folder with --lm_path"]),
    "hub data offline": (["--data_path", "none"],
                         ["could not reach the Hugging Face Hub", "pass --data_path"]),
}


@pytest.mark.parametrize("flags, fragments", list(SUBPROCESS_CASES.values()), ids=list(SUBPROCESS_CASES))
def test_cli_process_rejects_input(flags, fragments, model_dir, data_path, tmp_path, save_dir):
    bad_data = write_file(tmp_path / "bad.jsonl", b"not json\n")
    flags = [flag.replace("{bad_data}", str(bad_data)) for flag in flags]

    status, stderr = run_cli(base_args(model_dir, data_path, save_dir) + flags, tmp_path)

    assert_rejected(status, stderr, save_dir, fragments)
