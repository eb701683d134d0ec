"""Key table of transformers' ``LlamaForCausalLM`` <-> ``ppllava_jax.models.llama``.

``llama_rules`` is written against prefixes so other families can embed the decoder:

- ``LlamaForCausalLM``:            ``model.*`` + ``lm_head.*``  (the defaults)
- PPLLaVA / LLaVA (transformers 4): ``language_model.model.*`` + ``language_model.lm_head.*``
- LLaVA-NeXT (transformers 5):      ``model.language_model.*`` + ``lm_head.*``

e.g. ``llama_rules(torch_model="model.language_model.", torch_head="lm_head.",
jax_prefix="language_model/")``. Rotary ``inv_freq`` buffers are not parameters (``IGNORE``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ppllava_jax.convert.hf_config import llama_from_hf, llama_to_hf
from ppllava_jax.convert.mapping import KeyMap, Rule
from ppllava_jax.convert.registry import detect_type, family
from ppllava_jax.models.config import LlamaConfig

IGNORE = (r"rotary_emb\.inv_freq$",)

_LAYER = (
    ("input_layernorm.weight", "input_layernorm/weight", "none"),
    ("post_attention_layernorm.weight", "post_attention_layernorm/weight", "none"),
    *(
        (f"{mod}.{p}.weight", f"{mod}/{p}/kernel", "linear")
        for mod, projs in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for p in projs
    ),
    *(
        (f"{mod}.{p}.bias", f"{mod}/{p}/bias", "none")
        for mod, projs in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for p in projs
    ),
)


def llama_rules(
    *, torch_model: str = "model.", torch_head: str = "lm_head.", jax_prefix: str = ""
) -> list[Rule]:
    """Rules for a ``LlamaForCausalLM`` whose decoder sits under ``torch_model`` and head under
    ``torch_head`` (torch names, with trailing dots) and whose JAX tree (``model/...``,
    ``lm_head/...``) sits under ``jax_prefix`` (with a trailing ``/``, or empty).

    Bias rules are always present; a bias the model lacks is reported by the strict converter.
    """
    jm, jh = f"{jax_prefix}model/", f"{jax_prefix}lm_head/"
    rules = [
        Rule(f"{torch_model}embed_tokens.weight", f"{jm}embed_tokens/embedding"),
        Rule(f"{torch_model}norm.weight", f"{jm}norm/weight"),
        Rule(f"{torch_head}weight", f"{jh}kernel", "linear"),
    ]
    for t, j, tr in _LAYER:
        rules.append(Rule(f"{torch_model}layers.{{i}}.{t}", f"{jm}layers_{{i}}/{j}", tr))
    return rules


def llama_keymap(cfg: LlamaConfig, keys: Iterable[str] = ()) -> KeyMap:
    """Key map of a ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``) checkpoint."""
    return KeyMap(llama_rules())


def llama_abstract_params(cfg: LlamaConfig) -> Any:
    """``jax.ShapeDtypeStruct`` tree of the decoder's parameters."""
    from ppllava_jax.models.llama import abstract_params

    return abstract_params(cfg)


FAMILIES = [
    family(
        "llama",
        detect_type("llama", "Llama"),
        llama_from_hf,
        llama_to_hf,
        llama_abstract_params,
        llama_keymap,
        IGNORE,
    )
]
