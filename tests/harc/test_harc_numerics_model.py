"""HARC's numerics on models, against independent references (see test_harc_numerics.py): the KL reference (the
adapter-disabled model against a separately loaded copy of the base model), the trainer's whole objective recomputed
term by term from single-row forwards, and prompt positions with LLaMA-Factory's own templates, token by token.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace
from typing import Any

import harc_numerics_helpers
import pytest
import torch
from harc_numerics_helpers import (
    FAMILIES,
    N_RESPONSE,
    TAIL_TEXT,
    check_positions,
    encode,
    extraction_rows,
    hand_coupling,
    hand_kl,
    load_model,
    loop_mean,
    lora_model,
    no_progress,
    training_rows,
)

from llamafactory_hera.harc.batches import collate_rows
from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, encode_row, template_tail
from llamafactory_hera.harc.directions import Directions
from llamafactory_hera.harc.losses import coupling_loss

# the session fixtures, shared by both numerics files
numerics_assets = harc_numerics_helpers.numerics_assets
tiny = harc_numerics_helpers.tiny


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
    """HarcTrainerMixin.method_loss on a micro-batch against every term recomputed from single-row forwards of the
    adapted model and of a separately loaded base (the reference's two copies). The Trainer itself is not built:
    method_loss only reads harc_args, harc_state, accelerator.unwrap_model, harc_checkpointing and _harc_sums."""
    from llamafactory_hera.harc.trainer import HarcTrainerMixin
    from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing

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
    trainer.harc_checkpointing = LayerCheckpointing(peft_model, [], "HARC")  # as the trainer: KV-sharing chains only

    batch = collate_rows(rows, t.tokenizer.pad_token_id)
    total = trainer.method_loss(peft_model, dict(batch))
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
    from llamafactory_hera.harc.config import HarcArguments
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


@pytest.mark.accelerator  # a device-placement check: `-m accelerator` must run it
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
