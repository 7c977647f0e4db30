"""What --data names, in any of the three formats: a VOC folder, a YOLO data.yaml or COCO json; one way to load splits.

Detection: 'sample' is the built-in VOC sample; a folder with Annotations/ is VOC; a .yaml (or a folder holding
data.yaml) is YOLO; a .json, or a folder with annotations/instances_*.json, is COCO. Every format's splits
answer to our names train / val / test (COCO's train2017 to train, Roboflow's valid to val).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.data.coco_json import CocoData, coco_split, find_coco, load_coco
from utils.data.dataset import DatasetError, LoadReport, Record
from utils.data.sample_data import DEFAULT_ROOT, ensure_sample_dataset
from utils.data.voc import load_voc, split_exists
from utils.data.yolo_txt import YoloData, load_yolo, read_data_yaml

FORMAT_NAMES = {"voc": "Pascal VOC", "yolo": "YOLO txt", "coco": "COCO json"}


@dataclass
class DataSource:
    """A dataset in one of the formats: `path` is what --data named (folder or file)."""

    format: str                     # voc | yolo | coco
    path: Path
    yolo: YoloData | None = None
    coco: CocoData | None = None

    def has_split(self, split: str) -> bool:
        """Whether the data defines `split` itself (no fallback; a lone COCO json defines none by name)."""
        if self.format == "voc":
            return split_exists(self.path, split)
        if self.format == "yolo":
            return split in self.yolo.splits
        return not self.coco.single and coco_split(self.coco, split) is not None

    def load(self, split: str, class_names: list[str] | None = None, fallback: str | None = None,
             report: LoadReport | None = None) -> tuple[list[Record], list[str]]:
        """Records of a split (else of `fallback`) and the class names their labels index."""
        if self.format == "voc":
            return load_voc(self.path, split, class_names, fallback, report)
        if self.format == "yolo":
            return load_yolo(self.yolo, split, class_names, fallback, report)
        return load_coco(self.coco, split, class_names, fallback, report)

    @property
    def split_place(self) -> str:
        """Where the splits are defined, for messages."""
        if self.format == "voc":
            return str(self.path / "ImageSets" / "Main")
        if self.format == "yolo":
            return f"{self.yolo.yaml} (train/val/test)"
        return str(self.coco.path) if self.coco.single else f"{self.coco.path / 'annotations'} (instances_<split>.json)"

    def describe(self) -> str:
        """The format as the start-up table shows it."""
        return FORMAT_NAMES[self.format]


def open_data(data: str) -> DataSource:
    """--data -> a DataSource of the format it is in; anything else is an error saying what each format looks like."""
    if data == "sample":
        return DataSource("voc", ensure_sample_dataset(DEFAULT_ROOT))
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return DataSource("yolo", path, yolo=read_data_yaml(path))
    if path.is_file() and path.suffix.lower() == ".json":
        return DataSource("coco", path, coco=find_coco(path))
    if path.is_dir() and (path / "Annotations").is_dir():
        if not any((path / "Annotations").iterdir()):
            raise DatasetError(f"--data {data}: no annotations in {path / 'Annotations'}; put Pascal VOC there "
                               f"(Annotations/, JPEGImages/, ImageSets/Main/: see VOCdevkit/README.md)")
        return DataSource("voc", path)
    if path.is_dir() and any((path / "annotations").glob("instances_*.json")):
        return DataSource("coco", path, coco=find_coco(path))
    if path.is_dir() and (path / "data.yaml").is_file():
        return DataSource("yolo", path / "data.yaml", yolo=read_data_yaml(path / "data.yaml"))
    raise DatasetError(f"--data {data}: not a dataset; pass a VOC folder (Annotations/, JPEGImages/, "
                       f"ImageSets/Main/: see VOCdevkit/README.md), a YOLO data.yaml, a COCO instances json or a "
                       f"folder with annotations/instances_*.json, or --data sample for the built-in sample set")
