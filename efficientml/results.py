"""Result files: a small JSON per run, with the provenance a reader needs to trust it."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: str | torch.device = "cpu") -> dict:
    """Where and with what a result was produced: device, versions, date (UTC), threads, commit."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(obj):
    if hasattr(obj, "to_dict"):          # e.g. a training History
        return obj.to_dict()
    if isinstance(obj, (np.generic, torch.Tensor)) and obj.ndim == 0:
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a JSON result")


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as JSON atomically: the file holds either its old or its whole new text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, allow_nan=True, default=_jsonable) + "\n"  # serialise before touching disk
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def result_path(out_dir: str | os.PathLike, experiment: str, profile: str) -> Path:
    """The file a run of ``experiment`` under ``profile`` writes in ``out_dir``."""
    return Path(out_dir) / f"{experiment}-{profile}.json"


def load_result(experiment: str, profile: str = "full", out_dir: str | os.PathLike | None = None) -> dict | None:
    """The saved result of a real run, or ``None`` if that run has not been made.

    out_dir defaults to the repository's ``results/`` folder, where committed results live.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent.parent / "results"
    path = result_path(out_dir, experiment, profile)
    return read_json(path) if path.exists() else None


def rerun_command(result: dict, page_settings: dict, out: str = "ceiling") -> str:
    """The command line that made ``result`` (a result file's dict), for a page to print: ``python
    -m efficientml run EXPERIMENT --out OUT`` with one ``--set`` per setting that differs from
    ``page_settings`` (the settings of the page that shows it), then a comment naming the file it
    writes and, as ``load_result(EXPERIMENT, OUT)`` reads it, the file committed in ``results/``."""
    for key in ("experiment", "profile", "settings"):
        if key not in result:
            raise ValueError(f"not a result file's dict: it has no {key!r}")
    name, profile = result["experiment"], result["profile"]
    changed = {k: v for k, v in result["settings"].items() if page_settings.get(k) != v}
    lines = [f"python -m efficientml run {name} --out {out}"]
    lines += [f'--set "{k}={v!r}"' for k, v in changed.items()]
    return (" \\\n    ".join(lines) + f"\n# writes {result_path(out, name, profile)}, committed as "
            f"{result_path('results', name, out)}")


def provenance_text(result: dict) -> str:
    """Two short lines on where and when ``result`` (a result file's dict) was computed, and how
    long it took."""
    prov = result["provenance"]
    return (f"run on {prov['device']} ({prov['device_name']}, {prov['cpu_count']} cores), "
            f"{prov['torch_threads']} thread(s), torch {prov['torch']},\ncommit {prov['git_commit']}, "
            f"{prov['date'][:10]}, {result['wall_time_s'] / 60:.0f} min in all")
