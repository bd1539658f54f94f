"""Every user-facing error of ``stage: harc`` names the key, the value and the fix, and comes before any heavy
loading: the recipe keys (``harc_*``), the host keys HARC cannot run with, the role datasets and the model's depth."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import harc_recipe, run_train
from llamafactory_hera.harc.config import HarcArguments, parse_harc_arguments
from llamafactory_hera.harc.parsed_checks import validate_host_args
from llamafactory_hera.harc.raw_checks import validate_raw_host_args

ROLES = {"harc_harmful": "h", "harc_harmless": "s", "harc_pseudo": "p"}


@pytest.mark.parametrize(("raw", "message"), [
    ({"harc_margn": 0.5}, "Unknown HARC key 'harc_margn'. Did you mean 'harc_margin'?"),
    ({"harc_margin": 2}, "harc_margin: got 2; allowed range is <= 1.0."),
    ({"harc_batch_harmful": 0}, "harc_batch_harmful: got 0; allowed range is >= 1."),
    ({"harc_refresh_steps": "often"}, "harc_refresh_steps: got 'often'; expected a whole number."),
    ({"harc_eval": "maybe"}, "harc_eval: got 'maybe'; expected true or false."),
    ({"harc_harmful": "a,b"}, "harc_harmful: got 'a,b'; name one dataset"),
    ({"harc_harmful": ["a", "b"]}, "harc_harmful: got ['a', 'b']; name one dataset"),
    ({"harc_harmful": None}, "harc_harmful: missing."),
    ({"harc_harmless": ""}, "harc_harmless: missing."),
    ({"harc_pseudo": ""}, "harc_pseudo: missing while harc_batch_pseudo is 2"),
    ({"harc_batch_harmless": 0, "harc_batch_pseudo": 0}, "harc_batch_harmless and harc_batch_pseudo are both 0"),
    ({"harc_layers": 3, "harc_layers_final": 2}, "harc_layers_final: 2 is fewer than harc_layers: 3"),
    ({"harc_weight_couple": 0, "harc_weight_couple_resp": 0, "harc_weight_kl": 0, "harc_weight_ce": 0},
     "harc_weight_couple: 0, harc_weight_ce: 0, harc_weight_kl: 0: every loss term is weighted 0 "
     "(harc_weight_couple_resp counts only with harc_harmful_completions), so nothing would train."),
    ({"harc_weight_couple": 0, "harc_weight_kl": 0, "harc_weight_ce": 0},  # couple_resp is 0 without completions
     "harc_weight_couple: 0, harc_weight_ce: 0, harc_weight_kl: 0: every loss term is weighted 0"),
    ({"harc_harmful_completions": "c", "harc_weight_couple": 0, "harc_weight_couple_resp": 0.0, "harc_weight_kl": 0,
      "harc_weight_ce": "0"}, "harc_weight_couple: 0, harc_weight_couple_resp: 0, harc_weight_ce: 0, harc_weight_kl: "
                              "0: every loss term is weighted 0, so nothing would train. Set harc_weight_couple: 1"),
])
def test_bad_harc_keys_are_refused_naming_key_and_value(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_harc_arguments({**ROLES, **raw})
    assert message in str(error.value)


def test_defaults_are_the_reference_configs() -> None:
    args = parse_harc_arguments(dict(ROLES))
    assert (args.harc_margin, args.harc_weight_couple, args.harc_weight_couple_resp, args.harc_weight_kl,
            args.harc_weight_ce) == (0.5, 1.0, 1.0, 10.0, 1.0)
    assert (args.harc_batch_harmful, args.harc_batch_harmless, args.harc_batch_pseudo) == (6, 4, 2)
    assert (args.harc_extract_samples, args.harc_validate_samples, args.harc_response_tokens) == (300, 100, 32)
    assert (args.harc_refresh_steps, args.harc_refresh_beta, args.harc_layers, args.harc_layers_final,
            args.harc_layers_ramp_step, args.harc_band) == (100, 0.3, 2, 4, 500, 4)
    assert parse_harc_arguments({**ROLES, "harc_batch_pseudo": "0", "harc_pseudo": ""}).harc_batch_pseudo == 0
    for none in ("null", "None", None, [None]):  # a role left empty (command line, YAML, a one-item list)
        assert parse_harc_arguments({**ROLES, "harc_batch_pseudo": "0", "harc_pseudo": none}).harc_pseudo == ""
    roles = ["harc_harmful", "harc_harmless", "harc_pseudo", "harc_harmful_completions"]
    assert [spec.name for spec in fields(HarcArguments)][:4] == roles


@pytest.mark.parametrize(("host", "message"), [
    ({"finetuning_type": "full"}, "stage: harc trains a LoRA adapter"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size: got 0; with stage: harc it counts composed"),
    ({"per_device_train_batch_size": "two"}, "per_device_train_batch_size: got two; with stage: harc it counts"),
    ({"do_eval": True}, "do_eval: stage: harc has no evaluation split"),
    ({"do_predict": True}, "do_predict: stage: harc has no evaluation split"),
    ({"predict_with_generate": "true"}, "predict_with_generate: stage: harc has no evaluation split .* to write "
     "predictions with the adapter, run stage: sft with do_train: false"),
    ({"packing": "true"}, "packing: true is not supported by stage: harc: it composes each micro-batch of whole rows"),
    ({"neat_packing": True}, "neat_packing: true is not supported by stage: harc: .* Remove neat_packing."),
    ({"val_size": 0.1}, "val_size: stage: harc holds out its own validation rows"),
    ({"do_train": False}, "stage: harc trains; set do_train: true."),
])
def test_host_keys_harc_cannot_run_with_are_refused(host: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_raw_host_args(dict(host), HarcArguments(**ROLES))


def test_weights_that_leave_only_the_kl_are_refused_for_a_new_adapter() -> None:
    """With a new adapter (the identity) the KL to the adapter-free model is 0 with zero gradient: alone it trains
    nothing. A loaded adapter (adapter_name_or_path) starts away from the base model, where the KL does pull."""
    kl_only = HarcArguments(**ROLES, harc_weight_couple=0.0, harc_weight_ce=0.0)  # couple_resp: no completions
    with pytest.raises(ValueError, match=r"^harc_weight_couple: 0, harc_weight_ce: 0 leave only harc_weight_kl: 10, "
                                         r"and the KL .* nothing would train. Set harc_weight_couple: 1"):
        validate_raw_host_args({}, kl_only)
    validate_raw_host_args({"adapter_name_or_path": "saves/harc"}, kl_only)
    validate_raw_host_args({}, HarcArguments(**ROLES, harc_harmful_completions="c", harc_weight_couple=0.0,
                                             harc_weight_ce=0.0))  # the response coupling still moves it


def test_cutoff_len_is_said_to_be_unused(capsys: pytest.CaptureFixture[str]) -> None:
    for host in ({"cutoff_len": 1024}, ["--cutoff_len", "1024"]):
        validate_raw_host_args(host, HarcArguments(**ROLES))
        said = capsys.readouterr().out
        assert "note: cutoff_len: 1024 is not used by stage: harc; harc_max_length: 256 limits" in said
    validate_raw_host_args({}, HarcArguments(**ROLES))
    assert "cutoff_len" not in capsys.readouterr().out


def test_dataset_and_batch_size_are_filled_when_absent_in_both_argument_forms() -> None:
    as_dict: dict[str, Any] = {"stage": "sft"}
    validate_raw_host_args(as_dict, HarcArguments(**ROLES))
    assert as_dict["dataset"] == "h" and as_dict["per_device_train_batch_size"] == 1
    as_list = ["--stage", "sft"]
    validate_raw_host_args(as_list, HarcArguments(**ROLES))
    assert as_list[2:] == ["--per_device_train_batch_size", "1", "--dataset", "h"]


def _parsed(harc_assets: Any, **data: Any) -> tuple[Any, ...]:
    model = SimpleNamespace(model_name_or_path=str(harc_assets.models["llama3"]), trust_remote_code=False,
                            disable_gradient_checkpointing=False, use_reentrant_gc=True)
    data_args = SimpleNamespace(template="llama3", dataset_dir=str(harc_assets.dataset_dir))
    vars(data_args).update(data)
    return model, data_args, SimpleNamespace(), SimpleNamespace(), SimpleNamespace()


def test_parsed_arguments_are_checked_against_the_datasets_and_the_model(harc_assets: Any, tmp_path: Path) -> None:
    roles = {"harc_harmful": "harc_harmful", "harc_harmless": "harc_harmless", "harc_pseudo": "harc_pseudo",
             "harc_band": 1}
    parsed = _parsed(harc_assets)
    validate_host_args(*parsed, HarcArguments(**roles))
    # the recipe's checkpointing stays, in every layer (the coupling reads the layers' own inputs)
    assert parsed[0].use_reentrant_gc is True
    with pytest.raises(ValueError, match=r"harc_pseudo: dataset 'xstest' is not in .*dataset_info.json \(it lists"):
        validate_host_args(*_parsed(harc_assets), HarcArguments(**{**roles, "harc_pseudo": "xstest"}))
    with pytest.raises(ValueError, match="harc_band: 4 leaves 0 of 6 decoder layers .* fewer than "
                                         "harc_layers_final: 4. Lower harc_band"):
        validate_host_args(*_parsed(harc_assets), HarcArguments(**{**roles, "harc_band": 4}))
    with pytest.raises(ValueError, match="template: stage: harc locates"):
        validate_host_args(*_parsed(harc_assets, template=None), HarcArguments(**roles))
    with pytest.raises(ValueError, match="has no dataset_info.json"):
        validate_host_args(*_parsed(harc_assets, dataset_dir=str(tmp_path)), HarcArguments(**roles))


def test_errors_reach_the_user_of_llamafactory_cli_before_the_model_loads(harc_assets: Any, tmp_path: Path) -> None:
    """Through the stock command line: one line naming key, value and fix; no model or dataset loaded."""
    for name, overrides, message in (
        ("batch", {"per_device_train_batch_size": 0}, "per_device_train_batch_size: got 0"),
        ("role", {"harc_harmless": "ultrachat"}, "harc_harmless: dataset 'ultrachat' is not in"),
        ("rows", {"harc_extract_samples": 40}, "harc_harmful: dataset 'harc_harmful' has 48 rows; "
                                               "harc_extract_samples + harc_validate_samples + one micro-batch need "
                                               "at least 50"),
        ("weights", {f"harc_weight_{term}": 0 for term in ("couple", "couple_resp", "kl", "ce")},
         "harc_weight_couple: 0, harc_weight_couple_resp: 0, harc_weight_ce: 0, harc_weight_kl: 0: every loss term "
         "is weighted 0"),
        ("kl_only", {"harc_weight_couple": 0, "harc_weight_couple_resp": 0, "harc_weight_ce": 0},
         "leave only harc_weight_kl: 10"),
    ):
        proc = run_train(harc_recipe(harc_assets, "llama3", tmp_path / name / "out"), tmp_path / name,
                         *(f"{k}={v}" for k, v in overrides.items()), check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0 and message in text, text[-3000:]
        assert "Traceback" not in text and "model.safetensors" not in text  # short error, before the model


def test_a_multimodal_model_is_refused_before_it_loads(assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    """HARC trains text LLMs: a Qwen2.5-VL checkpoint (which would otherwise train its language model on text rows
    without a word) is refused through the stock command line, naming the model and the fix."""
    recipe = harc_recipe(harc_assets, "qwen2", tmp_path / "out", model_name_or_path=str(assets.models["qwen2_5_vl"]),
                         template="qwen2_vl", harc_layers=1, harc_layers_final=1)  # its 2 layers leave 1 to couple
    proc = run_train(recipe, tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert (f"[llamafactory-hera] error: model_name_or_path: {assets.models['qwen2_5_vl']} is a multimodal model "
            "(qwen2_5_vl); stage: harc trains text LLMs only") in text, text[-3000:]
    assert "Traceback" not in text and "model.safetensors" not in text
