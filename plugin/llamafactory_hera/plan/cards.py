"""The GPUs ``llamafactory-hera plan`` knows: dense bf16 tensor peak (no sparsity), from the vendor's datasheet (named
beside the row), and the memory a process can allocate on it: the total ``nvidia-smi`` reports (MiB / 1024), below
the datasheet's GB (an H100's 80 GB is 81,559 MiB, 79.65 GiB); the link between a node's GPUs and its datasheet
rate; and the MFU band the time is given at, per engine and for 4-bit, from published runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float  # dense, FP32 accumulate
    memory_gib: float  # nvidia-smi's total, GiB
    link: str = "PCIe Gen4"  # the link between the node's GPUs
    link_gbs: float = 64.0  # its datasheet rate per GPU, GB/s, both directions together

    def seconds(self, flops: float, band: tuple[float, float]) -> tuple[float, float]:
        """Seconds (fast, slow) for ``flops`` at the MFU ``band`` (low, high) of the card's peak."""
        return flops / (self.bf16_tflops * 1e12 * band[1]), flops / (self.bf16_tflops * 1e12 * band[0])

    def holds(self, needed: float) -> bool:
        """Whether ``needed`` bytes fit the card's allocatable memory (GiB: 2**30 bytes each)."""
        return needed <= self.memory_gib * 2**30


CARDS = {
    card.name: card
    for card in (
        # NVIDIA H100 Tensor Core GPU datasheet (SXM): 1,979 TFLOPs with sparsity; NVLink 900 GB/s
        Card("H100-SXM", 989.4, 79.65, "NVLink 4", 900.0),
        # same datasheet, H100 PCIe: 1,513 with sparsity; PCIe Gen5 128 GB/s (its NVLink bridge joins pairs only)
        Card("H100-PCIe", 756.0, 79.65, "PCIe Gen5", 128.0),
        Card("H200", 989.4, 140.4, "NVLink 4", 900.0),  # NVIDIA H200 datasheet (SXM): 1,979 with sparsity; 900 GB/s
        Card("A100-80GB", 312.0, 80.0, "NVLink 3", 600.0),  # NVIDIA A100 datasheet (SXM, 80 GB): NVLink 600 GB/s
        Card("A100-40GB", 312.0, 40.0, "NVLink 3", 600.0),  # same datasheet (40 GB)
        Card("L40S", 362.05, 44.99),  # NVIDIA L40S datasheet: 733 with sparsity; PCIe Gen4 x16 64 GB/s, no NVLink
        Card(
            "RTX-4090", 165.2, 23.99
        ),  # NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090, FP32 accum.; PCIe 4
        Card("RTX-3090", 71.0, 24.0),  # NVIDIA Ampere GA102 whitepaper, GeForce RTX 3090, FP32 accumulate; PCIe Gen4
        Card(
            "A10G", 125.0, 22.49
        ),  # AWS's A10 variant: NVIDIA publishes none for it; the NVIDIA A10 datasheet's figures
    )
}
DEFAULT_CARD = "H100-SXM"
# The share of the dense bf16 peak a step reaches, (low, high) per engine, and where it is published. torchtitan's
# docs/performance.md: Llama 3.1 8B, FSDP on 8 or 128 H100, no Float8, 33 % to 39 % (its A100 runs: 50-58 %). None
# found for ZeRO-3, ZeRO-2 or DDP under the HF Trainer: FSDP2's assumed (their communication is timed apart).
MFU = {
    engine: (
        (0.33, 0.39),
        "torchtitan performance docs, 8B FSDP on 8 H100"
        + ("" if engine == "fsdp2" else "; FSDP2's, none published for this engine"),
    )
    for engine in ("ddp", "zero2", "zero3", "fsdp2")
}
# bitsandbytes 4-bit dequantizes each weight for every matmul: ms-swift's docs/source_en/LLM/Benchmark.md (A100,
# LoRA) trains qwen-7b-chat at 2.41 samples/s in int4 (bnb) vs 4.31 in bf16 (0.56x), qwen-14b-chat 1.36 vs 2.60 (0.52x).
QUANTIZED = ((0.52, 0.56), "x 0.52-0.56 for 4-bit, ms-swift LLM benchmark docs")


def mfu(engine: str, bits: int | None = None) -> tuple[tuple[float, float], str]:
    """The MFU band (low, high) of a step under ``engine`` (with ``bits``: bitsandbytes' slowdown) and its source."""
    (low, high), source = MFU[engine]
    slow = QUANTIZED[0] if bits else (1, 1)
    return (low * slow[0], high * slow[1]), source + (f", {QUANTIZED[1]}" if bits else "")
