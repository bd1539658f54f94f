"""The HeRA panel of LlamaBoard (LLaMA-Factory's web UI), declared: its fields (from
:class:`~llamafactory_hera.hera.args.HeraArguments`), their texts in LlamaBoard's languages, the check of
``hera_heads`` against the model's layers and heads, and the loss plot with ``hera_loss``.
:mod:`llamafactory_hera.anatomy.panel_builder` makes the panel; how panels are wired into LlamaBoard is
:mod:`llamafactory_hera_patches.webui_board`.

The other ``hera_*`` keys (``hera_temperature_lr``, ``hera_teacher_cache``, ...) go into LlamaBoard's "Extra
arguments" JSON box, which wins over the panel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llamafactory_hera.anatomy.heads import check_heads_fit
from llamafactory_hera.anatomy.panel_builder import build_panel
from llamafactory_hera.anatomy.panel_checks import local_attention_geometry
from llamafactory_hera.anatomy.panel_spec import Field, LossPlot, PanelDeclaration, Texts
from llamafactory_hera.hera.args import AUTO, HeraArguments, parse_hera_arguments
from llamafactory_hera.hera.board_plot import HERA_TERMS, hera_loss_figure


def normalize_heads(value: Any) -> str:
    """The heads box as a recipe value: ``auto`` or ``L1H0,L1H2`` (one string, safe on a command line)."""
    text = str(value if value is not None else "").strip()
    if text.lower() == AUTO:
        return AUTO
    items = [t.strip("'\" ") for t in re.split(r"[,\s;]+", text.strip("[]() ")) if t.strip("'\" ")]
    return ",".join(items)


def check_heads_geometry(args: HeraArguments, context: Mapping[str, Any]) -> str:
    """``hera_heads`` against the layers and heads of LlamaBoard's model, where its config can be read locally (the
    run's own check, :func:`~llamafactory_hera.anatomy.heads.check_heads_fit`, so the same line); "" when they fit,
    under ``auto`` or when the model is unknown here (the run checks it again)."""
    if args.auto_heads:
        return ""
    geometry = local_attention_geometry(context.get("model_path"))
    if geometry is None:
        return ""
    try:
        check_heads_fit(args.head_refs, geometry, str(context.get("model_path")).strip())
    except ValueError as err:
        return str(err)
    return ""


AUTO_ONLY = ("hera_heads", AUTO)  # hera_select_* keys are sent only with hera_heads: auto
FIELDS = (
    # the recipe key has no default (required); the panel starts with auto-selection
    Field("hera_heads", 0, scale=2, default=AUTO, normalize=normalize_heads),
    Field("hera_teacher", 0, scale=2),
    Field("hera_k", 0),
    Field("hera_lambda", 0),
    Field("hera_temperature", 0),
    Field("hera_pooling", 1),
    Field("hera_similarity", 1),
    Field("hera_teacher_feature", 1),
    Field("hera_learn_temperature", 1),
    Field("hera_select_samples", 2, only_with=AUTO_ONLY),
    Field("hera_select_num_heads", 2, only_with=AUTO_ONLY),
    Field("hera_select_strategy", 2, only_with=AUTO_ONLY),
    Field("hera_select_mode", 2, only_with=AUTO_ONLY),
    Field("hera_select_batch_size", 2, only_with=AUTO_ONLY),
)

# key -> language -> (label, info)
TEXTS: Texts = {
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

PANEL = build_panel(PanelDeclaration(
    name="HeRA", prefix="hera_", arguments=HeraArguments, parse=parse_hera_arguments, fields=FIELDS, texts=TEXTS,
    loss_plot=LossPlot(terms=HERA_TERMS.terms, figure=hera_loss_figure), checks=(check_heads_geometry,),
    only_with_note={"en": "With heads = auto: ", "ru": "При heads = auto: ", "zh": "头为 auto 时：",
                    "ko": "heads = auto일 때: ", "ja": "heads = auto の場合: "},
))
