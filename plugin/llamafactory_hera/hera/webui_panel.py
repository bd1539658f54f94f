"""The HeRA panel of LlamaBoard (LLaMA-Factory's web UI), independent of LLaMA-Factory's internals.

What is here: the panel's fields (defaults from :class:`~llamafactory_hera.hera.args.HeraArguments`),
their labels in LlamaBoard's languages, the gradio components, turning the panel's values into
``hera_*`` arguments, and the loss plot with ``hera_loss``. How the panel is wired into
LlamaBoard is :mod:`llamafactory_hera_patches.webui_board`.

Imported only when LlamaBoard is built; gradio and matplotlib are imported inside the functions
that need them.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from llamafactory_hera.anatomy.panel_widgets import (
    LANGS,
    as_markup,
    build_locales,
    create_widgets,
    localized_in,
    typed_value,
)
from llamafactory_hera.hera.args import AUTO, HeraArguments, parse_hera_arguments
from llamafactory_hera.hera.board_plot import hera_loss_figure

HERA_STAGE = "hera"
TAB = "hera_tab"  # element id of the accordion (train.hera_tab)


@dataclass(frozen=True)
class Field:
    """One input of the panel: a ``hera_*`` key, its widget and its row in the accordion."""

    key: str
    widget: str  # textbox | number | int | dropdown | checkbox
    row: int
    scale: int = 1

    @property
    def default(self) -> Any:
        if self.key == "hera_heads":
            return AUTO  # the recipe key has no default (required); the panel starts with auto-selection
        spec = _SPECS[self.key]
        return spec.default_factory() if spec.default is MISSING else spec.default

    @property
    def choices(self) -> tuple[str, ...] | None:
        return _SPECS[self.key].metadata.get("choices")

    @property
    def auto_only(self) -> bool:
        """Only used with ``hera_heads: auto``."""
        return self.key.startswith("hera_select_")


_SPECS = {spec.name: spec for spec in fields(HeraArguments)}

# Other keys (hera_temperature_lr, ...) go into LlamaBoard's extra-arguments JSON box.
FIELDS: tuple[Field, ...] = (
    Field("hera_heads", "textbox", 0, scale=2),
    Field("hera_teacher", "textbox", 0, scale=2),
    Field("hera_k", "int", 0),
    Field("hera_lambda", "number", 0),
    Field("hera_temperature", "number", 0),
    Field("hera_pooling", "dropdown", 1),
    Field("hera_similarity", "dropdown", 1),
    Field("hera_teacher_feature", "dropdown", 1),
    Field("hera_learn_temperature", "checkbox", 1),
    Field("hera_select_samples", "int", 2),
    Field("hera_select_num_heads", "int", 2),
    Field("hera_select_strategy", "dropdown", 2),
    Field("hera_select_mode", "dropdown", 2),
    Field("hera_select_batch_size", "int", 2),
)
KEYS = tuple(f.key for f in FIELDS)
DEFAULTS = {f.key: f.default for f in FIELDS}

_AUTO_NOTE = {
    "en": "With heads = auto: ",
    "ru": "При heads = auto: ",
    "zh": "头为 auto 时：",
    "ko": "heads = auto일 때: ",
    "ja": "heads = auto の場合: ",
}

# element id -> language -> {"label", "info"}, the shape of LlamaBoard's LOCALES
_TEXTS: dict[str, dict[str, tuple[str, str]]] = {
    "hera_heads": {
        "en": ("Heads to align", "auto: pick the least MKNN-aligned heads when training starts; or zero-based heads, "
                                 "e.g. L13H12, L7H6."),
        "ru": ("Выравниваемые головы", "auto: выбрать наименее MKNN-выровненные головы в начале обучения; или головы "
                                       "с нумерацией с нуля, напр. L13H12, L7H6."),
        "zh": ("对齐的注意力头", "auto：训练开始时自动选择 MKNN 对齐度最低的头；或填写从 0 开始编号的头，"
                                 "例如 L13H12, L7H6。"),
        "ko": ("정렬할 헤드", "auto: 학습 시작 시 MKNN 정렬도가 가장 낮은 헤드를 선택; 또는 0부터 번호를 매긴 헤드, "
                             "예: L13H12, L7H6."),
        "ja": ("整列するヘッド", "auto: 学習開始時に MKNN 整列度が最も低いヘッドを選択。または 0 始まりのヘッド"
                              "（例: L13H12, L7H6）。"),
    },
    "hera_teacher": {
        "en": ("Vision teacher", "Frozen vision encoder: Hugging Face model id or local path (paper: DINOv2-L)."),
        "ru": ("Визуальный учитель", "Замороженный визуальный энкодер: id модели Hugging Face или локальный путь "
                                     "(в статье: DINOv2-L)."),
        "zh": ("视觉教师模型", "冻结的视觉编码器：Hugging Face 模型 ID 或本地路径（论文：DINOv2-L）。"),
        "ko": ("비전 교사 모델", "고정된 비전 인코더: Hugging Face 모델 ID 또는 로컬 경로 (논문: DINOv2-L)."),
        "ja": ("視覚教師モデル", "凍結した視覚エンコーダ: Hugging Face モデル ID またはローカルパス"
                                "（論文: DINOv2-L）。"),
    },
    "hera_k": {
        "en": ("Neighbours k", "Teacher nearest neighbours used as positives per sample."),
        "ru": ("Соседи k", "Ближайшие соседи по учителю, используемые как позитивные примеры."),
        "zh": ("近邻数 k", "每个样本作为正样本的教师最近邻数量。"),
        "ko": ("이웃 수 k", "샘플마다 양성으로 쓰는 교사 기준 최근접 이웃 수."),
        "ja": ("近傍数 k", "各サンプルで正例とする教師空間の最近傍の数。"),
    },
    "hera_lambda": {
        "en": ("HeRA weight (lambda)", "loss = lm_loss + lambda * hera_loss."),
        "ru": ("Вес HeRA (lambda)", "loss = lm_loss + lambda * hera_loss."),
        "zh": ("HeRA 权重 (lambda)", "总损失 = lm_loss + lambda * hera_loss。"),
        "ko": ("HeRA 가중치 (lambda)", "loss = lm_loss + lambda * hera_loss."),
        "ja": ("HeRA 重み (lambda)", "loss = lm_loss + lambda * hera_loss。"),
    },
    "hera_temperature": {
        "en": ("Temperature", "Initial InfoNCE temperature."),
        "ru": ("Температура", "Начальная температура InfoNCE."),
        "zh": ("温度系数", "InfoNCE 的初始温度。"),
        "ko": ("온도", "InfoNCE 초기 온도."),
        "ja": ("温度", "InfoNCE の初期温度。"),
    },
    "hera_pooling": {
        "en": ("Pooling", "Tokens averaged into a head's representation: assistant (answer tokens, paper) or text "
                          "(all text tokens)."),
        "ru": ("Пулинг", "Токены, усредняемые в представление головы: assistant (токены ответа, как в статье) или "
                         "text (все текстовые токены)."),
        "zh": ("池化方式", "平均得到注意力头表示的 token：assistant（回答部分，论文做法）或 text（全部文本 token）。"),
        "ko": ("풀링", "헤드 표현으로 평균할 토큰: assistant (응답 토큰, 논문) 또는 text (모든 텍스트 토큰)."),
        "ja": ("プーリング", "ヘッド表現として平均するトークン: assistant（応答トークン、論文）または text"
                            "（全テキストトークン）。"),
    },
    "hera_similarity": {
        "en": ("Similarity", "cosine (default) or dot product (dot)."),
        "ru": ("Сходство", "cosine (по умолчанию) или скалярное произведение (dot)."),
        "zh": ("相似度", "cosine（默认）或点积 dot。"),
        "ko": ("유사도", "cosine (기본값) 또는 내적 (dot)."),
        "ja": ("類似度", "cosine（既定）または内積 (dot)。"),
    },
    "hera_teacher_feature": {
        "en": ("Teacher feature", "cls ([CLS] token, paper) or mean (mean of the patch tokens)."),
        "ru": ("Признак учителя", "cls (токен [CLS], как в статье) или mean (среднее по патчам)."),
        "zh": ("教师特征", "cls（[CLS] token，论文做法）或 mean（图像块 token 的平均）。"),
        "ko": ("교사 특징", "cls ([CLS] 토큰, 논문) 또는 mean (패치 토큰 평균)."),
        "ja": ("教師特徴", "cls（[CLS] トークン、論文）または mean（パッチトークンの平均）。"),
    },
    "hera_learn_temperature": {
        "en": ("Learn temperature", "Learn the temperature during training (paper)."),
        "ru": ("Обучать температуру", "Обучать температуру во время обучения (как в статье)."),
        "zh": ("学习温度", "训练中学习温度系数（论文做法）。"),
        "ko": ("온도 학습", "학습 중에 온도를 학습합니다 (논문)."),
        "ja": ("温度を学習", "学習中に温度を学習します（論文）。"),
    },
    "hera_select_samples": {
        "en": ("Selection samples", "image-caption pairs used to score the heads."),
        "ru": ("Примеры для выбора", "пары изображение-подпись для оценки голов."),
        "zh": ("选择样本数", "用于为注意力头打分的图文对数量。"),
        "ko": ("선택 샘플 수", "헤드 점수 계산에 쓰는 이미지-캡션 쌍 수."),
        "ja": ("選択サンプル数", "ヘッドの採点に使う画像とキャプションの組の数。"),
    },
    "hera_select_num_heads": {
        "en": ("Heads to select", "number of heads to align."),
        "ru": ("Число голов", "сколько голов выравнивать."),
        "zh": ("选择头数", "要对齐的注意力头数量。"),
        "ko": ("선택할 헤드 수", "정렬할 헤드 수."),
        "ja": ("選択ヘッド数", "整列するヘッドの数。"),
    },
    "hera_select_strategy": {
        "en": ("Selection strategy", "worst (least aligned, paper), best or random."),
        "ru": ("Стратегия выбора", "worst (наименее выровненные, как в статье), best или random."),
        "zh": ("选择策略", "worst（对齐度最低，论文做法）、best 或 random。"),
        "ko": ("선택 전략", "worst (정렬도 최저, 논문), best 또는 random."),
        "ja": ("選択戦略", "worst（整列度が最低、論文）、best または random。"),
    },
    "hera_select_mode": {
        "en": ("Selection mode", "text (captions through the language model, paper) or multimodal."),
        "ru": ("Режим выбора", "text (только подписи через языковую модель, как в статье) или multimodal."),
        "zh": ("选择模式", "text（仅将描述输入语言模型，论文做法）或 multimodal。"),
        "ko": ("선택 모드", "text (캡션만 언어 모델에 입력, 논문) 또는 multimodal."),
        "ja": ("選択モード", "text（キャプションのみ言語モデルに入力、論文）または multimodal。"),
    },
    "hera_select_batch_size": {
        "en": ("Selection batch size", "batch size of the scoring passes."),
        "ru": ("Размер батча выбора", "размер батча при оценке голов."),
        "zh": ("选择批大小", "打分前向计算的批大小。"),
        "ko": ("선택 배치 크기", "점수 계산 시 배치 크기."),
        "ja": ("選択バッチサイズ", "採点時のバッチサイズ。"),
    },
}

_TAB_LABELS = {
    "en": "HeRA configurations",
    "ru": "Конфигурации HeRA",
    "zh": "HeRA 参数设置",
    "ko": "HeRA 구성",
    "ja": "HeRA 設定",
}

ALERTS: dict[str, dict[str, str]] = {
    "err_hera_args": {
        "en": "Invalid HeRA setting: ",
        "ru": "Неверный параметр HeRA: ",
        "zh": "HeRA 参数无效：",
        "ko": "잘못된 HeRA 설정: ",
        "ja": "HeRA の設定が無効です: ",
    },
}


def _auto_note(key: str, lang: str) -> str:
    return _AUTO_NOTE[lang] if key.startswith("hera_select_") else ""


LOCALES = build_locales(TAB, _TAB_LABELS, _TEXTS, KEYS, note=_auto_note)


def localized(key: str, lang: str) -> dict[str, str]:
    """Label (and info) of a panel element in ``lang``, English where the language is unknown."""
    return localized_in(LOCALES, key, lang)


def is_hera_stage(stage: str | None) -> bool:
    """Whether a stage value (``TRAINING_STAGES[label]``) is HeRA's."""
    return str(stage or "").strip().lower() == HERA_STAGE


def normalize_heads(value: Any) -> str:
    """The heads box as a recipe value: ``auto`` or ``L1H0,L1H2`` (one string, safe on a command line)."""
    text = str(value if value is not None else "").strip()
    if text.lower() == AUTO:
        return AUTO
    items = [t.strip("'\" ") for t in re.split(r"[,\s;]+", text.strip("[]() ")) if t.strip("'\" ")]
    return ",".join(items)


def build_hera_args(values: dict[str, Any]) -> dict[str, Any]:
    """``hera_*`` arguments for a run from the panel's values (missing ones take their defaults).

    ``hera_select_*`` keys are included only with ``hera_heads: auto``. A false boolean is written as
    the string ``"false"``: LlamaBoard drops False values from the command and the saved YAML, which
    would silently turn the default (true) back on.
    """
    merged = {**DEFAULTS, **{k: v for k, v in values.items() if k in DEFAULTS}}
    heads = normalize_heads(merged["hera_heads"])
    args: dict[str, Any] = {}
    for field in FIELDS:
        if field.auto_only and heads != AUTO:
            continue
        value = merged[field.key]
        if field.key == "hera_heads":
            value = heads
        elif field.widget == "checkbox":
            value = True if value else "false"
        else:
            value = typed_value(field.widget, value)
        args[field.key] = value
    return args


def validate(values: dict[str, Any]) -> str:
    """Empty when the panel's values make a valid HeRA run, else the problem (naming the key)."""
    try:
        parse_hera_arguments(build_hera_args(values))
    except ValueError as err:
        return str(err)
    return ""


def create_panel(gr: Any) -> dict[str, Any]:
    """Create the panel's inputs in the current gradio layout context (an accordion); element name -> component.

    Labels are English here; LlamaBoard replaces them from ``LOCALES`` when the language is set.
    """
    return create_widgets(gr, FIELDS, LOCALES)


def has_hera_loss(trainer_log: list[dict[str, Any]]) -> bool:
    """Whether a trainer_log.jsonl (as parsed lines) comes from a HeRA run."""
    return any(log.get("hera_loss") is not None for log in trainer_log)


# the panel protocol the LlamaBoard patch uses for every declared method (llamafactory_hera.methods.Method.panel)
ERROR_ALERT = "err_hera_args"  # ALERTS entry that prefixes a validation problem
__all__ = ["ALERTS", "ERROR_ALERT", "KEYS", "LANGS", "LOCALES", "TAB", "as_markup", "build_args", "create_panel",
           "loss_figure", "owns_loss_plot", "validate"]
build_args = build_hera_args
owns_loss_plot = has_hera_loss
loss_figure = hera_loss_figure
