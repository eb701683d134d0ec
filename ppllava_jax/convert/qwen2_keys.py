"""Key table of transformers' ``Qwen2ForCausalLM`` <-> ``ppllava_jax.models.llama`` with a
``Qwen2Config``.

Qwen2's parameter names are LLaMA's (``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
``lm_head``), with biases on q/k/v, so the table, key map and abstract tree are ``llama_keys``'s;
the family differs in its config (``Qwen2Config``: GQA, ``qkv_bias``, ``rope_theta``, untied head).
"""

from __future__ import annotations

from ppllava_jax.convert.hf_config import llama_to_hf, qwen2_from_hf
from ppllava_jax.convert.llama_keys import IGNORE, llama_abstract_params, llama_keymap
from ppllava_jax.convert.registry import detect_type, family

FAMILIES = [
    family(
        "qwen2",
        detect_type("qwen2", "Qwen2For"),
        qwen2_from_hf,
        llama_to_hf,
        llama_abstract_params,
        llama_keymap,
        IGNORE,
    )
]
