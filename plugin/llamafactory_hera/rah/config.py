"""``RahArguments``: every ``rah_*`` key of ``stage: rah`` with help text, the paper's default (§3.6) and checks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.recipe.keys import fail, parse_keys, recipe_key
from llamafactory_hera.runtime.errors import RecipeError

AUTO = "auto"


@dataclass
class RahArguments:
    """Settings of RAH-LoRA (paper defaults)."""

    rah_layers: str | list[int] = recipe_key(
        AUTO,
        "Decoder layers to calibrate: auto (the first half, paper: 0-15 of 32), a range such as 0-15, or a list "
        "such as [0, 2, 4]; zero-based.",
    )
    rah_isal_percentile: float = recipe_key(
        15.0,
        "Targets have standardised I-SAL below this percentile of their layer (paper: 15).",
        min_exclusive=0.0,
        max_exclusive=100.0,
    )
    rah_caf_percentile: float = recipe_key(
        70.0, "... and CAF above this percentile of their layer (paper: 70).", min=0.0, max_exclusive=100.0
    )
    rah_num_anchors: int = recipe_key(3, "Anchors per target, most similar first (paper: 3).", min=1)
    rah_rank: int = recipe_key(8, "Rank r of each head's update (paper text: 8; its Table 3 caption says 4).", min=1)
    rah_delta: float = recipe_key(
        0.05,
        "Trust region: largest mean KL(p || p') on the probe batch a head's update may cause (paper: 0.05).",
        min_exclusive=0.0,
    )
    rah_alpha_max: float = recipe_key(
        0.15,
        "Largest step alpha towards the anchors (paper: 0.15); halved until the KL fits.",
        min_exclusive=0.0,
        max=1.0,
    )
    rah_halvings: int = recipe_key(5, "Halvings of alpha before a head is rolled back (paper: 3-5).", min=0)
    rah_samples: int = recipe_key(
        100, "Unlabelled image-text rows for I-SAL and the attention maps (paper: ~100).", min=1
    )
    rah_probe_samples: int = recipe_key(32, "Rows for CAF's gate gradients (paper: 32).", min=1)
    rah_kl_samples: int = recipe_key(
        8, "Rows of the trust region's KL probe (not given by the paper; the authors' script: 1).", min=1
    )
    rah_rho: float = recipe_key(
        0.6, "Similarity = rho * attention-map cosine + (1 - rho) * weight cosine (paper: 0.6).", min=0.0, max=1.0
    )
    rah_w_v: float = recipe_key(
        0.7,
        "Weight of the V-slice cosine in the weight similarity (paper: 0.7; w_O = 1 - w_V = 0.3).",
        min=0.0,
        max=1.0,
    )
    rah_adjacent_layers: int = recipe_key(
        2,
        "A target whose own layer has no anchor takes them from the nearest calibrated layers within this distance, "
        "+-1 first (paper: adjacent layers, +-1-2); 0: same layer only.",
        min=0,
    )
    rah_trim: float = recipe_key(
        0.1,
        "Element-wise trimmed mean of the anchors' slices (paper: 0.1; with 3 anchors nothing is trimmed).",
        min=0.0,
        max_exclusive=0.5,
    )
    rah_beta: float = recipe_key(
        0.25,
        "Anchors have standardised I-SAL above beta (Eq. 8's mu + beta sigma on the standardised scale; beta is "
        "not given: 0.25, about the 60th percentile, as the authors' script).",
    )
    rah_caf_form: str = recipe_key(
        "magnitude",
        "magnitude: z(|mean g|) + w z(mean g^2) (default: the size of a head's influence); paper: Eq. 5 "
        "as printed, mean g + w mean g^2.",
        choices=("magnitude", "paper"),
    )
    rah_caf_weight: float = recipe_key(
        0.25,
        "w of the squared-gradient term of CAF (the paper's lambda is not given; 0.25 as the authors' script).",
        min=0.0,
    )
    rah_isal_pairs: str = recipe_key(
        "paper",
        "paper: text->image mean over every text query (Eq. 3, and the maps of Eq. 10); visible: only text "
        "after the image.",
        choices=("paper", "visible"),
    )
    rah_update: str = recipe_key(
        AUTO,
        "Projections to update: auto (V and O under MHA, O only under GQA, where V rows are shared), vo, o, v.",
        choices=(AUTO, "vo", "o", "v"),
    )
    rah_batch_size: int = recipe_key(
        1, "Rows per I-SAL forward (attention weights of every layer are kept: ~1 GB per 7B sample in bf16).", min=1
    )

    def layer_list(self, num_layers: int, calibratable: list[int] | None = None) -> list[int]:
        """Layers to calibrate of ``num_layers``, of which ``calibratable`` (default: all) have heads with their own V
        and O: ``auto`` is the first half of those (at least one)."""
        if self.rah_layers == AUTO:
            usable = list(range(num_layers)) if calibratable is None else list(calibratable)
            return usable[: max(1, len(usable) // 2)]
        layers = list(self.rah_layers)
        outside = [layer for layer in layers if layer >= num_layers]
        if outside:
            raise RecipeError(
                f"rah_layers: {outside} outside the model, which has decoder layers 0..{num_layers - 1} "
                "(zero-based). Use auto or a range within them."
            )
        return layers


def _coerce_layers(key: str, value: Any) -> str | list[int]:
    if isinstance(value, str):
        text = value.strip().strip("[]").strip()
        if text.lower() == AUTO:
            return AUTO
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
        if match:
            first = int(match.group(1))
            last = int(match.group(2))
            if first > last:
                raise fail(key, value, "a range runs from low to high, e.g. 0-15.")
            return list(range(first, last + 1))
        items: list[Any] = [t.strip() for t in text.split(",") if t.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise fail(key, value, "expected auto, a range such as 0-15, or a list such as [0, 2, 4].")
    try:
        layers = [int(str(item)) for item in items]
    except ValueError:
        raise fail(key, value, "expected auto, a range such as 0-15, or a list of whole numbers.") from None
    if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
        raise fail(key, value, "list each layer once, zero-based, e.g. [0, 2, 4].")
    return sorted(layers)


def parse_rah_arguments(raw: dict[str, Any]) -> RahArguments:
    rest = {key: value for key, value in raw.items() if key != "rah_layers"}
    args = parse_keys(RahArguments, rest, "RAH-LoRA")
    if "rah_layers" in raw:  # auto, a range or a list: a grammar of its own, parsed here
        args.rah_layers = _coerce_layers("rah_layers", raw["rah_layers"])
    probes = max(args.rah_probe_samples, args.rah_kl_samples)
    if args.rah_samples < probes:
        raise fail(
            "rah_samples",
            args.rah_samples,
            f"the CAF and KL probes (rah_probe_samples: "
            f"{args.rah_probe_samples}, rah_kl_samples: {args.rah_kl_samples}) are drawn from the calibration "
            f"rows, so at least {probes} are needed. Raise rah_samples or lower those keys.",
        )
    return args
