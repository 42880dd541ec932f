"""THUDM's ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B on today's transformers.

A run (or ``chattune convert``) that names a folder downloaded from one of them gets
a native model folder instead (``convert.py``): ChatGLM2/3 become transformers' GLM,
ChatGLM-6B chattune's port (``glm6b.py``). :func:`register` makes the port's config,
model and tokenizer known to transformers' Auto classes; importing chattune's model
loading calls it.
"""

from __future__ import annotations

from chattune.chatglm.convert import convert, native_config, native_model_path, thudm_family

__all__ = ["convert", "native_config", "native_model_path", "register", "thudm_family"]

_registered = False


def register() -> None:
    """Register ChatGLM-6B's port with AutoConfig, AutoModelForCausalLM and AutoTokenizer (once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from chattune.chatglm.glm6b import MODEL_TYPE, ChatGLM6BConfig, ChatGLM6BForCausalLM
    from chattune.chatglm.glm6b_tokenizer import ChatGLM6BTokenizer

    AutoConfig.register(MODEL_TYPE, ChatGLM6BConfig, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM6BConfig, ChatGLM6BForCausalLM, exist_ok=True)
    AutoModel.register(ChatGLM6BConfig, ChatGLM6BForCausalLM, exist_ok=True)
    AutoTokenizer.register(ChatGLM6BConfig, tokenizer_class=ChatGLM6BTokenizer, exist_ok=True)
    _registered = True
