"""The half of the parity check that must not see the model's class: load exported files in a fresh process,
run them on saved inputs, save the outputs.

    python _parity_worker.py JOBS.json

JOBS.json holds {"forbid": [module names], "result": path, "jobs": [{"format", "file", "inputs", "outputs"}]}.
The forbidden modules (etappe and the modules that define the model's classes) cannot be imported here, so a file
that needs them to load fails the check instead of passing because they happened to be importable. ONNX files
run in onnxruntime, without torch. This file is run by path and imports nothing from etappe.
"""

import os
import sys

# Run by path, Python puts etappe's own folder first on sys.path; take it off so nothing of etappe is importable.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import importlib.abc  # noqa: E402
import json  # noqa: E402


class Forbid(importlib.abc.MetaPathFinder):
    """Refuses to import the named modules and everything under them."""

    def __init__(self, names: list) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        for name in self.names:
            if fullname == name or fullname.startswith(name + "."):
                raise ImportError(f"module {fullname!r} is not importable in the parity check; "
                                  "the exported file must load without it")
        return None


def run(job: dict) -> None:
    import numpy as np

    x = np.load(job["inputs"], allow_pickle=False)
    if job["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(job["file"], providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: x})
    else:
        import torch

        if job["format"] == "torchscript":
            model = torch.jit.load(job["file"], map_location="cpu")
        elif job["format"] == "export":
            model = torch.export.load(job["file"]).module()
        else:
            raise ValueError(f"unknown format {job['format']!r}")
        with torch.no_grad():
            out = model(torch.from_numpy(x))
        outputs = [o.numpy() for o in ([out] if torch.is_tensor(out) else out)]
    np.savez(job["outputs"], *outputs)


def main(jobs_file: str) -> int:
    with open(jobs_file) as f:
        spec = json.load(f)
    sys.meta_path.insert(0, Forbid(spec["forbid"]))
    results = []
    for job in spec["jobs"]:
        try:
            run(job)
            results.append({"ok": True})
        except Exception as exc:  # reported to the parent, which turns it into one line for the user
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            results.append({"ok": False, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"})
    with open(spec["result"], "w") as f:
        json.dump({"results": results, "forbidden_loaded": sorted(n for n in spec["forbid"] if n in sys.modules)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
