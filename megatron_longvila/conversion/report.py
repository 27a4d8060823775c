"""What a conversion tells its user: log lines, the progress bar, memory, the summary."""

import sys

from tqdm import tqdm


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM (its own address space's high-water mark).

    Not getrusage's ru_maxrss: on Linux that also keeps the peak of the address space before
    exec, i.e. of the parent that forked this process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not on every platform
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def progress_bar(total, desc, enabled):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def format_summary(s: dict) -> str:
    lines = [f"converted {s['tensors']} Megatron tensors ({s['direction'].replace('_', ' ')})",
             f"  read    {human_bytes(s['read_bytes'])}",
             f"  written {human_bytes(s['written_bytes'])}",
             f"  dtype   {s['dtype']}", f"  time    {s['seconds']:.1f} s",
             f"  peak RSS {human_bytes(s['peak_rss_bytes'])} (largest process)",
             f"  output  {s['save']}"]
    if s.get("dtype_from_source"):
        lines[3] += " (the source's; --dtype to change)"
    if s.get("extra_tensors"):
        lines.insert(1, f"  + {s['extra_tensors']} unused HF tensors carried in hf_assets/")
    if s.get("projector_initialized"):
        lines.insert(1, "  projector: not in the source; freshly initialised (seeded)")
    return "\n".join(lines)
