"""What --source names: an image, a folder, a glob, a video file or a webcam index."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import cv2

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


@dataclass
class Source:
    """kind is 'images' (paths), 'video' (a file) or 'webcam' (an index)."""

    kind: str
    paths: list[Path]
    webcam: int | None = None


def resolve_source(source: str) -> Source:
    """Classify --source; a name that matches nothing is an error."""
    if source.isdigit():
        return Source("webcam", [], int(source))
    path = Path(source)
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"--source {source}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Source("images", paths)
    if path.is_file():
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return Source("video", [path])
        return Source("images", [path])
    if any(ch in source for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(source, recursive=True)
                       if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"--source {source}: the pattern matches no images")
        return Source("images", paths)
    raise FileNotFoundError(f"--source {source}: no such image, folder, video or glob (a webcam is a number such as 0)")


def open_video(source: Source) -> cv2.VideoCapture:
    """A capture for a video file or webcam; one that cannot be opened is an error."""
    cap = cv2.VideoCapture(source.webcam if source.kind == "webcam" else str(source.paths[0]))
    if not cap.isOpened():
        what = f"webcam {source.webcam}" if source.kind == "webcam" else f"video {source.paths[0]}"
        raise ValueError(f"--source: cannot open {what} (missing codec, busy device or not a video)")
    return cap


def display_available() -> bool:
    """Whether cv2.imshow can open a window here."""
    import os  # noqa: PLC0415
    if os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return False
    try:
        return "GUI" not in cv2.getBuildInformation() or "NO" not in cv2.getBuildInformation().split("GUI:")[1][:40]
    except (IndexError, cv2.error):
        return False
