"""Video needle-in-a-haystack (V-NIAH, after LongVA): accuracy over (frames x depth).

For a cell (N frames, depth d) and a needle (image, question, answer): N-1 frames are sampled
uniformly from the haystack video (or made synthetically), the needle image is inserted as
frame ``floor(d * (N-1) + 0.5)`` (d = 0: first frame, d = 1: last), the model answers the question
about the N frames, and the answer is scored by exact match (case and surrounding
punctuation/space ignored) or by containment (the expected answer appears in the output).

Results are a JSON file, rewritten after every cell; a cell already in it is not run again
(resume), provided the file was made with the same settings. The heatmap puts frames on x
and depth on y (0% at the top), like LongVA's plot.

Scoring, per needle: free generation (``output`` matched as above) and/or teacher-forced as
LongVA / LongVILA score V-NIAH (``teacher_forced``: the answer's tokens follow the prompt and
every one is the argmax of the logits before it); a cell's ``accuracy`` is the free
generation's, ``tf_accuracy`` the teacher-forced one's (see
:mod:`megatron_longvila.evaluation.vniah` for the model side).

Needle sets (:func:`load_needles`): this project's JSON list
(``{"image", "question", "answer"}``), LongVA's ``dataset.json`` (``{"path", "prompt",
"answer"}``, images beside it or in its ``images/`` folder), or the Hugging Face needle set
LongVILA evaluates with (``lmms-lab/v_niah_needles``: ``image``, ``question``, ``answer``) as
a parquet file (needs pyarrow).

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
    image: str  # path (or a name, with ``frame`` holding the pixels)
    question: str
    answer: str
    frame: Optional[np.ndarray] = None  # RGB uint8 [H, W, 3], when not read from ``image``


def load_needles(path: str) -> List[Needle]:
    """A needle set (see the module docstring for the three accepted forms)."""
    if path.endswith(".parquet"):
        return _load_parquet_needles(path)
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of needles")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict):
            raise ValueError(f"{path}: needle {i} is not an object")
        longva = "path" in e and "prompt" in e  # LongVA's dataset.json
        keys = ("path", "prompt", "answer") if longva else ("image", "question", "answer")
        missing = [k for k in keys if k not in e]
        if missing:
            raise ValueError(f"{path}: needle {i} lacks {', '.join(missing)} (expected "
                             "image/question/answer, or LongVA's path/prompt/answer)")
        img = str(e[keys[0]])
        if not os.path.isabs(img):
            cands = [os.path.join(root, img)] + ([os.path.join(root, "images", img)]
                                                 if longva else [])
            img = next((c for c in cands if os.path.exists(c)), cands[0])
        # LongVA's prompts start with a newline (their image goes in front): frames go first
        # here too, so the question is the prompt without it
        out.append(Needle(img, str(e[keys[1]]).strip(), str(e["answer"]).strip()))
    return out


def _load_parquet_needles(path: str) -> List[Needle]:
    import io

    from PIL import Image
    try:
        import pyarrow.parquet as pq  # optional: the Hugging Face needle set's file format
    except ImportError:
        raise ValueError(f"{path}: reading a parquet needle set needs pyarrow "
                         "(pip install pyarrow)") from None
    table = pq.read_table(path).to_pylist()
    if not table:
        raise ValueError(f"{path}: no needles")
    out = []
    for i, row in enumerate(table):
        missing = [k for k in ("image", "question", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}: row {i} lacks {', '.join(missing)}")
        img = row["image"]
        data = img.get("bytes") if isinstance(img, dict) else img
        if not data:
            raise ValueError(f"{path}: row {i} has no image bytes")
        with Image.open(io.BytesIO(data)) as im:
            frame = np.asarray(im.convert("RGB"))
        name = (img.get("path") if isinstance(img, dict) else None) or f"needle{i}"
        out.append(Needle(name, str(row["question"]).strip(), str(row["answer"]).strip(), frame))
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
        cells = list(self.cells.values())
        n = sum(c["total"] for c in cells)
        out = {"cells": len(cells), "answers": n}
        if all("correct" in c for c in cells):
            k = sum(c["correct"] for c in cells)
            out.update(correct=k, accuracy=(k / n) if n else None)
        if cells and all("tf_correct" in c for c in cells):
            k = sum(c["tf_correct"] for c in cells)
            out.update(tf_correct=k, tf_accuracy=(k / n) if n else None)
        return out

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


def run_cells(cell_fn: Callable[[int, float, int], dict], needles: Sequence[Needle],
              frame_counts: Sequence[int], depths: Sequence[float], results: Results,
              match: str = "exact", write: bool = True,
              log: Optional[Callable[[str], None]] = None) -> Results:
    """Evaluate every unfinished cell. ``cell_fn(n_frames, depth, needle_i)`` returns
    ``{"output": text or None, "teacher_forced": bool or None}`` for one needle."""
    for n in frame_counts:
        if n < 1:
            raise ValueError(f"frame count {n} < 1")
    for n in frame_counts:
        for d in depths:
            if results.done(cell_key(n, d)):
                continue
            answers = []
            for i, nd in enumerate(needles):
                r = cell_fn(n, d, i)
                a = {"needle": os.path.basename(nd.image), "answer": nd.answer}
                if r.get("output") is not None:
                    a.update(output=r["output"], correct=bool(score(r["output"], nd.answer, match)))
                if r.get("teacher_forced") is not None:
                    a["teacher_forced"] = bool(r["teacher_forced"])
                answers.append(a)
            cell = {"key": cell_key(n, d), "frames": n, "depth": d,
                    "needle_index": needle_index(n, d), "total": len(answers), "answers": answers}
            msg = f"frames {n:4d} depth {d:5.2f}:"
            if all("correct" in a for a in answers):
                k = sum(a["correct"] for a in answers)
                cell.update(correct=k, accuracy=k / len(answers))
                msg += f" {k}/{len(answers)} = {k / len(answers):.2f}"
            if all("teacher_forced" in a for a in answers):
                k = sum(a["teacher_forced"] for a in answers)
                cell.update(tf_correct=k, tf_accuracy=k / len(answers))
                msg += f" teacher-forced {k}/{len(answers)} = {k / len(answers):.2f}"
            results.add(cell)
            if write:
                results.write()
            if log:
                log(msg)
    return results


def run_grid(answer_fn: Callable[[List[np.ndarray], Needle], str],
             haystack_fn: Callable[[int], List[np.ndarray]], needles: Sequence[Needle],
             needle_frames: Sequence[np.ndarray], frame_counts: Sequence[int],
             depths: Sequence[float], results: Results, match: str = "exact",
             write: bool = True, log: Optional[Callable[[str], None]] = None) -> Results:
    """Evaluate every unfinished cell by free generation. ``answer_fn(frames_u8, needle) ->
    text``; ``haystack_fn(n) -> n`` uint8 frames (made once per frame count);
    ``needle_frames[i]`` is needle i's image."""
    hay: Dict[int, List[np.ndarray]] = {}

    def cell_fn(n, d, i):
        if n not in hay:
            hay.clear()
            hay[n] = haystack_fn(n - 1)
        return {"output": answer_fn(insert_needle(hay[n], needle_frames[i], d), needles[i])}

    return run_cells(cell_fn, needles, frame_counts, depths, results, match, write, log)


def answer_differences(a: dict, b: dict, common_only: bool = False) -> List[str]:
    """Cells/needles whose outputs differ between two results dicts (e.g. SP=1 vs SP=2 runs),
    and (unless ``common_only``) cells present in only one of them."""
    ca = {c["key"]: c for c in a["cells"]}
    cb = {c["key"]: c for c in b["cells"]}
    diffs = [] if common_only else [f"cell {k} only in one run" for k in sorted(set(ca) ^ set(cb))]
    for k in sorted(set(ca) & set(cb)):
        for x, y in zip(ca[k]["answers"], cb[k]["answers"]):
            kx = (x["needle"], x.get("output"), x.get("teacher_forced"))
            ky = (y["needle"], y.get("output"), y.get("teacher_forced"))
            if kx != ky:
                diffs.append(f"cell {k} needle {x['needle']}: {kx[1:]!r} vs {ky[1:]!r}")
    return diffs


def plot_heatmap(results: dict, path: str, title: Optional[str] = None,
                 key: Optional[str] = None):
    """Accuracy heatmap PNG: frames on x, depth on y (0% at the top). ``key``: ``accuracy``
    (free generation) or ``tf_accuracy`` (teacher-forced); default: the first present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cells = results["cells"]
    if key is None:
        key = "accuracy" if all("accuracy" in c for c in cells) else "tf_accuracy"
    frames = sorted({c["frames"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = np.full((len(depths), len(frames)), np.nan)
    for c in cells:
        acc[depths.index(c["depth"]), frames.index(c["frames"])] = c[key]
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
        title = "V-NIAH accuracy" + (" (teacher-forced)" if key == "tf_accuracy" else "")
        if s.get(key) is not None:
            title += f" (mean {s[key]:.2f} over {s['answers']} answers)"
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
