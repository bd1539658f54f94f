"""Test-only start-up hook of every process a test starts (tests/conftest.py ``offline_env``): the packages its run does
not use hidden (:mod:`unused_packages`), DeepSpeed's shared-memory op not built (:mod:`deepspeed_shm`); with
``HERA_TEST_RANK_MARKER`` naming a folder, a rank of a launch (``RANK`` set by torchrun or ``accelerate launch``) leaves
``rank<N>`` there, so a test can tell no rank started; ``HERA_TEST_PROBE_SEEN_S`` (seconds) is how long the
shared-output probe looks for another node's file (``runtime/shared_output.py`` ``SEEN_S``, 30 s: a test whose nodes
each have an ``output_dir`` of their own would wait it out). The other hooks (tests/engine_evidence/, tests/fsdp_cpu/,
tests/without_deepspeed/) come first on ``PYTHONPATH`` when a test adds them, and import it themselves: Python runs the
first ``sitecustomize`` it finds."""

import os

import deepspeed_shm  # noqa: F401
import unused_packages  # noqa: F401

if os.environ.get("HERA_TEST_RANK_MARKER") and "RANK" in os.environ:
    os.makedirs(os.environ["HERA_TEST_RANK_MARKER"], exist_ok=True)
    open(os.path.join(os.environ["HERA_TEST_RANK_MARKER"], f"rank{os.environ['RANK']}"), "w").close()

if os.environ.get("HERA_TEST_PROBE_SEEN_S"):
    from after_import import patch_after_import

    patch_after_import({"llamafactory_hera.runtime.shared_output": lambda module: setattr(
        module, "SEEN_S", float(os.environ["HERA_TEST_PROBE_SEEN_S"]))})
