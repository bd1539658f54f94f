"""Every method as a stage of LlamaBoard, applied once ``llamafactory.webui.interface`` has executed (it imported every
module touched here): all shapes checked, then everything patched. Each method gets the ``MethodPanel`` its
declaration names; with any other stage UI, preview, command and saved configs are stock.

Checked on LLaMA-Factory 0.9.5 (gradio 5) by :func:`_modules`. ``create_train_tab(engine)`` binds its buttons to
``engine.manager.get_base_elems()`` plus the tab's inputs, so panel inputs must exist before it runs;
``common._clean_cmd`` drops every false value from the preview and the saved ``training_args.yaml``, so a method's
false flag is put back (a quoted ``'false'`` is refused).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Generator
from types import ModuleType
from typing import Any

import llamafactory.extras.constants as constants
import llamafactory.extras.ploting as ploting

from llamafactory_hera.runtime.registry import method_of_key, registered_methods

from ..guard import DISABLE_ENV, HostMismatchError, host_version, mismatch, require, warn_if_unchecked

Method = Any  # a registered method (:mod:`llamafactory_hera.runtime.registry`)
MethodPanel = Any  # its LlamaBoard panel: tab, keys, locales, create_panel, bind, validate, build_args, ...

PATCH = "webui"
_WEBUI = "llamafactory.webui"
# web-UI functions wrapped or called: (module, attribute) -> parameters
_SIGNATURES = {
    ("components.train", "create_train_tab"): ("engine",),
    ("runner", "Runner._initialize"): ("self", "data", "do_train", "from_preview"),
    ("runner", "Runner._parse_train_args"): ("self", "data"),
    ("runner", "Runner._build_config_dict"): ("self", "data"),
    ("runner", "Runner.monitor"): ("self",),
    ("control", "gen_loss_plot"): ("trainer_log",),
    ("control", "get_trainer_info"): ("lang", "output_path", "do_train"),
    ("common", "_clean_cmd"): ("args",),
}


def _require_signature(module: ModuleType, path: str, expected: tuple[str, ...]) -> None:
    """Raise :class:`HostMismatchError` unless ``module.path`` takes ``expected``."""
    func: Any = module
    for name in path.split("."):
        require(func, (name,), PATCH)
        func = getattr(func, name)
    params = tuple(inspect.signature(func).parameters)
    if params != expected:
        raise mismatch(PATCH, f"{path} takes ({', '.join(params)}), expected ({', '.join(expected)})")


def _modules(interface: ModuleType) -> dict[str, ModuleType]:
    """The web-UI modules, checked before anything is patched."""
    require(interface, ("create_ui", "create_train_tab"), PATCH)
    mods = {
        name: importlib.import_module(f"{_WEBUI}.{name}")
        for name in ("components", "components.train", "runner", "control", "locales", "common")
    }
    mods["constants"] = constants
    mods["ploting"] = ploting
    require(mods["components"], ("create_train_tab",), PATCH)
    require(mods["locales"], ("LOCALES",), PATCH)
    require(mods["common"], ("get_save_dir", "DEFAULT_DATA_DIR"), PATCH)
    require(mods["constants"], ("TRAINING_STAGES",), PATCH)
    require(mods["ploting"], ("smooth",), PATCH)
    for (module, path), expected in _SIGNATURES.items():
        _require_signature(mods[module], path, expected)
    for method in registered_methods():
        if method.stage not in mods["constants"].TRAINING_STAGES.values():  # the .webui patch did not run
            raise HostMismatchError(
                f"llamafactory-hera: LLaMA-Factory {host_version()}'s TRAINING_STAGES does not "
                f"list the '{method.stage}' stage; the web UI cannot offer {method.label}. Set "
                f"{DISABLE_ENV}=1 to run LLaMA-Factory without the plugin."
            )
    return mods


def apply(interface: ModuleType) -> None:
    """Patch LlamaBoard (``llamafactory.webui.*``) in place."""
    if getattr(interface, "_llamafactory_hera_patched", False):
        return
    mods = _modules(interface)
    panels = [(method, method.panel()) for method in registered_methods() if method.panel]  # declaration order
    warn_if_unchecked()
    stages = mods["constants"].TRAINING_STAGES

    for _, panel in panels:
        for name, texts in panel.locales.items():
            mods["locales"].LOCALES.setdefault(name, texts)

    original = mods["components.train"].create_train_tab
    create_train_tab = (
        original
        if getattr(original, "_llamafactory_hera", False)
        else _wrap_create_train_tab(original, stages, panels, mods["common"].DEFAULT_DATA_DIR)
    )
    for module in (interface, mods["components"], mods["components.train"]):
        module.create_train_tab = create_train_tab
    if not getattr(mods["runner"].Runner, "_llamafactory_hera_patched", False):
        _patch_runner(mods["runner"].Runner, stages, mods, panels)
    if not getattr(mods["common"]._clean_cmd, "_llamafactory_hera", False):
        mods["common"]._clean_cmd = _keeping_false_flags(mods["common"]._clean_cmd)
    if not getattr(mods["control"].gen_loss_plot, "_llamafactory_hera", False):
        mods["control"].gen_loss_plot = _wrap_gen_loss_plot(
            mods["control"].gen_loss_plot, mods["ploting"].smooth, panels
        )
    interface._llamafactory_hera_patched = True


def _keeping_false_flags(clean: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def clean_cmd(args: dict[str, Any]) -> dict[str, Any]:
        kept = clean(args)
        return {k: v for k, v in args.items() if k in kept or (v is False and method_of_key(k) is not None)}

    clean_cmd._llamafactory_hera = True
    return clean_cmd


def _wrap_create_train_tab(
    original: Callable[..., dict[str, Any]],
    stages: dict[str, str],
    panels: list[tuple[Method, MethodPanel]],
    data_dir: str,
) -> Callable[..., Any]:
    def create_train_tab(engine: Any) -> dict[str, Any]:
        # lazy: gradio, only when LlamaBoard runs
        import gradio as gr

        built = []  # (method, panel, its accordion, its elements)
        for method, panel in panels:
            with gr.Accordion(
                panel.locales[panel.tab]["en"]["label"], open=True, visible=False, elem_id=f"train-{panel.tab}"
            ) as tab:
                built.append((method, panel, tab, panel.create_panel(gr, data_dir)))
        inputs = {elem for _, panel, _, own in built for elem in panel.inputs(own).values()}
        manager = engine.manager
        own_base = vars(manager).get("get_base_elems")
        base = manager.get_base_elems
        manager.get_base_elems = lambda: base() | inputs  # the tab's buttons take these as inputs
        try:
            elem_dict = original(engine)
        finally:
            if own_base is None:
                vars(manager).pop("get_base_elems", None)
            else:
                manager.get_base_elems = own_base
        # what Preview and Start send: the top bar's and the Train tab's inputs
        sent = base() | inputs | {c for c in elem_dict.values() if isinstance(c, gr.components.FormComponent)}
        stage = elem_dict["training_stage"]
        stage.min_width = max(int(getattr(stage, "min_width", None) or 0), STAGE_MIN_WIDTH)  # read when rendered
        for method, panel, tab, own in built:
            _place_before(tab, elem_dict["cmd_preview_btn"])
            stage.change(_shown_for(method, stages, gr), [stage], [tab], queue=False)
            panel.bind(gr, elem_dict, own)
            if method.plan:
                own[panel.plan_button].click(_planner(engine.runner, method), sent, [own[panel.plan_box]])
            elem_dict[panel.tab] = tab
            elem_dict.update(own)
        return elem_dict

    create_train_tab.__wrapped__ = original
    create_train_tab._llamafactory_hera = True
    return create_train_tab


def _planner(runner: Any, method: Method) -> Callable[[dict[Any, Any]], str]:
    """The plan button's callback: the method's plan of the run Start would launch."""

    def plan_run(data: dict[Any, Any]) -> str:
        return method.plan(runner._parse_train_args(data))

    return plan_run


# The Stage dropdown's least width (px): stock's 1/6 of the row cuts the methods' names; this fits the longest from a
# 1280 px window up.
STAGE_MIN_WIDTH = 420


def _shown_for(method: Method, stages: dict[str, str], gr: Any) -> Callable[[str], Any]:
    """Dropdown callback: the method's accordion shown only for its own stage."""
    return lambda label: gr.Accordion(visible=method.owns(stages.get(label)))


def _place_before(block: Any, anchor: Any) -> None:
    """Move ``block`` just before ``anchor``'s ancestor that shares its parent."""
    parent = getattr(block, "parent", None)
    children = getattr(parent, "children", None)
    node = anchor
    while node is not None and getattr(node, "parent", None) is not parent:
        node = getattr(node, "parent", None)
    if children is None or node is None or block not in children:
        return  # another layout: the panel stays on top
    children.remove(block)
    children.insert(children.index(node), block)


def _patch_runner(
    runner_cls: type, stages: dict[str, str], mods: dict[str, ModuleType], panels: list[tuple[Method, MethodPanel]]
) -> None:
    original_initialize = runner_cls._initialize
    original_parse = runner_cls._parse_train_args
    original_config = runner_cls._build_config_dict
    original_monitor = runner_cls.monitor

    def elem_value(self: Any, data: dict[Any, Any], elem_id: str) -> Any:
        try:
            return data[self.manager.get_elem_by_id(elem_id)]
        except KeyError:
            return None

    def chosen(self: Any, data: dict[Any, Any] | None) -> tuple[Method, MethodPanel] | None:
        """The selected stage's (method, panel), or None."""
        stage = stages.get(elem_value(self, data, "train.training_stage")) if data else None
        return next(((method, panel) for method, panel in panels if method.owns(stage)), None)

    def panel_values(self: Any, data: dict[Any, Any], panel: MethodPanel) -> dict[str, Any] | None:
        values = {key: elem_value(self, data, f"train.{key}") for key in panel.keys}
        return None if all(v is None for v in values.values()) else values  # None: no panel in the UI

    def extra_args(self: Any, data: dict[Any, Any]) -> dict[str, Any]:
        """The "Extra arguments" JSON box as a dict ({} if not JSON: the stock checks refuse it)."""
        try:
            extra = json.loads(elem_value(self, data, "train.extra_args") or "{}")
        except (TypeError, ValueError):
            return {}
        return extra if isinstance(extra, dict) else {}

    def _initialize(self: Any, data: dict[Any, Any], do_train: bool, from_preview: bool) -> str:
        selected = chosen(self, data)
        dataset_box = self.manager.get_elem_by_id("train.dataset") if do_train and selected is not None else None
        if dataset_box is not None and selected[1].declaration.dataset_from_panel and not data.get(dataset_box):
            # the panel's dataset keys name the rows (the run fills `dataset`): the stock check refuses an empty box
            data = {**data, dataset_box: ["(from the panel)"]}
        error = original_initialize(self, data, do_train, from_preview)
        if error or not do_train or selected is None:
            return error
        panel = selected[1]
        values = panel_values(self, data, panel)
        context = {
            "model_path": elem_value(self, data, "top.model_path"),
            "dataset_dir": elem_value(self, data, "train.dataset_dir"),
        }
        problem = panel.validate(values, extra_args(self, data), context) if values is not None else ""
        if problem:
            return panel.error_text(problem, elem_value(self, data, "top.lang") or "en")
        return error

    def _parse_train_args(self: Any, data: dict[Any, Any]) -> dict[str, Any]:
        args = original_parse(self, data)
        for method, panel in panels:
            if method.owns(args.get("stage")):
                values = panel_values(self, data, panel)
                if values is not None:
                    for key, value in panel.build_args(values).items():
                        args.setdefault(key, value)  # a key in the extra-arguments JSON wins
                    args = panel.host_args(args, extra_args(self, data))
        return args

    def _build_config_dict(self: Any, data: dict[Any, Any]) -> dict[str, Any]:
        config = original_config(self, data)
        selected = chosen(self, data)
        for method, _ in panels:
            if selected is None or selected[0] is not method:
                prefix = f"train.{method.prefix}"
                config = {k: v for k, v in config.items() if not k.startswith(prefix)}
        return config

    def monitor(self: Any) -> Generator[dict[Any, Any], None, None]:
        # Stock polls every 2 s and stops with the process, so a short run can end on an old plot (or none): a method's
        # run gets one last plot after it.
        data = self.running_data
        final = None
        if self.do_train and chosen(self, data) is not None:
            get = lambda elem_id: elem_value(self, data, elem_id)  # noqa: E731
            output_path = mods["common"].get_save_dir(
                get("top.model_name"), get("top.finetuning_type"), get("train.output_dir")
            )
            final = (get("top.lang") or "en", output_path)
        yield from original_monitor(self)
        if final is not None:
            _, _, info = mods["control"].get_trainer_info(final[0], final[1], True)
            if "loss_viewer" in info:
                yield {self.manager.get_elem_by_id("train.loss_viewer"): info["loss_viewer"]}

    for name, func in (
        ("_initialize", _initialize),
        ("_parse_train_args", _parse_train_args),
        ("_build_config_dict", _build_config_dict),
        ("monitor", monitor),
    ):
        func.__wrapped__ = getattr(runner_cls, name)
        func.__name__ = name
        func.__qualname__ = f"{runner_cls.__name__}.{name}"
        setattr(runner_cls, name, func)
    runner_cls._llamafactory_hera_patched = True


def _wrap_gen_loss_plot(
    original: Callable[..., Any], smooth: Callable[..., Any], panels: list[tuple[Method, MethodPanel]]
) -> Callable[..., Any]:
    def gen_loss_plot(trainer_log: list[dict[str, Any]]) -> Any:
        for _, panel in panels:
            if panel.owns_loss_plot(trainer_log):
                return panel.loss_figure(trainer_log, smooth)
        return original(trainer_log)

    gen_loss_plot.__wrapped__ = original
    gen_loss_plot._llamafactory_hera = True
    return gen_loss_plot
