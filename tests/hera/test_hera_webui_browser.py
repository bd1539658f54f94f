"""LlamaBoard in a real headless Chromium: pick HeRA, fill the panel, preview, start, wait, check the loss plot.

Needs Debian's ``chromium`` (installed here with apt-get when missing and running as root; the test is
skipped, saying why, where it cannot be installed) and Playwright's Python package (the ``test``
extra), which drives that binary; ``playwright install`` is never run.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import CLI, free_port, offline_env
from llamafactory_hera.fixtures import TinyAssets

HERA_LABEL = "HeRA (Head-wise Representation Alignment)"
SFT_LABEL = "Supervised Fine-Tuning"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEPS = 12
EXTRA_ARGS = {"optim": "adamw_torch", "max_steps": STEPS, "logging_steps": 1, "preprocessing_num_workers": 1,
              "dataloader_num_workers": 0, "gradient_accumulation_steps": 1, "save_strategy": "no", "seed": 0}


def _chromium() -> str:
    """Path of Debian's chromium, installed with apt-get if missing (skip, with the reason, where it cannot be)."""
    found = shutil.which("chromium") or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Debian's chromium is not installed and cannot be installed here (apt-get as root is needed): "
                    "apt-get install -y chromium")
    install = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium"
    proc = subprocess.run(["bash", "-c", install], capture_output=True, text=True, timeout=1200)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        pytest.skip(f"Debian's chromium could not be installed (apt-get exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return found


@pytest.fixture(scope="module")
def webui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``llamafactory-cli webui`` on 127.0.0.1 with cwd ``board/`` of a folder of the module's (its saves and cache
    live there): one start for the module's tests. The tests that only look (the stage box at each width) come first
    in the module: the run's test picks a model and the zh language last, which LlamaBoard keeps for the next page."""
    tmp_path = tmp_path_factory.mktemp("webui")
    workdir = tmp_path / "board"
    workdir.mkdir()
    port = free_port()
    env = offline_env(tmp_path, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                      GRADIO_ANALYTICS_ENABLED="False")
    log_path = tmp_path / "webui.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([CLI, "webui"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: the training job it starts goes too
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/config", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the web UI did not come up:\n{log_path.read_text(errors='replace')[-3000:]}")
        yield url, workdir
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _pick(page: Any, input_selector: str, option: str) -> None:
    """Choose ``option`` in a gradio dropdown (typing filters the list; then click the option). The input is checked
    through its element, not the selector: picking a language relabels the page, the Language box's aria-label too (a
    check through the selector waited for a box no longer so named, when the relabelling came first)."""
    box = page.locator(input_selector)
    box.click()
    element = box.element_handle()
    box.fill(option)
    page.locator(_option(option)).first.click()
    assert element.input_value() == option, (element.input_value(), option)


def _option(value: str) -> str:
    """Selector of a gradio dropdown's option."""
    return f"[data-testid='dropdown-option'][aria-label={json.dumps(value)}]"


def _labelled(label: str) -> str:
    """Selector of the gradio blocks labelled exactly ``label``."""
    return f"label:has([data-testid='block-info']:text-is({json.dumps(label)}))"


def _field(page: Any, label: str, tag: str = "textarea") -> Any:
    """The first (Train tab) textbox, or dropdown with ``tag="input"``, labelled exactly ``label``."""
    return page.locator(f"{_labelled(label)} {tag}").first


def _fill_the_run(page: Any, assets: TinyAssets) -> None:
    """Fill the form for the run, each field again where it lost its value. LlamaBoard answers some events outside
    its queue (the model name's fills the model path and template; the stage's empties the dataset); under CI's
    loaded cores such an answer came after the test had filled the field, and every Preview click then failed."""
    model_path = str(assets.models["qwen3_vl"])
    if _field(page, "Model path").input_value() != model_path:
        _field(page, "Model path").fill(model_path)
    if page.locator("input[aria-label='Chat template']").input_value() != assets.templates["qwen3_vl"]:
        _pick(page, "input[aria-label='Chat template']", assets.templates["qwen3_vl"])
    if _field(page, "Data dir").input_value() != str(assets.dataset_dir):
        _field(page, "Data dir").fill(str(assets.dataset_dir))
    if "hera_demo" not in _dataset_tokens(page):
        _field(page, "Dataset", "input").click()  # focus lists the datasets of the folder
        page.locator(_option("hera_demo")).first.click()
        page.keyboard.press("Escape")
    if page.locator("input[aria-label='Compute type']").input_value() != "fp32":
        _pick(page, "input[aria-label='Compute type']", "fp32")
    batch = page.locator("input[aria-label='number input for Batch size']").first
    batch.fill("8")
    batch.press("Enter")
    if not _field(page, "Extra arguments").is_visible():
        page.get_by_text("Extra configurations", exact=True).click()
    _field(page, "Extra arguments").fill(json.dumps(EXTRA_ARGS))
    page.locator("#train-hera_heads textarea").fill("L1H0, L1H2")
    page.locator("#train-hera_teacher textarea").fill(str(assets.teacher))
    page.locator("#train-hera_k input").fill("3")
    page.locator("#train-hera_k input").press("Tab")


def _dataset_tokens(page: Any) -> list[str]:
    """The datasets chosen in the Train tab's Dataset box."""
    return page.locator(f"{_labelled('Dataset')} .token span").all_inner_texts()


def _form_state(page: Any) -> str:
    """What the form held when no preview came, and the page's last text (LlamaBoard's alert is there)."""
    values = {"model path": _field(page, "Model path").input_value(),
              "template": page.locator("input[aria-label='Chat template']").input_value(),
              "data dir": _field(page, "Data dir").input_value(), "datasets": _dataset_tokens(page)}
    body = page.locator("body").inner_text()
    return f"{values}\n{body[-1500:]}"


def _orange_pixels(data_uri: str) -> int:
    """Pixels near matplotlib's C1 orange (#ff7f0e, hera_loss) in a plot image."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB")
    return sum(1 for r, g, b in image.getdata() if r > 200 and 90 < g < 170 and b < 90)


# A picked stage's text in the dropdown: (scroll width, client width) of the input, and where the text ends and where
# the dropdown's arrow begins (px from the window's left; the input's right padding edge without an arrow)
_SHOWN = """e => {
    const style = getComputedStyle(e), box = e.getBoundingClientRect();
    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = style.font;
    const arrow = e.closest('.wrap')?.querySelector('.dropdown-arrow, .icon-wrap');
    const limit = arrow ? arrow.getBoundingClientRect().left : box.right - parseFloat(style.paddingRight);
    return [e.scrollWidth, e.clientWidth, box.left + parseFloat(style.paddingLeft) + ctx.measureText(e.value).width,
            limit, !!arrow];
}"""


def _stage_box_report(page: Any, stage: str, labels: list[str]) -> dict[str, Any]:
    """For each stage label (the first the shortest), picked in turn: how its text sits in the box (:data:`_SHOWN`)
    and whether the box still holds it half a second later; then, with the list left open, its option's height in
    heights of the first name's option (1: on one line)."""
    report: dict[str, Any] = {}
    box = page.locator(stage)
    for label in labels:
        _pick(page, stage, label)
        report[label] = {"box": box.evaluate(_SHOWN)}
        page.wait_for_timeout(500)
        report[label]["kept"] = box.input_value()
    box.click()  # the open list, every option
    one_line = page.locator(_option(labels[0])).first.bounding_box()["height"]  # the shortest name
    for label in labels:
        height = page.locator(_option(label)).first.bounding_box()["height"]
        report[label]["option_lines"] = round(height / one_line, 2)
    return report


@pytest.mark.parametrize("width", [1600, 1280])
def test_the_stage_box_shows_the_methods_names_whole(webui: tuple[str, Path], tmp_path: Path,
                                                     width: int) -> None:
    """The Train tab's Stage dropdown shows each stage's full name, the methods' long ones included, in the box and in
    its list, at a desktop and a laptop width (a narrow box cuts the methods' names off). A screenshot of
    the Train tab's first row with the list open is left in the test's folder."""
    from llamafactory_hera.methods import declared_methods

    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install '.[test]'")
    url, _ = webui
    labels = [SFT_LABEL, *(method.label for method in declared_methods())]
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(90_000)  # LlamaBoard under a busy 2-core CI: 30 s timed out once
            page.goto(url)
            page.get_by_text("Ready.", exact=True).first.wait_for()
            block_id = page.locator("input[aria-label='Stage']").evaluate("e => e.closest('[id^=component-]').id")
            stage = f"#{block_id} input"
            # HeRA's name (the widest) picked last: the screenshot shows it in the box
            report = _stage_box_report(page, stage, [*sorted(set(labels) - {HERA_LABEL}, key=len), HERA_LABEL])
            boxes = [page.locator(_option(label)).first.bounding_box() for label in labels]
            boxes.append(page.locator(f"#{block_id}").bounding_box())
            top = max(0, min(b["y"] for b in boxes) - 10)
            bottom = max(b["y"] + b["height"] for b in boxes) + 10
            screenshot = tmp_path / f"llamaboard_stage_{width}.png"
            page.screenshot(path=str(screenshot), clip={"x": 0, "y": top, "width": width, "height": bottom - top})
            print(f"\nscreenshot: {screenshot}")
        finally:
            context.close()
    cut = {label: shown for label, shown in report.items()
           if shown["box"][0] > shown["box"][1] or shown["box"][2] > shown["box"][3]}
    assert all(shown["kept"] == label for label, shown in report.items()), report  # no event put another back
    assert cut == {}, f"stage names cut off at {width} px ([scroll, client width, text end, arrow start]): {cut}"
    assert all(shown["box"][4] for shown in report.values()), report  # the arrow was found: the check means it
    wrapped = {label: shown["option_lines"] for label, shown in report.items() if shown["option_lines"] > 1.2}
    assert wrapped == {}, f"stage names wrapped in the open list at {width} px (lines): {wrapped}"


def test_hera_run_from_the_browser(assets: TinyAssets, webui: tuple[str, Path], tmp_path: Path) -> None:
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install '.[test]'")
    url, workdir = webui
    started = time.time()
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000})
        try:
            page = context.new_page()
            page.set_default_timeout(90_000)  # LlamaBoard under a busy 2-core CI: 30 s timed out once
            page.goto(url)
            page.get_by_text("Ready.", exact=True).first.wait_for()  # LlamaBoard has loaded its texts
            block_id = page.locator("input[aria-label='Stage']").evaluate("e => e.closest('[id^=component-]').id")
            stage = f"#{block_id} input"  # the label changes with the language
            assert page.locator("#train-hera_tab").count() == 0 or not page.locator("#train-hera_tab").is_visible()

            # the model and its template
            _pick(page, "input[aria-label='Model name']", "Custom")
            _field(page, "Model path").fill(str(assets.models["qwen3_vl"]))
            _pick(page, "input[aria-label='Chat template']", assets.templates["qwen3_vl"])

            # HeRA: the panel appears with the paper's defaults
            _pick(page, stage, HERA_LABEL)
            panel = page.locator("#train-hera_tab")
            panel.wait_for(state="visible")
            assert "HeRA configurations" in panel.inner_text()
            defaults = {"hera_heads": "auto", "hera_teacher": "facebook/dinov2-large", "hera_k": "10",
                        "hera_lambda": "0.01", "hera_temperature": "0.07", "hera_pooling": "assistant"}
            for key, value in defaults.items():
                assert page.locator(f"#train-{key} textarea, #train-{key} input").first.input_value() == value, key
            assert "Heads to align" in panel.inner_text() and "Vision teacher" in panel.inner_text()

            # data and a short CPU run; the command preview carries the stage and the hera_* keys
            command = page.locator("code", has_text="llamafactory-cli train").first
            states = []
            for _ in range(3):
                _fill_the_run(page, assets)
                page.get_by_role("button", name="Preview command", exact=True).click()
                try:
                    command.wait_for(timeout=45_000)
                    break
                except sync_api.TimeoutError:
                    states.append(_form_state(page))
            else:
                pytest.fail("no command preview after 3 clicks; the form at each:\n" + "\n".join(states))
            preview = command.inner_text()
            for expected in ("--stage hera", "--hera_heads L1H0,L1H2", f"--hera_teacher {assets.teacher}",
                             "--hera_k 3", "--hera_lambda 0.01", "--hera_temperature 0.07",
                             "--hera_pooling assistant", "--per_device_train_batch_size 8"):
                assert expected in preview, (expected, preview)

            # Start: the run finishes and the loss plot shows hera_loss beside the loss
            page.get_by_role("button", name="Start", exact=True).click()
            deadline, state = time.time() + 180, ""
            while time.time() < deadline:
                text = page.locator("body").inner_text()
                if "Finished." in text or "Failed." in text:
                    state = "Failed." if "Failed." in text else "Finished."
                    break
                time.sleep(1)
            runs = sorted((workdir / "saves" / "Custom" / "lora").glob("train_*"))
            assert len(runs) == 1, runs
            run = runs[0]
            log_lines = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()] \
                if (run / "trainer_log.jsonl").is_file() else []
            assert state == "Finished.", f"{state or 'timeout'}\n{page.locator('body').inner_text()[-3000:]}"
            assert [line["current_steps"] for line in log_lines if "loss" in line] == list(range(1, STEPS + 1))
            assert all("hera_loss" in line for line in log_lines if "loss" in line)
            plot = page.locator("[data-testid='block-label']:text-is('Loss')").first.locator(
                "xpath=ancestor::div[contains(concat(' ', @class, ' '), ' block ')][1]").locator("img").first
            src = plot.get_attribute("src")
            assert _orange_pixels(src) > 200, "no hera_loss trace in the loss plot"

            # the saved run config and the command that ran
            args = yaml.safe_load((run / "training_args.yaml").read_text())
            assert args["stage"] == "hera" and args["hera_heads"] == "L1H0,L1H2" and args["hera_k"] == 3
            board_config = yaml.safe_load((run / "llamaboard_config.yaml").read_text())
            assert board_config["train.training_stage"] == HERA_LABEL
            assert board_config["train.hera_heads"] == "L1H0, L1H2" and board_config["train.hera_k"] == 3
            assert (run / "hera_run.json").is_file()

            screenshot = tmp_path / "llamaboard_hera.png"
            page.get_by_text("Extra configurations", exact=True).click()  # fold it again: panel and plot in view
            page.evaluate("window.scrollTo(0, 0)")
            time.sleep(0.5)
            bottom = max(box["y"] + box["height"] for box in (plot.bounding_box(), panel.bounding_box()))
            page.screenshot(path=str(screenshot), full_page=True,
                            clip={"x": 0, "y": 0, "width": 1600, "height": bottom + 40})
            print(f"\nscreenshot: {screenshot}  (browser part {time.time() - started:.0f}s)")

            # the panel speaks the UI's languages
            _pick(page, "input[aria-label='Language']", "zh")
            page.locator("#train-hera_tab", has_text="HeRA 参数设置").wait_for()
            assert "对齐的注意力头" in panel.inner_text() and "视觉教师模型" in panel.inner_text()

            # back to a stock stage: the panel goes away
            _pick(page, stage, SFT_LABEL)
            panel.wait_for(state="hidden")
        finally:
            context.close()
