"""What a RAH-LoRA run reports: ``rah_profile.json`` (every head's scores, the targets with their anchors, alpha and
KL, rollbacks, settings, identity, versions, duration) and ``rah_profile.png`` (I-SAL and CAF, layers x heads,
targets boxed as in the paper's Figure 3)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llamafactory_hera.rah.calibrate import Calibration, RahSettings

RECORD_VERSION = 1


def _table(values: Any, layers: list[int]) -> dict[str, list[float]]:
    return {f"L{layer}": [round(float(v), 6) for v in row] for layer, row in zip(layers, values, strict=True)}


def profile_record(calibration: Calibration, settings: RahSettings, identity: dict[str, Any],
                   versions: dict[str, str], duration: dict[str, float]) -> dict[str, Any]:
    """The JSON-ready record of a calibration."""
    targets = []
    for update in calibration.updates:
        region = update.region
        targets.append({
            "head": f"L{update.layer}H{update.head}",
            "anchors": [{"head": f"L{update.layer}H{head}", "similarity": round(score, 6)}
                        for head, score in update.anchors],
            "alpha": region.alpha if region else 0.0,
            "kl": region.kl if region else None,
            "tried": [{"alpha": a, "kl": kl} for a, kl in region.tried] if region else [],
            "outcome": "no anchor" if region is None else "rounds to zero" if region.rounds_to_zero
            else "rolled back" if region.rolled_back else "calibrated",
            "modules": list(calibration.modules),
        })
    calibrated = sum(1 for t in targets if t["outcome"] == "calibrated")
    return {
        "record_version": RECORD_VERSION, "stage": "rah", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "layers": calibration.layers, "isal": _table(calibration.isal, calibration.layers),
        "isal_standardised": _table(calibration.isal_std, calibration.layers),
        "caf": _table(calibration.caf, calibration.layers), "targets": targets,
        "summary": {"targets": len(targets), "calibrated": calibrated,
                    "rolled_back": sum(1 for t in targets if t["outcome"] == "rolled back"),
                    "without_anchor": sum(1 for t in targets if t["outcome"] == "no anchor"),
                    "rounds_to_zero": sum(1 for t in targets if t["outcome"] == "rounds to zero"),
                    "kl_to_original": calibration.kl_to_original,
                    "samples_scored_on_one_half": calibration.one_sided_samples,
                    "samples_without_a_map": calibration.maps_skipped},
        "settings": asdict(settings), "identity": identity, "versions": versions, "duration": duration,
    }


def plot_profile(calibration: Calibration, path: Path, model_name: str) -> Path:
    """I-SAL (standardised) and CAF heatmaps, calibrated targets boxed red, rolled-back ones black."""
    from llamafactory_hera.anatomy.head_plots import plot_score_panels

    calibrated = [(u.layer, u.head) for u in calibration.updates if u.region is not None and not u.region.rolled_back]
    others = [(u.layer, u.head) for u in calibration.updates if (u.layer, u.head) not in calibrated]
    title = (f"RAH-LoRA head profile: {Path(model_name).name} ({len(calibrated)} calibrated, {len(others)} rolled "
             "back or without anchors)")
    return plot_score_panels([(calibration.isal_std.numpy(), "I-SAL (standardised)"), (calibration.caf.numpy(), "CAF")],
                             calibration.layers, calibrated, others, path, title)
