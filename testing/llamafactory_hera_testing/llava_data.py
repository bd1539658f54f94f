"""LLaVA's training data in its own file formats, tiny: a LLaVA-Pretrain-558k-style caption file with its image
folder and a LLaVA-v1.5-mix665k-style mixture with its image folders, laid out as LLaVA's ``playground/data``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

GREEN = (10, 200, 30)


def turn(who: str, text: str) -> dict[str, str]:
    """One turn of a LLaVA conversation."""
    return {"from": who, "value": text}


def png(path: Path, colour: tuple[int, int, int] = GREEN) -> str:
    """An 8 x 8 image of one ``colour`` at ``path`` (its folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return str(path)


def colour_of(index: int) -> tuple[int, int, int]:
    """A colour per index, different for the first hundred (a teacher tells the images apart)."""
    return (index * 83 + 10) % 256, (200 - index * 47) % 256, (index * 61 + 30) % 256


def write_tree(root: Path, dataset_info: Path, captions: int = 3) -> SimpleNamespace:
    """A dataset_dir (``root/data``) holding ``dataset_info`` and LLaVA's files in its layout (``llava/`` as LLaVA's
    ``playground/data``): a 558k-style caption file of ``captions`` rows, each its own image of its own colour, and a
    665k-style mixture with a missing, an empty and a corrupt image, two text-only rows, an image two rows share and
    integer ids beside string ones."""
    data = root / "data"
    llava = data / "llava"
    data.mkdir(parents=True)
    shutil.copy(dataset_info, data / "dataset_info.json")
    pretrain = llava / "LLaVA-Pretrain"
    rows = []
    for i in range(captions):
        png(pretrain / "images" / "00000" / f"{i:09d}.png", colour_of(i))
        prompt = "<image>\nWrite a terse but informative summary of the picture." if i % 2 else \
            "Render a clear and concise summary of the photo.\n<image>"
        rows.append({"id": f"{i:09d}", "image": f"00000/{i:09d}.png",
                     "conversations": [turn("human", prompt), turn("gpt", f"a green square number {i}")]})
    (pretrain / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(rows))
    for i, image in enumerate(("coco/train2017/000000000001.png", "gqa/images/1.png", "vg/VG_100K_2/2.png")):
        png(llava / image, colour_of(i))
    (llava / "textvqa" / "train_images").mkdir(parents=True)
    (llava / "textvqa" / "train_images" / "empty.jpg").write_bytes(b"")
    (llava / "vg" / "VG_100K").mkdir(parents=True)
    (llava / "vg" / "VG_100K" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")

    def vqa(row_id: object, image: str, question: str = "<image>\nWhat colour is it?") -> dict[str, object]:
        return {"id": row_id, "image": image, "conversations": [turn("human", question), turn("gpt", "Green."),
                                                                  turn("human", "Sure?"), turn("gpt", "Yes.")]}

    mixture = [
        vqa("000000000001", "coco/train2017/000000000001.png"),
        vqa("000000000001", "coco/train2017/000000000001.png", "Describe it.\n<image>"),
        vqa("1", "gqa/images/1.png"),
        {"id": "i6IyJda_0", "model": "", "conversations": [turn("human", "Hi"), turn("gpt", "Hello")]},
        {"id": "wgByO4Y_0", "model": "", "conversations": [turn("human", "Tell a joke"), turn("gpt", "No.")]},
        vqa("B00000J0AD", "ocr_vqa/images/B00000J0AD.jpg"),
        vqa("textvqa_1", "textvqa/train_images/empty.jpg"),
        vqa(7, "vg/VG_100K/corrupt.jpg"),
        vqa(2, "vg/VG_100K_2/2.png"),
    ]
    (llava / "llava_v1_5_mix665k.json").write_text(json.dumps(mixture))
    return SimpleNamespace(data=data, llava=llava, pretrain=pretrain, mixture=llava / "llava_v1_5_mix665k.json",
                           converted=llava / "llava_v1_5_mix665k.string_ids.json")


BAD_IMAGES = ("ocr_vqa", "textvqa", "vg/VG_100K/")  # the mixture's missing, empty and corrupt images


def keep_loadable_rows(mixture: Path) -> None:
    """Drop the mixture's rows whose image is missing, empty or corrupt (:data:`BAD_IMAGES`): 6 rows stay, 2 of
    them text-only."""
    rows = [row for row in json.loads(mixture.read_text()) if not str(row.get("image", "")).startswith(BAD_IMAGES)]
    mixture.write_text(json.dumps(rows))
