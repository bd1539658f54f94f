"""``HarcArguments``: every ``harc_*`` key of ``stage: harc``, and what a run logs and plots.

Defaults are the authors' (``microsoft/HARC`` ``main/configs/*.yaml``, which win over the code's, e.g. margin 0.5).
Step counts are **optimizer steps**: the reference counts micro-steps at gradient accumulation 2, so its refresh every
200 micro-steps is 100 here and its ramp at 1000 is 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory_hera.plots.training import TrainingPlot
from llamafactory_hera.recipe.keys import parse_keys, recipe_key, save_on_signal_key, watchdog_key
from llamafactory_hera.runtime.errors import RecipeError

ROLE_KEYS = ("harc_harmful", "harc_harmless", "harc_pseudo", "harc_harmful_completions")


@dataclass
class HarcArguments:
    """Settings of HARC (reference defaults)."""

    harc_harmful: str = recipe_key(
        "",
        "Dataset (a name in dataset_dir's dataset_info.json) of harmful prompts with refusal responses: the CE "
        "target and the coupled rows. Required.",
        dataset=True,
    )
    harc_harmless: str = recipe_key(
        "",
        "Dataset of harmless prompts with helpful responses: retained (KL to the adapter-free model) and "
        "decoupled. Required.",
        dataset=True,
    )
    harc_pseudo: str = recipe_key(
        "",
        "Dataset of benign prompts that look harmful, with compliant answers (e.g. XSTest): retained like the "
        "harmless rows. Required unless harc_batch_pseudo is 0.",
        dataset=True,
    )
    harc_harmful_completions: str = recipe_key(
        "",
        "Dataset of harmful prompts with harmful completions, used only for the response-side harmfulness "
        "direction. Without it response coupling is off (with a warning).",
        dataset=True,
    )
    harc_extract_harmful: str = recipe_key(
        "",
        "Optional dataset whose prompts give the prompt-side harmful mean instead of harc_harmful's held-out rows "
        "(the reference's Qwen config: AdvBench).",
        dataset=True,
    )
    harc_extract_harmless: str = recipe_key(
        "",
        "Optional dataset whose prompts give the prompt-side harmless mean instead of harc_harmless's held-out "
        "rows (the reference's Qwen config: Alpaca).",
        dataset=True,
    )
    harc_extract_samples: int = recipe_key(
        300, "Rows per role held out to extract the directions (reference: 300).", min=2
    )
    harc_validate_samples: int = recipe_key(
        100,
        "Harmful and harmless rows held out for the diagnostics and the refusal evaluation (reference: 100).",
        min=1,
    )
    harc_batch_harmful: int = recipe_key(6, "Harmful rows per micro-batch (reference: 6).", min=1)
    harc_batch_harmless: int = recipe_key(4, "Harmless rows per micro-batch (reference: 4).", min=0)
    harc_batch_pseudo: int = recipe_key(2, "Pseudo-harmful rows per micro-batch (reference: 2).", min=0)
    harc_margin: float = recipe_key(
        0.5,
        "Margin m of the coupling: harmful rows are pushed to cosine >= m with the directions (reference configs: "
        "0.5; the code's default 0.3).",
        min=0.0,
        max=1.0,
    )
    harc_weight_couple: float = recipe_key(1.0, "Weight of the prompt-side coupling (1).", min=0.0)
    harc_weight_couple_resp: float = recipe_key(1.0, "Weight of the response-side coupling (1).", min=0.0)
    harc_weight_kl: float = recipe_key(
        10.0, "Weight of KL(adapter-free || current) on the retain rows' response tokens (10).", min=0.0
    )
    harc_weight_ce: float = recipe_key(1.0, "Weight of the cross-entropy on the harmful rows' refusals (1).", min=0.0)
    harc_response_tokens: int = recipe_key(
        32, "Response tokens pooled for the response-side coupling and directions (reference: 32).", min=1
    )
    harc_refresh_steps: int = recipe_key(
        100,
        "Optimizer steps between re-extractions of the directions on the current model (0: never). Reference: "
        "every 200 micro-steps at gradient accumulation 2 = 100.",
        min=0,
    )
    harc_refresh_beta: float = recipe_key(
        0.3,
        "Weight of the fresh directions in the blend normalize((1 - beta) base + beta fresh) (0.3).",
        min=0.0,
        max=1.0,
    )
    harc_layers: int = recipe_key(2, "Layers coupled at the start (reference: 2).", min=1)
    harc_layers_final: int = recipe_key(4, "Layers coupled from harc_layers_ramp_step on (reference: 4).", min=1)
    harc_layers_ramp_step: int = recipe_key(
        500, "Optimizer step at which harc_layers_final layers are chosen (reference: micro-step 1000 = 500).", min=0
    )
    harc_band: int = recipe_key(
        4, "Layers are chosen within [band, n - band] of the n decoder layers (reference: 4).", min=0
    )
    harc_max_length: int = recipe_key(
        256,
        "Longest prompt (cut on the left) and longest answer (cut on the right, then closed with the template's "
        "closing tokens), in tokens (256). cutoff_len is not used.",
        min=8,
    )
    harc_extract_batch_size: int = recipe_key(8, "Rows per forward when extracting (8).", min=1)
    harc_eval: bool = recipe_key(
        True,
        "At the end, generate answers to the held-out harmful prompts and to pseudo-harmful prompts and report "
        "the refusal rates (harc_eval.json).",
    )
    harc_eval_max_new_tokens: int = recipe_key(
        64, "Tokens generated per prompt for the refusal evaluation (greedy).", min=1
    )
    harc_save_on_signal: str = save_on_signal_key()
    harc_watchdog_timeout: float | None = watchdog_key()

    @property
    def response_coupling(self) -> bool:
        return bool(self.harc_harmful_completions)


def moving_weights(args: HarcArguments) -> dict[str, float]:
    """Weights of the terms that can move a fresh adapter (the KL cannot: see harc/raw_checks.py)."""
    weights = {"harc_weight_couple": args.harc_weight_couple}
    if args.response_coupling:  # without harmful completions the response-side term is always 0
        weights["harc_weight_couple_resp"] = args.harc_weight_couple_resp
    return {**weights, "harc_weight_ce": args.harc_weight_ce}


def parse_harc_arguments(raw: dict[str, Any]) -> HarcArguments:
    """Validated :class:`HarcArguments` from ``harc_*`` keys, checked against each other."""
    args = parse_keys(HarcArguments, raw, "HARC")
    if not args.harc_harmful:
        raise RecipeError(
            "harc_harmful: missing. stage: harc needs a dataset of harmful prompts with refusal "
            "responses (a name in dataset_info.json); `llamafactory-hera harc-data` writes one."
        )
    if not args.harc_harmless:
        raise RecipeError(
            "harc_harmless: missing. stage: harc needs a dataset of harmless prompts with helpful "
            "responses (a name in dataset_info.json); `llamafactory-hera harc-data` writes one."
        )
    if args.harc_batch_pseudo > 0 and not args.harc_pseudo:
        raise RecipeError(
            f"harc_pseudo: missing while harc_batch_pseudo is {args.harc_batch_pseudo}. Name a dataset "
            "of pseudo-harmful prompts with compliant answers, or set harc_batch_pseudo: 0."
        )
    if args.harc_batch_harmless + args.harc_batch_pseudo == 0:
        raise RecipeError(
            "harc_batch_harmless and harc_batch_pseudo are both 0: every micro-batch needs retain rows "
            "(the KL and the decoupling). Set harc_batch_harmless: 4 (reference)."
        )
    if not any(moving_weights(args).values()) and not args.harc_weight_kl:
        keys = ", ".join(f"{key}: {value:g}" for key, value in {**moving_weights(args), "harc_weight_kl": 0}.items())
        off = "" if args.response_coupling else " (harc_weight_couple_resp counts only with harc_harmful_completions)"
        raise RecipeError(
            f"{keys}: every loss term is weighted 0{off}, so nothing would train. Set "
            "harc_weight_couple: 1, harc_weight_kl: 10 and harc_weight_ce: 1 (reference)."
        )
    if args.harc_layers_final < args.harc_layers:
        raise RecipeError(
            f"harc_layers_final: {args.harc_layers_final} is fewer than harc_layers: "
            f"{args.harc_layers}; the ramp adds layers. Set harc_layers_final >= harc_layers."
        )
    return args


# logged every step next to LLaMA-Factory's loss (trainer_log.jsonl, LlamaBoard, the curves)
LOG_KEYS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce", "harc_layers")

# training.png: loss and CE (same scale) on the left axis, coupling and KL (10x smaller) on the right
TRAINING_PLOT = TrainingPlot(
    terms=("harc_couple", "harc_couple_resp", "harc_kl"),
    losses=("loss", "harc_ce"),
    terms_label="HARC coupling and KL terms",
)
