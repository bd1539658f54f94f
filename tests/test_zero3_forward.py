"""engines/deepspeed.py ``zero3_forward``: a forward outside the DeepSpeed engine's is marked as the engine marks its
own, and the marks come back as they were; a DeepSpeed whose ZeRO-3 modules lack the mark is named, never ignored.
(End to end: tests/hera/test_hera_deepspeed_lora.py, whose ZeRO-3 DoRA run's monitor failed without it.)
``loaded_whole``: ZeRO-3's config and FSDP's efficient loading off inside, back as they were after, an error or not."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import pytest
import transformers.integrations.deepspeed as integration
from torch import nn

from llamafactory_hera_patches.engines.deepspeed import EFFICIENT_LOADING, loaded_whole, zero3_forward
from llamafactory_hera_patches.guard import HostMismatchError


class _Flagged(OrderedDict):
    """Stands for DeepSpeed's ZeROOrderedDict: a module's parameters with the ``_in_forward`` flag."""

    _in_forward = False


def _zero3_model(flagged: bool) -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    for module in model.modules():
        if flagged:
            module._parameters = _Flagged(module._parameters)
        for parameter in module.parameters(recurse=False):
            parameter.ds_id = id(parameter)  # what ZeRO-3 adds to each parameter it manages
    return model


def test_the_flags_are_set_inside_and_restored_after() -> None:
    model = _zero3_model(flagged=True)
    model[1]._parameters._in_forward = True  # as inside the engine's own forward: left as it was
    with zero3_forward(model):
        assert all(module._parameters._in_forward for module in model.modules())
    assert [module._parameters._in_forward for module in model.modules()] == [False, False, True]
    with pytest.raises(RuntimeError), zero3_forward(model):
        raise RuntimeError
    assert [module._parameters._in_forward for module in model.modules()] == [False, False, True]


def test_a_model_zero3_does_not_manage_is_left_alone() -> None:
    model = nn.Linear(2, 2)
    with zero3_forward(model):
        assert not hasattr(model._parameters, "_in_forward")


def test_a_deepspeed_without_the_flag_is_named() -> None:
    with pytest.raises(HostMismatchError, match="no _in_forward flag .* set hera_monitor_steps: 0"), \
            zero3_forward(_zero3_model(flagged=False)):
        pass


@pytest.mark.parametrize("efficient", ["true", None])
def test_loaded_whole_turns_zero3_and_efficient_loading_off_and_back(efficient: str | None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    config = object()  # stands for the weak reference to a ZeRO-3 config that from_pretrained consults
    monkeypatch.setattr(integration, "_hf_deepspeed_config_weak_ref", config)
    if efficient is None:
        monkeypatch.delenv(EFFICIENT_LOADING, raising=False)
    else:
        monkeypatch.setenv(EFFICIENT_LOADING, efficient)
    for error in (False, True):
        with pytest.raises(RuntimeError) if error else contextlib.nullcontext(), loaded_whole():
            assert integration._hf_deepspeed_config_weak_ref is None and EFFICIENT_LOADING not in os.environ
            if error:
                raise RuntimeError
        assert integration._hf_deepspeed_config_weak_ref is config and os.environ.get(EFFICIENT_LOADING) == efficient
