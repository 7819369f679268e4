"""Reading sharded state safely, in one process: DCP's pickled metadata and values never run code from the file,
and the shards read are only the files the manifest lists. (Training with shards: tests/test_distributed.py.)"""

from __future__ import annotations

import os
import pathlib
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from etappe.checkpoint import CheckpointError
from etappe.checkpoint.safe_dcp import SafeReader
from etappe.checkpoint.sharded import Shards, materialize


class Evil:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def shards_of(folder: pathlib.Path, key: str, **state) -> Shards:
    """A DCP checkpoint of ``state`` under ``key``, written in ``folder/shards-00000000`` by one process."""
    sub = folder / "shards-00000000"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save({key: state}, storage_writer=dcp.FileSystemWriter(sub))
    files = {f"{sub.name}/{p.name}": {} for p in sub.iterdir()}
    return Shards.of(folder, {"shards": sub.name, "key": key, "kind": "optimizer"}, files)


def test_a_well_formed_entry_reads_back_whole(tmp_path):
    shards = shards_of(tmp_path, "optimizer", state={"w": {"exp_avg": torch.arange(6.0)}}, param_groups=[{"lr": 0.1, "params": ["w"]}])
    whole = materialize(shards)
    assert torch.equal(whole["state"]["w"]["exp_avg"], torch.arange(6.0))
    assert whole["param_groups"] == [{"lr": 0.1, "params": ["w"]}]


def test_metadata_naming_other_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(__import__("pickle").dumps(Evil(marker)))
    with pytest.raises(CheckpointError, match="refusing to load posix.system"):
        SafeReader(tmp_path).read_metadata()
    assert not marker.exists()


def test_metadata_that_sets_state_on_a_class_is_refused(tmp_path):
    # GLOBAL pathlib.PosixPath, a dict {"x": 1}, BUILD: would set PosixPath.x for the whole process
    (tmp_path / ".metadata").write_bytes(b"\x80\x02cpathlib\nPosixPath\n}X\x01\x00\x00\x00xK\x01sb.")
    with pytest.raises(CheckpointError, match="refusing to load setting the state"):
        SafeReader(tmp_path).read_metadata()
    assert not hasattr(pathlib.PosixPath, "x")


@pytest.mark.parametrize("other", [torch.float32, torch.Size([3]), pathlib.PurePosixPath("x")])
def test_metadata_that_is_another_allowed_object_is_refused(tmp_path, other):
    (tmp_path / ".metadata").write_bytes(__import__("pickle").dumps(other))
    with pytest.raises(CheckpointError, match="not DCP metadata"):
        SafeReader(tmp_path, frozenset()).read_metadata()


def test_a_value_in_the_shards_that_names_other_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    shards = shards_of(tmp_path, "optimizer", state={}, param_groups=Evil(marker))
    with pytest.raises(CheckpointError, match="refusing to load a value"):
        materialize(shards)
    assert not marker.exists()


def test_shards_outside_what_the_manifest_lists_are_not_read(tmp_path):
    shards = shards_of(tmp_path, "model", w=torch.ones(3))
    unlisted = Shards(shards.folder, shards.record, frozenset({".metadata"}))  # the data file left out
    with pytest.raises(CheckpointError, match="does not list"):
        materialize(unlisted)
    for bad in ("../elsewhere", "/tmp", "shards-0000000g", "shards-00000000/.."):
        with pytest.raises(CheckpointError, match="does not list"):
            Shards.of(tmp_path, {**shards.record, "shards": bad}, {f"{bad}/.metadata": {}})
