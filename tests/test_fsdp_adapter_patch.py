"""engines/fsdp_adapter.py: on an accelerate whose adapter-only FSDP2 state dict is each rank's shard (1.11, before
accelerate PR 4206), the start-up hook replaces the two helpers; on one with the fix it leaves them. What the patched
helpers do on two ranks is tested by the FSDP2 resume of tests/hera/test_hera_fsdp2.py (bit for bit)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import accelerate
import accelerate.utils.fsdp_utils as fsdp_utils
import pytest
from packaging.version import Version

from llamafactory_hera_patches.engines import fsdp_adapter
from llamafactory_hera_patches.errors import RecipeError

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


def test_a_checkpoint_saved_without_the_fix_is_refused_on_load() -> None:
    """PEFT's key names (``...lora_A.weight``, no adapter name) match no parameter of the model: restoring it with
    ``strict=False`` would load nothing and resume from the initial adapter, silently."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    class Peft(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2)})

    model = Peft()
    original = fsdp_utils.is_peft_model
    fsdp_utils.is_peft_model = lambda m: True
    try:
        with pytest.raises(RecipeError, match="^resume_from_checkpoint: the FSDP2 checkpoint's pytorch_model_fsdp"):
            fsdp_utils._set_model_state_dict(model, {"lora_A.weight": torch.zeros(2, 2)}, adapter_only=True,
                                             sd_options=StateDictOptions(full_state_dict=True))
    finally:
        fsdp_utils.is_peft_model = original
