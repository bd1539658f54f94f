"""What a RAH-LoRA run reports: ``rah_profile.json`` (every head's scores, the targets with their anchors, alpha and
KL, rollbacks, settings, identity, versions, duration) and ``rah_profile.png`` (I-SAL and CAF, layers x heads,
targets boxed as in the paper's Figure 3)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llamafactory_hera.rah.args import RahArguments
from llamafactory_hera.rah.calibrate import Calibration

RECORD_VERSION = 2  # 2: anchors may come from adjacent layers, outcome "unchanged", map layouts


def _table(values: Any, layers: list[int]) -> dict[str, list[float]]:
    return {f"L{layer}": [round(float(v), 6) for v in row] for layer, row in zip(layers, values, strict=True)}


def reported_kl(kl: float | None) -> float | None:
    """A measured mean KL as reported: KL >= 0, so float32 noise below 0 (e.g. -2e-8) is shown as 0."""
    return None if kl is None else max(0.0, float(kl))


def settings_record(args: RahArguments, layers: list[int]) -> dict[str, Any]:
    """The profile's ``settings``: the ``rah_*`` values without the prefix, on the calibrated ``layers``, with
    ``w_o = 1 - w_v``."""
    values = {key.removeprefix("rah_"): value for key, value in args.to_dict().items()}
    return {**values, "layers": list(layers), "w_o": 1.0 - args.rah_w_v}


def profile_record(calibration: Calibration, args: RahArguments, identity: dict[str, Any],
                   versions: dict[str, str], duration: dict[str, float]) -> dict[str, Any]:
    """The JSON-ready record of a calibration."""
    targets = []
    for update in calibration.updates:
        region = update.region
        targets.append({
            "head": f"L{update.layer}H{update.head}",
            "anchors": [{"head": f"L{layer}H{head}", "similarity": round(score, 6)}
                        for layer, head, score in update.anchors],
            "anchor_distance": update.anchor_distance,
            "alpha": region.alpha if region else 0.0,
            "kl": reported_kl(region.kl) if region else None,
            "tried": [{"alpha": a, "kl": reported_kl(kl)} for a, kl in region.tried] if region else [],
            "outcome": update.outcome,
            "modules": list(calibration.modules),
        })

    def count(outcome: str) -> int:
        return sum(1 for t in targets if t["outcome"] == outcome)

    return {
        "record_version": RECORD_VERSION, "stage": "rah", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "layers": calibration.layers, "isal": _table(calibration.isal, calibration.layers),
        "isal_standardised": _table(calibration.isal_std, calibration.layers),
        "caf": _table(calibration.caf, calibration.layers), "targets": targets,
        "summary": {"targets": len(targets), "calibrated": count("calibrated"), "rolled_back": count("rolled back"),
                    "without_anchor": count("no anchor"), "unchanged_in_model_dtype": count("unchanged"),
                    "anchors_from_adjacent_layers": sum(1 for u in calibration.updates if u.anchor_distance),
                    "kl_to_original": reported_kl(calibration.kl_to_original),
                    "samples_scored_on_one_half": calibration.one_sided_samples,
                    "samples_without_a_map": calibration.maps_skipped, "map_layouts": calibration.map_layouts},
        "settings": settings_record(args, calibration.layers), "identity": identity, "versions": versions,
        "duration": duration,
    }


def plot_profile(calibration: Calibration, path: Path, model_name: str) -> Path:
    """I-SAL (standardised) and CAF heatmaps, calibrated targets boxed red, the others (rolled back, unchanged,
    without anchors) black, as the legend says; the title names the run (``path``'s folder)."""
    from llamafactory_hera.anatomy.head_plots import plot_score_panels

    calibrated = [(u.layer, u.head) for u in calibration.updates if u.calibrated]
    others = [(u.layer, u.head) for u in calibration.updates if (u.layer, u.head) not in calibrated]
    title = (f"{Path(path).parent.name} (stage: rah): head profile of {Path(model_name).name}, {len(calibrated)} of "
             f"{len(calibrated) + len(others)} targets calibrated")
    return plot_score_panels([(calibration.isal_std.numpy(), "I-SAL (standardised)"), (calibration.caf.numpy(), "CAF")],
                             calibration.layers, calibrated, others, path, title,
                             box_labels=("calibrated targets", "other targets (rolled back, unchanged or without "
                                                               "anchors)"))
