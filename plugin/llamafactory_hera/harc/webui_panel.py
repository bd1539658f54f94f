"""The HARC panel of LlamaBoard (LLaMA-Factory's web UI), declared: its fields (defaults from
:class:`~llamafactory_hera.harc.args.HarcArguments`, the reference's), their texts in LlamaBoard's languages, the
check of ``harc_band`` against the model's depth, and the loss plot with HARC's terms beside the loss.
:mod:`llamafactory_hera.anatomy.panel_builder` makes the panel; how panels are wired into LlamaBoard is
:mod:`llamafactory_hera_patches.webui_board`.

The four role datasets are dropdowns of the datasets in the Train tab's Data dir (its dataset_info.json), prefilled
with the names ``llamafactory-hera harc-data`` writes (each role under its key's name, e.g. ``harc_harmful``). The
other ``harc_*`` keys (``harc_extract_harmful``, ``harc_extract_harmless``, ``harc_response_tokens``,
``harc_refresh_beta``, ``harc_max_length``, ``harc_extract_batch_size``, ``harc_eval_max_new_tokens``) go into
LlamaBoard's "Extra arguments" JSON box, which wins over the panel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamafactory_hera.anatomy.panel_builder import build_panel
from llamafactory_hera.anatomy.panel_checks import local_text_depth
from llamafactory_hera.anatomy.panel_spec import Field, LossPlot, PanelDeclaration, Texts
from llamafactory_hera.harc.args import ROLE_KEYS, HarcArguments, parse_harc_arguments

# HARC's terms in trainer_log.jsonl (llamafactory_hera.harc.method.LOG_KEYS) -> colour in the loss plot
TERM_COLORS = {"harc_ce": "#d62728", "harc_kl": "#2ca02c", "harc_couple": "#ff7f0e", "harc_couple_resp": "#9467bd"}
# the dataset names `llamafactory-hera harc-data` writes (harc/convert.py: each role under its recipe key's name)
HARC_DATA_NAMES = {key: key for key in ROLE_KEYS}


def check_band_depth(args: HarcArguments, context: Mapping[str, Any]) -> str:
    """``harc_band`` against the depth of LlamaBoard's model where its config can be read locally: the band must
    leave at least ``harc_layers_final`` layers to couple; "" when it does or the depth is unknown."""
    depth = local_text_depth(context.get("model_path"))
    if depth is None:
        return ""
    from llamafactory_hera.harc.layers import eligible_layers

    eligible = eligible_layers(depth, args.harc_band)
    if len(eligible) >= args.harc_layers_final:
        return ""
    return (f"harc_band: {args.harc_band} leaves {len(eligible)} of the {depth} decoder layers of "
            f"{context.get('model_path')} to couple, fewer than harc_layers_final: {args.harc_layers_final}. Lower "
            "harc_band or harc_layers_final.")


FIELDS = (
    *(Field(key, 0, default=HARC_DATA_NAMES[key]) for key in ROLE_KEYS),
    Field("harc_batch_harmful", 1),
    Field("harc_batch_harmless", 1),
    Field("harc_batch_pseudo", 1),
    Field("harc_margin", 1),
    Field("harc_weight_couple", 2),
    Field("harc_weight_couple_resp", 2),
    Field("harc_weight_kl", 2),
    Field("harc_weight_ce", 2),
    Field("harc_refresh_steps", 3),
    Field("harc_layers", 3),
    Field("harc_layers_final", 3),
    Field("harc_layers_ramp_step", 3),
    Field("harc_band", 3),
    Field("harc_extract_samples", 4),
    Field("harc_validate_samples", 4),
    Field("harc_eval", 4),
)

# key -> language -> (label, info)
TEXTS: Texts = {
    "harc_harmful": {
        "en": ("Harmful dataset", "Harmful prompts with refusal responses: the refusals are the CE target and the "
                                  "rows are coupled. One dataset name of the data dir's dataset_info.json. Required."),
        "ru": ("Вредный датасет", "Вредные запросы с ответами-отказами: отказы — цель CE, строки связываются. Одно "
                                  "имя датасета из dataset_info.json папки данных. Обязательно."),
        "zh": ("有害数据集", "有害提示及拒绝回答：拒绝回答是 CE 目标，这些样本参与耦合。填数据目录 "
                             "dataset_info.json 中的一个数据集名。必填。"),
        "ko": ("유해 데이터셋", "거절 응답이 달린 유해 프롬프트: 거절이 CE 목표이며 이 행들이 결합됩니다. 데이터 폴더 "
                                "dataset_info.json의 데이터셋 이름 하나. 필수."),
        "ja": ("有害データセット", "拒否応答付きの有害プロンプト。拒否が CE の目標で、これらの行を結合します。データ"
                                   "フォルダの dataset_info.json のデータセット名を 1 つ。必須。"),
    },
    "harc_harmless": {
        "en": ("Harmless dataset", "Harmless prompts with helpful responses: kept close to the adapter-free model (KL) "
                                   "and decoupled. One dataset name. Required."),
        "ru": ("Безвредный датасет", "Безвредные запросы с полезными ответами: удерживаются близко к модели без "
                                     "адаптера (KL) и развязываются. Одно имя датасета. Обязательно."),
        "zh": ("无害数据集", "无害提示及有用回答：通过 KL 保持接近无适配器的模型，并解耦。一个数据集名。必填。"),
        "ko": ("무해 데이터셋", "유용한 응답이 달린 무해 프롬프트: 어댑터 없는 모델에 가깝게 유지(KL)되고 결합이 "
                                "해제됩니다. 데이터셋 이름 하나. 필수."),
        "ja": ("無害データセット", "有用な応答付きの無害プロンプト。アダプタなしのモデルに近く保ち（KL）、結合を"
                                   "外します。データセット名を 1 つ。必須。"),
    },
    "harc_pseudo": {
        "en": ("Pseudo-harmful dataset", "Benign prompts that look harmful, with compliant answers (e.g. XSTest): kept "
                                         "like the harmless rows. One dataset name; required unless the pseudo-harmful "
                                         "rows per micro-batch are 0."),
        "ru": ("Псевдовредный датасет", "Безобидные запросы, похожие на вредные, с ответами по существу (напр. "
                                        "XSTest): удерживаются как безвредные. Одно имя датасета; обязательно, если "
                                        "псевдовредных строк в микробатче больше 0."),
        "zh": ("伪有害数据集", "看似有害的良性提示及顺从回答（如 XSTest）：与无害样本一样保持。一个数据集名；"
                               "每个微批的伪有害样本数不为 0 时必填。"),
        "ko": ("유사 유해 데이터셋", "유해해 보이는 무해 프롬프트와 응하는 답변 (예: XSTest): 무해 행처럼 유지됩니다. "
                                     "데이터셋 이름 하나; 마이크로 배치당 유사 유해 행이 0이 아니면 필수."),
        "ja": ("疑似有害データセット", "有害に見える無害なプロンプトと応じる回答（例: XSTest）。無害の行と同様に保ち"
                                       "ます。データセット名を 1 つ。マイクロバッチあたりの疑似有害行が 0 でなければ"
                                       "必須。"),
    },
    "harc_harmful_completions": {
        "en": ("Harmful completions dataset", "Harmful prompts with harmful completions, used only for the "
                                              "response-side harmfulness direction. One dataset name; empty: "
                                              "response-side coupling is off."),
        "ru": ("Датасет вредных ответов", "Вредные запросы с вредными ответами, только для направления вредности "
                                          "на стороне ответа. Одно имя датасета; пусто: связывание ответа выключено."),
        "zh": ("有害续写数据集", "有害提示及有害续写，仅用于回答侧的有害方向。一个数据集名；留空则关闭回答侧耦合。"),
        "ko": ("유해 응답 데이터셋", "유해 응답이 달린 유해 프롬프트, 응답 측 유해성 방향에만 사용. 데이터셋 이름 "
                                     "하나; 비우면 응답 측 결합이 꺼집니다."),
        "ja": ("有害応答データセット", "有害な応答付きの有害プロンプト。応答側の有害性方向にのみ使用。データセット名を "
                                       "1 つ。空なら応答側の結合はオフ。"),
    },
    "harc_batch_harmful": {
        "en": ("Harmful rows per micro-batch", "Harmful rows in each micro-batch, at least 1 (reference: 6). One epoch "
                                               "is one pass over the harmful training rows."),
        "ru": ("Вредных строк в микробатче", "Вредных строк в каждом микробатче, не меньше 1 (эталон: 6). Эпоха — "
                                             "один проход по вредным обучающим строкам."),
        "zh": ("每微批有害样本数", "每个微批中的有害样本数，至少 1（参考：6）。一个 epoch 即遍历一次有害训练样本。"),
        "ko": ("마이크로 배치당 유해 행", "각 마이크로 배치의 유해 행 수, 최소 1 (참조: 6). 한 에폭은 유해 학습 행을 "
                                         "한 번 도는 것."),
        "ja": ("マイクロバッチあたりの有害行", "各マイクロバッチの有害行数、1 以上（参照: 6）。1 エポックは有害な"
                                               "学習行を 1 周すること。"),
    },
    "harc_batch_harmless": {
        "en": ("Harmless rows per micro-batch", "Harmless rows in each micro-batch (reference: 4)."),
        "ru": ("Безвредных строк в микробатче", "Безвредных строк в каждом микробатче (эталон: 4)."),
        "zh": ("每微批无害样本数", "每个微批中的无害样本数（参考：4）。"),
        "ko": ("마이크로 배치당 무해 행", "각 마이크로 배치의 무해 행 수 (참조: 4)."),
        "ja": ("マイクロバッチあたりの無害行", "各マイクロバッチの無害行数（参照: 4）。"),
    },
    "harc_batch_pseudo": {
        "en": ("Pseudo-harmful rows per micro-batch", "Pseudo-harmful rows in each micro-batch (reference: 2); 0: no "
                                                      "pseudo-harmful dataset needed."),
        "ru": ("Псевдовредных строк в микробатче", "Псевдовредных строк в каждом микробатче (эталон: 2); 0: "
                                                   "псевдовредный датасет не нужен."),
        "zh": ("每微批伪有害样本数", "每个微批中的伪有害样本数（参考：2）；0 表示无需伪有害数据集。"),
        "ko": ("마이크로 배치당 유사 유해 행", "각 마이크로 배치의 유사 유해 행 수 (참조: 2); 0: 유사 유해 데이터셋 "
                                              "불필요."),
        "ja": ("マイクロバッチあたりの疑似有害行", "各マイクロバッチの疑似有害行数（参照: 2）。0 なら疑似有害"
                                                   "データセットは不要。"),
    },
    "harc_margin": {
        "en": ("Margin (m)", "Between 0 and 1: harmful rows are pushed to cosine >= m with the directions (reference "
                             "configs: 0.5)."),
        "ru": ("Зазор (m)", "От 0 до 1: вредные строки подтягиваются к косинусу >= m с направлениями (конфигурации "
                            "эталона: 0.5)."),
        "zh": ("间隔 (m)", "0 到 1 之间：有害样本与方向的余弦被推到 >= m（参考配置：0.5）。"),
        "ko": ("마진 (m)", "0에서 1 사이: 유해 행을 방향과의 코사인 >= m 으로 밉니다 (참조 설정: 0.5)."),
        "ja": ("マージン (m)", "0 から 1: 有害行を方向とのコサイン >= m へ押します（参照設定: 0.5）。"),
    },
    "harc_weight_couple": {
        "en": ("Coupling weight", "Weight of the prompt-side coupling loss (reference: 1)."),
        "ru": ("Вес связывания", "Вес потерь связывания на стороне запроса (эталон: 1)."),
        "zh": ("耦合权重", "提示侧耦合损失的权重（参考：1）。"),
        "ko": ("결합 가중치", "프롬프트 측 결합 손실의 가중치 (참조: 1)."),
        "ja": ("結合の重み", "プロンプト側の結合損失の重み（参照: 1）。"),
    },
    "harc_weight_couple_resp": {
        "en": ("Response coupling weight", "Weight of the response-side coupling loss (reference: 1); used only with a "
                                           "harmful completions dataset."),
        "ru": ("Вес связывания ответа", "Вес потерь связывания на стороне ответа (эталон: 1); только с датасетом "
                                        "вредных ответов."),
        "zh": ("回答侧耦合权重", "回答侧耦合损失的权重（参考：1）；仅在有有害续写数据集时使用。"),
        "ko": ("응답 결합 가중치", "응답 측 결합 손실의 가중치 (참조: 1); 유해 응답 데이터셋이 있을 때만 사용."),
        "ja": ("応答側結合の重み", "応答側の結合損失の重み（参照: 1）。有害応答データセットがあるときのみ使用。"),
    },
    "harc_weight_kl": {
        "en": ("KL weight", "Weight of KL(adapter-free || current) on the harmless and pseudo-harmful rows' response "
                            "tokens (reference: 10)."),
        "ru": ("Вес KL", "Вес KL(без адаптера || текущая) на токенах ответов безвредных и псевдовредных строк "
                         "(эталон: 10)."),
        "zh": ("KL 权重", "无害与伪有害样本回答 token 上 KL(无适配器 || 当前) 的权重（参考：10）。"),
        "ko": ("KL 가중치", "무해 및 유사 유해 행의 응답 토큰에 대한 KL(어댑터 없음 || 현재)의 가중치 (참조: 10)."),
        "ja": ("KL の重み", "無害・疑似有害行の応答トークン上の KL(アダプタなし || 現在) の重み（参照: 10）。"),
    },
    "harc_weight_ce": {
        "en": ("CE weight", "Weight of the cross-entropy on the harmful rows' refusals (reference: 1)."),
        "ru": ("Вес CE", "Вес перекрёстной энтропии на отказах вредных строк (эталон: 1)."),
        "zh": ("CE 权重", "有害样本拒绝回答上交叉熵的权重（参考：1）。"),
        "ko": ("CE 가중치", "유해 행의 거절에 대한 교차 엔트로피의 가중치 (참조: 1)."),
        "ja": ("CE の重み", "有害行の拒否に対するクロスエントロピーの重み（参照: 1）。"),
    },
    "harc_refresh_steps": {
        "en": ("Refresh every (optimizer steps)", "Optimizer steps between re-extractions of the directions on the "
                                                  "current model; 0: never (reference: 100, i.e. 200 micro-steps at "
                                                  "gradient accumulation 2)."),
        "ru": ("Обновлять каждые (шагов оптимизатора)", "Шагов оптимизатора между повторными извлечениями направлений "
                                                        "на текущей модели; 0: никогда (эталон: 100, т. е. 200 "
                                                        "микрошагов при накоплении градиента 2)."),
        "zh": ("刷新间隔（优化器步）", "在当前模型上重新提取方向的间隔优化器步数；0 表示从不（参考：100，即梯度累积 2 "
                                       "时的 200 个微步）。"),
        "ko": ("갱신 간격 (옵티마이저 스텝)", "현재 모델에서 방향을 다시 추출하는 옵티마이저 스텝 간격; 0: 안 함 "
                                              "(참조: 100, 즉 그래디언트 누적 2에서 마이크로 스텝 200)."),
        "ja": ("更新間隔（オプティマイザステップ）", "現在のモデルで方向を再抽出するオプティマイザステップの間隔。0 "
                                                     "なら行わない（参照: 100、勾配累積 2 で 200 マイクロステップ）。"),
    },
    "harc_layers": {
        "en": ("Coupled layers", "Number of layers coupled from the start (reference: 2)."),
        "ru": ("Связываемые слои", "Число слоёв, связываемых с начала (эталон: 2)."),
        "zh": ("耦合层数", "从开始就耦合的层数（参考：2）。"),
        "ko": ("결합 레이어 수", "처음부터 결합하는 레이어 수 (참조: 2)."),
        "ja": ("結合する層数", "開始時から結合する層の数（参照: 2）。"),
    },
    "harc_layers_final": {
        "en": ("Coupled layers after the ramp", "Number of layers coupled from the ramp step on, at least the coupled "
                                                "layers (reference: 4)."),
        "ru": ("Слоёв после наращивания", "Число слоёв, связываемых начиная с шага наращивания, не меньше числа "
                                          "связываемых слоёв (эталон: 4)."),
        "zh": ("增长后的耦合层数", "从增长步起耦合的层数，不少于耦合层数（参考：4）。"),
        "ko": ("램프 이후 결합 레이어 수", "램프 스텝부터 결합하는 레이어 수, 결합 레이어 수 이상 (참조: 4)."),
        "ja": ("ランプ後の結合層数", "ランプのステップ以降に結合する層の数。結合する層数以上（参照: 4）。"),
    },
    "harc_layers_ramp_step": {
        "en": ("Ramp step (optimizer step)", "Optimizer step at which the layers after the ramp are chosen (reference: "
                                             "500, i.e. micro-step 1000 at gradient accumulation 2)."),
        "ru": ("Шаг наращивания (шаг оптимизатора)", "Шаг оптимизатора, на котором выбираются слои после наращивания "
                                                     "(эталон: 500, т. е. микрошаг 1000 при накоплении градиента 2)."),
        "zh": ("增长步（优化器步）", "选择增长后各层的优化器步（参考：500，即梯度累积 2 时的第 1000 个微步）。"),
        "ko": ("램프 스텝 (옵티마이저 스텝)", "램프 이후 레이어를 고르는 옵티마이저 스텝 (참조: 500, 즉 그래디언트 "
                                              "누적 2에서 마이크로 스텝 1000)."),
        "ja": ("ランプのステップ（オプティマイザステップ）", "ランプ後の層を選ぶオプティマイザステップ（参照: 500、勾配"
                                                             "累積 2 でマイクロステップ 1000）。"),
    },
    "harc_extract_samples": {
        "en": ("Extraction rows", "Rows of each role held out to extract the directions, at least 2 (reference: 300)."),
        "ru": ("Строк для извлечения", "Строк каждой роли, отложенных для извлечения направлений, не меньше 2 "
                                       "(эталон: 300)."),
        "zh": ("提取样本数", "每个角色留出用于提取方向的样本数，至少 2（参考：300）。"),
        "ko": ("추출 행 수", "방향 추출을 위해 역할마다 떼어 두는 행 수, 최소 2 (참조: 300)."),
        "ja": ("抽出用の行数", "方向の抽出のためにロールごとに取り分ける行数、2 以上（参照: 300）。"),
    },
    "harc_validate_samples": {
        "en": ("Validation rows", "Harmful and harmless rows held out for the diagnostics and the refusal evaluation "
                                  "(reference: 100)."),
        "ru": ("Строк для проверки", "Вредных и безвредных строк, отложенных для диагностики и оценки отказов "
                                     "(эталон: 100)."),
        "zh": ("验证样本数", "留出用于诊断和拒绝率评估的有害与无害样本数（参考：100）。"),
        "ko": ("검증 행 수", "진단과 거절률 평가를 위해 떼어 두는 유해 및 무해 행 수 (참조: 100)."),
        "ja": ("検証用の行数", "診断と拒否率の評価のために取り分ける有害・無害の行数（参照: 100）。"),
    },
    "harc_band": {
        "en": ("Layer band", "Coupled layers are chosen within [band, n - band] of the n decoder layers, never layer 0 "
                             "(reference: 4)."),
        "ru": ("Полоса слоёв", "Связываемые слои выбираются в пределах [band, n - band] из n слоёв декодера, слой 0 — "
                               "никогда (эталон: 4)."),
        "zh": ("层选择范围 (band)", "耦合层在 n 个解码器层的 [band, n - band] 范围内选择，从不选第 0 层（参考：4）。"),
        "ko": ("레이어 범위 (band)", "결합 레이어는 n개 디코더 레이어의 [band, n - band] 범위에서 고르며, 0번 레이어는 "
                                     "고르지 않습니다 (참조: 4)."),
        "ja": ("層の範囲 (band)", "結合する層は n 個のデコーダ層の [band, n - band] の範囲から選び、第 0 層は選びません"
                                  "（参照: 4）。"),
    },
    "harc_eval": {
        "en": ("Refusal evaluation", "At the end, answer the held-out harmful and the pseudo-harmful prompts (greedy) "
                                     "and report the refusal rates before and after (harc_eval.json)."),
        "ru": ("Оценка отказов", "В конце ответить на отложенные вредные и псевдовредные запросы (жадно) и сообщить "
                                 "доли отказов до и после (harc_eval.json)."),
        "zh": ("拒绝率评估", "结束时对留出的有害提示和伪有害提示生成回答（贪心），并报告训练前后的拒绝率"
                             "（harc_eval.json）。"),
        "ko": ("거절률 평가", "끝에 떼어 둔 유해 프롬프트와 유사 유해 프롬프트에 답을 생성(greedy)하고 학습 전후의 "
                              "거절률을 보고합니다 (harc_eval.json)."),
        "ja": ("拒否率の評価", "最後に、取り分けた有害プロンプトと疑似有害プロンプトへの応答を生成（貪欲）し、"
                               "学習前後の拒否率を報告します（harc_eval.json）。"),
    },
}

PANEL = build_panel(PanelDeclaration(
    name="HARC", prefix="harc_", arguments=HarcArguments, parse=parse_harc_arguments, fields=FIELDS, texts=TEXTS,
    loss_plot=LossPlot(terms=TERM_COLORS, axis_label="HARC terms"), dataset_from_panel=True,
    dataset_hint="`llamafactory-hera harc-data --out DIR` writes the four role datasets under their keys' names.",
    checks=(check_band_depth,),
))
