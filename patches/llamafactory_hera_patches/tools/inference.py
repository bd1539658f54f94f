"""The host's inference engine for ``llamafactory-hera eval``: ``HuggingfaceEngine`` (base model, adapters loaded and
merged) and one answer from its static ``_chat``. Checked on LLaMA-Factory 0.9.5 (:func:`check_host`).
"""

from __future__ import annotations

from typing import Any

from ..guard import require


def check_host() -> None:
    """Raise ``HostMismatchError`` unless every host name used here exists."""
    # lazy: the host's chat engine, only when eval answers
    import llamafactory.chat.hf_engine as hf_engine
    import llamafactory.hparams as hparams

    require(hparams, ("get_infer_args",), "inference")
    require(hf_engine, ("HuggingfaceEngine",), "inference")
    require(hf_engine.HuggingfaceEngine, ("_chat",), "inference")


def load_engine(recipe: dict[str, Any]) -> Any:
    """The host's ``HuggingfaceEngine`` for ``recipe``, its model in eval mode."""
    check_host()
    # lazy: the host's chat engine, only when eval answers
    import llamafactory.chat.hf_engine as hf_engine
    import llamafactory.hparams as hparams

    model_args, data_args, finetuning_args, generating_args = hparams.get_infer_args(
        {**recipe, "infer_backend": "huggingface"}
    )
    engine = hf_engine.HuggingfaceEngine(model_args, data_args, finetuning_args, generating_args)
    engine.model.eval()
    return engine


def answer(engine: Any, messages: list[dict[str, str]], images: list[Any] | None, input_kwargs: dict[str, Any]) -> str:
    """The engine's first response text, as the host's chat answers."""
    # lazy: the host's chat engine, only when eval answers
    import llamafactory.chat.hf_engine as hf_engine

    responses = hf_engine.HuggingfaceEngine._chat(
        engine.model,
        engine.tokenizer,
        engine.processor,
        engine.template,
        engine.generating_args,
        messages,
        images=images,
        input_kwargs=input_kwargs,
    )
    return responses[0].response_text
