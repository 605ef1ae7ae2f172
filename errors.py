"""Exception type for invalid user input: flags, data files and model folders.

Command-line entry points catch `InputError`, print its one-line message on stderr and exit with
status 2, so that a typo costs no traceback and writes no run folder. Every other exception is a bug
or an environment failure and keeps its traceback.

Example: `python train_guidance.py --lm_name gpt9` prints
`error: unknown --lm_name 'gpt9'; valid: llama2_chat_hf, llama2_hf, pythia, smollm2`.
"""


class InputError(ValueError):
    """Invalid user input; the message is one line that names the value and what is allowed."""
