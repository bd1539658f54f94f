"""The RAH-LoRA panel of LlamaBoard (LLaMA-Factory's web UI), declared: its fields (defaults from
:class:`~llamafactory_hera.rah.args.RahArguments`, the paper's), their texts in LlamaBoard's languages, the check of
``rah_layers`` against the model's depth, and the calibration's progress in place of the loss plot (RAH-LoRA trains
nothing). :mod:`llamafactory_hera.anatomy.panel_builder` makes the panel; how panels are wired into LlamaBoard is
:mod:`llamafactory_hera_patches.webui_board`.

RAH-LoRA takes no optimizer step: the panel says so, and the command leaves out the Train tab's optimizer settings
(learning rate, epochs, batch size, gradient accumulation, scheduler, warmup, gradient clipping) unless "Extra
arguments" sets them. The other ``rah_*`` keys (``rah_rho``, ``rah_w_v``, ``rah_adjacent_layers``, ``rah_trim``,
``rah_beta``, ``rah_caf_weight``, ``rah_halvings``, ``rah_batch_size``) go into LlamaBoard's "Extra arguments" JSON
box, which wins over the panel.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from llamafactory_hera.anatomy.board_log import PHASE_KEY
from llamafactory_hera.anatomy.panel_builder import build_panel
from llamafactory_hera.anatomy.panel_checks import local_text_depth
from llamafactory_hera.anatomy.panel_spec import Field, LossPlot, PanelDeclaration, Texts
from llamafactory_hera.rah.args import AUTO, RahArguments, parse_rah_arguments

# LlamaBoard's Train-tab arguments that only matter to an optimizer: left out of a RAH-LoRA command
OPTIMIZER_KEYS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "lr_scheduler_type", "max_grad_norm", "warmup_steps")


def normalize_layers(value: Any) -> Any:
    """The layers box as one recipe string without spaces: ``auto``, ``0-15`` or ``0,2,4`` (from ``[0, 2 4]``)."""
    if not isinstance(value, str):
        return value
    text = value.strip().strip("[]() ")
    if text.lower() == "auto" or re.fullmatch(r"\d+\s*-\s*\d+", text):
        return re.sub(r"\s+", "", text.lower())
    return ",".join(t for t in re.split(r"[,\s;]+", text) if t)


def check_layers_depth(args: RahArguments, context: Mapping[str, Any]) -> str:
    """``rah_layers`` against the depth of LlamaBoard's model (``num_hidden_layers`` of its text config), where its
    config can be read locally; "" when they fit or the depth is unknown (the run checks it again)."""
    if args.rah_layers == AUTO:
        return ""
    depth = local_text_depth(context.get("model_path"))
    layers = list(args.rah_layers)
    if depth is None or max(layers) < depth:
        return ""
    given = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2 \
        else ",".join(map(str, layers))
    return (f"rah_layers: {given} goes beyond {context.get('model_path')}, which has {depth} decoder layers "
            f"(num_hidden_layers of its text config; zero-based 0..{depth - 1}). Use auto or layers within "
            f"0-{depth - 1}.")


def progress_figure(trainer_log: list[dict[str, Any]], smooth: Any = None) -> Any:
    """In place of the loss plot: how far each phase of the calibration is (percent done, in run order)."""
    import matplotlib.pyplot as plt

    plt.close("all")
    plt.switch_backend("agg")
    done: dict[str, float] = {}
    for log in trainer_log:
        if PHASE_KEY in log:
            done[log[PHASE_KEY]] = float(log.get("percentage", 0.0))
    fig = plt.figure(figsize=(6.4, 1.2 + 0.5 * len(done)))
    ax = fig.add_subplot(111)
    phases = list(done)[::-1]
    ax.barh(phases, [done[p] for p in phases], color="#2ca02c")
    ax.set_xlim(0, 100)
    ax.set_xlabel("% done")
    ax.set_title("RAH-LoRA calibration (training-free: no loss)", fontsize="small")
    fig.tight_layout()
    return fig


FIELDS = (
    Field("rah_layers", 0, scale=2, normalize=normalize_layers),
    Field("rah_isal_percentile", 0),
    Field("rah_caf_percentile", 0),
    Field("rah_num_anchors", 0),
    Field("rah_rank", 0),
    Field("rah_delta", 1),
    Field("rah_alpha_max", 1),
    Field("rah_samples", 1),
    Field("rah_probe_samples", 1),
    Field("rah_kl_samples", 1),
    Field("rah_update", 2),
    Field("rah_caf_form", 2),
    Field("rah_isal_pairs", 2),
)

NOTES = {
    "en": "RAH-LoRA is training-free: it takes no optimizer step, so the learning rate, epochs, batch size, gradient "
          "accumulation, scheduler, warmup and gradient clipping of this tab do not apply and are left out of the "
          "command. The rows it calibrates on are the Dataset box's (Samples below).",
    "ru": "RAH-LoRA не обучается: шагов оптимизатора нет, поэтому скорость обучения, эпохи, размер батча, накопление "
          "градиента, планировщик, прогрев и отсечение градиента на этой вкладке не применяются и не попадают в "
          "команду. Строки для калибровки берутся из поля Dataset (Примеры ниже).",
    "zh": "RAH-LoRA 无需训练：不执行优化器步，因此本页的学习率、训练轮数、批大小、梯度累积、学习率调度、预热和梯度"
          "裁剪均不适用，也不会写入命令。校准所用的样本来自数据集框（见下方样本数）。",
    "ko": "RAH-LoRA는 학습이 필요 없습니다: 옵티마이저 스텝이 없으므로 이 탭의 학습률, 에폭, 배치 크기, 그래디언트 "
          "누적, 스케줄러, 워밍업, 그래디언트 클리핑은 적용되지 않으며 명령에서 빠집니다. 보정에 쓰는 행은 데이터셋 "
          "칸의 것입니다 (아래 샘플 수).",
    "ja": "RAH-LoRA は学習不要です。オプティマイザのステップがないため、このタブの学習率・エポック数・バッチサイズ・"
          "勾配累積・スケジューラ・ウォームアップ・勾配クリッピングは適用されず、コマンドにも含まれません。校正に使う"
          "行はデータセット欄のものです（下のサンプル数）。",
}

# key -> language -> (label, info)
TEXTS: Texts = {
    "rah_layers": {
        "en": ("Layers", "auto (first half of the decoder, paper), a range such as 0-15, or a list such as 0, 2, 4; "
                         "zero-based."),
        "ru": ("Слои", "auto (первая половина декодера, как в статье), диапазон вида 0-15 или список вида 0, 2, 4; "
                       "нумерация с нуля."),
        "zh": ("层", "auto（解码器前一半，论文做法）、范围如 0-15，或列表如 0, 2, 4；从 0 开始编号。"),
        "ko": ("레이어", "auto (디코더 앞쪽 절반, 논문), 0-15 같은 범위 또는 0, 2, 4 같은 목록; 0부터 번호."),
        "ja": ("層", "auto（デコーダの前半、論文）、0-15 のような範囲、または 0, 2, 4 のようなリスト。0 始まり。"),
    },
    "rah_isal_percentile": {
        "en": ("I-SAL percentile", "Targets: standardised I-SAL below this percentile of their layer (paper: 15)."),
        "ru": ("Перцентиль I-SAL", "Цели: стандартизованный I-SAL ниже этого перцентиля слоя (в статье: 15)."),
        "zh": ("I-SAL 百分位", "目标头：标准化 I-SAL 低于本层该百分位（论文：15）。"),
        "ko": ("I-SAL 백분위", "대상: 표준화된 I-SAL이 레이어의 이 백분위 미만 (논문: 15)."),
        "ja": ("I-SAL パーセンタイル", "対象: 標準化 I-SAL が層のこのパーセンタイル未満（論文: 15）。"),
    },
    "rah_caf_percentile": {
        "en": ("CAF percentile", "... and CAF above this percentile of their layer (paper: 70)."),
        "ru": ("Перцентиль CAF", "... и CAF выше этого перцентиля слоя (в статье: 70)."),
        "zh": ("CAF 百分位", "……且 CAF 高于本层该百分位（论文：70）。"),
        "ko": ("CAF 백분위", "... 그리고 CAF가 레이어의 이 백분위 초과 (논문: 70)."),
        "ja": ("CAF パーセンタイル", "……かつ CAF が層のこのパーセンタイル超（論文: 70）。"),
    },
    "rah_num_anchors": {
        "en": ("Anchors", "Anchor heads per target, most similar first (paper: 3)."),
        "ru": ("Якоря", "Якорных голов на цель, сначала самые похожие (в статье: 3)."),
        "zh": ("锚点头数", "每个目标头的锚点头数，按相似度排序（论文：3）。"),
        "ko": ("앵커 수", "대상마다 앵커 헤드 수, 유사한 순 (논문: 3)."),
        "ja": ("アンカー数", "対象ごとのアンカーヘッド数、類似度順（論文: 3）。"),
    },
    "rah_rank": {
        "en": ("Rank", "Rank r of each head's update (paper: 8)."),
        "ru": ("Ранг", "Ранг r обновления каждой головы (в статье: 8)."),
        "zh": ("秩", "每个头更新的秩 r（论文：8）。"),
        "ko": ("랭크", "각 헤드 업데이트의 랭크 r (논문: 8)."),
        "ja": ("ランク", "各ヘッド更新のランク r（論文: 8）。"),
    },
    "rah_delta": {
        "en": ("KL budget (delta)", "Trust region: largest mean KL a head's update may cause (paper: 0.05)."),
        "ru": ("Бюджет KL (delta)", "Доверительная область: наибольший средний KL от обновления головы "
                                    "(в статье: 0.05)."),
        "zh": ("KL 预算 (delta)", "信赖域：单个头的更新允许的最大平均 KL（论文：0.05）。"),
        "ko": ("KL 예산 (delta)", "신뢰 영역: 헤드 업데이트가 허용되는 최대 평균 KL (논문: 0.05)."),
        "ja": ("KL 予算 (delta)", "信頼領域: ヘッド更新に許す平均 KL の上限（論文: 0.05）。"),
    },
    "rah_alpha_max": {
        "en": ("Largest step (alpha)", "Largest step towards the anchors, halved until the KL fits (paper: 0.15)."),
        "ru": ("Наибольший шаг (alpha)", "Наибольший шаг к якорям, делится пополам, пока KL не уложится "
                                         "(в статье: 0.15)."),
        "zh": ("最大步长 (alpha)", "向锚点靠近的最大步长，减半直到 KL 满足（论文：0.15）。"),
        "ko": ("최대 스텝 (alpha)", "앵커 쪽 최대 스텝, KL이 맞을 때까지 절반으로 (논문: 0.15)."),
        "ja": ("最大ステップ (alpha)", "アンカーへの最大ステップ。KL が収まるまで半減（論文: 0.15）。"),
    },
    "rah_samples": {
        "en": ("Samples", "Unlabelled image-text rows for I-SAL and the attention maps (paper: ~100)."),
        "ru": ("Примеры", "Неразмеченные строки изображение-текст для I-SAL и карт внимания (в статье: ~100)."),
        "zh": ("样本数", "用于 I-SAL 和注意力图的无标注图文样本（论文：约 100）。"),
        "ko": ("샘플 수", "I-SAL과 어텐션 맵에 쓰는 라벨 없는 이미지-텍스트 행 (논문: ~100)."),
        "ja": ("サンプル数", "I-SAL と注意マップに使うラベルなしの画像テキスト行（論文: 約 100）。"),
    },
    "rah_probe_samples": {
        "en": ("CAF probe samples", "Rows for CAF's gate gradients (paper: 32)."),
        "ru": ("Примеры для CAF", "Строки для градиентов гейтов CAF (в статье: 32)."),
        "zh": ("CAF 探测样本数", "用于 CAF 门控梯度的样本（论文：32）。"),
        "ko": ("CAF 프로브 샘플 수", "CAF 게이트 기울기에 쓰는 행 (논문: 32)."),
        "ja": ("CAF プローブサンプル数", "CAF のゲート勾配に使う行（論文: 32）。"),
    },
    "rah_kl_samples": {
        "en": ("KL probe samples", "Rows of the trust region's KL probe (not in the paper; default 8)."),
        "ru": ("Примеры для KL", "Строки KL-пробы доверительной области (нет в статье; по умолчанию 8)."),
        "zh": ("KL 探测样本数", "信赖域 KL 探测的样本数（论文未给出；默认 8）。"),
        "ko": ("KL 프로브 샘플 수", "신뢰 영역 KL 프로브의 행 (논문에 없음; 기본값 8)."),
        "ja": ("KL プローブサンプル数", "信頼領域の KL プローブの行（論文に記載なし、既定 8）。"),
    },
    "rah_update": {
        "en": ("Projections", "auto (V and O under MHA, O only under GQA), vo, o or v."),
        "ru": ("Проекции", "auto (V и O при MHA, только O при GQA), vo, o или v."),
        "zh": ("更新的投影", "auto（MHA 下 V 和 O，GQA 下仅 O）、vo、o 或 v。"),
        "ko": ("업데이트할 프로젝션", "auto (MHA는 V와 O, GQA는 O만), vo, o 또는 v."),
        "ja": ("更新する射影", "auto（MHA では V と O、GQA では O のみ）、vo、o または v。"),
    },
    "rah_caf_form": {
        "en": ("CAF form", "magnitude (size of a head's influence, default) or paper (Eq. 5 as printed)."),
        "ru": ("Форма CAF", "magnitude (величина влияния головы, по умолчанию) или paper (ур. 5 как напечатано)."),
        "zh": ("CAF 形式", "magnitude（头影响的大小，默认）或 paper（按论文式 5 原文）。"),
        "ko": ("CAF 형식", "magnitude (헤드 영향의 크기, 기본값) 또는 paper (인쇄된 식 5)."),
        "ja": ("CAF の形式", "magnitude（ヘッドの影響の大きさ、既定）または paper（印刷された式 5）。"),
    },
    "rah_isal_pairs": {
        "en": ("I-SAL pairs", "paper (text->image mean over every text query) or visible (text after the image)."),
        "ru": ("Пары I-SAL", "paper (среднее text->image по всем текстовым запросам) или visible (текст после "
                             "изображения)."),
        "zh": ("I-SAL 配对", "paper（对所有文本查询取 文本->图像 平均）或 visible（仅图像之后的文本）。"),
        "ko": ("I-SAL 쌍", "paper (모든 텍스트 쿼리의 text->image 평균) 또는 visible (이미지 뒤의 텍스트)."),
        "ja": ("I-SAL のペア", "paper（全テキストクエリの text->image 平均）または visible（画像の後のテキスト）。"),
    },
}

PANEL = build_panel(PanelDeclaration(
    name="RAH-LoRA", prefix="rah_", arguments=RahArguments, parse=parse_rah_arguments, fields=FIELDS, texts=TEXTS,
    loss_plot=LossPlot(marker=PHASE_KEY, figure=progress_figure), notes=NOTES, unused_host_keys=OPTIMIZER_KEYS,
    checks=(check_layers_depth,),
))
