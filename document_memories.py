"""Document-wise memory: a small MLP on a block's output, gated by a document's fixed random DocRep.

For the hidden state h of one transformer block and the DocRep K of the document being read, the
memory adds

    act(W_lmm(W_down(act(W_up h) * key_act(g(K)))))

to h. `act(W_up h)` is the token selection (which memory entries the current token requests),
`key_act(g(K))` the document selection (which entries the document may use), and their product the
memory that is read. `g` is linear or a small MLP ("nonlinear"). Each document has one DocRep:
a random row of an orthogonal matrix that is fixed at creation, never trained, and saved with the
memory's weights.

Example:
    memory = DocumentMemory(hidden_size=576, hook_memory_dim=32, num_documents=4)
    update = memory(hidden_states, memory.docreps[labels])  # (batch, seq, hidden)
"""

import torch
import torch.nn.functional as F
from torch import nn

from errors import InputError

KEY_ACTIVATIONS = ("tanh", "relu", "sigmoid", "gelu", "swiglu")
LM_ACTIVATIONS = ("gelu", "relu", "tanh", "silu")
DOCUMENT_KEY_MODULE_TYPES = ("linear", "nonlinear")


def make_activation(name: str):
    """Return the activation function called `name` (swiglu halves the last dimension)."""
    activations = {
        "tanh": torch.tanh,
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "gelu": F.gelu,
        "silu": F.silu,
        "swiglu": _swiglu,
    }
    if name not in activations:
        raise InputError(f"unknown activation '{name}'; valid: {', '.join(activations)}")
    return activations[name]


def _swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class DocumentKeyGenerator(nn.Module):
    """The map g from a DocRep (key_dim) to pre-activation document selection (out_features)."""

    def __init__(self, key_dim: int, out_features: int, module_type: str = "linear",
                 intermediate_size: int = 64):
        super().__init__()
        if module_type == "linear":
            self.net = nn.Linear(key_dim, out_features)
        elif module_type == "nonlinear":
            self.net = nn.Sequential(
                nn.Linear(key_dim, intermediate_size),
                nn.GELU(),
                nn.Linear(intermediate_size, intermediate_size),
                nn.GELU(),
                nn.Linear(intermediate_size, out_features),
            )
        else:
            raise InputError(f"unknown --document_key_module_type '{module_type}'; "
                             f"valid: {', '.join(DOCUMENT_KEY_MODULE_TYPES)}")

    def forward(self, docreps: torch.Tensor) -> torch.Tensor:
        return self.net(docreps)


class DocumentMemory(nn.Module):
    """Trainable memory of `hook_memory_dim` entries shared by `num_documents` documents."""

    def __init__(self, hidden_size: int, hook_memory_dim: int, num_documents: int, key_dim: int = 2,
                 key_activation: str = "tanh", lm_act: str = "gelu",
                 document_key_module_type: str = "linear", seed: int = 0):
        super().__init__()
        self.settings = dict(
            hidden_size=hidden_size, hook_memory_dim=hook_memory_dim, num_documents=num_documents,
            key_dim=key_dim, key_activation=key_activation, lm_act=lm_act,
            document_key_module_type=document_key_module_type, seed=seed,
        )
        self.key_activation = make_activation(key_activation)
        self.lm_act = make_activation(lm_act)

        # a seeded generator makes the DocReps and the initial weights depend on `seed` only
        generator = torch.Generator().manual_seed(seed)
        docreps = torch.empty(num_documents, key_dim)
        nn.init.orthogonal_(docreps, generator=generator)
        self.register_buffer("docreps", docreps)  # (num_documents, key_dim), never trained

        # swiglu consumes two pre-activations per memory entry
        key_out = 2 * hook_memory_dim if key_activation == "swiglu" else hook_memory_dim
        self.up_proj = nn.Linear(hidden_size, hook_memory_dim)
        self.key_generator = DocumentKeyGenerator(key_dim, key_out, document_key_module_type)
        self.down_proj = nn.Linear(hook_memory_dim, hidden_size)
        self.lmm_proj = nn.Linear(hidden_size, hidden_size)
        self._init_weights(generator)

    def _init_weights(self, generator: torch.Generator) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)

    def token_selection(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return act(W_up h): (batch, seq, hook_memory_dim) for hidden states (batch, seq, hidden)."""
        return self.lm_act(self.up_proj(hidden_states))

    def document_selection(self, docreps: torch.Tensor) -> torch.Tensor:
        """Return key_act(g(K)): (batch, hook_memory_dim) for DocReps (batch, key_dim)."""
        return self.key_activation(self.key_generator(docreps))

    def forward(self, hidden_states: torch.Tensor, docreps: torch.Tensor | None) -> torch.Tensor:
        """Return the memory's update to add to `hidden_states`.

        `docreps` is (batch, key_dim), one DocRep per sequence. None reads the memory with no
        document selection, that is, every entry fully selected.
        """
        selection = self.token_selection(hidden_states)  # (batch, seq, hook_memory_dim)
        if docreps is not None:
            document_selection = self.document_selection(docreps.to(selection.dtype))
            selection = selection * document_selection[:, None, :]
        return self.lm_act(self.lmm_proj(self.down_proj(selection)))

    @torch.no_grad()
    def selections(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                   docreps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return token selection (mean over real tokens), document selection and their product.

        Inputs are one batch of sequences with their own DocReps; each output is
        (batch, hook_memory_dim). These are the three panels of the memory-selection figure.
        """
        mask = attention_mask[..., None].to(hidden_states.dtype)  # (batch, seq, 1)
        token = (self.token_selection(hidden_states) * mask).sum(1) / mask.sum(1).clamp(min=1)
        document = self.document_selection(docreps.to(token.dtype))
        return {"token": token, "document": document, "product": token * document}
