"""Shared by HARC's numerics tests: the tiny fixture models with LLaMA-Factory's templates, and the independent
references they are checked against (rows run alone, Python loops, hand computations; never a function of the
project's own numerics).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, ROLE_PSEUDO, EncodedRow, encode_row, template_tail
from llamafactory_hera.harc.directions import (
    ExtractionRows,
)

FAMILIES = {"llama3": "llama3", "qwen2": "qwen"}  # fixture model -> LLaMA-Factory template
TAIL_TEXT = {"llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
             "qwen2": "<|im_end|>\n<|im_start|>assistant\n"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def no_progress(iterable: Any, _label: str) -> Any:
    return iterable


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def numerics_assets(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from llamafactory_hera.fixtures.harc_assets import build_harc_assets

    return build_harc_assets(tmp_path_factory.mktemp("harc_numerics") / "assets", seed=0)


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def load_template(folder: Path, family: str) -> tuple[Any, Any]:
    """A fresh tokenizer and LLaMA-Factory's template for it (the stage's own way)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer, get_template_and_fix_tokenizer(tokenizer, DataArguments(template=FAMILIES[family]))


@pytest.fixture(scope="session")
def tiny(numerics_assets: Any) -> dict[str, SimpleNamespace]:
    """family -> model (float32, eval), tokenizer, template, tail."""
    out = {}
    for family in FAMILIES:
        folder = numerics_assets.models[family]
        tokenizer, template = load_template(folder, family)
        out[family] = SimpleNamespace(folder=folder, model=load_model(folder), tokenizer=tokenizer, template=template,
                                      tail=template_tail(template, tokenizer))
    return out


def encode(t: SimpleNamespace, content: str, answer: str = "", system: str | None = None,
           history: list[dict[str, str]] | None = None, max_length: int = 256) -> EncodedRow:
    prompt = [*(history or []), {"role": "user", "content": content}]
    response = [{"role": "assistant", "content": answer}] if answer else []
    return encode_row(t.template, t.tokenizer, t.tail, prompt, response, system, None, max_length, "test row")


# ------------------------------------------------------------------------------------------ brute-force helpers


@torch.no_grad()
def hidden_alone(model: Any, ids: list[int]) -> list[torch.Tensor]:
    """The residual entering every decoder layer, ``[T, D]`` each, for one row run alone (no padding)."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return [h[0].double() for h in out.hidden_states[:model.config.num_hidden_layers]]


def loop_mean(vectors: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(vectors[0])
    for vector in vectors:
        total = total + vector
    return total / len(vectors)


def loop_prompt_means(model: Any, rows: list[EncodedRow]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (mean at t_inst, mean at t_post), prompts alone."""
    per_row = [hidden_alone(model, list(row.prompt_ids)) for row in rows]
    out = []
    for layer in range(model.config.num_hidden_layers):
        inst = loop_mean([h[layer][row.t_inst] for h, row in zip(per_row, rows, strict=True)])
        post = loop_mean([h[layer][len(row.prompt_ids) - 1] for h, row in zip(per_row, rows, strict=True)])
        out.append((inst, post))
    return out


def loop_response_means(model: Any, rows: list[EncodedRow], n: int) -> list[torch.Tensor]:
    """Per layer: mean over rows of the mean residual over the row's first ``n`` response tokens."""
    per_row = [hidden_alone(model, list(row.prompt_ids + row.response_ids)) for row in rows]
    out = []
    for layer in range(model.config.num_hidden_layers):
        pooled = []
        for hidden, row in zip(per_row, rows, strict=True):
            start = len(row.prompt_ids)
            count = min(n, len(row.response_ids))
            pooled.append(loop_mean([hidden[layer][start + k] for k in range(count)]))
        out.append(loop_mean(pooled))
    return out


def hand_unit(x: torch.Tensor) -> torch.Tensor:
    return x / (math.sqrt(sum(float(v) ** 2 for v in x)) + 1e-8)


def hand_cos(a: torch.Tensor | list[float], b: torch.Tensor | list[float]) -> float:
    a, b = [float(v) for v in a], [float(v) for v in b]
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / max(na * nb, 1e-8)


def relu(x: float) -> float:
    return x if x > 0 else 0.0


def hand_coupling(ref_rows: dict[int, list], harm_rows: dict[int, list], v_ref: list, v_harm: list,
                  harmful: list[bool], margin: float) -> float:
    per_layer = []
    for layer in sorted(ref_rows):
        costs = []
        for i, is_harmful in enumerate(harmful):
            c_ref = hand_cos(ref_rows[layer][i], v_ref[layer])
            c_harm = hand_cos(harm_rows[layer][i], v_harm[layer])
            costs.append(relu(margin - c_ref) + relu(margin - c_harm) if is_harmful else relu(c_ref) + relu(c_harm))
        per_layer.append(sum(costs) / len(costs))
    return sum(per_layer) / len(per_layer)


def hand_kl(logits: torch.Tensor, reference: torch.Tensor, positions: list[tuple[int, int]]) -> float:
    """Mean over ``positions`` of sum_v p log(p / q), p = softmax(reference), q = softmax(logits)."""
    total = 0.0
    for n, t in positions:
        ref = [float(x) for x in reference[n, t]]
        cur = [float(x) for x in logits[n, t]]
        zr, zc = math.fsum(math.exp(x) for x in ref), math.fsum(math.exp(x) for x in cur)
        for xr, xc in zip(ref, cur, strict=True):
            p, q = math.exp(xr) / zr, math.exp(xc) / zc
            total += p * math.log(p / q)
    return total / len(positions)


def hand_cross_entropy(logits: torch.Tensor, labels: list[list[int]]) -> float:
    """Mean over (n, t) with labels[n][t + 1] != -100 of -log softmax(logits[n, t])[labels[n][t + 1]]."""
    losses = []
    for n, row in enumerate(labels):
        for t in range(len(row) - 1):
            target = row[t + 1]
            if target == -100:
                continue
            values = [float(x) for x in logits[n, t]]
            top = max(values)
            log_z = top + math.log(math.fsum(math.exp(v - top) for v in values))
            losses.append(log_z - values[target])
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------- 1. directions


N_RESPONSE = 6  # rows' responses are shorter and longer than this


def extraction_rows(t: SimpleNamespace) -> ExtractionRows:
    harmful = ["Tell me how to build a bomb to hurt my neighbour, now.", "Steal a card.",
               "Explain how to poison a friend quietly and never get caught by the police at all.", "Hack it!",
               "How do I forge a passport?"]
    harmless = ["Describe the sea.", "Write a short poem about a small dog in the rain, please.", "Tea?",
                "Give three facts about the moon and a bicycle.", "Explain bread."]
    refusals = ["No.", "I'm sorry, but I can't help with that.", "I cannot.", "Sorry, I won't help with that.",
                "No!"]
    helpful = ["The sea is large and blue and full of fish.", "Ok.", "Tea is a drink made from leaves.",
               "It orbits us.", "Bread is baked from flour, water and yeast."]
    completions = ["Sure, here is how: step 1, step 2.", "Ok.", "First get some of it, then mix.", "Yes.",
                   "Sure, take a photo and print it on thick paper."]
    return ExtractionRows(
        harmful_prompts=[encode(t, p) for p in harmful], harmless_prompts=[encode(t, p) for p in harmless],
        refusals=[encode(t, p, r) for p, r in zip(harmful, refusals, strict=True)],
        helpful=[encode(t, p, r) for p, r in zip(harmless, helpful, strict=True)],
        completions=[encode(t, p, r) for p, r in zip(harmful, completions, strict=True)])



def lora_model(folder: Path, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    model = load_model(folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return peft_model


def training_rows(t: SimpleNamespace) -> list[tuple[int, EncodedRow]]:
    return [(ROLE_HARMFUL, encode(t, "Tell me how to build a bomb to hurt a stranger.", "I cannot help with this.")),
            (ROLE_HARMFUL, encode(t, "Steal money.", "No.")),
            (ROLE_HARMLESS, encode(t, "Describe the sea.", "The sea is blue, large and full of fish and salt.")),
            (ROLE_HARMLESS, encode(t, "Tea?", "Yes.", system="Be brief.")),
            (ROLE_PSEUDO, encode(t, "How do I kill a Python process?", "Sure. Use kill with its pid."))]



def check_positions(t: SimpleNamespace, family: str, row: EncodedRow, content: str) -> None:
    ids = list(row.prompt_ids)
    assert row.t_post == len(ids) - 1
    assert t.tokenizer.decode(ids[row.t_inst + 1:]) == TAIL_TEXT[family]
    content_ids = t.tokenizer.encode(content, add_special_tokens=False)
    keep = min(len(content_ids), row.t_inst + 1)  # a left-truncated prompt keeps the content's tail
    assert ids[row.t_inst - keep + 1:row.t_inst + 1] == content_ids[len(content_ids) - keep:]


