"""LeRobot v3.0 writer and reader: the layout LeRobot expects, exact round trips, atomic writes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steadyvla.data.frames import Frame
from steadyvla.data.lerobot import LeRobotFrames, is_lerobot_dataset
from steadyvla.data.lerobot_writer import Episode, write_lerobot_dataset

TASKS = ["pick up the cube", "open the drawer", "pick up the cube"]
LENGTHS = [5, 41, 9]


def make_episodes(seed: int = 0, h: int = 12, w: int = 10) -> list[Episode]:
    rng = np.random.default_rng(seed)
    return [
        Episode(
            images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
            states=rng.normal(size=(n, 4)).astype(np.float32),
            actions=rng.normal(size=(n, 7)).astype(np.float32),
            task=task,
        )
        for n, task in zip(LENGTHS, TASKS)
    ]


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, list[Episode]]:
    episodes = make_episodes()
    root = write_lerobot_dataset(tmp_path / "toy", iter(episodes), fps=10, robot_type="sawyer",
                                 action_names=[f"a{i}" for i in range(7)], row_group_size=8)
    return root, episodes


def test_layout_files(dataset):
    root, _ = dataset
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [
        "data/chunk-000/file-000.parquet",
        "meta/episodes/chunk-000/file-000.parquet",
        "meta/info.json",
        "meta/stats.json",
        "meta/tasks.parquet",
    ]
    assert [p.name for p in root.parent.iterdir()] == ["toy"]  # no temporary directory left
    assert is_lerobot_dataset(root)


def test_info_json(dataset):
    root, _ = dataset
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["robot_type"] == "sawyer" and info["fps"] == 10
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 55, 2)
    assert info["chunks_size"] == 1000 and info["data_files_size_in_mb"] == 100
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] is None
    assert info["splits"] == {"train": "0:3"}
    feats = info["features"]
    assert feats["observation.image"] == {
        "dtype": "image", "shape": [12, 10, 3], "names": ["height", "width", "channels"]}
    assert feats["observation.state"] == {"dtype": "float32", "shape": [4], "names": None}
    assert feats["action"]["shape"] == [7] and feats["action"]["names"][0] == "a0"
    for key, dtype in [("timestamp", "float32"), ("frame_index", "int64"),
                       ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")]:
        assert feats[key] == {"dtype": dtype, "shape": [1], "names": None}


def test_tasks_and_episodes_parquet(dataset):
    root, _ = dataset
    tasks = pq.read_table(root / "meta" / "tasks.parquet")
    assert tasks.to_pydict() == {"task_index": [0, 1],
                                 "task": ["pick up the cube", "open the drawer"]}
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas_meta["index_columns"] == ["task"]  # pandas reads the task string as the index

    eps = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pydict()
    assert eps["episode_index"] == [0, 1, 2]
    assert eps["tasks"] == [[t] for t in TASKS]
    assert eps["length"] == LENGTHS
    assert eps["dataset_from_index"] == [0, 5, 46]
    assert eps["dataset_to_index"] == [5, 46, 55]
    assert eps["data/chunk_index"] == [0, 0, 0] and eps["data/file_index"] == [0, 0, 0]
    assert eps["meta/episodes/chunk_index"] == [0, 0, 0]
    np.testing.assert_allclose(eps["stats/action/mean"][1],
                               make_episodes()[1].actions.astype(np.float64).mean(0))


def test_data_parquet_schema_and_rows(dataset):
    root, episodes = dataset
    pf = pq.ParquetFile(root / "data" / "chunk-000" / "file-000.parquet")
    schema = pf.schema_arrow
    assert schema.field("observation.image").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("observation.state").type == pa.list_(pa.float32(), 4)
    assert schema.field("action").type == pa.list_(pa.float32(), 7)
    assert schema.field("timestamp").type == pa.float32()
    for key in ("frame_index", "episode_index", "index", "task_index"):
        assert schema.field(key).type == pa.int64()
    hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["observation.image"] == {"_type": "Image"}
    assert all(pf.metadata.row_group(i).num_rows <= 8 for i in range(pf.num_row_groups))

    table = pf.read().to_pydict()
    assert table["index"] == list(range(55))
    assert table["episode_index"] == [0] * 5 + [1] * 41 + [2] * 9
    assert table["frame_index"][5:8] == [0, 1, 2]
    assert table["task_index"] == [0] * 5 + [1] * 41 + [0] * 9
    np.testing.assert_allclose(table["timestamp"][5:8], [0.0, 0.1, 0.2], rtol=1e-6)
    assert table["observation.image"][0]["bytes"].startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.array(table["observation.state"][6], np.float32),
                                  episodes[1].states[1])


def test_stats_json(dataset):
    root, episodes = dataset
    stats = json.loads((root / "meta" / "stats.json").read_text())
    all_actions = np.concatenate([e.actions for e in episodes]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0))
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(all_actions, 0.99, axis=0))
    assert stats["action"]["count"] == [55]
    assert np.array(stats["observation.image"]["mean"]).shape == (3, 1, 1)
    assert stats["index"]["max"] == [54.0]


def test_reader_round_trip_is_exact(dataset):
    root, episodes = dataset
    reader = LeRobotFrames(root)
    assert (reader.name, len(reader), reader.num_episodes, reader.fps) == ("toy", 55, 3, 10)
    assert reader.instructions == ["pick up the cube", "open the drawer"]
    assert reader.image_key == "observation.image"
    assert reader.features["action"]["shape"] == [7]
    expected = [(e, t) for e in range(3) for t in range(LENGTHS[e])]
    order = np.random.default_rng(1).permutation(55)  # random access, as the sampler does
    for index in order:
        e, t = expected[index]
        frame = reader.frame(int(index))
        assert isinstance(frame, Frame)
        assert frame.image.dtype == np.uint8
        np.testing.assert_array_equal(frame.image, episodes[e].images[t])
        np.testing.assert_array_equal(frame.action, episodes[e].actions[t])
        assert frame.action.dtype == np.float32
        assert frame.instruction == TASKS[e]
        assert (frame.episode_index, frame.frame_index) == (e, t)
    assert len(reader._cache) <= 2  # bounded: never all decoded images
    np.testing.assert_array_equal(reader.actions(), np.concatenate([e.actions for e in episodes]))
    with pytest.raises(IndexError, match="out of range for 55 frames"):
        reader.frame(55)


def test_multiple_data_files(tmp_path):
    episodes = make_episodes(seed=3)
    root = write_lerobot_dataset(tmp_path / "split", episodes, fps=5, robot_type="x",
                                 data_file_size_in_mb=0.001)
    files = sorted(p.name for p in (root / "data" / "chunk-000").iterdir())
    assert files == ["file-000.parquet", "file-001.parquet", "file-002.parquet"]
    eps = pq.read_table(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert eps["data/file_index"].to_pylist() == [0, 1, 2]
    reader = LeRobotFrames(root)
    for index, (e, t) in enumerate((e, t) for e in range(3) for t in range(LENGTHS[e])):
        frame = reader.frame(index)
        np.testing.assert_array_equal(frame.image, episodes[e].images[t])
        assert frame.instruction == TASKS[e]


def test_interrupted_write_leaves_nothing(tmp_path):
    def broken():
        yield from make_episodes()[:2]
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        write_lerobot_dataset(tmp_path / "ds", broken(), fps=10, robot_type="x")
    assert list(tmp_path.iterdir()) == []
    assert not is_lerobot_dataset(tmp_path / "ds")


def test_existing_dataset_and_overwrite(dataset):
    root, _ = dataset
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_lerobot_dataset(root, make_episodes(), fps=10, robot_type="x")
    new = make_episodes(seed=7)[:1]
    write_lerobot_dataset(root, new, fps=10, robot_type="x", overwrite=True)
    reader = LeRobotFrames(root)
    assert len(reader) == 5
    np.testing.assert_array_equal(reader.frame(4).image, new[0].images[4])
    assert [p.name for p in root.parent.iterdir()] == ["toy"]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda eps: setattr(eps[1], "task", ""), "episode 1: task must be a non-empty string"),
        (lambda eps: setattr(eps[0], "actions", eps[0].actions[:3]),
         r"episode 0: actions must be \[T=5"),
        (lambda eps: setattr(eps[2], "images", eps[2].images[:, :4]), "differ from episode 0's"),
        (lambda eps: setattr(eps[0], "images", eps[0].images.astype(np.float32)), "uint8"),
    ],
)
def test_invalid_episodes(tmp_path, change, match):
    episodes = make_episodes()
    change(episodes)
    with pytest.raises(ValueError, match=match):
        write_lerobot_dataset(tmp_path / "bad", episodes, fps=10, robot_type="x")
    assert list(tmp_path.iterdir()) == []


def test_not_a_dataset(tmp_path):
    assert not is_lerobot_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a complete LeRobot v3 dataset"):
        LeRobotFrames(tmp_path)
    with pytest.raises(ValueError, match="episodes iterable was empty"):
        write_lerobot_dataset(tmp_path / "empty", [], fps=10, robot_type="x")


def test_unknown_image_key(dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match=r"valid: \['observation.image'\]"):
        LeRobotFrames(root, image_key="observation.images.wrist")


def test_video_feature_goes_through_decode_frame(dataset, monkeypatch):
    root, _ = dataset
    key = "observation.images.top"
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"] = {key: {**info["features"]["observation.image"], "dtype": "video"},
                        **info["features"]}
    info["video_path"] = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    (root / "meta" / "info.json").write_text(json.dumps(info))
    ep_path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    eps = pq.read_table(ep_path)
    for name, values in [("chunk_index", [0, 0, 0]), ("file_index", [0, 0, 1]),
                         ("from_timestamp", [0.0, 0.5, 0.0])]:
        eps = eps.append_column(f"videos/{key}/{name}", pa.array(values))
    pq.write_table(eps, ep_path)

    calls = []

    def fake_decode(path: Path, timestamp_s: float) -> np.ndarray:
        calls.append((path, timestamp_s))
        return np.full((12, 10, 3), 7, np.uint8)

    fake = types.ModuleType("steadyvla.data.video")
    fake.decode_frame = fake_decode
    monkeypatch.setitem(sys.modules, "steadyvla.data.video", fake)
    reader = LeRobotFrames(root)  # the first image/video feature is the default
    assert reader.image_key == key
    frame = reader.frame(5 + 3)  # episode 1, frame 3 at 10 fps
    assert frame.image[0, 0, 0] == 7 and frame.frame_index == 3
    path, ts = calls[-1]
    assert path == root / "videos" / key / "chunk-000" / "file-000.mp4"
    assert ts == pytest.approx(0.5 + 0.3)
    reader.frame(54)
    assert calls[-1][0].name == "file-001.mp4" and calls[-1][1] == pytest.approx(0.8)


def test_pandas_reads_tasks_with_task_index(dataset):
    pd = pytest.importorskip("pandas")
    root, _ = dataset
    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    assert tasks.index.name == "task"
    assert int(tasks.loc["open the drawer"].task_index) == 1


def test_reader_survives_a_dataloader_worker_copy(dataset):
    import copy

    root, episodes = dataset
    reader = LeRobotFrames(root)
    reader.frame(3)  # opens a parquet file and fills the cache
    clone = copy.deepcopy(reader)  # what spawn-started workers do, minus the process
    assert clone._handles == {} and len(clone._cache) == 0
    np.testing.assert_array_equal(clone.frame(50).image, episodes[2].images[4])
