"""HARC's numerics against independent references: brute-force loops and hand computations, never another function
of the project.

- directions: each row run alone (no padding) with ``output_hidden_states`` (``hidden_states[l]`` is the residual
  entering decoder layer ``l``), positions picked by plain indexing, means and differences by Python loops;
- layer scores and selection: a per-layer loop of the formula, rankings sorted by hand;
- loss terms: worked by hand on tiny tensors (cosines, KL sums, -log softmax) with Python loops;
- the KL reference: the adapter-disabled model against a separately loaded copy of the base model (the authors' two
  copies), and the trainer's whole objective recomputed term by term from single-row forwards;
- prompt positions: LLaMA-Factory's own ``llama3`` / ``qwen`` templates, checked token by token.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llamafactory_hera.harc.args import HarcArguments
from llamafactory_hera.harc.batches import collate_rows
from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, ROLE_PSEUDO, EncodedRow, encode_row, template_tail
from llamafactory_hera.harc.directions import (
    Directions,
    ExtractionRows,
    blend,
    blended,
    extract,
    prompt_means,
    response_means,
    unit,
)
from llamafactory_hera.harc.layers import layer_scores, select_layers
from llamafactory_hera.harc.losses import coupling_loss, kl_to_reference, refusal_cross_entropy
from llamafactory_hera.harc.residuals import StepCapture, reading_layers, response_window

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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_directions_match_rows_run_alone(tiny: dict[str, SimpleNamespace], family: str) -> None:
    t = tiny[family]
    rows = extraction_rows(t)
    lengths = {len(r.prompt_ids) + len(r.response_ids) for r in rows.refusals + rows.helpful + rows.completions}
    responses = [len(r.response_ids) for r in rows.refusals + rows.helpful + rows.completions]
    assert len(lengths) > 3 and min(responses) < N_RESPONSE < max(responses)  # padding and both window cases matter
    pad = t.tokenizer.pad_token_id
    layers = t.model.config.num_hidden_layers

    brute_harmful = loop_prompt_means(t.model, rows.harmful_prompts)
    got = prompt_means(t.model, rows.harmful_prompts, 3, pad, no_progress, "x")
    assert got.shape == (layers, 2, t.model.config.hidden_size) and got.dtype == torch.float64
    for layer in range(layers):
        torch.testing.assert_close(got[layer, 0], brute_harmful[layer][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[layer, 1], brute_harmful[layer][1], atol=1e-5, rtol=1e-5)

    brute_helpful = loop_response_means(t.model, rows.helpful, N_RESPONSE)
    got = response_means(t.model, rows.helpful, N_RESPONSE, 2, pad, no_progress, "x")
    assert got.shape == (layers, t.model.config.hidden_size)
    for layer in range(layers):
        torch.testing.assert_close(got[layer], brute_helpful[layer], atol=1e-5, rtol=1e-5)

    found = extract(t.model, rows, N_RESPONSE, 3, pad, no_progress)
    brute_harmless = loop_prompt_means(t.model, rows.harmless_prompts)
    brute_refusal = loop_response_means(t.model, rows.refusals, N_RESPONSE)
    brute_completion = loop_response_means(t.model, rows.completions, N_RESPONSE)
    for layer in range(layers):
        expected = {
            "v_harm": hand_unit(brute_harmful[layer][0] - brute_harmless[layer][0]),
            "v_ref": hand_unit(brute_harmful[layer][1] - brute_harmless[layer][1]),
            "v_ref_resp": hand_unit(brute_refusal[layer] - brute_helpful[layer]),
            "v_harm_resp": hand_unit(brute_completion[layer] - brute_helpful[layer]),
        }
        for name, vector in expected.items():
            value = getattr(found, name)
            assert value.dtype == torch.float32 and value.shape == (layers, t.model.config.hidden_size)
            torch.testing.assert_close(value[layer].double(), vector, atol=1e-5, rtol=1e-5, msg=f"{name}[{layer}]")

    rows.completions = None
    prompt_only = extract(t.model, rows, N_RESPONSE, 4, pad, no_progress)
    assert prompt_only.v_ref_resp is None and prompt_only.v_harm_resp is None
    torch.testing.assert_close(prompt_only.v_ref, found.v_ref, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------- 2. blend / unit


def test_blend_and_unit_by_hand() -> None:
    base = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    fresh = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # 0.7 * [3, 4, 0] + 0.3 * [0, 1, 0] = [2.1, 3.1, 0]; 0.7 * [0, 0, 2] + 0.3 * [1, 0, 0] = [0.3, 0, 1.4]
    first, second = math.sqrt(2.1 ** 2 + 3.1 ** 2), math.sqrt(0.3 ** 2 + 1.4 ** 2)
    expected = torch.tensor([[2.1 / first, 3.1 / first, 0.0], [0.3 / second, 0.0, 1.4 / second]])
    torch.testing.assert_close(blend(base, fresh, 0.3), expected)
    torch.testing.assert_close(blend(base, fresh, 0.0), torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(blend(base, fresh, 1.0), fresh)

    torch.testing.assert_close(unit(torch.tensor([3.0, 4.0])), torch.tensor([3.0 / (5 + 1e-8), 4.0 / (5 + 1e-8)]))
    zero = unit(torch.zeros(2, 3))
    assert torch.isfinite(zero).all() and torch.equal(zero, torch.zeros(2, 3))
    tiny_vector = unit(torch.tensor([1e-9, 0.0]))  # x / (||x|| + 1e-8), not x / ||x||: 1e-9 / 1.1e-8
    assert math.isclose(float(tiny_vector[0]), 1e-9 / (1e-9 + 1e-8), rel_tol=1e-5)

    pair = blended(Directions(v_ref=base, v_harm=fresh), Directions(v_ref=fresh, v_harm=base), 0.3)
    torch.testing.assert_close(pair.v_ref, expected)
    assert pair.v_ref_resp is None and pair.v_harm_resp is None


# -------------------------------------------------------------------------------------------- 3. layer scores


def test_layer_scores_match_a_per_layer_loop() -> None:
    generator = torch.Generator().manual_seed(3)
    num_layers, width = 7, 5
    v_ref, v_harm, v_ref_resp, v_harm_resp = (torch.randn(num_layers, width, generator=generator) for _ in range(4))

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    whole = layer_scores(v_ref, v_harm, v_ref_resp, v_harm_resp)
    prompt = layer_scores(v_ref, v_harm, None, None)
    assert whole.shape == prompt.shape == (num_layers,)
    for layer in range(num_layers):
        expected = ((1 - abs(cos(v_ref[layer], v_harm[layer]))) * (1 - abs(cos(v_ref_resp[layer], v_harm_resp[layer])))
                    * abs(cos(v_harm[layer], v_harm_resp[layer])) * abs(cos(v_ref[layer], v_ref_resp[layer])))
        assert math.isclose(float(whole[layer]), expected, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(float(prompt[layer]), 1 - abs(cos(v_ref[layer], v_harm[layer])), rel_tol=1e-5)
    # scale does not matter (cosines), sign does not matter (absolute values)
    torch.testing.assert_close(layer_scores(3 * v_ref, -v_harm, 0.5 * v_ref_resp, -2 * v_harm_resp), whole)


def test_select_layers_by_hand() -> None:
    scores = torch.tensor([0.99, 0.1, 0.5, 0.3, 0.7, 0.5, 0.2, 0.9, 0.4, 0.98])  # L = 10
    # band 0: every layer but 0 (the embeddings, which the adapter cannot move), 9 included; top 3 = 9, 7, 4
    assert select_layers(scores, 3, 0) == [4, 7, 9]
    # band 1: layers 1..9 (min(10 - 1, 9)); top 2 = 9, 7
    assert select_layers(scores, 2, 1) == [7, 9]
    # band 2: layers 2..8: 0.5, 0.3, 0.7, 0.5, 0.2, 0.9, 0.4 -> top 2 = 7, 4; top 3 ties 2 and 5 at 0.5: the lower, 2
    assert select_layers(scores, 2, 2) == [4, 7]
    assert select_layers(scores, 3, 2) == [2, 4, 7]
    assert select_layers(scores, 4, 2) == [2, 4, 5, 7]
    # band 4 (the reference's, L = 10): layers 4..6 only, exactly 3
    assert select_layers(scores, 3, 4) == [4, 5, 6]
    assert select_layers(scores, 1, 4) == [4]
    with pytest.raises(ValueError, match="harc_band") as raised:
        select_layers(scores, 4, 4)
    assert "4" in str(raised.value) and "3 of 10" in str(raised.value)
    with pytest.raises(ValueError, match="harc_band"):
        select_layers(scores, 1, 6)  # 6..4: nothing left
    # all tied: the lowest eligible layers
    assert select_layers(torch.ones(10), 3, 2) == [2, 3, 4]
    # ties with equal values everywhere but one
    flat = torch.full((10,), 0.25)
    flat[6] = 0.5
    assert select_layers(flat, 2, 1) == [1, 6]


# --------------------------------------------------------------------------------------------- 4. loss terms


@pytest.mark.parametrize("margin", [0.5, 0.3])
def test_coupling_loss_by_hand(margin: float) -> None:
    v_ref = [[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]  # not unit on layer 1: only the direction counts
    v_harm = [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    ref_rows = {0: [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.2, 0.0, 1.0]],
                3: [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, -5.0]]}
    harm_rows = {0: [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, -1.0, 0.0]],
                 3: [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 3.0, 4.0]]}
    harmful = [True, True, False, False]
    # the directions are given per *layer index*: layer 3 reads v[3]; pad rows 1..2 with other vectors
    v_ref_full = torch.tensor([v_ref[0], [5.0, 5.0, 5.0], [5.0, 5.0, 5.0], v_ref[1]])
    v_harm_full = torch.tensor([v_harm[0], [5.0, -5.0, 5.0], [5.0, 5.0, -5.0], v_harm[1]])
    expected = hand_coupling(ref_rows, harm_rows, {0: v_ref[0], 3: v_ref[1]}, {0: v_harm[0], 3: v_harm[1]},
                             harmful, margin)
    # written out for layer 0, margin m: harmful row 0: cos 1, 1 -> 0; row 1: cos 1/sqrt2, 0 -> relu(m - .707) + m;
    # retain row 2: cos -1, 1/sqrt2 -> .707; row 3: cos .2/sqrt(1.04), -1/sqrt2 -> .196
    layer0 = (0 + (relu(margin - 1 / math.sqrt(2)) + margin) + 1 / math.sqrt(2) + 0.2 / math.sqrt(1.04)) / 4
    # layer 3: harmful row 0: cos 1, 1/sqrt2 -> 0 (m <= .707); row 1: cos 0, 1 -> m; retain row 2: cos 1/sqrt2, -1
    # -> .707; row 3: cos -1, 3 / (5 sqrt2) -> .424
    layer3 = (0 + margin + 1 / math.sqrt(2) + 3 / (5 * math.sqrt(2))) / 4
    assert math.isclose(expected, (layer0 + layer3) / 2, rel_tol=1e-12)

    tensors_ref = {k: torch.tensor(v, requires_grad=True) for k, v in ref_rows.items()}
    tensors_harm = {k: torch.tensor(v, requires_grad=True) for k, v in harm_rows.items()}
    v_ref_full.requires_grad_(True)
    got = coupling_loss(tensors_ref, tensors_harm, v_ref_full, v_harm_full, torch.tensor(harmful), margin)
    assert got.dim() == 0 and math.isclose(got.item(), expected, rel_tol=1e-6)
    got.backward()
    assert v_ref_full.grad is None  # the directions are constants
    assert tensors_ref[0].grad is not None and tensors_harm[3].grad is not None
    # bf16 rows are compared in float32
    half = coupling_loss({k: v.detach().bfloat16() for k, v in tensors_ref.items()},
                         {k: v.detach().bfloat16() for k, v in tensors_harm.items()}, v_ref_full, v_harm_full,
                         torch.tensor(harmful), margin)
    assert half.dtype == torch.float32 and math.isclose(float(half), expected, rel_tol=1e-2)


def test_coupling_loss_random_rows_against_the_loop() -> None:
    generator = torch.Generator().manual_seed(11)
    for seed in range(5):
        layers = [1, 2]
        rows = {layer: torch.randn(4, 3, generator=generator) for layer in layers}
        other = {layer: torch.randn(4, 3, generator=generator) for layer in layers}
        v_ref, v_harm = torch.randn(3, 3, generator=generator), torch.randn(3, 3, generator=generator)
        harmful = [bool((seed >> k) & 1) for k in range(4)]
        for margin in (0.5, 0.3):
            as_lists = ({k: v.tolist() for k, v in rows.items()}, {k: v.tolist() for k, v in other.items()})
            expected = hand_coupling(*as_lists, v_ref.tolist(), v_harm.tolist(), harmful, margin)
            got = coupling_loss(rows, other, v_ref, v_harm, torch.tensor(harmful), margin)
            assert math.isclose(float(got), expected, rel_tol=1e-5, abs_tol=1e-7)


def test_kl_to_reference_by_hand() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 5, generator=generator)
    reference = torch.randn(3, 4, 5, generator=generator)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]])
    positions = [(n, t) for n in range(3) for t in range(4) if mask[n, t]]
    got = kl_to_reference(logits, reference, mask)
    assert math.isclose(float(got), hand_kl(logits, reference, positions), rel_tol=1e-5)
    # direction KL(reference || current), not the reverse
    assert not math.isclose(float(got), hand_kl(reference, logits, positions), rel_tol=1e-3)
    # identical logits: 0; empty mask: 0 (not nan)
    assert float(kl_to_reference(reference, reference, mask)) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_reference(logits, reference, torch.zeros(3, 4))) == 0.0
    # the reference gets no gradient
    current, ref = logits.clone().requires_grad_(True), reference.clone().requires_grad_(True)
    kl_to_reference(current, ref, mask).backward()
    assert ref.grad is None and current.grad is not None
    assert float(current.grad[1].abs().sum()) == 0.0  # a row outside the mask gets nothing


def test_refusal_cross_entropy_by_hand() -> None:
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 6, generator=generator)
    labels = [[-100, -100, 3, 1, 5], [-100, 2, 0, -100, -100]]
    got = refusal_cross_entropy(logits, torch.tensor(labels))
    assert math.isclose(float(got), hand_cross_entropy(logits, labels), rel_tol=1e-5)
    # written out: the terms are (row 0) positions 1, 2, 3 predicting 3, 1, 5 and (row 1) 0, 1 predicting 2, 0
    explicit = [-float(torch.log_softmax(logits[n, t], -1)[k]) for n, t, k in
                ((0, 1, 3), (0, 2, 1), (0, 3, 5), (1, 0, 2), (1, 1, 0))]
    assert math.isclose(float(got), sum(explicit) / 5, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------- 5. residuals


def test_response_window_by_hand() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    got = response_window(mask, 2)
    expected = torch.tensor([[0, 0, 0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                             [0.5, 0.5, 0, 0, 0, 0]])
    torch.testing.assert_close(got, expected)
    third = 1 / 3
    torch.testing.assert_close(response_window(mask, 10), torch.tensor(
        [[0, 0, third, third, third, 0], [0, 0.2, 0.2, 0.2, 0.2, 0.2], [0] * 6, [0.5, 0.5, 0, 0, 0, 0]]))
    torch.testing.assert_close(response_window(mask, 1), torch.tensor(
        [[0, 0, 1.0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0] * 6, [1.0, 0, 0, 0, 0, 0]]))


def test_step_capture_reads_keep_the_graph() -> None:
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(3, 5, 4, generator=generator)
    scale = torch.tensor(2.0, requires_grad=True)
    t_inst, t_post = torch.tensor([1, 0, 2]), torch.tensor([3, 2, 4])
    window = response_window(torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]), 4)
    capture = StepCapture(t_inst, t_post, window, require_grad=True)
    capture(2, base * scale)
    capture(2, base * 100)  # a recomputation during backward: the first input is kept
    capture.read([2])
    assert capture.hidden == {}
    for i in range(3):
        torch.testing.assert_close(capture.inst[2][i], 2 * base[i, int(t_inst[i])])
        torch.testing.assert_close(capture.post[2][i], 2 * base[i, int(t_post[i])])
    torch.testing.assert_close(capture.response[2][0], 2 * base[0, 4])
    torch.testing.assert_close(capture.response[2][1], base[1, 3] + base[1, 4])
    torch.testing.assert_close(capture.response[2][2], torch.zeros(4))
    (capture.inst[2].sum() + capture.post[2].sum() + capture.response[2].sum()).backward()
    expected = sum(float(base[i, int(t_inst[i])].sum() + base[i, int(t_post[i])].sum()) for i in range(3))
    expected += float(base[0, 4].sum()) + float((base[1, 3] + base[1, 4]).sum()) / 2
    assert math.isclose(float(scale.grad), expected, rel_tol=1e-5)

    no_grad = StepCapture(t_inst, t_post, None, require_grad=True)
    no_grad(1, base)
    with pytest.raises(RuntimeError, match="decoder layer 1 carries no gradient"):
        no_grad.read([1])
    allowed = StepCapture(t_inst, t_post, None, require_grad=False)
    allowed(1, base)
    allowed.read([1])
    assert allowed.response == {} and allowed.inst[1].shape == (3, 4)
    missing = StepCapture(t_inst, t_post, None, require_grad=False)
    with pytest.raises(RuntimeError, match="decoder layer 5 was not called"):
        missing.read([5])


def test_step_capture_on_a_model_reaches_upstream_parameters(tiny: dict[str, SimpleNamespace]) -> None:
    """Reading through the forward pre-hooks of a real model keeps the graph down to the embeddings."""
    t = tiny["llama3"]
    rows = [(ROLE_HARMFUL, encode(t, "Steal a card.", "No.")), (ROLE_HARMLESS, encode(t, "Describe tea.", "Tea."))]
    batch = collate_rows(rows, t.tokenizer.pad_token_id)
    capture = StepCapture(batch["harc_t_inst"], batch["harc_t_post"], response_window(batch["harc_response_mask"], 3),
                          require_grad=True)
    embeddings = t.model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    try:
        with reading_layers(t.model, [2], capture):
            t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        capture.read([2])
        (capture.inst[2].sum() + capture.response[2].sum()).backward()
        assert embeddings.grad is not None and float(embeddings.grad.abs().sum()) > 0
    finally:
        t.model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ 6. KL reference, trainer


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_disabled_equals_a_separate_base_copy(tiny: dict[str, SimpleNamespace], family: str) -> None:
    t = tiny[family]
    peft_model = lora_model(t.folder, seed=1)
    separate = load_model(t.folder)
    batch = collate_rows(training_rows(t), t.tokenizer.pad_token_id)
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    with torch.no_grad():
        adapted = peft_model(**feed).logits
        with peft_model.disable_adapter():
            disabled = peft_model(**feed).logits
        copy = separate(**feed).logits
    assert float((disabled - copy).abs().max()) <= 1e-6
    assert float((adapted - copy).abs().max()) > 1e-3  # the adapter is not the identity: the check means something
    with torch.no_grad():
        again = peft_model(**feed).logits  # the context restored the adapter
    assert torch.equal(again, adapted)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainer_objective_term_by_term(tiny: dict[str, SimpleNamespace], family: str) -> None:
    """HarcTrainerMixin.compute_loss on a micro-batch against every term recomputed from single-row forwards of the
    adapted model and of a separately loaded base (the reference's two copies). The Trainer itself is not built:
    compute_loss only reads harc_args, harc_state, accelerator.unwrap_model and _harc_sums."""
    from llamafactory_hera.harc.trainer import HarcTrainerMixin

    t = tiny[family]
    peft_model = lora_model(t.folder, seed=2).train()
    separate = load_model(t.folder)
    rows = training_rows(t)
    num_layers, width = t.model.config.num_hidden_layers, t.model.config.hidden_size
    generator = torch.Generator().manual_seed(9)
    directions = Directions(*(torch.nn.functional.normalize(torch.randn(num_layers, width, generator=generator), dim=-1)
                              for _ in range(4)))
    layers, n_tokens, weights = [1, 3], 4, (1.0, 1.0, 10.0, 1.0)
    args = HarcArguments(harc_harmful="h", harc_harmless="s", harc_pseudo="p", harc_margin=0.5,
                         harc_response_tokens=n_tokens, harc_weight_couple=weights[0],
                         harc_weight_couple_resp=weights[1], harc_weight_kl=weights[2], harc_weight_ce=weights[3])
    trainer = object.__new__(HarcTrainerMixin)
    trainer.harc_args, trainer.harc_state = args, SimpleNamespace(current=directions, layers=layers)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    trainer._harc_sums = torch.zeros(5, dtype=torch.float64)

    batch = collate_rows(rows, t.tokenizer.pad_token_id)
    total = trainer.compute_loss(peft_model, dict(batch))
    couple, couple_resp, kl, ce, count = (float(v) for v in trainer._harc_sums)
    assert count == 1

    # the reference, row by row
    harmful = [role == ROLE_HARMFUL for role, _ in rows]
    inst, post, pooled = ({layer: [] for layer in layers} for _ in range(3))
    kl_sum, kl_count, ce_terms = 0.0, 0, []
    for role, row in rows:
        ids = list(row.prompt_ids + row.response_ids)
        with torch.no_grad():
            out = peft_model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            base = separate(input_ids=torch.tensor([ids]), use_cache=False).logits
        start = len(row.prompt_ids)
        for layer in layers:
            hidden = out.hidden_states[layer][0].double()
            inst[layer].append(hidden[row.t_inst].tolist())
            post[layer].append(hidden[start - 1].tolist())
            window = range(start, start + min(n_tokens, len(row.response_ids)))
            pooled[layer].append(loop_mean([hidden[k] for k in window]).tolist())
        positions = [(0, k) for k in range(start, len(ids))]
        if role == ROLE_HARMFUL:
            ce_terms.append((out.logits[0, start - 1:len(ids) - 1], row.response_ids))
        else:
            kl_sum += hand_kl(out.logits, base, positions) * len(positions)
            kl_count += len(positions)
    expected_couple = hand_coupling(post, inst, directions.v_ref.tolist(), directions.v_harm.tolist(), harmful, 0.5)
    expected_resp = hand_coupling(pooled, pooled, directions.v_ref_resp.tolist(), directions.v_harm_resp.tolist(),
                                  harmful, 0.5)
    expected_kl = kl_sum / kl_count
    nll = []
    for logits, targets in ce_terms:
        for k, target in enumerate(targets):
            values = [float(x) for x in logits[k]]
            top = max(values)
            nll.append(top + math.log(math.fsum(math.exp(v - top) for v in values)) - values[target])
    expected_ce = sum(nll) / len(nll)

    assert kl > 1e-4  # the adapter moved the model: the KL term is not trivially 0
    for name, got, expected in (("couple", couple, expected_couple), ("couple_resp", couple_resp, expected_resp),
                                ("kl", kl, expected_kl), ("ce", ce, expected_ce)):
        assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-6), (name, got, expected)
    combined = sum(w * v for w, v in zip(weights, (expected_couple, expected_resp, expected_kl, expected_ce),
                                         strict=True))
    assert math.isclose(total.item(), combined, rel_tol=1e-4)

    total.backward()  # the coupling reaches the adapters below the coupled layers
    grads = {name: p.grad for name, p in peft_model.named_parameters() if "layers.0." in name and "lora_A" in name}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())


# --------------------------------------------------------------------------------------------- 7. positions


def check_positions(t: SimpleNamespace, family: str, row: EncodedRow, content: str) -> None:
    ids = list(row.prompt_ids)
    assert row.t_post == len(ids) - 1
    assert t.tokenizer.decode(ids[row.t_inst + 1:]) == TAIL_TEXT[family]
    content_ids = t.tokenizer.encode(content, add_special_tokens=False)
    keep = min(len(content_ids), row.t_inst + 1)  # a left-truncated prompt keeps the content's tail
    assert ids[row.t_inst - keep + 1:row.t_inst + 1] == content_ids[len(content_ids) - keep:]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_positions_with_the_llamafactory_templates(tiny: dict[str, SimpleNamespace], family: str) -> None:
    t = tiny[family]
    slot = t.template.format_user.slots[0]
    assert slot.split("{{content}}")[1] == TAIL_TEXT[family]  # the literal tail is LLaMA-Factory's own
    assert t.tokenizer.decode(list(t.tail)) == TAIL_TEXT[family]

    cases = [
        ("Hello there, how are you?", {}),
        ("ends with a space ", {}),
        ("ends with a newline\n", {}),
        ("two newlines\n\n", {"system": "You are a careful assistant."}),
        ("x", {}),
        ("What about the second question?", {"history": [{"role": "user", "content": "First question here."},
                                                         {"role": "assistant", "content": "First answer."}]}),
        ("And the last one?", {"system": "Be brief.", "history": [
            {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "No."}]}),
    ]
    for content, extra in cases:
        row = encode(t, content, "Sure, here it is.", **extra)
        check_positions(t, family, row, content)
        text = t.tokenizer.decode(list(row.prompt_ids))
        if "system" in extra:
            assert extra["system"] in text
        for turn in extra.get("history", []):
            assert turn["content"] in text  # earlier turns stay before the content
        assert t.tokenizer.decode(list(row.response_ids)).startswith("Sure, here it is.")
        prompt_only = encode(t, content, **extra)
        assert prompt_only.prompt_ids == row.prompt_ids and prompt_only.t_inst == row.t_inst
        assert prompt_only.response_ids == ()

    long_content = " ".join(f"word{k}" for k in range(200)) + " end of the question?"
    whole = encode(t, long_content, "Fine.", system="Be brief.", max_length=10_000)
    check_positions(t, family, whole, long_content)
    for limit in (40, 12, len(t.tail) + 1):
        cut = encode(t, long_content, "Fine.", system="Be brief.", max_length=limit)
        assert len(cut.prompt_ids) == limit and cut.prompt_ids == whole.prompt_ids[-limit:]
        assert cut.t_inst == whole.t_inst - (len(whole.prompt_ids) - limit)
        check_positions(t, family, cut, long_content)
    long_answer = encode(t, "Tea?", "a b c d e f g h i j k l m n o p " * 5, max_length=16)
    assert len(long_answer.response_ids) == 16  # answers are cut on the right


def test_template_tokenizer_mismatch_names_the_row(tiny: dict[str, SimpleNamespace]) -> None:
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    llama, qwen = tiny["llama3"], tiny["qwen2"]
    prompt, answer = [{"role": "user", "content": "Hello?"}], [{"role": "assistant", "content": "Hi."}]
    with pytest.raises(ValueError, match="harc_harmful: dataset 'x', row 7.*does not end with"):
        encode_row(llama.template, llama.tokenizer, qwen.tail, prompt, answer, None, None, 256,
                   "harc_harmful: dataset 'x', row 7")
    with pytest.raises(ValueError, match="row 3.*does not end with"):
        encode_row(qwen.template, llama.tokenizer, qwen.tail, prompt, answer, None, None, 256, "row 3")
    with pytest.raises(ValueError, match="row 4: the prompt has no user message"):
        encode_row(llama.template, llama.tokenizer, llama.tail, [{"role": "user", "content": "  "}], answer, None,
                   None, 256, "row 4")
    tokenizer = llama.tokenizer.__class__.from_pretrained(llama.folder)
    empty = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="empty"))
    with pytest.raises(ValueError, match="no assistant header"):
        template_tail(empty, tokenizer)


def test_random_contents_keep_positions(tiny: dict[str, SimpleNamespace]) -> None:
    """Random contents (letters, digits, spaces, newlines, punctuation at the end): the tail always follows the
    content's own tokens."""
    rng = random.Random(0)
    alphabet = "abcdefghij klmnop0123456789 .,?!\n"
    for family, t in tiny.items():
        for _ in range(40):
            content = "q" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            check_positions(t, family, encode(t, content, "ok"), content)


def test_a_ramp_at_step_0_couples_the_final_count_from_the_start(tiny: dict[str, SimpleNamespace]) -> None:
    """``harc_layers_ramp_step: 0`` (the reference ramps before its first micro-step then); optimizer steps count
    from 1, so the ramp must happen at the base extraction."""
    from llamafactory_hera.harc.args import HarcArguments
    from llamafactory_hera.harc.state import HarcState

    t = tiny["llama3"]
    rows = extraction_rows(t)
    validation = (rows.harmful_prompts[:2], rows.harmless_prompts[:2])
    for ramp, expected in ((0, 4), (3, 2)):
        args = HarcArguments(harc_harmful="h", harc_harmless="s", harc_pseudo="p", harc_harmful_completions="c",
                             harc_band=1, harc_layers=2, harc_layers_final=4, harc_layers_ramp_step=ramp,
                             harc_refresh_steps=0, harc_response_tokens=N_RESPONSE)
        state = HarcState(args, rows, validation, t.tokenizer.pad_token_id, no_progress)
        state.start(t.model)
        assert len(state.layers) == expected and 0 not in state.layers


@pytest.mark.parametrize(("family", "closing"), [("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>\n")])
def test_answer_tail_is_the_templates_closing_text(tiny: dict[str, SimpleNamespace], family: str,
                                                   closing: str) -> None:
    """The response-side means read bare answers, as the reference's extraction: the template's closing tokens
    are cut from each answer's end, and only there."""
    from llamafactory_hera.harc.data import answer_tail, without_answer_tail

    t = tiny[family]
    tail = answer_tail(t.template, t.tokenizer)
    assert t.tokenizer.decode(list(tail)) == closing
    rows = [encode(t, "Describe the sea.", "Waves."), encode(t, "Tea?", "Leaves and water.")]
    bare = without_answer_tail(rows, tail)
    for row, cut in zip(rows, bare, strict=True):
        assert row.response_ids == cut.response_ids + tail and cut.prompt_ids == row.prompt_ids
        assert t.tokenizer.decode(list(cut.response_ids)).strip() in {"Waves.", "Leaves and water."}
    assert without_answer_tail(bare, tail) == bare  # nothing more is cut


def test_coupling_reads_directions_kept_on_the_cpu_against_residuals_on_another_device() -> None:
    """The run's state keeps the directions on the CPU; on a GPU the residuals are CUDA tensors. The meta device
    stands in for it here: the directions must be moved to the residuals' device, not the other way round."""
    rows = {1: torch.randn(3, 4, device="meta", requires_grad=True)}
    loss = coupling_loss(rows, rows, torch.randn(2, 4), torch.randn(2, 4), torch.tensor([True, False, False]), 0.5)
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize(("family", "closing"), [("llama3", "<|eot_id|>"), ("qwen2", "<|im_end|>\n")])
def test_long_answers_are_cut_and_then_closed(tiny: dict[str, SimpleNamespace], family: str, closing: str) -> None:
    """As the reference's collate (answer tokens cut to the maximum length, then EOS appended): a training answer
    longer than ``harc_max_length`` keeps its first ``harc_max_length`` tokens and still ends with the template's
    closing tokens; the response-side means read the cut answer without them. Through the run's row loading."""
    from llamafactory_hera.harc.roles import load_role_rows

    t, size = tiny[family], 16
    long_answer = " ".join(f"Here is fact {k} about the sea." for k in range(12))
    answer_ids = t.tokenizer.encode(long_answer, add_special_tokens=False)
    closing_ids = t.tokenizer.encode(closing, add_special_tokens=False)
    assert len(answer_ids) > 3 * size

    def aligned(answer: str) -> list[dict[str, Any]]:
        return [{"_prompt": [{"role": "user", "content": f"Question {k}?"}],
                 "_response": [{"role": "assistant", "content": answer}], "_system": "", "_tools": ""}
                for k in range(6)]

    datasets = {"h": aligned("No."), "s": aligned(long_answer)}
    args = HarcArguments(harc_harmful="h", harc_harmless="s", harc_pseudo="", harc_batch_pseudo=0,
                         harc_extract_samples=2, harc_validate_samples=1, harc_batch_harmful=1, harc_batch_harmless=1,
                         harc_max_length=size)
    rows = load_role_rows(args, datasets.__getitem__, t.template, t.tokenizer, 0, lambda _: None)
    for row in rows.train[ROLE_HARMLESS]:
        assert list(row.response_ids) == answer_ids[:size] + closing_ids
    for row in rows.train[ROLE_HARMFUL]:  # a short answer keeps all its tokens and its closing
        assert list(row.response_ids) == t.tokenizer.encode("No.", add_special_tokens=False) + closing_ids
    assert all(list(row.response_ids) == answer_ids[:size] for row in rows.extraction.helpful)
