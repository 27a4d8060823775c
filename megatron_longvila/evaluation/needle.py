"""Video needle-in-a-haystack (V-NIAH, after LongVA): accuracy over (frames x depth).

For a cell (N frames, depth d) and a needle (image, question, answer): N-1 frames are sampled
uniformly from the haystack video (or made synthetically), the needle image is inserted as
frame ``floor(d * (N-1) + 0.5)`` (d = 0: first frame, d = 1: last), the model answers the question
about the N frames, and the answer is scored by exact match (case and surrounding
punctuation/space ignored) or by containment (the expected answer appears in the output).

Results are a JSON file, rewritten after every cell; a cell already in it is not run again
(resume), provided the file was made with the same settings. The heatmap puts frames on x
and depth on y (0% at the top), like LongVA's plot.

Every rank of a multi-rank run evaluates the same cells together (MM-SP shares each forward);
rank 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

RESULTS_VERSION = 1


@dataclass
class Needle:
    image: str  # path
    question: str
    answer: str


def load_needles(path: str) -> List[Needle]:
    """``[{"image": path (relative to the JSON's folder), "question", "answer"}, ...]``."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of needles")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, e in enumerate(data):
        missing = [k for k in ("image", "question", "answer") if k not in e]
        if missing:
            raise ValueError(f"{path}: needle {i} lacks {', '.join(missing)}")
        img = e["image"] if os.path.isabs(e["image"]) else os.path.join(root, e["image"])
        out.append(Needle(img, str(e["question"]), str(e["answer"])))
    return out


def _norm(s: str) -> str:
    return " ".join(s.lower().strip().strip(string.punctuation + " ").split())


def score(output: str, answer: str, match: str = "exact") -> bool:
    if match == "exact":
        return _norm(output) == _norm(answer)
    if match == "contains":
        return re.search(r"(?<![a-z0-9])" + re.escape(_norm(answer)) + r"(?![a-z0-9])",
                         _norm(output)) is not None
    raise ValueError(f"unknown match {match!r}: exact or contains")


def needle_index(num_frames: int, depth: float) -> int:
    """Frame index of the needle: depth * (N-1), halves rounded up."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    return int(np.floor(depth * (num_frames - 1) + 0.5))


def insert_needle(haystack: Sequence[np.ndarray], needle: np.ndarray, depth: float) -> List[np.ndarray]:
    """``len(haystack) + 1`` frames with ``needle`` at ``needle_index(len + 1, depth)``."""
    frames = list(haystack)
    frames.insert(needle_index(len(frames) + 1, depth), needle)
    return frames


def cell_key(num_frames: int, depth: float) -> str:
    return f"{num_frames}@{depth:g}"


class Results:
    """The results file: settings + finished cells (resumable)."""

    def __init__(self, path: str, settings: dict, overwrite: bool = False):
        self.path, self.settings = path, settings
        self.cells: Dict[str, dict] = {}
        if os.path.exists(path) and not overwrite:
            with open(path) as f:
                old = json.load(f)
            if old.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(old.get("settings", {}))
                              if settings.get(k) != old.get("settings", {}).get(k))
                raise ValueError(f"{path} holds results of other settings ({', '.join(diff)} "
                                 f"differ); pass --overwrite or another --output")
            self.cells = {c["key"]: c for c in old.get("cells", [])}

    def done(self, key: str) -> bool:
        return key in self.cells

    def add(self, cell: dict):
        self.cells[cell["key"]] = cell

    def summary(self) -> dict:
        n = sum(c["total"] for c in self.cells.values())
        k = sum(c["correct"] for c in self.cells.values())
        return {"cells": len(self.cells), "answers": n, "correct": k,
                "accuracy": (k / n) if n else None}

    def to_dict(self) -> dict:
        order = sorted(self.cells.values(), key=lambda c: (c["frames"], c["depth"]))
        return {"version": RESULTS_VERSION, "settings": self.settings,
                "summary": self.summary(), "cells": order}

    def write(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, self.path)


def run_grid(answer_fn: Callable[[List[np.ndarray], Needle], str],
             haystack_fn: Callable[[int], List[np.ndarray]], needles: Sequence[Needle],
             needle_frames: Sequence[np.ndarray], frame_counts: Sequence[int],
             depths: Sequence[float], results: Results, match: str = "exact",
             write: bool = True, log: Optional[Callable[[str], None]] = None) -> Results:
    """Evaluate every unfinished cell. ``answer_fn(frames_u8, needle) -> text``;
    ``haystack_fn(n) -> n`` uint8 frames; ``needle_frames[i]`` is needle i's image."""
    for n in frame_counts:
        if n < 1:
            raise ValueError(f"frame count {n} < 1")
        todo = [d for d in depths if not results.done(cell_key(n, d))]
        if not todo:
            continue
        hay = haystack_fn(n - 1)
        for d in todo:
            answers = []
            for nd, img in zip(needles, needle_frames):
                out = answer_fn(insert_needle(hay, img, d), nd)
                answers.append({"needle": os.path.basename(nd.image), "answer": nd.answer,
                                "output": out, "correct": bool(score(out, nd.answer, match))})
            k = sum(a["correct"] for a in answers)
            cell = {"key": cell_key(n, d), "frames": n, "depth": d,
                    "needle_index": needle_index(n, d), "correct": k, "total": len(answers),
                    "accuracy": k / len(answers), "answers": answers}
            results.add(cell)
            if write:
                results.write()
            if log:
                log(f"frames {n:4d} depth {d:5.2f}: {k}/{len(answers)} = {k / len(answers):.2f}")
    return results


def answer_differences(a: dict, b: dict, common_only: bool = False) -> List[str]:
    """Cells/needles whose outputs differ between two results dicts (e.g. SP=1 vs SP=2 runs),
    and (unless ``common_only``) cells present in only one of them."""
    ca = {c["key"]: c for c in a["cells"]}
    cb = {c["key"]: c for c in b["cells"]}
    diffs = [] if common_only else [f"cell {k} only in one run" for k in sorted(set(ca) ^ set(cb))]
    for k in sorted(set(ca) & set(cb)):
        for x, y in zip(ca[k]["answers"], cb[k]["answers"]):
            if (x["needle"], x["output"]) != (y["needle"], y["output"]):
                diffs.append(f"cell {k} needle {x['needle']}: {x['output']!r} vs {y['output']!r}")
    return diffs


def plot_heatmap(results: dict, path: str, title: Optional[str] = None):
    """Accuracy heatmap PNG: frames on x, depth on y (0% at the top)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cells = results["cells"]
    frames = sorted({c["frames"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = np.full((len(depths), len(frames)), np.nan)
    for c in cells:
        acc[depths.index(c["depth"]), frames.index(c["frames"])] = c["accuracy"]
    cmap = LinearSegmentedColormap.from_list("niah", ["#d7263d", "#f4c542", "#1b998b"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(frames) + 2.5),
                                    max(3.0, 0.55 * len(depths) + 1.8)))
    im = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(frames)), [str(f) for f in frames])
    ax.set_yticks(range(len(depths)), [f"{d * 100:.0f}%" for d in depths])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(frames)):
            if not np.isnan(acc[i, j]):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black")
    s = results.get("summary", {})
    if title is None:
        title = "V-NIAH accuracy"
        if s.get("accuracy") is not None:
            title += f" (mean {s['accuracy']:.2f} over {s['answers']} answers)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _main(argv=None):
    """``python -m megatron_longvila.evaluation.needle compare A.json B.json``: exit 1 if the
    two runs answered differently anywhere."""
    p = argparse.ArgumentParser(prog="python -m megatron_longvila.evaluation.needle")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="same answers in two results files?")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--common-only", action="store_true", help="compare the cells both hold")
    h = sub.add_parser("heatmap", help="redraw a results file's heatmap")
    h.add_argument("results")
    h.add_argument("png")
    args = p.parse_args(argv)
    if args.cmd == "heatmap":
        with open(args.results) as f:
            print(plot_heatmap(json.load(f), args.png))
        return 0
    with open(args.a) as f:
        a = json.load(f)
    with open(args.b) as f:
        b = json.load(f)
    diffs = answer_differences(a, b, args.common_only)
    keys = {c["key"] for c in b["cells"]}
    cells = [c for c in a["cells"] if c["key"] in keys]
    if diffs:
        print(f"{len(diffs)} differences:\n" + "\n".join(diffs[:50]))
        return 1
    wrong = sum(c["total"] - c["correct"] for c in cells)
    print(f"same answers: {sum(c['total'] for c in cells)} answers ({wrong} of them wrong) "
          f"in {len(cells)} cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
