"""A model loaded as LLaMA-Factory loads it for inference (``HuggingfaceEngine``: base, then each adapter merged),
served to lm-eval by its own ``HFLM`` and to lmms-eval by :func:`lmms_model`, whose ``generate_until`` answers with
LLaMA-Factory's chat (the recipe's template and multimodal plugin: the prompt format the model was trained on).
"""

from __future__ import annotations

from typing import Any

from llamafactory_hera.evaluation.runs import ModelSpec
from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera_patches import inference

PIN = "CUDA_VISIBLE_DEVICES=0 llamafactory-hera eval ..."


def device_note() -> str | None:
    """A line when several GPUs are visible: LLaMA-Factory loads with ``device_map: auto``, a pipeline over all of
    them (docs/eval.md, "On a node with several GPUs")."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        return None
    return (f"eval: {count} GPUs visible: the model is loaded with device_map: auto, split across all {count} (a "
            f"pipeline, one GPU at work at a time); a model that fits one GPU runs faster pinned to it: {PIN}")


def load_engine(spec: ModelSpec) -> Any:
    """``HuggingfaceEngine`` for ``spec`` (model in eval mode, tokenizer, processor, template, generating args)."""
    return inference.load_engine(spec.recipe)


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, list | tuple):
        return [item for value in visuals for item in _flatten(value)]
    return [visuals]


def lmms_model(engine: Any, label: str) -> Any:
    """An lmms-eval model (``lmms``, simple type) that answers with ``engine`` (see the module docstring)."""
    import PIL.Image
    from lmms_eval.api.model import lmms
    from tqdm.auto import tqdm

    class LlamaFactoryLMM(lmms):
        """lmms-eval's view of a LLaMA-Factory-loaded MLLM: greedy ``generate_until`` with images."""

        is_simple = True

        def __init__(self) -> None:
            super().__init__()
            self.engine = engine
            self.batch_size_per_gpu = 1

        def generate_until(self, requests: list[Any]) -> list[str]:
            """One greedy answer per request (``args``: context, generation kwargs, doc_to_visual, doc id, task,
            split); the answer is cut at the first of the request's ``until`` strings."""
            answers = []
            for request in tqdm(requests, desc=f"{label}: answering", leave=False):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
                others = [type(v).__name__ for v in visuals if not isinstance(v, PIL.Image.Image)]
                if others:
                    raise RecipeError(f"task {task}: inputs of type {', '.join(sorted(set(others)))}; "
                                      "llamafactory-hera eval answers image and text tasks only")
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = float(kwargs.get("temperature", 0) or 0)
                input_kwargs = {"max_new_tokens": int(kwargs.get("max_new_tokens", 128)),
                                "do_sample": temperature > 0}
                if temperature > 0:
                    input_kwargs["temperature"] = temperature
                text = inference.answer(engine, [{"role": "user", "content": context}], visuals or None,
                                        input_kwargs)
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                answers.append(text)
            return answers

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            task = requests[0].args[-2] if requests and len(requests[0].args) > 2 else "?"
            raise RecipeError(f"task {task} scores by log-likelihood; llamafactory-hera eval runs MLLM tasks that "
                              "generate answers (generate_until), as every preset's")

        def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
            raise RecipeError("multi-round tasks are not served by llamafactory-hera eval; choose single-turn tasks")

    return LlamaFactoryLMM()


def lm_model(engine: Any, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` around the engine's (merged) model and tokenizer."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=batch_size)
