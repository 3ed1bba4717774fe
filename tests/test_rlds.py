"""RLDS reader (no TensorFlow) and dataset registry: exact round trip through a real TFDS layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tfrecord", reason="RLDS tests need tfrecord (pip install 'steadyvla[rlds]')")

from PIL import Image  # noqa: E402
from tfrecord.writer import TFRecordWriter  # noqa: E402

from steadyvla.data.registry import describe_dataset, detect_format, open_frame_source  # noqa: E402
from steadyvla.data.rlds import RLDSFrames  # noqa: E402
from steadyvla.data.rlds_features import read_features  # noqa: E402
from steadyvla.data.tfrecord_io import iter_tfrecord  # noqa: E402

NAME, H, W, A, S = "toy_rlds", 12, 16, 7, 4
TENSOR = "tensorflow_datasets.core.features.tensor_feature.Tensor"


def _tensor(dims: list[int], dtype: str, encoding: str = "none") -> dict:
    return {
        "pythonClassName": TENSOR,
        "tensor": {
            "shape": {"dimensions": [str(d) for d in dims]},
            "dtype": dtype,
            "encoding": encoding,
        },
    }


def _features() -> dict:
    scalar_bool = _tensor([], "bool")
    step = {
        "action": _tensor([A], "float32"),
        "is_first": scalar_bool,
        "is_last": scalar_bool,
        "is_terminal": scalar_bool,
        "reward": _tensor([], "float32"),
        "language_instruction": {"text": {}},
        "observation": {
            "featuresDict": {
                "features": {
                    "image": {
                        "image": {
                            "shape": {"dimensions": [str(H), str(W), "3"]},
                            "dtype": "uint8",
                            "encodingFormat": "png",
                        }
                    },
                    "wrist_image": {
                        "image": {
                            "shape": {"dimensions": [str(H), str(W), "3"]},
                            "dtype": "uint8",
                            "encodingFormat": "png",
                        }
                    },
                    # Raw-bytes tensor whose last values are 0: the payload ends in NUL bytes.
                    "state": _tensor([S], "float32", encoding="bytes"),
                }
            }
        },
    }
    return {
        "featuresDict": {
            "features": {
                "episode_metadata": {"featuresDict": {"features": {"file_path": {"text": {}}}}},
                "steps": {
                    "sequence": {"feature": {"featuresDict": {"features": step}}, "length": "-1"}
                },
            }
        }
    }


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _episode(rng: np.random.Generator, t: int, text: str) -> dict:
    state = rng.normal(size=(t, S)).astype(np.float32)
    state[:, -2:] = 0.0
    return {
        "image": rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8),
        "action": rng.normal(size=(t, A)).astype(np.float32),
        "state": state,
        "instruction": [text + "\x00" if i == t - 1 else text for i in range(t)],
    }


def _datum(ep: dict, first: list[int] | None = None, last: list[int] | None = None) -> dict:
    t = len(ep["action"])
    first = first if first is not None else [int(i == 0) for i in range(t)]
    last = last if last is not None else [int(i == t - 1) for i in range(t)]
    return {
        "episode_metadata/file_path": ([b"/raw/ep.hdf5"], "byte"),
        "steps/action": (ep["action"].reshape(-1).tolist(), "float"),
        "steps/is_first": (first, "int"),
        "steps/is_last": (last, "int"),
        "steps/is_terminal": (last, "int"),
        "steps/reward": ([0.0] * t, "float"),
        "steps/language_instruction": ([s.encode() for s in ep["instruction"]], "byte"),
        "steps/observation/image": ([_png(x) for x in ep["image"]], "byte"),
        "steps/observation/wrist_image": ([_png(x) for x in ep["wrist"]], "byte"),
        "steps/observation/state": ([s.tobytes() for s in ep["state"]], "byte"),
    }


def write_rlds(root: Path, shards: list[list[dict]]) -> Path:
    """Write a TFDS builder dir root/NAME/1.0.0 with one shard per inner list of datums."""
    version = root / NAME / "1.0.0"
    version.mkdir(parents=True)
    n = len(shards)
    for i, datums in enumerate(shards):
        writer = TFRecordWriter(str(version / f"{NAME}-train.tfrecord-{i:05d}-of-{n:05d}"))
        for d in datums:
            writer.write(d)
        writer.close()
    (version / "features.json").write_text(json.dumps(_features()))
    info = {
        "name": NAME,
        "version": "1.0.0",
        "splits": [
            {
                "name": "train",
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                "shardLengths": [str(len(s)) for s in shards],
            }
        ],
    }
    (version / "dataset_info.json").write_text(json.dumps(info))
    return root / NAME


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    rng = np.random.default_rng(0)
    eps = [_episode(rng, t, f"task {k}") for k, t in enumerate([5, 3, 6, 4])]
    # Last record packs two episodes (is_first at 0 and 3): the reader must split it.
    packed = _episode(rng, 6, "packed")
    packed["instruction"] = ["packed a"] * 3 + ["packed b"] * 3
    flags = dict(first=[1, 0, 0, 1, 0, 0], last=[0, 0, 1, 0, 0, 1])
    shards = [
        [_datum(eps[0]), _datum(eps[1])],
        [_datum(eps[2]), _datum(eps[3]), _datum(packed, **flags)],
    ]
    root = tmp_path_factory.mktemp("rlds")
    path = write_rlds(root, shards)
    split = [{k: v[:3] for k, v in packed.items()}, {k: v[3:] for k, v in packed.items()}]
    return path, eps + split


def _expected(eps: list[dict]) -> list[tuple[int, int, dict]]:
    return [(e, i, ep) for e, ep in enumerate(eps) for i in range(len(ep["action"]))]


def test_features_json_is_the_source_of_keys(toy: tuple[Path, list[dict]]) -> None:
    path, _ = toy
    steps, specs = read_features(path / "1.0.0" / "features.json")
    assert steps == "steps"
    assert specs["steps/observation/image"].kind == "image"
    assert specs["steps/observation/state"].encoding == "bytes"
    assert specs["steps/language_instruction"].kind == "text"
    assert specs["episode_metadata/file_path"].kind == "text"


def test_round_trip_exact(toy: tuple[Path, list[dict]]) -> None:
    path, eps = toy
    src = RLDSFrames(path)
    expected = _expected(eps)
    assert src.name == NAME and src.num_episodes == len(eps) == 6 and len(src) == len(expected)
    assert list(src.episode_lengths()) == [len(ep["action"]) for ep in eps]
    np.testing.assert_array_equal(src.actions(), np.concatenate([ep["action"] for ep in eps]))
    for g, (e, i, ep) in enumerate(expected):
        f = src.frame(g)
        assert (f.episode_index, f.frame_index) == (e, i)
        np.testing.assert_array_equal(f.image, ep["image"][i])
        np.testing.assert_array_equal(f.action, ep["action"][i])
        assert f.instruction == ep["instruction"][i]
    assert src.instructions() == ["task 0", "task 1", "task 2", "task 3", "packed a", "packed b"]


def test_nul_bytes_survive_and_other_camera(toy: tuple[Path, list[dict]]) -> None:
    path, eps = toy
    src = RLDSFrames(path, image_key="observation/wrist_image")
    for e, ep in enumerate(eps):
        steps = src.episode(e)
        np.testing.assert_array_equal(steps["observation/state"], ep["state"])  # trailing NULs
        assert steps["language_instruction"] == ep["instruction"]
        assert steps["is_first"][0] and steps["is_last"][-1] and steps["is_last"].sum() == 1
    g = src.episode_range(2)[0] + 1
    np.testing.assert_array_equal(src.frame(g).image, eps[2]["wrist"][1])
    assert eps[0]["instruction"][-1].endswith("\x00") and src.frame(4).instruction.endswith("\x00")


def test_random_access_is_order_independent(toy: tuple[Path, list[dict]]) -> None:
    path, eps = toy
    expected = _expected(eps)
    src = RLDSFrames(path)
    for g in np.random.default_rng(1).permutation(len(src)):
        e, i, ep = expected[g]
        f = src.frame(int(g))
        np.testing.assert_array_equal(f.image, ep["image"][i])
        assert (f.episode_index, f.frame_index, f.instruction) == (e, i, ep["instruction"][i])
    with pytest.raises(IndexError, match="out of range"):
        src.frame(len(src))


def test_sequence_example_records(tmp_path: Path) -> None:
    ep = _episode(np.random.default_rng(4), 3, "seq")
    flat = _datum(ep)
    context = {k: v for k, v in flat.items() if not k.startswith("steps/")}
    t = len(ep["action"])
    sequence = {
        "steps/action": (ep["action"].tolist(), "float"),
        "steps/is_first": ([[int(i == 0)] for i in range(t)], "int"),
        "steps/is_last": ([[int(i == t - 1)] for i in range(t)], "int"),
        "steps/language_instruction": ([[s.encode()] for s in ep["instruction"]], "byte"),
        "steps/observation/image": ([[_png(x)] for x in ep["image"]], "byte"),
    }
    version = tmp_path / NAME / "1.0.0"
    version.mkdir(parents=True)
    writer = TFRecordWriter(str(version / f"{NAME}-train.tfrecord-00000-of-00001"))
    writer.write(context, sequence)
    writer.close()
    (version / "features.json").write_text(json.dumps(_features()))
    (version / "dataset_info.json").write_text(json.dumps({"splits": [{"name": "train"}]}))
    src = RLDSFrames(tmp_path / NAME)
    assert len(src) == t and src.num_episodes == 1
    for i in range(t):
        f = src.frame(i)
        np.testing.assert_array_equal(f.image, ep["image"][i])
        np.testing.assert_array_equal(f.action, ep["action"][i])
        assert f.instruction == ep["instruction"][i]


def test_bad_keys_and_incomplete_copies(toy: tuple[Path, list[dict]], tmp_path: Path) -> None:
    path, _ = toy
    with pytest.raises(ValueError, match=r"image_key='observation/depth'.*valid"):
        RLDSFrames(path, image_key="observation/depth")
    with pytest.raises(ValueError, match=r"action_key='actions'.*valid"):
        RLDSFrames(path, action_key="actions")
    with pytest.raises(FileNotFoundError, match="split='val'"):
        RLDSFrames(path, split="val")
    shard = path / "1.0.0" / f"{NAME}-train.tfrecord-00001-of-00002"
    offsets = [off for off, _ in iter_tfrecord(shard, verify_crc=True)]
    assert len(offsets) == 3
    broken = tmp_path / "broken"
    write_rlds(broken, [[_datum(_episode(np.random.default_rng(2), 2, "x"))]])
    f = next((broken / NAME / "1.0.0").glob("*.tfrecord-*"))
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        RLDSFrames(broken / NAME)


def test_registry_detects_rlds_and_describes(toy: tuple[Path, list[dict]]) -> None:
    path, eps = toy
    assert detect_format(path) == detect_format(path / "1.0.0") == "rlds"
    src = open_frame_source(path.parent, NAME)
    assert isinstance(src, RLDSFrames) and len(src) == sum(len(e["action"]) for e in eps)
    report = describe_dataset(src)
    for needle in (
        "episodes: 6",
        f"frames: {len(src)}",
        "steps/observation/image",
        "<- image",
        "6 unique",
        "'task 0'",
        "q99",
        "actions: 24 x 7",
    ):
        assert needle in report, needle


def test_registry_errors_name_the_problem(toy: tuple[Path, list[dict]], tmp_path: Path) -> None:
    path, _ = toy
    with pytest.raises(FileNotFoundError, match=r"dataset_name='toy_rdls'.*did you mean.*toy_rlds"):
        open_frame_source(path.parent, "toy_rdls")
    with pytest.raises(FileNotFoundError, match="data_root_dir"):
        open_frame_source(tmp_path / "nowhere", NAME)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(
        ValueError, match=r"junk is not a dataset.*1\.0\.0/.*meta/info\.json.*notes"
    ):
        open_frame_source(tmp_path, "junk")


def test_registry_detects_lerobot(tmp_path: Path) -> None:
    lerobot_writer = pytest.importorskip(
        "steadyvla.data.lerobot_writer", reason="LeRobot writer not written yet"
    )
    rng = np.random.default_rng(3)
    episodes = [
        lerobot_writer.Episode(
            images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
            states=rng.normal(size=(4, 3)).astype(np.float32),
            actions=rng.normal(size=(4, A)).astype(np.float32),
            task="pick up the cube",
        )
        for _ in range(2)
    ]
    lerobot_writer.write_lerobot_dataset(tmp_path / "toy_lerobot", episodes, fps=10, robot_type="toy")
    assert detect_format(tmp_path / "toy_lerobot") == "lerobot"
    src = open_frame_source(tmp_path, "toy_lerobot")
    assert len(src) == 8 and src.num_episodes == 2
    assert "pick up the cube" in describe_dataset(src)


def test_fingerprint_ignores_the_path_and_sees_changed_contents(toy: tuple[Path, list[dict]], tmp_path: Path) -> None:
    import shutil

    from steadyvla.data.fingerprint import dataset_fingerprint, fingerprint_differences

    path, _ = toy
    original = dataset_fingerprint(RLDSFrames(path))
    assert set(original["files"]) == {"dataset_info.json", "features.json", f"{NAME}-train.tfrecord-00000-of-00002",
                                      f"{NAME}-train.tfrecord-00001-of-00002"}
    shutil.copytree(path, tmp_path / "staged" / NAME, copy_function=shutil.copy)  # new path, new mtimes
    assert dataset_fingerprint(RLDSFrames(tmp_path / "staged" / NAME)) == original
    rng = np.random.default_rng(1)
    smaller = write_rlds(tmp_path / "other", [[_datum(_episode(rng, 5, "task 0"))]])
    differences = fingerprint_differences(original, dataset_fingerprint(RLDSFrames(smaller)))
    assert differences[0] == f"frames: checkpoint {original['frames']}, now 5"
