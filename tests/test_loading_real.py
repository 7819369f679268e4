"""Weights as real projects ship them: head weights loaded non-strictly into a full model, state dicts saved from
DDP or torch.compile (or under any other prefix), tied weights written by safetensors' save_model, and Hugging
Face style folders (one file, or shards with an index). Each file is written here by the tool that writes it."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etappe
from etappe.checkpoint import CheckpointError, CheckpointWarning, hf, kinds
from etappe.cli import main
from etappe.errors import UsageError
from tests.conftest import run_cli


class Full(nn.Module):
    """A backbone and a head, as a project with published head weights has them."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (head.weight is embed.weight)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


def made(cls=Full, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kw)


def same(a: dict, b: dict, keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


BACKBONE = ("backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias")


# --- non-strict loads -------------------------------------------------------------------------------------------

def test_head_weights_load_non_strictly_and_the_report_names_exactly_what_differs(tmp_path):
    published = made(seed=1)
    torch.save({k: v for k, v in published.state_dict().items() if k.startswith("head.")}, tmp_path / "head.pt")
    net = made(seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        etappe.load(tmp_path / "head.pt", model=net)
    msg = str(err.value)
    assert "\n" not in msg and "missing backbone.* (4 keys)" in msg and "strict=False" in msg
    assert same(net.state_dict(), before), "a refused strict load must leave the model untouched"
    values = etappe.load(tmp_path / "head.pt", model=net, strict=False)
    assert values == {} and isinstance(values, dict)
    report = values.reports["model"]
    assert report.missing == BACKBONE and report.unexpected == () and report.mismatched == ()
    assert not report.complete and not report.renamed
    assert same(net.state_dict(), published.state_dict(), ["head.weight", "head.bias"])
    assert same(net.state_dict(), before, BACKBONE)


def test_non_strict_lists_unexpected_and_other_shapes_and_loads_the_rest(tmp_path):
    other = made(seed=3, classes=5)  # another number of classes: the head's weight and bias differ in shape
    state = dict(other.state_dict())
    state["head.scale"] = torch.ones(1)
    torch.save(state, tmp_path / "other.pt")
    net = made(seed=4)
    with pytest.raises(CheckpointError, match=r"unexpected head\.scale; size mismatch for head\.weight: "
                                              r"torch\.Size\(\[5, 8\]\) in the file, torch\.Size\(\[3, 8\]\)"):
        etappe.load(tmp_path / "other.pt", model=net)
    report = etappe.load(tmp_path / "other.pt", model=net, strict=False).reports["model"]
    assert report.missing == () and report.unexpected == ("head.scale",)
    assert report.mismatched == (("head.weight", (5, 8), (3, 8)), ("head.bias", (5,), (3,)))
    assert same(net.state_dict(), other.state_dict(), BACKBONE)


def test_a_file_of_which_nothing_fits_is_refused_even_non_strictly(tmp_path):
    torch.save({"encoder.w": torch.zeros(2), "encoder.b": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"none of its 2 tensors fits the model .*every name in the file "
                                              r"starts with 'encoder\.'"):
        etappe.load(tmp_path / "x.pt", model=made(), strict=False)


def test_strict_is_loads_own_keyword_never_an_object_to_restore(tmp_path):
    net = made()
    etappe.save(tmp_path / "ck", model=net, strict=[1, 2])  # an entry may be named strict ...
    with pytest.raises(UsageError, match=r"strict: expected True or False, got a Full; .*\['strict'\]"):
        etappe.load(tmp_path / "ck", strict=made(seed=5))
    values = etappe.load(tmp_path / "ck", model=made(seed=6))  # ... and comes back as a value
    assert values == {"strict": [1, 2]} and values.reports["model"].complete


def test_non_strict_goes_through_an_etappe_checkpoint_and_puts_a_submodule_prefix_on(tmp_path):
    published = made(seed=7)
    etappe.save(tmp_path / "ck", model=published.head, epoch=3)  # names weight, bias: the head's own
    net = made(seed=8)
    with pytest.warns(CheckpointWarning, match=r"put 'head\.' in front of every name"):
        values = etappe.load(tmp_path / "ck", model=net, strict=False)
    report = values.reports["model"]
    assert values == {"epoch": 3} and report.renamed.add == "head." and report.missing == BACKBONE
    assert torch.equal(net.head.weight, published.head.weight)  # backbone.0 takes weight/bias too, not its shapes


# --- prefixes ---------------------------------------------------------------------------------------------------

@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_states_saved_from_ddp_and_compile_load_into_the_plain_model_and_say_so(tmp_path, one_process_group):
    net = made(seed=9)
    wrapped = {
        "ddp": nn.parallel.DistributedDataParallel(net).state_dict(),  # module.*
        "compiled": torch.compile(net).state_dict(),  # _orig_mod.*
        "compiled-ddp": torch.compile(nn.parallel.DistributedDataParallel(net)).state_dict(),
    }
    assert all(k.startswith("module.") for k in wrapped["ddp"])
    assert all(k.startswith("_orig_mod.module.") for k in wrapped["compiled-ddp"])
    for name, state in wrapped.items():
        torch.save(state, tmp_path / f"{name}.pt")
        fresh = made(seed=10)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = etappe.load(tmp_path / f"{name}.pt", model=fresh).reports["model"]
        said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        prefix = next(iter(state)).rsplit("backbone.", 1)[0]
        assert report.renamed.strip == prefix and report.complete, name
        assert len(said) == 1 and f"took {prefix!r}" in said[0] and caught[0].filename == __file__, said
        assert same(fresh.state_dict(), net.state_dict())
        versions = kinds.unprefixed(state, net.state_dict())._metadata  # torch's per-module versions follow the names
        assert versions == net.state_dict()._metadata, name


def test_any_consistent_prefix_is_taken_off_or_put_on(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = made(seed=11)

    wrapper = Wrapper()
    torch.save(wrapper.state_dict(), tmp_path / "wrapped.pt")  # model.backbone..., model.head...
    plain = made(seed=12)
    with pytest.warns(CheckpointWarning, match=r"took 'model\.' off"):
        etappe.load(tmp_path / "wrapped.pt", model=plain)
    assert same(plain.state_dict(), wrapper.model.state_dict())
    torch.save(made(seed=13).state_dict(), tmp_path / "plain.pt")
    target = Wrapper()
    with pytest.warns(CheckpointWarning, match=r"put 'model\.' in front"):
        etappe.load(tmp_path / "plain.pt", model=target)
    assert same(target.model.state_dict(), made(seed=13).state_dict())


def test_load_model_takes_prefixed_weights_for_eval_and_export(tmp_path):
    from etappe.export import load_model
    from etappe.models import build

    torch.manual_seed(14)
    cnn = build("cnn", (1, 8, 8), 10)
    torch.save({"module." + k: v for k, v in cnn.state_dict().items()}, tmp_path / "ddp.pt")
    with pytest.warns(CheckpointWarning, match=r"took 'module\.'"):
        model, _ = load_model(tmp_path / "ddp.pt", model="cnn", input_shape=(1, 8, 8), num_outputs=10)
    x = torch.randn(2, 1, 8, 8)
    cnn.eval()
    assert torch.equal(model(x), cnn(x))



def test_the_cli_loads_head_weights_only_with_non_strict_and_lists_what_it_left_out(tmp_path, capsys):
    """eval, export and predict take --non-strict: the weights that fit go in (here the head of the MLP), the rest
    stays as the model was built, and one warning names exactly the keys left out; without it, one error line
    with the hint."""
    import numpy as np

    from etappe.models import build

    torch.manual_seed(3)
    full = build("mlp", (1, 8, 8), 10)
    head = {k: v for k, v in full.state_dict().items() if k.startswith("5.")}
    torch.save(head, tmp_path / "head.pt")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    argv = ["predict", str(tmp_path / "head.pt"), str(tmp_path / "x.npy"), "--model", "mlp", "--input-shape", "1,8,8",
            "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--non-strict" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--non-strict"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 3
    said = [line for line in err.splitlines() if "loaded what fits" in line]
    assert len(said) == 1 and said[0].endswith("missing 1.* (2 keys), 3.* (2 keys)"), err
    from etappe.export import load_model

    with pytest.warns(CheckpointWarning):
        model, _ = load_model(tmp_path / "head.pt", model="mlp", input_shape=(1, 8, 8), num_outputs=10, strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in head.items())
    assert not torch.equal(model.state_dict()["1.weight"], full.state_dict()["1.weight"])  # left as built

# the rule itself, over random names --------------------------------------------------------------------------

_PARTS = ["a", "b", "fc", "head", "0", "1", "weight", "bias"]
_WRAP = ["module", "_orig_mod", "backbone", "model", "encoder"]  # never a component of the generated model names


def _dotted(parts: list[str]):
    return st.lists(st.sampled_from(parts), min_size=1, max_size=4).map(".".join)


@st.composite
def _case(draw, overlapping: bool):
    """A model's names (with shapes), the subset a file holds, a prefix and its direction, and extra file names no
    renaming can map (a fresh component), fewer than the names that fit."""
    names = draw(st.lists(_dotted(_PARTS), min_size=1, max_size=10, unique=True))
    model = {n: (i + 1,) if not overlapping else draw(st.sampled_from([(2,), (3,)])) for i, n in enumerate(names)}
    if draw(st.booleans()):  # the same layers again under fc. (two heads alike): names that fit in two places
        for n, shape in list(model.items()):
            model.setdefault("fc." + n, shape if overlapping else (len(model) + 1,))
        names = list(model)
    held = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    prefix = draw(_dotted(_PARTS + _WRAP if overlapping else _WRAP)) + "."
    extras = draw(st.lists(st.integers(0, 99), max_size=len(held) - 1, unique=True))
    strip = draw(st.booleans())
    if strip:  # the file was saved from a wrapped model: its names carry the prefix
        saved = {prefix + k: model[k] for k in held} | {f"{prefix}zz{i}.w": (1,) for i in extras}
        truth = kinds.Renaming(strip=prefix)
    else:  # the model is the wrapped one (or the file holds one of its submodules)
        model = {prefix + k: s for k, s in model.items()}
        saved = {k[len(prefix):]: model[k] for k in (prefix + h for h in held)} | {f"zz{i}.w": (1,) for i in extras}
        truth = kinds.Renaming(add=prefix)
    return saved, model, truth, len(held)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case(overlapping=False))
def test_the_prefix_rule_finds_exactly_the_prefix_that_was_added(case):
    saved, model, truth, _ = case
    found = kinds.renaming(saved, model)
    assert (found.strip, found.add) == (truth.strip, truth.add)
    mapped = {k: found(k) for k in saved if found(k) in model}
    assert all(truth(k) == v for k, v in mapped.items())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case(overlapping=True))
def test_the_prefix_rule_never_maps_a_name_to_a_wrong_one(case):
    saved, model, truth, held = case
    found = kinds.renaming(saved, model)
    if found:
        assert (found.strip, found.add) == (truth.strip, truth.add), "a renaming other than the true one"
    elif found.rivals:
        assert str(truth) in found.rivals  # equally good candidates, the true one among them: none guessed
    else:
        assert sum(k in model for k in saved) >= held  # the names as they are fit as many


@settings(max_examples=300, deadline=None)
@given(st.lists(_dotted(_PARTS + ["x", "y"]), min_size=1, max_size=20, unique=True), st.data())
def test_grouped_names_stand_for_exactly_the_names_they_group(universe, data):
    keys = data.draw(st.lists(st.sampled_from(universe), unique=True))
    pieces = kinds.grouped(keys, universe)
    covered = []
    for label, n in pieces:
        if n == 1:
            covered.append(label)
        else:
            under = [u for u in universe if u.startswith(label)]
            assert label.endswith(".") and len(under) == n and set(under) <= set(keys)
            covered += under
    assert sorted(covered) == sorted(keys)
    if len(pieces) <= 6:
        text = kinds.grouped_text(keys, universe)
        assert "more" not in text and text.count(",") == max(len(pieces) - 1, 0)


# --- tied weights -----------------------------------------------------------------------------------------------

def test_a_tied_weight_stored_once_by_save_model_loads_as_safetensors_loads_it(tmp_path):
    lm = made(TiedLM, seed=15)
    assert lm.head.weight is lm.embed.weight
    safetensors.torch.save_model(lm, tmp_path / "lm.safetensors")
    stored = safetensors.torch.load_file(tmp_path / "lm.safetensors")
    assert "head.weight" not in stored and "embed.weight" in stored  # one tensor for two names
    ours, theirs = made(TiedLM, seed=16), made(TiedLM, seed=16)
    report = etappe.load(tmp_path / "lm.safetensors", model=ours).reports["model"]
    assert safetensors.torch.load_model(theirs, tmp_path / "lm.safetensors") == (set(), [])
    assert report.complete and report.tied == (("head.weight", "embed.weight"),)
    assert same(ours.state_dict(), theirs.state_dict()) and same(ours.state_dict(), lm.state_dict())
    assert ours.head.weight is ours.embed.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(ours(ids), lm(ids))
    untied = made(TiedLM, seed=17, tie=False)  # a model that does not tie them: the file lacks head.weight
    with pytest.raises(CheckpointError, match=r"missing head\.weight; load with strict=False"):
        etappe.load(tmp_path / "lm.safetensors", model=untied)


# --- Hugging Face style folders ---------------------------------------------------------------------------------

CONFIG = {"model_type": "toy-lm", "architectures": ["ToyForCausalLM"], "hidden_size": 6, "vocab_size": 11,
          "auto_map": {"AutoModel": "modeling_evil.ToyModel"}}
EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('code ran')\n"


def hf_folder(root: Path, lm: nn.Module, shards: int) -> Path:
    """A folder as transformers' save_pretrained writes it: config.json, and model.safetensors or shards with a
    model.safetensors.index.json; plus custom code its config names, which must never run."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    (root / "modeling_evil.py").write_text(EVIL)
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "head.weight"}  # tied: stored once
    if shards == 1:
        safetensors.torch.save_file(state, root / "model.safetensors", metadata={"format": "pt"})
        return root
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        safetensors.torch.save_file(part, root / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("shards", [1, 2])
def test_a_hugging_face_folder_loads_verifies_and_inspects(tmp_path, capsys, shards):
    lm = made(TiedLM, seed=18)
    folder = hf_folder(tmp_path / "hub", lm, shards)
    net = made(TiedLM, seed=19)
    values = etappe.load(folder, model=net)
    assert values == {"config": CONFIG} and values.reports["model"].tied == (("head.weight", "embed.weight"),)
    assert same(net.state_dict(), lm.state_dict())
    whole = etappe.load(folder)["model"]
    assert sorted(whole) == ["body.bias", "body.weight", "embed.weight"] and same(whole, lm.state_dict())
    etappe.verify(folder)

    assert main(["verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok    {folder}: a Hugging Face style folder") and "no checksums to check" in out
    assert ("2 shards, index checked" if shards == 2 else "one file") in out

    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "Hugging Face style folder" and info["shards"] == (2 if shards == 2 else 0)
    model = info["entries"][0]
    assert model["parameters"] == sum(p.numel() for p in lm.parameters())  # the tied weight counted once
    assert {t["name"]: (t["shape"], t["dtype"]) for t in model["tensors"]} == {
        "embed.weight": ([11, 6], "float32"), "body.weight": ([6, 6], "float32"), "body.bias": ([6], "float32")}
    config = info["entries"][1]
    assert config["value"] == {"model_type": "toy-lm", "architectures": ["ToyForCausalLM"], "hidden_size": 6,
                               "vocab_size": 11}
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "Hugging Face style folder" in text and "embed.weight\t[11, 6]\tfloat32" in text and "toy-lm" in text
    assert not (folder / "RAN").exists(), "nothing in the folder may run"


def test_hugging_face_folder_strict_and_non_strict(tmp_path):
    folder = hf_folder(tmp_path / "hub", made(TiedLM, seed=20), 2)
    full = made(Full, seed=21)
    with pytest.raises(CheckpointError, match=r"missing backbone\.\* \(4 keys\), head\.\* \(2 keys\); unexpected "):
        etappe.load(folder, model=full)
    bigger = made(TiedLM, seed=22)
    bigger.extra = nn.Linear(2, 2)
    report = etappe.load(folder, model=bigger, strict=False).reports["model"]
    assert report.missing == ("extra.weight", "extra.bias") and report.unexpected == ()
    with pytest.raises(UsageError, match="one model's weights"):
        etappe.load(folder, model=bigger, optimizer=torch.optim.SGD(bigger.parameters(), lr=0.1))


def test_broken_hugging_face_folders_are_reported(tmp_path, capsys):
    folder = hf_folder(tmp_path / "missing", made(TiedLM, seed=23), 2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL  ") and "maps 1 tensors to model-00002-of-00002.safetensors, which is missing" in out
    with pytest.raises(CheckpointError, match="which is missing"):
        etappe.load(folder, model=made(TiedLM))

    folder = hf_folder(tmp_path / "twice", made(TiedLM, seed=24), 2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    moved = next(n for n, f in index["weight_map"].items() if f.startswith("model-00001"))
    index["weight_map"][moved] = "model-00002-of-00002.safetensors"  # the index puts it in the other shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not hold it"):
        etappe.verify(folder)
    second = folder / "model-00002-of-00002.safetensors"
    first = folder / "model-00001-of-00002.safetensors"
    both = safetensors.torch.load_file(first) | safetensors.torch.load_file(second)
    safetensors.torch.save_file(both, second)  # now it is in both shards
    with pytest.raises(CheckpointError, match=r"is in model-0000[12]-of-00002\.safetensors and in model-0000[12]"):
        etappe.verify(folder)

    text = '{"weight_map": {"embed.weight": "a.safetensors", "embed.weight": "b.safetensors"}}'
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="names tensor 'embed.weight' twice"):
        etappe.verify(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a file name in the folder"):
        etappe.verify(folder)

    folder = hf_folder(tmp_path / "short", made(TiedLM, seed=25), 1)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-4])
    assert main(["verify", str(folder)]) == 1
    assert "lies outside the file" in capsys.readouterr().out
    (folder / "model.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        etappe.verify(folder)
    assert not any((tmp_path / d / "RAN").exists() for d in ("missing", "twice", "short"))


def test_a_hub_cache_folder_of_links_loads(tmp_path):
    lm = made(TiedLM, seed=26)
    blobs = hf_folder(tmp_path / "blobs", lm, 2)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in blobs.iterdir():
        os.symlink(f, snapshot / f.name)  # the Hub's cache: snapshots/<rev>/ links into blobs/
    net = made(TiedLM, seed=27)
    etappe.load(snapshot, model=net)
    assert same(net.state_dict(), lm.state_dict())
    os.mkfifo(tmp_path / "fifo")
    (snapshot / "model-00001-of-00002.safetensors").unlink()
    os.symlink(tmp_path / "fifo", snapshot / "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        etappe.verify(snapshot)


def test_a_run_folder_is_not_taken_for_a_hugging_face_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.zeros(1)}, run / "model.safetensors")
    (run / "config.json").write_text("{}")
    assert not hf.is_folder(run) and hf.is_folder(run.parent) is False


def test_verify_in_a_real_process(tmp_path):
    folder = hf_folder(tmp_path / "hub", made(TiedLM, seed=28), 2)
    ok = run_cli("verify", str(folder))
    assert ok.returncode == 0 and "Hugging Face style folder" in ok.stdout, ok.stderr
    (folder / "model-00001-of-00002.safetensors").unlink()
    bad = run_cli("verify", str(folder))
    assert bad.returncode == 1 and "which is missing" in bad.stdout and "Traceback" not in bad.stderr


class _Marker:
    """Unpickling this writes a marker file: proof that code from a file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


def test_a_pickle_posing_as_model_safetensors_never_runs(tmp_path, capsys):
    folder = tmp_path / "hub"
    folder.mkdir()
    marker = tmp_path / "RAN"
    torch.save({"w": _Marker(marker)}, folder / "model.safetensors")
    for attempt in (lambda: etappe.load(folder, model=made()), lambda: etappe.load(folder),
                    lambda: etappe.verify(folder), lambda: etappe.inspect(folder)):
        with pytest.raises(CheckpointError, match="model.safetensors"):
            attempt()
    assert main(["verify", str(folder)]) == 1 and main(["inspect", str(folder), "--trust"]) != 0
    assert not marker.exists()


def test_a_stores_load_takes_strict_as_etappe_load_does(tmp_path):
    from etappe.checkpoint import CheckpointStore

    published = made(seed=1)
    head_only = nn.Module()
    head_only.head = published.head  # its state dict: head.weight and head.bias, as published head weights are
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(1, {"model": head_only})
    net = made(seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for path in (None, store.latest()):  # the newest, and one named
        with pytest.raises(CheckpointError, match="missing backbone.* .*strict=False"):
            store.load(path, model=net)
        assert same(net.state_dict(), before), "a refused strict load must leave the model untouched"
    report = store.load(model=net, strict=False).reports["model"]
    assert report.missing == BACKBONE and report.unexpected == () and report.mismatched == ()
    assert same(net.state_dict(), published.state_dict(), ["head.weight", "head.bias"])
    assert same(net.state_dict(), before, BACKBONE)
    with pytest.raises(UsageError, match="strict: expected True or False"):
        store.load(model=net, strict="no")


def test_a_stores_load_takes_trusted_as_etappe_load_does(tmp_path):
    """``trusted`` is load's own option for a store as well, not an object to restore by that name."""
    from etappe.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(1, {"model": made(seed=3), "epoch": 1})
    net = made(seed=4)
    assert store.load(trusted=True, model=net) == {"epoch": 1}
    with pytest.raises(CheckpointError, match=r"no entry 'path'.*comes first, without a name"):
        store.load(path=store.latest(), model=net)
    assert same(net.state_dict(), made(seed=3).state_dict())
    torch.save({"model": made(seed=5).state_dict(), "note": Note("a pickled object")}, tmp_path / "full.tar")
    with pytest.raises(CheckpointError, match="trust"):
        store.load(tmp_path / "full.tar", model=net)
    assert store.load(tmp_path / "full.tar", trusted=True, model=net)["note"].text == "a pickled object"
    assert same(net.state_dict(), made(seed=5).state_dict())


class Note:
    """A class a plain weights-only unpickler refuses: only a trusted load may build it."""

    def __init__(self, text: str) -> None:
        self.text = text


NOT_A_BOOL = st.one_of(st.text(max_size=6), st.integers(), st.floats(allow_nan=False), st.none(),
                       st.lists(st.integers(), max_size=2), st.sampled_from(["False", "false", "no", "0", "True", 1, 0]))


@pytest.fixture(scope="module")
def whole_model_file(tmp_path_factory) -> Path:
    """A torch.save of a whole pickled model: only a trusted load may unpickle it."""
    path = tmp_path_factory.mktemp("trust") / "whole.pt"
    torch.save(made(seed=6), path)
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=NOT_A_BOOL)
def test_trusted_is_true_or_false_and_nothing_else_lets_code_run(whole_model_file, tmp_path, value):
    """A value that is not True or False ("False", 1, None, ...) is refused by every entry point that takes
    ``trusted``, before the file is opened; only True unpickles it."""
    from etappe.checkpoint import CheckpointStore
    from etappe.export import load_model

    store = CheckpointStore(tmp_path / "unused")
    calls = {
        "etappe.load": lambda: etappe.load(whole_model_file, trusted=value),
        "store.load": lambda: store.load(whole_model_file, trusted=value),
        "etappe.inspect": lambda: etappe.inspect(whole_model_file, trusted=value),
        "etappe.diff": lambda: etappe.diff(whole_model_file, whole_model_file, trusted=value),
        "load_model": lambda: load_model(whole_model_file, trusted=value),
    }
    for name, call in calls.items():
        with pytest.raises(UsageError, match="trusted: expected True or False"):
            call()
    with pytest.raises(CheckpointError, match="trust"):
        etappe.load(whole_model_file, trusted=False)
    assert isinstance(etappe.load(whole_model_file, trusted=True)["model"], nn.Module)  # a whole model: one entry


class Marker:
    """Unpickling it writes a file: the proof that a file ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_verify_of_a_plain_file_says_what_it_checked_and_what_loading_it_needs(tmp_path, capsys):
    """A plain file verifies by its own checksums (a zip's CRC-32s) or its header, and the line says so, and
    whether loading it needs --trust; nothing in it runs. A Hugging Face folder's config.json must parse too."""
    net = made(seed=10)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    torch.save({"model": net.state_dict(), "x": Marker(str(tmp_path / "RAN"))}, tmp_path / "evil.pt")
    torch.jit.save(torch.jit.script(net), tmp_path / "net.ts")
    safetensors.torch.save_file(net.state_dict(), tmp_path / "weights.safetensors")
    expected = {
        "weights.pt": "a torch.save file: the CRC-32s of its",
        "evil.pt": "loading it needs --trust (full unpickling of io.open, which runs code)",
        "net.ts": "a TorchScript archive: the CRC-32s of its",
        "weights.safetensors": "a safetensors file: its header parses",
    }
    for name, said in expected.items():
        assert main(["verify", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"ok    {tmp_path / name}: ") and said in out and len(out.splitlines()) == 1, out
    assert "opens without running code" not in expected["evil.pt"]
    assert not (tmp_path / "RAN").exists()

    folder = hf_folder(tmp_path / "hf", made(TiedLM, seed=26), 1)
    assert main(["verify", str(folder)]) == 0 and "config.json parses" in capsys.readouterr().out
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["verify", str(folder)]) == 1 and "FAIL" in capsys.readouterr().out
