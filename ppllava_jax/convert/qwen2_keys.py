"""Key table of transformers' ``Qwen2ForCausalLM`` <-> ``ppllava_jax.models.llama`` with a
``Qwen2Config``.

Qwen2's parameter names are LLaMA's (``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``,
``lm_head``), with biases on q/k/v, so the table, key map and abstract tree are ``llama_keys``'s;
the family differs in its config (``Qwen2Config``: GQA, ``qkv_bias``, ``rope_theta``, untied head).
"""

from __future__ import annotations

from ppllava_jax.convert.llama_keys import IGNORE, _abstract, _keymap, llama_rules
from ppllava_jax.convert.mapping import KeyMap
from ppllava_jax.convert.registry import Family
from ppllava_jax.models.config import Qwen2Config


def _detect(hf: dict) -> bool:
    archs = hf.get("architectures") or []
    return hf.get("model_type") == "qwen2" or any(a.startswith("Qwen2For") for a in archs)


FAMILIES = [
    Family(
        name="qwen2",
        detect=_detect,
        config_from_hf=Qwen2Config.from_hf,
        config_to_hf=lambda cfg: cfg.to_hf(),
        abstract_params=_abstract,
        keymap=_keymap,
        export_keymap=lambda cfg: KeyMap(llama_rules()),
        ignore=IGNORE,
    )
]
