"""engines/fsdp_adapter.py: on an accelerate whose adapter-only FSDP2 state dict is each rank's shard (1.11, before
accelerate PR 4206), the start-up hook replaces the two helpers; on one with the fix it leaves them. What the patched
helpers do on two ranks is tested by the FSDP2 resume of tests/hera/test_hera_fsdp2.py (bit for bit) and
tests/test_stock_stages_distributed.py (across the plugin's switch)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Any

import accelerate
import accelerate.utils.fsdp_utils as fsdp_utils
import pytest
from packaging.version import Version

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.engines import fsdp_adapter

# accelerate 1.15.0's helper, which carries the fix (abridged to the lines the guard reads)
FIXED = '''
def _get_model_state_dict(model, adapter_only=False, sd_options=None):
    if adapter_only and is_peft_model(model):
        if sd_options is not None and sd_options.full_state_dict:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(model, options=replace(sd_options, ignore_frozen_params=True))
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    return model.state_dict()
'''


def _module(tmp_path: Path, source: str):
    path = tmp_path / "fsdp_utils_copy.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("fsdp_utils_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_accelerate_is_patched_where_it_lacks_the_fix(tmp_path: Path) -> None:
    if Version(accelerate.__version__) >= Version("1.15.0"):  # read there: the fix is in
        pytest.skip(f"accelerate {accelerate.__version__} carries the fix of PR 4206: nothing to patch")
    for name in ("_get_model_state_dict", "_set_model_state_dict"):
        assert getattr(fsdp_utils, name).__qualname__ == f"apply.<locals>.{name}", name
    assert not fsdp_adapter.lacks_fix(_module(tmp_path, FIXED))


def test_an_accelerate_with_the_fix_is_left_as_it_is(tmp_path: Path) -> None:
    fixed = _module(tmp_path, FIXED + "\ndef _set_model_state_dict(*a, **k): pass\ndef is_peft_model(m): pass\n"
                                      "def save_fsdp_model(*a, **k): pass\ndef load_fsdp_model(*a, **k): pass\n")
    helpers = fixed._get_model_state_dict, fixed._set_model_state_dict
    fsdp_adapter.apply(fixed)
    assert (fixed._get_model_state_dict, fixed._set_model_state_dict) == helpers


def _peft_model() -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(2, 2)

    return get_peft_model(Tiny(), LoraConfig(target_modules=["q_proj"], r=1))


def test_the_adapter_is_saved_under_peft_names() -> None:
    """torch's name of each adapter tensor -> the file's, PEFT's: accelerate 1.11 hands them to PEFT, which then fails
    to copy a whole tensor into a shard, stock's own refusal (two ranks: tests/test_stock_stages_distributed.py)."""
    assert fsdp_adapter._peft_names(_peft_model()) == {
        f"base_model.model.q_proj.lora_{m}.default.weight": f"base_model.model.q_proj.lora_{m}.weight" for m in "AB"}


def test_a_checkpoint_that_restores_nothing_is_refused_on_load() -> None:
    """Names matching no trainable parameter, by torch's naming or PEFT's: restoring it with ``strict=False`` would
    load nothing and resume from the initial adapter, silently. (A file of rank 0's DTensor shards, what accelerate
    1.11 saves without the plugin: refused on two ranks in tests/test_stock_stages_distributed.py.)"""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    with pytest.raises(RecipeError, match="^resume_from_checkpoint: the FSDP2 checkpoint's pytorch_model_fsdp"):
        fsdp_utils._set_model_state_dict(_peft_model(), {"lora_A.weight": torch.zeros(1, 2)}, adapter_only=True,
                                         sd_options=StateDictOptions(full_state_dict=True))
