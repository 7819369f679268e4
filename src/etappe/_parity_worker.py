"""The half of the parity check that must not see the model's class: load exported files in a fresh process,
run them on saved inputs, save the outputs.

    python _parity_worker.py FORBID_JSON FORMATS      then, on stdin, one path of a JOBS.json per line

Modules in FORBID_JSON (etappe), and in each JOBS.json's "forbid" (the modules defining that model's classes),
cannot be imported here, so a file that needs them to load fails the check instead of passing because they
happened to be importable. The process starts while the parent is still writing the files: it imports what
FORMATS need first (torch and torch.export's loader take seconds), then reads JOBS.json paths until end of
input. JOBS.json: {"forbid": [...], "jobs": [{"format", "file", "inputs", "args", "kwargs", "names", "outputs"}]}:
"inputs" an .npz of positional inputs a0, a1 ... and keyword inputs k0, k1 ... (named in "kwargs"), "names" the
ONNX file's input names; each job's outputs go to its "outputs" .npz, flattened, and the results to stdout as one
line starting with MARK. ONNX files run in onnxruntime. This file is run by path and imports
nothing from etappe.

TorchScript and .pt2 files run code of theirs when loaded (etappe.export.load_model asks for trust for them);
the only files loaded here are the ones the parent has just written from the user's own model, in this call.
"""

import os
import sys

# Run by path, Python puts etappe's own folder first on sys.path; take it off so nothing of etappe is importable.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import importlib.abc  # noqa: E402
import json  # noqa: E402


MARK = "@@etappe-parity "  # starts the line that reports a check's results on stdout


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


def flatten(out) -> list:  # noqa: ANN001
    """A model's outputs in etappe's one order (etappe.export.writers.flatten_outputs, which this file cannot
    import): a tensor; tuples and lists depth first; a dict's values in its order."""
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten(v)]
    return [out]


def run(job: dict) -> None:
    import numpy as np

    with np.load(job["inputs"], allow_pickle=False) as z:
        args = [z[f"a{i}"] for i in range(job["args"])]
        kwargs = {name: z[f"k{i}"] for i, name in enumerate(job["kwargs"])}
    if job["format"] == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(job["file"], providers=["CPUExecutionProvider"])
        wanted = [i.name for i in session.get_inputs()]
        given = args + list(kwargs.values())
        names = job.get("names") or wanted  # the names the export gave, in the inputs' order
        feed = {name: x for name, x in zip(names, given) if name in wanted}
        outputs = session.run(None, feed)
    else:
        import torch

        if job["format"] == "torchscript":
            model = torch.jit.load(job["file"], map_location="cpu")
        elif job["format"] == "export":
            with open(job["file"], "rb") as f:  # a file object: the temporary name checked does not end in .pt2
                model = torch.export.load(f).module()
        else:
            raise ValueError(f"unknown format {job['format']!r}")
        with torch.no_grad():
            out = model(*[torch.from_numpy(x) for x in args], **{k: torch.from_numpy(v) for k, v in kwargs.items()})
        outputs = [o.numpy() for o in flatten(out)]
    np.savez(job["outputs"], *outputs)


def warm_up(formats: list) -> None:
    try:
        if "onnx" in formats:
            import onnxruntime  # noqa: F401
        if "torchscript" in formats or "export" in formats:
            import torch  # noqa: F401
        if "export" in formats:
            import torch.export.pt2_archive  # noqa: F401  (what torch.export.load imports on first use)
    except ImportError:
        pass  # the job itself will report it


def main(forbid_json: str, formats: str) -> int:
    base = json.loads(forbid_json)
    finder = Forbid(base)
    sys.meta_path.insert(0, finder)
    warm_up(formats.split(","))
    for line in sys.stdin:  # one JOBS.json per line, until end of input
        if not line.strip():
            continue
        with open(line.strip()) as f:
            spec = json.load(f)
        finder.names = sorted(set(base) | set(spec.get("forbid", [])))
        # A forbidden module already here (imported by an earlier check) would void this check's claim.
        present = sorted(n for n in finder.names if any(m == n or m.startswith(n + ".") for m in sys.modules))
        results = []
        for job in spec["jobs"]:
            if present:
                results.append({"ok": False, "error": f"modules {present} were already imported in the check process"})
                continue
            try:
                run(job)
                results.append({"ok": True})
            except Exception as exc:  # reported to the parent, which turns it into one line for the user
                lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                results.append({"ok": False, "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"})
        sys.stdout.write("\n" + MARK + json.dumps({"results": results}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
