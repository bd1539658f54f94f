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
from types import SimpleNamespace

import harc_numerics_helpers
import pytest
import torch
from harc_numerics_helpers import (
    FAMILIES,
    N_RESPONSE,
    encode,
    extraction_rows,
    hand_coupling,
    hand_cross_entropy,
    hand_kl,
    hand_unit,
    loop_prompt_means,
    loop_response_means,
    no_progress,
    relu,
)

from llamafactory_hera.harc.batches import ComposedMicroBatches, collate_rows
from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, ROLE_PSEUDO
from llamafactory_hera.harc.directions import (
    Directions,
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
from llamafactory_hera.runtime.errors import RecipeError

# the session fixtures, shared by both numerics files
numerics_assets = harc_numerics_helpers.numerics_assets
tiny = harc_numerics_helpers.tiny


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


def test_an_epoch_is_whole_optimizer_steps_of_the_endless_role_streams() -> None:
    """36 harmful rows, 8 a micro-batch: 5 micro-batches, rounded up to 6 for optimizer steps of 2 (8 for 4); every
    item is the same whatever the rounding, and each role's rows, item after item, are passes over all of its rows."""
    rows = {ROLE_HARMFUL: list(range(36)), ROLE_HARMLESS: list(range(10)), ROLE_PSEUDO: list(range(3))}
    sizes = {ROLE_HARMFUL: 8, ROLE_HARMLESS: 4, ROLE_PSEUDO: 2}
    data = [ComposedMicroBatches(rows, sizes, 7, step) for step in (1, 2, 4)]
    assert [len(d) for d in data] == [5, 6, 8]
    assert all(data[2][i] == d[i] for d in data for i in range(len(d)))
    for role, count in ((ROLE_HARMFUL, 36), (ROLE_HARMLESS, 10), (ROLE_PSEUDO, 3)):
        stream = [row for i in range(8) for r, row in data[2][i]["harc_rows"] if r == role]
        assert all(sorted(stream[k:k + count]) == rows[role] for k in range(0, len(stream) - count + 1, count))


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
    with pytest.raises(RecipeError, match="decoder layer 1 carries no gradient"):
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

