"""GPU memory estimates for the HeRA recipes: the numbers in docs/hera.md's "Recipes" tables, in its table of the
paper's experiment and in the recipes/llava15/ headers.

These are estimates from a formula, not measurements; bench/cost.py counts the Qwen3-VL-8B recipes' steps op by op
(docs/cost.md), and this formula is within 5 % of that count for them (tensors, without this formula's CUDA-context
and teacher terms). ``python recipes/memory.py`` prints the
table rows; the batch size, cutoff length, LoRA rank and finetuning type are read from the
recipe files themselves, so the table follows the recipes.

Method (bytes per GPU, worst case: every sequence of the micro-batch is ``cutoff_len`` long; B below is
``per_device_train_batch_size``: activations and logits are per device, ``hera_gather`` gathers only the pooled head
representations across the GPUs):

- weights: bf16, 2 bytes per parameter of the whole MLLM (vision tower included). Quantized by bitsandbytes
  (``quantization_bit``, a QLoRA recipe), every linear layer's weight is stored in 4 or 8 bits and the token embeddings
  and the output layer stay in bf16 (transformers' bitsandbytes loader skips the output layer; embeddings are no
  linear layer). 4-bit (nf4 or fp4): half a byte per weight plus one absmax per block of 64 weights, a float32
  (4 bytes) or, with ``double_quantization``, 1 byte plus a float32 per 256 blocks; 8-bit (LLM.int8): 1 byte per
  weight plus a float32 scale per output row (:func:`quantized_bytes_per_weight`). The linear weights are counted as
  the whole model's parameters less the embeddings and output layer (norms, biases and the vision tower's patch
  convolution, under 0.1%, are counted as quantized). The one weight being used is dequantized to bf16 at a time: the
  largest linear layer, 2 bytes per weight, is added;
- trainable parameters: 16 bytes each (fp32 weight 4 + fp32 gradient 4 + Adam moments 8) for
  the LoRA adapters (rank r on every linear layer of the language model) or the projector;
- full fine-tune, DeepSpeed ZeRO-3 over N GPUs: 16 bytes per parameter / N (bf16 weight and
  gradient, fp32 master weight and Adam moments, all sharded; the frozen vision tower is counted
  as trainable, which overestimates slightly) + 2 bytes x ``stage3_max_live_parameters`` (1e9)
  for the parameters gathered at a time;
- full fine-tune, ZeRO-2 (the fallback while ZeRO-3 is refused): 2 bytes per parameter
  replicated + 14 bytes per parameter / N;
- activations with gradient checkpointing: each decoder layer's input, L x B x S x d x 2 bytes,
  plus the one layer being recomputed, its activations and their gradients,
  2 x B x S x (8 d + 4 i) x 2 bytes (d: hidden size, i: MLP width);
- logits: B x S x V x 10 bytes (bf16 logits, their fp32 copy in the loss, the saved
  log-softmax and its gradient; V: vocabulary size);
- the HeRA teacher, DINOv2 ViT-L/14 in float32 (always, see trainer.py): 0.3 B parameters x 4 bytes (its activations,
  without gradient, are small; under the default hera_teacher_precompute it leaves the GPU before
  step 1, so this term is a margin); the HeRA term itself adds the contrastive set's pooled head representations,
  (B x GPUs under hera_gather) x heads x head width floats, and their similarities: a few MB, negligible;
- LoRA under FSDP2 over N GPUs (``fsdp2_gib``, a recipe run by ``accelerate launch`` with recipes/accelerate/'s
  config): accelerate upcasts every parameter to float32 before sharding (``mixed_precision: bf16``), so each GPU
  holds 4 bytes per parameter / N, the root's included; every decoder layer and vision block is gathered whole in
  bf16 for its forward and backward, two at a time (the one computing and the one prefetched); the root module, the
  token embeddings and the output layer, stays gathered through the step (2 bytes per parameter, not divided); the
  adapters' 16 bytes per trainable parameter / N. (bench/cost.py's count, docs/cost.md, gave 2 bytes / N short by
  2.3 GiB for Qwen3-VL-8B on 8 GPUs; with 4 it agrees within 1 %);
- 2 GiB for the CUDA context, cuBLAS/NCCL workspaces and allocator slack.

The paper's own experiment (Table 2, recipes/llava15/): the model ``llamafactory-hera compose`` builds from the
text-only LLM, its parameters = the LLM's + the SigLIP2-SO400M/14@384 vision tower (~0.4 B) + the fresh
``mlp2x_gelu`` projector (1152 x d + d x d weights and biases), full fine-tune with ZeRO-3 over 8 GPUs in both
stages; stage 1 (language model frozen, projector trained): 2 bytes per parameter / N (frozen bf16 weights, sharded)
+ 16 bytes per projector parameter / N + the gathered parameters, as above. The recipes' per-device batch is
LLaVA-1.5's 16 where that estimate stays under ``FIT_GIB``, else 8 with twice the gradient accumulation: the same
global batch (256, 128) and optimizer step; the contrastive set per micro-step is per-device x 8 GPUs under
``hera_gather``.

Not included: the frozen vision tower's activations (no gradient flows into it), memory
fragmentation, evaluation. An 80 GB card has about 79 GiB usable, a 24 GB card about 22 GiB.

The recipes for the hardware users have (docs/hera.md "Recipes", "Smaller GPUs, a node, and the 2026 families"):
``qwen3_8b_hera_qlora.yaml`` (4-bit, one 24 GB GPU: its estimate stays under ``FIT_24GB_GIB``),
``qwen3_8b_hera_fsdp2.yaml`` (FSDP2 over a node of 8 GPUs), one LoRA recipe for each family of
:data:`FAMILIES_2026` and ``qwen2_5_72b_hera_fsdp2.yaml`` (a 72B model, FSDP2 over 8 GPUs of 80 GB).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from llamafactory_hera.plan.estimate import quantized_bytes_per_weight  # written once, with plan's count

RECIPES = Path(__file__).resolve().parent
GIB = 2**30
NUM_GPUS = 8  # the _full recipes are written for one node with 8 GPUs
GPU_GIB = 79.0  # usable memory of an 80 GB card
FIT_GIB = 76.0  # recipes/llava15/ keep their estimate under this: ~3 GiB of an 80 GB card for what is not counted
TEACHER_PARAMS = 0.304e9  # facebook/dinov2-large
OVERHEAD = 2 * GIB
ZERO3_LIVE_PARAMS = 1e9  # recipes/deepspeed/ds_z3_config.json: stage3_max_live_parameters
LOGIT_BYTES = 10
VISION_TOWER_PARAMS = 0.4e9  # google/siglip2-so400m-patch14-384's vision tower (compose's default encoder)
VISION_WIDTH = 1152  # its hidden size: the projector's input
LLAVA15 = "llava15"  # recipes/llava15/<stem>_stage1.yaml, <stem>_stage2.yaml: the paper's experiment
GPU_24GB_GIB = 22.0  # usable memory of a 24 GB card (24e9 bytes = 22.35 GiB, less the driver's share)
FIT_24GB_GIB = 20.0  # the QLoRA recipe keeps its estimate under this: 2 GiB of a 24 GB card for what is not counted


@dataclass(frozen=True)
class Backbone:
    """One LLM of the paper's Table 2 and the public MLLM its recipes are built on.

    Shapes are those of the MLLM's language model, which are the text-only LLM's (``llm_id``) too; ``params_b`` is
    the whole MLLM (model card, rounded).
    """

    llm: str  # as in the paper's Table 2
    vision_delta: str  # paper, Table 2: Vision score of HeRA minus the baseline
    stem: str  # recipes/<stem>_hera.yaml, recipes/<stem>_hera_full.yaml
    model_id: str
    template: str  # LLaMA-Factory template
    model_type: str  # transformers config.model_type
    params_b: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    projector_b: float = 0.0  # projector parameters (stage-1 recipe), billions
    paper_heads: tuple[str, ...] = ()  # paper, Table 5 (found on the text-only LLM)
    # The text-only LLM itself, for the paper's experiment (recipes/llava15/): compose --llm, its parameters (model
    # card), vocabulary and family (a key of compose's family -> template map).
    llm_id: str = ""
    llm_params_b: float = 0.0
    llm_vocab: int = 0
    llm_family: str = ""
    tied: bool = False  # the output layer shares the token embeddings' weight (config.tie_word_embeddings)


BACKBONES: tuple[Backbone, ...] = (
    Backbone("Qwen2.5-3B", "+2.4", "qwen2_5_3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_vl", "qwen2_5_vl",
             3.75, 36, 2048, 16, 2, 128, 11008, 151936,
             paper_heads=("L3H4", "L5H11", "L5H14", "L5H9", "L5H15"),
             llm_id="Qwen/Qwen2.5-3B-Instruct", llm_params_b=3.09, llm_vocab=151936, llm_family="qwen2.5", tied=True),
    Backbone("Qwen3-4B", "+2.2", "qwen3_4b", "Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl_nothink", "qwen3_vl",
             4.44, 36, 2560, 32, 8, 128, 9728, 151936,
             llm_id="Qwen/Qwen3-4B", llm_params_b=4.02, llm_vocab=151936, llm_family="qwen3", tied=True),
    Backbone("Vicuna-7B", "+2.3", "vicuna_7b", "llava-hf/llava-1.5-7b-hf", "llava", "llava",
             7.06, 32, 4096, 32, 32, 128, 11008, 32064, projector_b=0.021,
             paper_heads=("L0H14", "L1H1", "L0H1", "L0H3", "L0H30"),
             llm_id="lmsys/vicuna-7b-v1.5", llm_params_b=6.74, llm_vocab=32000, llm_family="vicuna"),
    Backbone("LLaMA3-8B", "+1.3", "llama3_8b", "llava-hf/llama3-llava-next-8b-hf", "llava_next_llama3", "llava_next",
             8.36, 32, 4096, 32, 8, 128, 14336, 128320,
             llm_id="meta-llama/Meta-Llama-3-8B-Instruct", llm_params_b=8.03, llm_vocab=128256, llm_family="llama3"),
    Backbone("Qwen2.5-7B", "+0.7", "qwen2_5_7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_vl", "qwen2_5_vl",
             8.29, 28, 3584, 28, 4, 128, 18944, 152064,
             llm_id="Qwen/Qwen2.5-7B-Instruct", llm_params_b=7.62, llm_vocab=152064, llm_family="qwen2.5"),
    Backbone("Qwen3-8B", "+3.6", "qwen3_8b", "Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl_nothink", "qwen3_vl",
             8.77, 36, 4096, 32, 8, 128, 12288, 151936,
             paper_heads=("L13H12", "L7H6", "L3H5", "L13H13", "L13H15"),
             llm_id="Qwen/Qwen3-8B", llm_params_b=8.19, llm_vocab=151936, llm_family="qwen3"),
    Backbone("Vicuna-13B", "+1.2", "vicuna_13b", "llava-hf/llava-1.5-13b-hf", "llava", "llava",
             13.35, 40, 5120, 40, 40, 128, 13824, 32064,
             llm_id="lmsys/vicuna-13b-v1.5", llm_params_b=13.0, llm_vocab=32000, llm_family="vicuna"),
    Backbone("Qwen2.5-14B", "+3.4", "qwen2_5_14b", "OpenGVLab/InternVL3-14B-hf", "intern_vl", "internvl",
             15.1, 48, 5120, 40, 8, 128, 13824, 151674,
             llm_id="Qwen/Qwen2.5-14B-Instruct", llm_params_b=14.77, llm_vocab=152064, llm_family="qwen2.5"),
    Backbone("Qwen3-14B", "+0.7", "qwen3_14b", "OpenGVLab/InternVL3_5-14B-HF", "intern_vl", "internvl",
             15.1, 40, 5120, 40, 8, 128, 17408, 151936,
             llm_id="Qwen/Qwen3-14B", llm_params_b=14.77, llm_vocab=151936, llm_family="qwen3"),
)


# The 2026 families users pick, one LoRA recipe each (recipes/<stem>_hera.yaml, one 80 GB GPU). Not in the paper
# (``llm`` names the MLLM, no Vision delta). Shapes: the text config of the checkpoint; params_b: a meta-device instance
# of transformers 5.6's class with that config and the vision tower's, counted (tests/hera/test_hera_recipe_hardware.py
# counts again). Qwen3.5's layers are 3 gated-delta-net (linear attention) layers then one gated softmax-attention
# layer, repeated: HeRA's heads are in the 8 softmax ones; the LoRA count below treats every layer as softmax
# attention (the adapter's states are under 1 GiB either way).
FAMILIES_2026: tuple[Backbone, ...] = (
    Backbone("Qwen3.5-9B", "", "qwen3_5_9b", "Qwen/Qwen3.5-9B", "qwen3_5", "qwen3_5",
             9.41, 32, 4096, 16, 4, 256, 12288, 248320),
    Backbone("Gemma-3-12B", "", "gemma3_12b", "google/gemma-3-12b-it", "gemma3", "gemma3",
             12.19, 48, 3840, 16, 8, 256, 15360, 262208, tied=True),
    Backbone("InternVL3.5-8B", "", "internvl3_5_8b", "OpenGVLab/InternVL3_5-8B-HF", "intern_vl", "internvl",
             8.53, 36, 4096, 32, 8, 128, 12288, 151936),
)
# A 70B-class model on one node: FSDP2 over 8 GPUs of 80 GB. Not in the paper; shapes: its config; params_b: a
# meta-device instance of its class, counted (tests/hera/test_hera_selection_memory.py: 73,410,777,344).
LARGE: tuple[Backbone, ...] = (
    Backbone("Qwen2.5-VL-72B", "", "qwen2_5_72b", "Qwen/Qwen2.5-VL-72B-Instruct", "qwen2_vl", "qwen2_5_vl",
             73.41, 80, 8192, 64, 8, 128, 29568, 152064),
)
FSDP2_72B = "qwen2_5_72b_hera_fsdp2.yaml"
QLORA = "qwen3_8b_hera_qlora.yaml"  # Qwen3-VL-8B, 4-bit, one 24 GB GPU
FSDP2 = "qwen3_8b_hera_fsdp2.yaml"  # Qwen3-VL-8B, FSDP2 over 8 GPUs
FSDP2_CONFIG = "accelerate/fsdp2_config.yaml"  # the accelerate config it runs with
FSDP2_GPUS = 8


def load_recipe(name: str) -> dict:
    """A recipe of this folder as a dict."""
    return yaml.safe_load((RECIPES / name).read_text(encoding="utf-8"))


def lora_params(b: Backbone, rank: int) -> float:
    """Adapter parameters: rank r on q, k, v, o, gate, up, down of every decoder layer."""
    q, kv, d, i = b.heads * b.head_dim, b.kv_heads * b.head_dim, b.hidden, b.intermediate
    in_plus_out = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d)
    return rank * b.layers * in_plus_out


def activation_bytes(b: Backbone, batch: int, seq: int) -> float:
    """Checkpointed layer inputs + one recomputed layer (activations and gradients) + logits."""
    tokens = batch * seq
    checkpoints = b.layers * tokens * b.hidden * 2
    recomputed = 2 * tokens * (8 * b.hidden + 4 * b.intermediate) * 2
    logits = tokens * b.vocab * LOGIT_BYTES
    return checkpoints + recomputed + logits


def embedding_params(b: Backbone) -> float:
    """The token embeddings and the output layer (one matrix when tied): what bitsandbytes leaves in bf16."""
    return b.vocab * b.hidden * (1 if b.tied else 2)


def layer_params(b: Backbone) -> float:
    """One decoder layer's linear weights (q, k, v, o, gate, up, down): what FSDP gathers at a time."""
    q, kv, d, i = b.heads * b.head_dim, b.kv_heads * b.head_dim, b.hidden, b.intermediate
    return d * q + 2 * d * kv + q * d + 3 * d * i


def stored_weight_bytes(b: Backbone, recipe: dict) -> float:
    """The frozen weights as stored: bf16, or bitsandbytes' ``quantization_bit`` (linear layers quantized, embeddings
    and output layer in bf16)."""
    params = b.params_b * 1e9
    bits = recipe.get("quantization_bit")
    if bits is None:
        return params * 2
    per_weight = quantized_bytes_per_weight(int(bits), bool(recipe.get("double_quantization", True)), b.hidden)
    return (params - embedding_params(b)) * per_weight + embedding_params(b) * 2


def weight_bytes(b: Backbone, recipe: dict) -> float:
    """The frozen weights during a step: as stored, plus, when quantized, the largest linear layer dequantized to bf16
    for its matmul."""
    dequantized = b.hidden * max(b.intermediate, b.heads * b.head_dim) * 2 if recipe.get("quantization_bit") else 0
    return stored_weight_bytes(b, recipe) + dequantized


def estimate_gib(b: Backbone, recipe: dict, zero: int | None = None, num_gpus: int = NUM_GPUS) -> float:
    """Estimated peak GiB per GPU for ``recipe`` on backbone ``b`` (``zero``: 2 or 3 for a full fine-tune)."""
    params = b.params_b * 1e9
    batch, seq = int(recipe["per_device_train_batch_size"]), int(recipe["cutoff_len"])
    fixed = TEACHER_PARAMS * 4 + OVERHEAD + activation_bytes(b, batch, seq)
    if recipe["finetuning_type"] == "lora":
        states = weight_bytes(b, recipe) + lora_params(b, int(recipe.get("lora_rank", 8))) * 16
    elif recipe.get("freeze_language_model") and zero == 3:  # stage 1 of the paper's experiment, sharded
        states = (params * 2 + b.projector_b * 1e9 * 16) / num_gpus + ZERO3_LIVE_PARAMS * 2
    elif recipe.get("freeze_language_model"):  # stage-1 style: projector only
        states = params * 2 + b.projector_b * 1e9 * 16
    elif zero == 3:
        states = params * 16 / num_gpus + ZERO3_LIVE_PARAMS * 2
    elif zero == 2:
        states = params * 2 + params * 14 / num_gpus
    else:
        raise ValueError("a full fine-tune needs zero=2 or zero=3")
    return (states + fixed) / GIB


def fsdp2_gib(b: Backbone, recipe: dict, num_gpus: int = FSDP2_GPUS) -> float:
    """Estimated peak GiB per GPU for a LoRA ``recipe`` on ``b`` under FSDP2 over ``num_gpus`` GPUs."""
    params = b.params_b * 1e9
    batch, seq = int(recipe["per_device_train_batch_size"]), int(recipe["cutoff_len"])
    fixed = TEACHER_PARAMS * 4 + OVERHEAD + activation_bytes(b, batch, seq)
    root = embedding_params(b) * 2
    sharded = params * 4 / num_gpus + 2 * layer_params(b) * 2  # fp32 shards (accelerate's upcast), 2 layers in bf16
    adapters = lora_params(b, int(recipe.get("lora_rank", 8))) * 16 / num_gpus
    return (root + sharded + adapters + fixed) / GIB


def backbone_of(stem: str) -> Backbone:
    """The backbone of recipes/<stem>_hera*.yaml (Table 2's, a 2026 family's or a large one's)."""
    return next(b for b in (*BACKBONES, *FAMILIES_2026, *LARGE) if b.stem == stem)


def composed(b: Backbone) -> Backbone:
    """The model ``llamafactory-hera compose --llm b.llm_id`` builds: the LLM, SigLIP2-SO400M and the projector."""
    projector = VISION_WIDTH * b.hidden + b.hidden + b.hidden * b.hidden + b.hidden  # linear, GELU, linear
    params = b.llm_params_b * 1e9 + VISION_TOWER_PARAMS + projector
    return replace(b, model_id=b.llm_id, params_b=params / 1e9, vocab=b.llm_vocab, projector_b=projector / 1e9)


def llava15_recipes(b: Backbone) -> tuple[str, str]:
    """The paper's experiment for backbone ``b``: its stage-1 and stage-2 recipes, relative to recipes/."""
    return f"{LLAVA15}/{b.stem}_stage1.yaml", f"{LLAVA15}/{b.stem}_stage2.yaml"


def llava15_gib(b: Backbone, name: str) -> float:
    """Estimated peak GiB per GPU of a recipes/llava15/ recipe (ZeRO-3 over 8 GPUs) on the composed model."""
    return estimate_gib(composed(b), load_recipe(name), zero=3)


def _cell(name: str, gib: float) -> str:
    verdict = "" if gib <= GPU_GIB else ", exceeds 80 GB"
    return f"`{name}`: ~{gib:.0f} GiB{verdict}"


def table_rows() -> list[str]:
    """The docs/hera.md table's rows, one per backbone."""
    rows = []
    for b in BACKBONES:
        lora, full = f"{b.stem}_hera.yaml", f"{b.stem}_hera_full.yaml"
        lora_gib = estimate_gib(b, load_recipe(lora))
        z3, z2 = (estimate_gib(b, load_recipe(full), zero=zero) for zero in (3, 2))
        z2_text = f"~{z2:.0f} GiB" + ("" if z2 <= GPU_GIB else ", exceeds 80 GB")
        rows.append(f"| {b.llm} | {b.vision_delta} | `{b.model_id}` | `{b.template}` | `{b.model_type}` | "
                    f"{_cell(lora, lora_gib)} | {_cell(full, z3)} (ZeRO-2: {z2_text}) |")
    return rows


def stage1_row() -> str:
    """The stage-1 example's memory line."""
    b = next(b for b in BACKBONES if b.stem == "vicuna_7b")
    name = "vicuna_7b_hera_stage1.yaml"
    return f"{_cell(name, estimate_gib(b, load_recipe(name)))}, one GPU"


def llava15_rows() -> list[str]:
    """The rows of docs/hera.md's table of the paper's experiment, one per backbone."""
    rows = []
    for b in BACKBONES:
        cells = " | ".join(f"{_cell(f'recipes/{name}', llava15_gib(b, name))}, per-device batch "
                           f"{load_recipe(name)['per_device_train_batch_size']}" for name in llava15_recipes(b))
        rows.append(f"| {b.llm} | `{b.llm_id}` | {cells} |")
    return rows


def hardware_rows() -> list[str]:
    """The rows of docs/hera.md's table of the recipes for smaller GPUs, a node and the 2026 families."""
    qwen3_8b = backbone_of("qwen3_8b")
    qlora = estimate_gib(qwen3_8b, load_recipe(QLORA))
    lora = estimate_gib(qwen3_8b, load_recipe(f"{qwen3_8b.stem}_hera.yaml"))
    fsdp2 = fsdp2_gib(qwen3_8b, load_recipe(FSDP2))
    rows = [f"| `{QLORA}` | `{qwen3_8b.model_id}` | `{qwen3_8b.template}` | 4-bit nf4 QLoRA, one 24 GB GPU | "
            f"~{qlora:.1f} GiB (bf16 LoRA: ~{lora:.0f} GiB) |",
            f"| `{FSDP2}` | `{qwen3_8b.model_id}` | `{qwen3_8b.template}` | LoRA, FSDP2 over {FSDP2_GPUS} GPUs "
            f"(`recipes/{FSDP2_CONFIG}`) | ~{fsdp2:.1f} GiB per GPU |"]
    large = backbone_of("qwen2_5_72b")
    rows.append(f"| `{FSDP2_72B}` | `{large.model_id}` | `{large.template}` | LoRA, FSDP2 over {FSDP2_GPUS} GPUs of "
                f"80 GB | ~{fsdp2_gib(large, load_recipe(FSDP2_72B)):.1f} GiB per GPU |")
    for b in FAMILIES_2026:
        name = f"{b.stem}_hera.yaml"
        rows.append(f"| `{name}` | `{b.model_id}` | `{b.template}` | LoRA, one 80 GB GPU | "
                    f"{_cell(name, estimate_gib(b, load_recipe(name))).split(': ', 1)[1]} |")
    return rows


def main() -> None:
    """Print the docs/hera.md tables' rows, the stage-1 line and the paper's experiment's table rows."""
    sys.stdout.write("\n".join([*table_rows(), stage1_row(), *llava15_rows(), *hardware_rows()]) + "\n")


if __name__ == "__main__":
    main()
