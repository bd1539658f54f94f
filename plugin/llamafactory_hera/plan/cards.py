"""The GPUs plan knows: dense bf16 peak from the datasheet named beside each row; allocatable memory, ``nvidia-smi``'s
total (MiB / 1024); the link between a node's GPUs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float  # dense, FP32 accumulate
    memory_gib: float  # nvidia-smi's total, GiB
    link: str = "PCIe Gen4"  # the link between the node's GPUs
    link_gbs: float = 64.0  # its datasheet rate per GPU, GB/s, both directions together

    def holds(self, needed: float) -> bool:
        return needed <= self.memory_gib * 2**30


CARDS = {
    card.name: card
    for card in (
        # NVIDIA H100 Tensor Core GPU datasheet (SXM): 1,979 TFLOPs with sparsity; NVLink 900 GB/s
        Card("H100-SXM", 989.4, 79.65, "NVLink 4", 900.0),
        # same datasheet, PCIe: 1,513 with sparsity; PCIe Gen5 128 GB/s (its NVLink bridge joins pairs only)
        Card("H100-PCIe", 756.0, 79.65, "PCIe Gen5", 128.0),
        Card("H200", 989.4, 140.4, "NVLink 4", 900.0),  # NVIDIA H200 datasheet (SXM): 1,979 with sparsity; 900 GB/s
        Card("A100-80GB", 312.0, 80.0, "NVLink 3", 600.0),  # NVIDIA A100 datasheet (SXM, 80 GB): NVLink 600 GB/s
        Card("A100-40GB", 312.0, 40.0, "NVLink 3", 600.0),  # same datasheet (40 GB)
        Card("L40S", 362.05, 44.99),  # NVIDIA L40S datasheet: 733 with sparsity; PCIe Gen4 x16 64 GB/s, no NVLink
        Card("RTX-4090", 165.2, 23.99),  # NVIDIA Ada GPU architecture whitepaper, FP32 accumulate; PCIe 4
        Card("RTX-3090", 71.0, 24.0),  # NVIDIA Ampere GA102 whitepaper, FP32 accumulate; PCIe Gen4
        Card("A10G", 125.0, 22.49),  # AWS's A10 variant, unpublished: the NVIDIA A10 datasheet's figures
    )
}
DEFAULT_CARD = "H100-SXM"
