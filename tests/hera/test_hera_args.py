"""HeraArguments parsing: every user-facing error names the key, the value and the fix."""

import pytest

from llamafactory_hera.heads.geometry import AttentionGeometry, HeadRef, check_heads_fit, parse_head
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera_patches.recipe.arguments import split_args


def test_defaults_match_the_paper() -> None:
    args = parse_hera_arguments({"hera_heads": ["L13H12", "l7h6"]})
    assert args.hera_heads == [HeadRef(13, 12), HeadRef(7, 6)]  # parsed once, in recipe order
    assert (args.hera_k, args.hera_lambda, args.hera_temperature) == (10, 0.01, 0.07)
    assert args.hera_teacher == "facebook/dinov2-large"
    assert (args.hera_teacher_feature, args.hera_similarity, args.hera_pooling) == ("cls", "cosine", "assistant")
    assert args.hera_learn_temperature is True
    assert (args.hera_teacher_cache, args.hera_teacher_precompute) == (True, "auto")
    assert args.hera_temperature_lr == 1e-3  # with the model's learning rate (2e-5) tau would barely move
    assert args.hera_select_clamp == 0.95  # PRH's outlier clamp
    assert args.recipe_keys()["hera_heads"] == ["L13H12", "L7H6"]  # the records write them as a recipe does


def test_string_values_from_the_command_line_are_coerced() -> None:
    args = parse_hera_arguments({"hera_heads": "[L1H0, L0H3]", "hera_k": "4", "hera_lambda": "0.5",
                                 "hera_learn_temperature": "false", "hera_temperature_lr": "none"})
    assert args.hera_heads == [HeadRef(1, 0), HeadRef(0, 3)] and args.hera_k == 4 and args.hera_lambda == 0.5
    assert args.hera_learn_temperature is False and args.hera_temperature_lr is None


def test_yaml_booleans_select_precompute_modes() -> None:
    for value, want in ((True, "true"), (False, "false"), ("AUTO", "auto")):
        args = parse_hera_arguments({"hera_heads": ["L0H0"], "hera_teacher_precompute": value})
        assert args.hera_teacher_precompute == want


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ValueError, match="Unknown HeRA key 'hera_lamda'. Did you mean 'hera_lambda'"):
        parse_hera_arguments({"hera_heads": ["L0H0"], "hera_lamda": 0.1})


@pytest.mark.parametrize("key,value,message", [
    ("hera_k", 0, "hera_k: got 0; allowed range is >= 1"),
    ("hera_k", "ten", "hera_k: got 'ten'; expected a whole number"),
    ("hera_k", 1.5, "hera_k: got 1.5; expected a whole number"),
    ("hera_lambda", "x", "hera_lambda: got 'x'; expected a number"),
    ("hera_lambda", -0.1, "hera_lambda: got -0.1; allowed range is >= 0.0"),
    ("hera_lambda", float("nan"), "hera_lambda: got nan; expected a finite number"),
    ("hera_temperature", 0, "hera_temperature: got 0; allowed range is >= 0.01"),
    ("hera_temperature", 101, "hera_temperature: got 101; allowed range is <= 100.0"),
    ("hera_select_clamp", 1.5, "hera_select_clamp: got 1.5; allowed range is <= 1.0"),
    ("hera_similarity", "l2", "hera_similarity: got 'l2'; allowed values are cosine, dot"),
    ("hera_pooling", "image", "hera_pooling: got 'image'; allowed values are assistant, text"),
    ("hera_teacher_feature", "pooler", "hera_teacher_feature: got 'pooler'; allowed values are cls, mean"),
    ("hera_learn_temperature", "maybe", "hera_learn_temperature: got 'maybe'; expected true or false"),
    ("hera_teacher", "  ", "hera_teacher: got '  '; a value is required"),
    ("hera_teacher_precompute", "sometimes", "hera_teacher_precompute: got 'sometimes'; allowed values are auto, true, "
                                             "false"),
])
def test_invalid_values_name_key_value_and_range(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_hera_arguments({"hera_heads": ["L0H0"], key: value})


@pytest.mark.parametrize("heads,message", [
    ([], "list at least one head"),
    (["L1"], "'L1' is not a head; write heads as L<layer>H<head>"),
    (["L1H2", "L1H2"], "repeated: L1H2"),
    (7, "expected a list of heads"),
])
def test_bad_heads(heads: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hera_arguments({"hera_heads": heads})


def test_auto_heads() -> None:
    args = parse_hera_arguments({"hera_heads": "auto", "hera_select_strategy": "random"})
    assert args.auto_heads and args.hera_select_strategy == "random" and args.hera_select_samples == 1000
    assert args.recipe_keys()["hera_heads"] == "auto"


def test_missing_heads() -> None:
    with pytest.raises(ValueError, match="hera_heads: missing"):
        parse_hera_arguments({})


def test_heads_outside_the_model() -> None:
    geometry = AttentionGeometry(num_layers=2, num_heads=4, head_dim=16, hidden_size=64)
    check_heads_fit([HeadRef(1, 3)], geometry, "tiny")
    with pytest.raises(ValueError, match=r"hera_heads: L2H0 is outside tiny, which has layers L0..L1 and heads H0..H3"):
        check_heads_fit([HeadRef(2, 0)], geometry, "tiny")
    with pytest.raises(ValueError, match="L0H4 is outside"):
        check_heads_fit([parse_head("L0H4")], geometry, "tiny")


def test_every_key_has_help_text() -> None:
    from dataclasses import fields

    from llamafactory_hera.hera.config import HeraArguments

    for spec in fields(HeraArguments):
        assert spec.name.startswith("hera_") and len(spec.metadata["help"]) > 20
    names = [spec.name for spec in fields(HeraArguments)]
    assert len(names) == len(set(names))


def test_split_dict_and_list_forms() -> None:
    host, hera, is_hera = split_args({"stage": "hera", "hera_k": 3, "model_name_or_path": "m"})
    assert host == {"stage": "sft", "model_name_or_path": "m"} and hera == {"hera_k": 3} and is_hera
    host, hera, is_hera = split_args(["--stage", "hera", "--hera_k=3", "--hera_heads", "L0H1,L1H1", "--do_train"])
    assert host == ["--stage", "sft", "--do_train"] and hera == {"hera_k": "3", "hera_heads": "L0H1,L1H1"}
    assert is_hera
    host, hera, is_hera = split_args({"stage": "sft", "hera_k": 3})
    assert host == {"stage": "sft"} and hera == {"hera_k": 3} and not is_hera


def test_precompute_auto_runs_only_when_the_run_covers_the_training_set() -> None:
    from llamafactory_hera.hera.teacher_run import precompute_wanted

    # (setting, cache on, samples, max_steps, global batch) -> wanted
    assert precompute_wanted("auto", True, 32, -1, 8)  # epochs-based run
    assert precompute_wanted("auto", True, 32, 4, 8)  # 4 x 8 = 32: exactly one epoch
    assert not precompute_wanted("auto", True, 32, 3, 8)  # ends inside the first epoch
    assert not precompute_wanted("auto", False, 32, -1, 8)  # no cache to fill
    assert not precompute_wanted("auto", True, None, -1, 8)  # no readable image column (streaming)
    assert precompute_wanted("true", True, 32, 1, 8) and not precompute_wanted("false", True, 32, -1, 8)
