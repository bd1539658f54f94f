"""``HeraArguments``: every ``hera_*`` recipe key with help, paper default and checks; what a HeRA run logs and
plots; ``select``'s recipe-backed options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llamafactory_hera.heads.geometry import HeadRef, head_names, parse_head
from llamafactory_hera.plots.training import Panel, TrainingPlot
from llamafactory_hera.recipe.keys import fail, parse_keys, recipe_key, save_on_signal_key, watchdog_key
from llamafactory_hera.runtime.errors import RecipeError

AUTO = "auto"
STRATEGIES = ("worst", "best", "random")
MODES = ("text", "multimodal")
DTYPES = ("float32", "bfloat16", "float16")

# (flag, type, recipe key, help): options falling back to the keys hera_heads: auto reads
RECIPE_BACKED: tuple[tuple[str, type, str, str], ...] = (
    ("--samples", int, "hera_select_samples", "image-caption pairs to score on"),
    ("--heads", int, "hera_select_num_heads", "number of heads to choose"),
    ("--strategy", str, "hera_select_strategy", "worst: least aligned (paper); best / random: ablations"),
    (
        "--mode",
        str,
        "hera_select_mode",
        "text: captions alone through the language model (paper); multimodal: image + caption through the MLLM",
    ),
    (
        "--clamp",
        float,
        "hera_select_clamp",
        "PRH's outlier clamp: feature values clamped at this quantile of |value| "
        "before normalising, both sides; 0 turns it off",
    ),
    ("--batch-size", int, "hera_select_batch_size", "forward batch size"),
    ("--k", int, "hera_k", "neighbours for MKNN"),
    ("--teacher", str, "hera_teacher", "vision teacher"),
)


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


@dataclass
class HeraArguments:
    """Settings of the HeRA objective (paper defaults)."""

    # parsed (parse_hera_arguments): the HeadRefs in recipe order, or auto until the selection resolves it
    hera_heads: list[HeadRef] | str = field(
        default_factory=list,
        metadata={
            "help": "Heads to align, zero-based, e.g. [L13H12, L7H6] (a comma-separated string works too), or "
            "auto: select them by MKNN at the start of training (hera_select_* keys). Required with stage: "
            "hera. `llamafactory-hera select RECIPE` writes them into the recipe."
        },
    )
    hera_teacher: str = recipe_key(
        "facebook/dinov2-large",
        "Frozen vision teacher: any Hugging Face vision model id or local path (paper: DINOv2-L).",
    )
    hera_teacher_feature: str = recipe_key(
        "cls",
        "Teacher feature per image: 'cls' (the family's own pooled image feature: DINOv2's last-layer [CLS], "
        "paper; CLIP's post-layernorm [CLS]; SigLIP's attention-pool head) or 'mean' (mean of the last layer's patch "
        "tokens).",
        choices=("cls", "mean"),
    )
    hera_k: int = recipe_key(10, "Teacher nearest neighbours used as positives per sample (paper: 10).", min=1)
    hera_lambda: float = recipe_key(
        0.01, "Weight of the HeRA term: loss = lm_loss + lambda * hera_loss (paper: 0.01).", min=0.0
    )
    hera_temperature: float = recipe_key(
        0.07,
        "Initial InfoNCE temperature tau (paper: 0.07); tau is clamped to [0.01, 100] where used (CLIP caps "
        "1/tau at 100).",
        min=0.01,
        max=100.0,
    )
    hera_learn_temperature: bool = recipe_key(
        True, "Learn tau in log space with its own optimizer group (paper); false freezes it."
    )
    hera_temperature_lr: float | None = recipe_key(
        1e-3,
        "Learning rate of log(tau) (Adam moves log tau by about this much per step; null: the run's "
        "learning_rate, with which tau barely leaves its start).",
        min_exclusive=0.0,
    )
    hera_teacher_cache: bool = recipe_key(
        True,
        "Cache each image's teacher feature (CPU, float32: 4 KB per image for DINOv2-L) so epochs after the "
        "first run no teacher forward; false recomputes every step.",
    )
    hera_teacher_precompute: str = recipe_key(
        "auto",
        "Compute every training image's teacher feature in one pass before the first step (split over the "
        "ranks), then move the teacher off the GPU: the steps hold no teacher weights (DINOv2-L: 1.2 GB in float32) "
        "and run no teacher forward. Same features as computing them in the steps. auto: on when hera_teacher_cache is "
        "on and the run covers the whole training set; true; false.",
        choices=("auto", "true", "false"),
    )
    hera_gather: bool = recipe_key(
        True,
        "With several data-parallel processes, take neighbours and negatives from the whole global batch "
        "(differentiable all-gather; the paper's batches were global). false: per device.",
    )
    hera_queue_size: str = recipe_key(
        "auto",
        "Queue of recent teacher features and detached head representations that extends the contrastive set: "
        "auto (a queue of 4*(hera_k+1) samples when the configured batch geometry, per_device_train_batch_size x "
        "gathered processes, gives fewer than hera_k+1 samples; decided once at the start), 0 (off) or a number of "
        "samples.",
    )
    hera_similarity: str = recipe_key(
        "cosine",
        "Student similarity: 'cosine' (L2-normalised, default) or 'dot' (raw dot product).",
        choices=("cosine", "dot"),
    )
    hera_pooling: str = recipe_key(
        "assistant",
        "Tokens averaged into a head's representation: 'assistant' (tokens with a label, paper's stage 2; "
        "the caption when it is the response) or 'text' (every attended token after the sample's first image); never a "
        "multimodal placeholder nor anything before the first image.",
        choices=("assistant", "text"),
    )

    hera_select_samples: int = recipe_key(
        1000, "With hera_heads: auto, image-caption pairs used to score the heads (paper: 1000).", min=2
    )
    hera_select_num_heads: int = recipe_key(5, "With hera_heads: auto, number of heads to align (paper: 5).", min=1)
    hera_select_strategy: str = recipe_key(
        "worst",
        "With hera_heads: auto, which heads: 'worst' (least MKNN-aligned, paper), 'best' or 'random' (ablations).",
        choices=STRATEGIES,
    )
    hera_select_mode: str = recipe_key(
        "text",
        "With hera_heads: auto, 'text' (captions alone through the language model, paper) or 'multimodal' "
        "(image + caption through the MLLM).",
        choices=MODES,
    )
    hera_select_clamp: float = recipe_key(
        0.95,
        "With hera_heads: auto (and `llamafactory-hera select`), clamp every feature value at this quantile of "
        "|value| before normalising, on both sides, as the Platonic Representation Hypothesis code does (0.95); 0 "
        "turns the clamp off.",
        min=0.0,
        max=1.0,
    )
    hera_select_batch_size: int = recipe_key(
        16, "With hera_heads: auto, batch size of the scoring forward passes.", min=1
    )
    hera_monitor_steps: int | None = recipe_key(
        None,
        "Score the aligned heads' MKNN with the teacher on a fixed probe set every this many optimizer steps "
        "(logged as hera_mknn, hera_mknn/L<l>H<h> and hera_mknn_control, a mean of as many unaligned heads of the same "
        "layers), scored as `llamafactory-hera select` scores (hera_select_mode, hera_select_clamp, hera_k, "
        "hera_select_batch_size), and at step 0. null: at step 0 and 10 evenly spaced steps, the last at the last "
        "step; 0: off.",
        min=0,
    )
    hera_monitor_pairs: int = recipe_key(
        256,
        "Image-caption pairs in the monitor's probe set: held-out rows (eval_dataset or val_size) when there are "
        "any, else a fixed sample of training rows.",
        min=2,
    )
    hera_save_on_signal: str = save_on_signal_key()
    hera_watchdog_timeout: float | None = watchdog_key()

    @property
    def auto_heads(self) -> bool:
        return self.hera_heads == AUTO

    def recipe_keys(self) -> dict[str, Any]:
        """The keys as a recipe writes them, for ``hera_run.json`` and ``hera_state.json``."""
        keys = asdict(self)
        if not self.auto_heads:
            keys["hera_heads"] = head_names(self.hera_heads)
        return keys


def _coerce_heads(key: str, value: Any) -> list[HeadRef] | str:
    """``auto``, or the heads in recipe order, each once."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        if text.lower() == AUTO:
            return AUTO
        items = [t for t in (p.strip().strip("'\"") for p in text.split(",")) if t]
    elif isinstance(value, list | tuple):
        items = [str(v).strip() for v in value]
    else:
        raise fail(key, value, "expected a list of heads such as [L13H12, L7H6].")
    if not items:
        raise fail(key, value, "list at least one head, e.g. [L13H12, L7H6] (zero-based).")
    refs = []
    for item in items:
        try:
            refs.append(parse_head(item))
        except ValueError as err:
            raise RecipeError(f"{key}: {err}") from None
    duplicates = sorted({str(r) for r in refs if refs.count(r) > 1})
    if duplicates:
        raise fail(key, value, f"each head may appear once; repeated: {', '.join(duplicates)}.")
    return refs


def _coerce_queue_size(key: str, value: Any) -> str:
    text = str(value).strip().lower()
    if text != AUTO and not text.isdigit():
        raise fail(key, value, "allowed values are auto or a whole number >= 0.")
    return text


# keys of a grammar of their own (auto or a list of heads; auto or a count): parsed here, not by the one parser
OWN_GRAMMAR = ("hera_heads", "hera_queue_size")


def parse_hera_arguments(raw: dict[str, Any], require_heads: bool = True) -> HeraArguments:
    """Validated :class:`HeraArguments` from ``hera_*`` keys (typed or strings)."""
    rest = {key: value for key, value in raw.items() if key not in OWN_GRAMMAR}
    args = parse_keys(HeraArguments, rest, "HeRA")
    if "hera_heads" in raw:
        args.hera_heads = _coerce_heads("hera_heads", raw["hera_heads"])
    if "hera_queue_size" in raw:
        args.hera_queue_size = _coerce_queue_size("hera_queue_size", raw["hera_queue_size"])
    if args.hera_teacher_precompute == "true" and not args.hera_teacher_cache:
        raise RecipeError(
            "hera_teacher_precompute: got true with hera_teacher_cache: false; the precomputed features "
            "are kept in the teacher cache. Set hera_teacher_cache: true, or hera_teacher_precompute: "
            "auto / false."
        )
    if args.hera_monitor_steps != 0 and args.hera_monitor_pairs < args.hera_k + 1:
        raise RecipeError(
            f"hera_monitor_pairs: got {args.hera_monitor_pairs}; the monitor's MKNN with hera_k="
            f"{args.hera_k} needs at least {args.hera_k + 1} pairs. Raise it, lower hera_k, or set "
            "hera_monitor_steps: 0."
        )
    if require_heads and not args.hera_heads:
        raise RecipeError(
            "hera_heads: missing; stage: hera needs the heads to align, e.g. hera_heads: [L13H12, L7H6] "
            "(zero-based; choose them with `llamafactory-hera select`)."
        )
    return args


HERA_RUN_RECORD = "hera_run.json"  # in output_dir; read by `select --report`, `eval`

# metrics logged next to LLaMA-Factory's ("hera_mknn/": the monitor's per-head keys, hera_mknn/L<l>H<h>)
LOG_KEYS = (
    "lm_loss",
    "hera_loss",
    "hera_weighted_loss",
    "hera_temperature",
    "hera_image_samples",
    "hera_text_only_samples",
    "hera_batches_without_term",
    "hera_nonfinite_skipped",
    "hera_queue_size",
    "hera_mknn",
    "hera_mknn/",
    "hera_mknn_control",
)

# the monitor's series, when logged, in training.png and LlamaBoard's loss plot (webui_panel)
ALIGNMENT_PANEL = Panel(
    "alignment with the teacher (MKNN)",
    "MKNN",
    ("hera_mknn", "hera_mknn_control"),
    labels={
        "hera_mknn": "aligned heads (mean)",
        "hera_mknn_control": "control heads (mean)",
        "hera_mknn/": "each aligned head",
    },
    prefix="hera_mknn/",
    ylim=(0.0, 1.0),
)
# training.png: the HeRA term beside the losses, the learned temperature, the alignment panel
TRAINING_PLOT = TrainingPlot(
    terms=("hera_loss",),
    terms_label="HeRA loss (InfoNCE)",
    losses=("loss", "lm_loss"),
    panels=(Panel("learned temperature", "temperature (tau)", ("hera_temperature",)), ALIGNMENT_PANEL),
)
