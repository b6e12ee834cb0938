"""Image datasets on disk, read and validated before any model is loaded: VTAB-1K list files, FGVC
annotation JSONs (VPT layout) and ImageFolder trees. Errors name the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import DataError, _need_dir, _need_file
from .records import Split, Splits
from .splits import stratified_split
from .tables import _INT


def _label_key(value: str) -> tuple:
    # integer-like labels sort numerically ("2" before "10"), others alphabetically after them
    return (0, int(value), "") if _INT.match(value) else (1, 0, value)


def read_list_file(list_path: str | Path, image_root: str | Path, num_classes: int | None = None) -> Split:
    """Read a VTAB-style list of ``relative/path.jpg label`` lines, checking every image exists.

    Paths are relative to ``image_root`` (the task folder in the VTAB-1K layout). Raises ``DataError``
    naming the file and line on a malformed line, a missing image, or a label outside
    ``[0, num_classes)``.
    """
    list_path, image_root = Path(list_path), Path(image_root)
    _need_file(
        list_path,
        "list file",
        "the VTAB-1K layout has <task>/train800val200.txt, train800.txt, "
        "val200.txt and test.txt (lines `path label`)",
    )
    paths, labels, lines = [], [], []
    with open(list_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not _INT.match(parts[1]):
                raise DataError(
                    f"{list_path}:{line_no}: expected `relative/path/to/image label` with an "
                    f"integer label, got {line!r}"
                )
            rel, label = parts[0], int(parts[1])
            if num_classes is not None and not 0 <= label < num_classes:
                raise DataError(
                    f"{list_path}:{line_no}: label {label} out of range [0, {num_classes - 1}]"
                    f" for this task ({num_classes} classes)"
                )
            if label < 0:
                raise DataError(f"{list_path}:{line_no}: negative label {label}")
            image = image_root / rel
            if not image.is_file():
                raise DataError(
                    f"{list_path}:{line_no}: image {rel!r} not found (looked for {image}); "
                    "restore the file or remove the line"
                )
            paths.append(str(image))
            labels.append(label)
            lines.append(line_no)
    if not labels:
        raise DataError(f"{list_path}: has no examples")
    return Split(paths, labels, str(list_path), lines)


#: VTAB-1K task folders (the NOAH / VPT naming) and their class counts.
VTAB_TASKS = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip

#: VTAB-1K protocols: which list files make train/val/test.
#: ``final``: train on the 1000 images, report test; ``val200`` is inside the training set there, so val/acc
#: is only a training monitor (no model selection is done: the last epoch is evaluated).
#: ``tune``: train on train800, validate and test on val200 (hyper-parameter search; never touches test).
VTAB_PROTOCOLS = {
    "final": ("train800val200.txt", "val200.txt", "test.txt"),
    "tune": ("train800.txt", "val200.txt", "val200.txt"),
}


def read_vtab(root: str | Path, task: str | None = None, protocol: str = "final") -> Splits:
    """One VTAB-1K task in its standard on-disk layout (``<root>/<task>/{train800val200,...,test}.txt``).

    ``root`` is the folder holding the task folders and ``task`` the task's folder name, or ``root`` is a
    task folder itself and ``task`` is None. Image paths in the lists are relative to the task folder.
    """
    root = Path(root)
    _need_dir(root, "VTAB-1K folder", "set data.path to the vtab-1k folder (holding e.g. cifar/, dtd/)")
    task_dir = root / task if task else root
    if task:
        _need_dir(
            task_dir,
            "VTAB-1K task folder",
            f"set data.task to one of the folders in {root}: "
            f"{sorted(p.name for p in root.iterdir() if p.is_dir())[:25]}",
        )
    if protocol not in VTAB_PROTOCOLS:
        raise DataError(f"unknown VTAB protocol {protocol!r}; valid: {sorted(VTAB_PROTOCOLS)}")
    name = task_dir.name
    known = VTAB_TASKS.get(name)
    files = VTAB_PROTOCOLS[protocol]
    train = read_list_file(task_dir / files[0], task_dir, known)
    num_classes = known if known is not None else max(train.labels) + 1
    val = read_list_file(task_dir / files[1], task_dir, num_classes)
    test = read_list_file(task_dir / files[2], task_dir, num_classes)
    desc = f"VTAB-1K task {name!r}, protocol {protocol!r}: train={files[0]}, val={files[1]}, test={files[2]}"
    return Splits("image", train, val, test, num_classes, [str(i) for i in range(num_classes)], desc)


#: FGVC datasets in the VPT layout: ``{train,val,test}.json`` map image paths (relative to the image folder)
#: to labels; the image folder differs per dataset.
FGVC_DATASETS = {
    "cub": ("images", 200),
    "nabirds": ("images", 555),
    "flowers": ("", 102),
    "dogs": ("Images", 120),
    "cars": ("", 196),
}


def _read_json_annotations(path: Path, image_dir: Path) -> tuple[list[str], list[str], list[int]]:
    _need_file(
        path,
        "annotation file",
        "the FGVC (VPT) layout has train.json, val.json and test.json mapping image paths to labels",
    )
    text = path.read_text(encoding="utf-8")
    try:
        anno = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(anno, dict) or not anno:
        raise DataError(f'{path}:1: expected a non-empty JSON object {{"relative/image.jpg": label, ...}}')
    paths, raw, lines = [], [], []
    for entry, (rel, label) in enumerate(anno.items(), start=1):
        # a JSON object has no line per entry: report the line of its key in the text (1 if one-line JSON)
        line_no = text.count("\n", 0, max(text.find(json.dumps(rel)), 0)) + 1
        image = image_dir / rel
        if not image.is_file():
            raise DataError(
                f"{path}:{line_no}: entry {entry} names image {rel!r}, not found (looked for "
                f"{image}); restore the file, fix data.image_dir, or remove the entry"
            )
        paths.append(str(image))
        raw.append(str(label))
        lines.append(line_no)
    return paths, raw, lines


def read_fgvc(root: str | Path, name: str, protocol: str = "final", image_dir: str | None = None) -> Splits:
    """One FGVC dataset (CUB-200, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) in the VPT layout.

    ``final`` trains on train.json + val.json and tests on test.json (val.json stays the monitor);
    ``tune`` trains on train.json and validates and tests on val.json. Labels are mapped to
    ``0..K-1`` by their sorted values in the training annotations (as VPT does).
    """
    if name not in FGVC_DATASETS:
        raise DataError(f"unknown FGVC dataset {name!r}; valid: {sorted(FGVC_DATASETS)}")
    if protocol not in ("final", "tune"):
        raise DataError(f"unknown FGVC protocol {protocol!r}; valid: ['final', 'tune']")
    root = Path(root)
    _need_dir(root, "FGVC dataset folder", f"set data.path to the folder holding {name}'s train.json")
    default_dir, known = FGVC_DATASETS[name]
    images = root / (image_dir if image_dir is not None else default_dir)
    parts = {s: _read_json_annotations(root / f"{s}.json", images) for s in ("train", "val", "test")}
    train_keys = ["train", "val"] if protocol == "final" else ["train"]
    values = sorted({v for s in train_keys for v in parts[s][1]}, key=_label_key)
    index = {v: i for i, v in enumerate(values)}

    def make(keys: list[str]) -> Split:
        paths, labels, lines, sources = [], [], [], []
        for s in keys:
            p, raw, ln = parts[s]
            for value, line_no in zip(raw, ln):
                if value not in index:
                    raise DataError(
                        f"{root / (s + '.json')}:{line_no}: label {value!r} does not occur in the "
                        "training annotations; the class set must come from training"
                    )
                labels.append(index[value])
            paths += p
            lines += ln
            sources.append(str(root / f"{s}.json"))
        return Split(paths, labels, "+".join(sources), lines)

    test_key = ["test"] if protocol == "final" else ["val"]
    splits = Splits(
        "image",
        make(train_keys),
        make(["val"]),
        make(test_key),
        len(values),
        values,
        f"FGVC {name!r} (VPT layout), protocol {protocol!r}: train={'+'.join(train_keys)}, "
        f"val=val, test={test_key[0]}",
    )
    if len(values) != known:
        # not an error (a user may train on a subset of classes) but worth a line in the result
        splits.description += f"; {len(values)} classes found, the full dataset has {known}"
    return splits


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def read_imagefolder(
    root: str | Path, split_fractions: Sequence[float] = (0.9, 0.1), split_seed: int = 0
) -> Splits:
    """An ImageFolder tree: ``<root>/train/<class>/*.png`` and ``<root>/test/<class>/...``, ``val/`` optional.

    Classes are the sorted folder names under ``train/``. Without ``val/``, a fixed stratified
    ``split_fractions[1]`` of train (seeded by ``split_seed``) becomes the validation split.
    """
    root = Path(root)
    _need_dir(root, "ImageFolder root", "set data.path to a folder with train/<class>/ and test/<class>/")
    train_dir = _need_dir(root / "train", "folder", "an ImageFolder root needs train/<class>/<image> files")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}

    def scan(split_dir: Path) -> Split:
        paths, labels = [], []
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{class_dir}: class {class_dir.name!r} does not exist under {train_dir}")
            files = sorted(f for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += [str(f) for f in files]
            labels += [index[class_dir.name]] * len(files)
        if not paths:
            raise DataError(f"{split_dir}: no images (suffixes {sorted(IMAGE_SUFFIXES)})")
        return Split(paths, labels, str(split_dir))

    train = scan(train_dir)
    test = scan(_need_dir(root / "test", "folder", "an ImageFolder root needs test/<class>/<image> files"))
    if (root / "val").is_dir():
        val, how = scan(root / "val"), "val/"
    else:
        tr, va = stratified_split(train.labels, split_fractions, seed=split_seed)
        train, val = train.take(tr), train.take(va, source=f"{train_dir} (held out)")
        how = f"{split_fractions[1]:.0%} of train/ held out (split_seed={split_seed})"
    return Splits(
        "image",
        train,
        val,
        test,
        len(classes),
        classes,
        f"ImageFolder {root}: train=train/, val={how}, test=test/",
    )
