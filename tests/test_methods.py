"""A method registers itself by its declaration alone: stage, keys, checks, run, logs, web-UI stage and verbs.

A toy method written here as a next method is written, a config, its checks and phases as module functions and a
trainer of the base's hooks alone (not in the plugin), is added to ``DECLARATIONS`` and goes through the same patches
as HeRA: LLaMA-Factory's real ``run_exp`` trains it on the tiny fixture, its metric reaches ``trainer_log.jsonl``,
LlamaBoard's stage list offers it and ``llamafactory-hera`` runs its verb.
"""

from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, base_recipe
from llamafactory_hera import cli, methods
from llamafactory_hera.recipe.declaration import Method
from llamafactory_hera.recipe.keys import parse_keys, recipe_key
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe
from llamafactory_hera.training.trainer_base import MethodTrainer
from llamafactory_hera_patches.recipe.arguments import keys_of, split_args
from llamafactory_hera_patches.sft_classes import HostTrainer
from llamafactory_hera_patches.webui import stage_list as webui

CALLS: list[tuple[str, Any]] = []  # each phase of the toy's run, in the order it ran


@dataclass
class ToyArguments:  # the config: the method's recipe keys
    toy_scale: float = recipe_key(1.0, "What the toy metric multiplies the loss by.", min=0.0)


class ToyTrainer(MethodTrainer, HostTrainer):  # the trainer: the base's hooks alone, over LLaMA-Factory's trainer
    toy_metric = 0.0

    def __init__(self, *args: Any, toy_scale: float, **kwargs: Any) -> None:  # the run's objects: keyword arguments
        super().__init__(*args, **kwargs)
        self.toy_scale = toy_scale

    def method_loss(self, model: Any, inputs: Any, *args: Any) -> Any:
        loss = self.host_loss(model, inputs, *args)
        self.toy_metric = self.toy_scale * (loss[0] if isinstance(loss, tuple) else loss).item()
        return loss

    def method_logs(self, logs: dict[str, float]) -> None:
        logs["toy_metric"] = self.toy_metric


# the run's parts, as a method's modules hold them (its declaration names each function)
def parse_toy_arguments(keys: dict[str, Any]) -> ToyArguments:
    CALLS.append(("parse", dict(keys)))
    return parse_keys(ToyArguments, keys, "Toy")


def validate_raw_host_args(host_args: RawRecipe, toy_args: ToyArguments) -> None:  # phase 1
    CALLS.append(("check_raw", host_args["stage"]))


def validate_host_args(model: Any, data: Any, training: Any, finetuning: Any, generating: Any, toy_args: Any) -> None:
    CALLS.append(("check_parsed", finetuning.stage))  # phase 2


def prepare(toy_args: ToyArguments, parsed: HostArguments) -> str:  # phase 3
    CALLS.append(("prepare", toy_args.toy_scale))
    return "prepared"


def train(toy_args: ToyArguments, host: Any, parsed: HostArguments, callbacks: list[Any], prepared: str) -> None:
    CALLS.append(("train", host.collator.__name__))  # phase 4
    host.run(host.collator, ToyTrainer, *parsed, callbacks, trainer_kwargs={"toy_scale": toy_args.toy_scale})


def finish(toy_args: ToyArguments, host: Any, parsed: HostArguments, prepared: str, trained: None) -> None:
    CALLS.append(("finish", prepared))  # phase 5


def add_toy_verbs(commands: Any) -> dict[str, Any]:
    commands.add_parser("toy-verb", help="the toy method's verb").add_argument("--value", type=int, required=True)
    return {"toy-verb": lambda args: CALLS.append(("verb", args.value))}


TOY = Method(stage="toy", label="Toy (registry test)", prefix="toy_", host_stage="sft", arguments=ToyArguments,
             parse=parse_toy_arguments, check_raw=f"{__name__}:validate_raw_host_args",
             check_parsed=f"{__name__}:validate_host_args", prepare=f"{__name__}:prepare", train=f"{__name__}:train",
             finish=f"{__name__}:finish",
             log_keys=("toy_metric",), add_cli_verbs=add_toy_verbs)


@pytest.fixture
def toy_declared(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(methods, "DECLARATIONS", (*methods.DECLARATIONS, TOY))
    methods.declared_methods.cache_clear()
    CALLS.clear()
    yield
    methods.declared_methods.cache_clear()


def test_arguments_are_routed_by_the_declared_stage_and_prefix(toy_declared) -> None:
    host, own, method = split_args({"stage": "toy", "toy_scale": 2, "hera_k": 3, "model_name_or_path": "m"})
    assert method == TOY and host == {"stage": "sft", "model_name_or_path": "m"}
    assert keys_of(method, own) == ({"toy_scale": 2}, ["hera_k"])
    host, own, method = split_args(["--stage", "toy", "--toy_scale=2", "--do_train"])
    assert method == TOY and host == ["--stage", "sft", "--do_train"] and own == {"toy_scale": "2"}
    assert split_args({"stage": "hera"})[2].stage == "hera"  # HeRA's own declaration still there


def test_a_declared_method_trains_through_run_exp_and_logs_its_metric(toy_declared, assets, tmp_path: Path) -> None:
    from llamafactory.train.tuner import run_exp

    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", max_steps=2)
    recipe = {k: v for k, v in recipe.items() if not k.startswith("hera_")} | {"stage": "toy", "toy_scale": 2.0}
    run_exp(recipe)
    assert [name for name, _ in CALLS] == ["parse", "check_raw", "check_parsed", "prepare", "train", "finish"]
    assert CALLS[0][1] == {"toy_scale": 2.0} and CALLS[2][1] == "sft" and CALLS[3][1] == 2.0
    assert CALLS[4][1] == "SFTDataCollatorWith4DAttentionMask"  # the stock class, for the method to extend
    assert CALLS[5][1] == "prepared"  # what prepare handed on
    lines = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert len(steps) == 2 and all(line["toy_metric"] == pytest.approx(2 * line["loss"]) for line in steps)


def test_the_web_ui_and_the_command_line_offer_a_declared_method(toy_declared, capsys) -> None:
    constants = types.SimpleNamespace(TRAINING_STAGES={"Supervised Fine-Tuning": "sft"})
    webui.apply(constants)
    assert constants.TRAINING_STAGES["Toy (registry test)"] == "toy"
    assert constants.TRAINING_STAGES["HeRA (Head-wise Representation Alignment)"] == "hera"
    assert cli.main(["toy-verb", "--value", "7"]) == 0 and CALLS == [("verb", 7)]
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "toy-verb" in capsys.readouterr().out


def test_two_methods_cannot_share_a_stage_or_a_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "DECLARATIONS", (*methods.DECLARATIONS, methods.HERA))
    methods.declared_methods.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="share a stage or a key prefix"):
            methods.declared_methods()
    finally:
        methods.declared_methods.cache_clear()


SHARED = ("heads", "board", "plots", "recipe", "runtime", "training")  # the folders every method uses, one job each


def test_patches_and_the_shared_packages_import_no_method_package() -> None:
    """The patches know methods only through their declarations, and the shared folders serve every method, so neither
    imports a method's package (a next method must not have to edit them); only the registry above them does."""
    package = REPO / "plugin" / "llamafactory_hera"
    method_packages = [p.name for p in package.iterdir() if (p / "workflow.py").is_file()]
    assert sorted(method_packages) == ["harc", "hera", "rah"]
    shared = [*(REPO / "patches" / "llamafactory_hera_patches").rglob("*.py"),
              *(path for folder in SHARED for path in (package / folder).glob("*.py")),
              *(package / name for name in ("cli.py", "_bootstrap.py", "job_refusal.py", "placement.py"))]
    pattern = re.compile(rf"^\s*(from|import) llamafactory_hera\.({'|'.join(method_packages)})\b", re.M)
    offenders = [str(path.relative_to(REPO)) for path in shared if pattern.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_shared_folders_hold_only_what_two_methods_or_the_shared_code_use() -> None:
    """A module one method alone uses (directly or through another shared module) lives in that method's package."""
    package = REPO / "plugin" / "llamafactory_hera"
    names = {f"{folder}.{path.stem}" for folder in SHARED for path in (package / folder).glob("*.py")}
    names -= {f"{folder}.__init__" for folder in SHARED}
    # a name list runs over lines only inside parentheses: a bare list ends at its line, before the next import
    pattern = re.compile(rf"llamafactory_hera\.({'|'.join(SHARED)})(?:\.(\w+)| import (?:\(([\w, \n]+)\)|([\w, ]+)))")

    def imported(paths: list[Path]) -> set[str]:
        found = set()
        for match in pattern.finditer("\n".join(path.read_text(encoding="utf-8") for path in paths)):
            listed = match.group(3) or match.group(4) or ""
            modules = [match.group(2)] if match.group(2) else re.split(r"[,\s]+", listed.strip())
            found |= {f"{match.group(1)}.{module}" for module in modules}
        return found & names

    def closure(start: set[str]) -> set[str]:
        seen: set[str] = set()
        while start - seen:
            seen |= start
            start = imported([package / f"{name.replace('.', '/')}.py" for name in seen])
        return seen

    users = {method: closure(imported(list((package / method).rglob("*.py")))) for method in ("hera", "rah", "harc")}
    top = [package / name for name in ("methods.py", "cli.py", "_bootstrap.py")]
    shared = closure(imported([*(REPO / "patches").rglob("*.py"), *(package / "evaluation").rglob("*.py"), *top]))
    alone = {name: [m for m in users if name in users[m]] for name in sorted(names - shared)}
    assert {name: used_by for name, used_by in alone.items() if len(used_by) < 2} == {}
