"""Action statistics (dataset_statistics.json format) and BOUNDS_Q99 normalization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steadyvla.data.stats import (
    compute_action_statistics,
    load_dataset_statistics,
    normalize_actions,
    unnormalize_actions,
    write_dataset_statistics,
)


@pytest.fixture
def actions() -> np.ndarray:
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(500, 7)) * [1, 2, 3, 0.1, 0.2, 0.3, 1]).astype(np.float32)
    a[:, -1] = np.where(rng.random(500) < 0.5, -1.0, 1.0)  # gripper: open/close
    return a


def test_statistics_match_numpy(actions):
    stats = compute_action_statistics(actions, num_trajectories=10)
    a = actions.astype(np.float64)
    expected = {
        "mean": a.mean(0), "std": a.std(0), "max": a.max(0), "min": a.min(0),
        "q01": np.quantile(a, 0.01, axis=0), "q99": np.quantile(a, 0.99, axis=0),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(stats["action"][key], value, rtol=1e-12, err_msg=key)
        assert all(isinstance(v, float) for v in stats["action"][key])
    assert stats["action"]["mask"] == [True] * 6 + [False]
    assert stats["num_transitions"] == 500
    assert stats["num_trajectories"] == 10
    assert "proprio" not in stats
    json.dumps(stats)  # plain JSON types only


def test_custom_mask_and_proprio(actions):
    proprio = np.arange(1000, dtype=np.float32).reshape(500, 2)
    stats = compute_action_statistics(actions, 3, mask=np.array([1, 0, 1, 0, 1, 0, 1], bool),
                                      proprio=proprio)
    assert stats["action"]["mask"] == [True, False, True, False, True, False, True]
    np.testing.assert_allclose(stats["proprio"]["mean"], proprio.mean(0))
    np.testing.assert_allclose(stats["proprio"]["q99"], np.quantile(proprio, 0.99, axis=0))
    assert "mask" not in stats["proprio"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": np.ones(3, bool)}, r"mask must have shape \(7,\)"),
        ({"num_trajectories": 0}, "num_trajectories must be >= 1"),
        ({"proprio": np.zeros((4, 2))}, "proprio has 4 rows but actions has 500"),
    ],
)
def test_statistics_errors_name_the_field(actions, kwargs, match):
    args = {"num_trajectories": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        compute_action_statistics(actions, **args)


def test_non_finite_actions_rejected(actions):
    actions[7, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite value.*row 7"):
        compute_action_statistics(actions, 1)


def test_normalize_formula_clip_and_unmasked(actions):
    stats = compute_action_statistics(actions, 1)["action"]
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    out = normalize_actions(actions, stats)
    assert out.dtype == np.float32 and out.shape == actions.shape
    expected = np.clip(2 * (actions[:, :6] - q01[:6]) / (q99[:6] - q01[:6]) - 1, -1, 1)
    np.testing.assert_allclose(out[:, :6], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[:, 6], actions[:, 6])  # gripper untouched
    assert out[:, :6].min() == -1.0 and out[:, :6].max() == 1.0  # the 1% tails are clipped
    # q01 -> -1, q99 -> +1, the midpoint -> 0
    probe = np.stack([q01, q99, (q01 + q99) / 2])
    np.testing.assert_allclose(normalize_actions(probe, stats)[:, :6],
                               [[-1] * 6, [1] * 6, [0] * 6], atol=1e-9)


def test_round_trip_on_masked_dims(actions):
    stats = compute_action_statistics(actions, 1)
    inside = np.clip(actions.astype(np.float64), stats["action"]["q01"], stats["action"]["q99"])
    back = unnormalize_actions(normalize_actions(inside, stats["action"]), stats["action"])
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, inside, rtol=1e-12, atol=1e-12)
    # The whole dataset entry is accepted too (callers often hold stats[name]).
    np.testing.assert_allclose(normalize_actions(inside, stats),
                               normalize_actions(inside, stats["action"]))


def test_constant_dimension_is_guarded():
    acts = np.zeros((50, 3), np.float32)
    acts[:, 0] = 0.25  # constant: q99 == q01
    acts[:, 1] = np.linspace(-1, 1, 50)
    stats = compute_action_statistics(acts, 1)["action"]
    out = normalize_actions(acts, stats)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_allclose(unnormalize_actions(out, stats)[:, 0], 0.25)


def test_dimension_mismatch_is_an_error(actions):
    stats = compute_action_statistics(actions, 1)["action"]
    with pytest.raises(ValueError, match="statistics describe 7-d actions"):
        normalize_actions(np.zeros((2, 4)), stats)


def test_write_and_load_round_trip(tmp_path, actions):
    entry = compute_action_statistics(actions, 4)
    path = tmp_path / "run" / "dataset_statistics.json"
    write_dataset_statistics(path, {"metaworld_demo": entry})
    assert load_dataset_statistics(path) == {"metaworld_demo": entry}
    assert sorted(p.name for p in path.parent.iterdir()) == ["dataset_statistics.json"]


def test_load_errors_name_the_problem(tmp_path, actions):
    path = tmp_path / "dataset_statistics.json"
    with pytest.raises(FileNotFoundError, match="dataset statistics file not found"):
        load_dataset_statistics(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset_statistics(path)
    entry = compute_action_statistics(actions, 1)
    del entry["action"]["q99"]
    path.write_text(json.dumps({"ds": entry}))
    with pytest.raises(ValueError, match=r"'ds': 'action' lacks \['q99'\]"):
        load_dataset_statistics(path)
    with pytest.raises(ValueError, match="lacks"):
        write_dataset_statistics(tmp_path / "x.json", {"ds": entry})
    assert not (tmp_path / "x.json").exists()


def test_openvla_entry_without_mask_normalizes_every_dim(tmp_path):
    entry = {"action": {"q01": [-2.0, 0.0], "q99": [2.0, 1.0]}, "num_transitions": 3,
             "num_trajectories": 1}
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps({"bridge_orig": entry}))
    action = load_dataset_statistics(path)["bridge_orig"]["action"]
    np.testing.assert_allclose(normalize_actions(np.array([[1.0, 0.25]]), action), [[0.5, -0.5]])
