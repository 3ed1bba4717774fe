"""predict_action: OpenVLA's prompt, greedy decoding, bin centres and q01/q99 un-normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LLAMA_TOKENIZER_DIR
from helpers import run_cli
from openvla_fixtures import NORM_STATS, write_tiny_openvla
from steadyvla import load_vla, predict_action
from steadyvla.config import ConfigError
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.predict import prompt_ids, tokens_to_actions


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path, _ = write_tiny_openvla(tmp_path_factory.mktemp("ov") / "tiny-openvla", seed=2)
    return load_vla(path)


def _image(seed: int = 0, shape=(48, 64, 3)) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def test_denormalisation_matches_hand_computed_values():
    stats = NORM_STATS["bridge_orig"]["action"]
    decoder = ActionTokenizer(vocab_end=32000)
    # ids 31999 -> bin 0, 31872 -> bin 127, 31744 -> bin 255 clipped to 254
    tokens = np.array([31999, 31872, 31744, 31999, 31744, 31872, 31744])
    centre = lambda i: -1.0 + (2.0 / 255.0) * (i + 0.5)  # noqa: E731  linspace(-1,1,256) midpoints
    x = [centre(0), centre(127), centre(254), centre(0), centre(254), centre(127), centre(254)]
    q01, q99 = stats["q01"], stats["q99"]
    expected = [0.5 * (x[i] + 1) * (q99[i] - q01[i]) + q01[i] for i in range(6)] + [x[6]]  # gripper: mask False
    actions = tokens_to_actions(tokens, decoder, stats)
    assert actions.dtype == np.float64
    np.testing.assert_allclose(actions, expected, rtol=0, atol=1e-12)
    assert actions[0] == pytest.approx(-0.5 + 0.5 / 255.0, abs=1e-12)
    # ids outside the action range clip to the outermost bins, as upstream
    for outside, inside in ((29000, 31744), (32005, 31999)):
        np.testing.assert_array_equal(tokens_to_actions(np.full(7, outside), decoder, stats),
                                      tokens_to_actions(np.full(7, inside), decoder, stats))


def _reference_tokens(bundle, image, instruction, n):
    """Greedy decoding the slow way: a full forward pass per token, no KV cache."""
    ids = torch.tensor([prompt_ids(bundle.tokenizer, instruction)])
    pixels = bundle.image_transform(image, 0, 0)[None].to(torch.bfloat16)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = bundle.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
            nxt = int(logits[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return np.array(out)


def test_predict_action_is_greedy_decoding_then_unnormalisation(bundle):
    image = _image()
    action = predict_action(bundle, image, "Pick up the CUP")
    tokens = _reference_tokens(bundle, image, "pick up the cup", 7)
    assert bundle.action_tokenizer.vocab_end == 768 - 64
    np.testing.assert_array_equal(action, tokens_to_actions(tokens, bundle.action_tokenizer,
                                                            NORM_STATS["bridge_orig"]["action"]))
    assert action.shape == (7,) and action.dtype == np.float64
    assert np.array_equal(predict_action(bundle, Image.fromarray(image), "pick up the cup",
                                         unnorm_key="bridge_orig"), action)


def test_batched_images_match_one_by_one(bundle):
    images = [_image(1), _image(2), _image(3)]
    texts = ["open the drawer", "open the drawer", "push the red block to the left"]
    batched = predict_action(bundle, images, texts)
    assert batched.shape == (3, 7)
    for row, (img, text) in zip(batched, zip(images, texts)):
        np.testing.assert_array_equal(row, predict_action(bundle, img, text))


def test_prompt_appends_the_separator_token_once(bundle):
    ids = prompt_ids(bundle.tokenizer, "Pick")
    assert ids[0] == bundle.tokenizer.bos_token_id
    assert ids[:-1] == list(bundle.tokenizer("In: What action should the robot take to pick?\nOut:").input_ids)
    assert ids == list(bundle.tokenizer("In: What action should the robot take to pick?\nOut: ").input_ids)


@pytest.mark.skipif(not LLAMA_TOKENIZER_DIR.is_dir(), reason=f"Llama-2 tokenizer not at {LLAMA_TOKENIZER_DIR}")
def test_llama_prompt_ends_with_29871():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(LLAMA_TOKENIZER_DIR))
    # <s> In : What action should the robot take to pick ? \n Out : ▁
    assert prompt_ids(tok, "PICK") == [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 29973, 13, 3744,
                                       29901, 29871]


def test_unnorm_key_errors_list_the_keys(bundle):
    with pytest.raises(ConfigError, match=r"'nope' is not in the model's norm_stats \(valid: bridge_orig\)"):
        predict_action(bundle, _image(), "pick", unnorm_key="nope")
    two = dict(NORM_STATS, fractal=NORM_STATS["bridge_orig"])
    bundle2 = type(bundle)(bundle.model, bundle.tokenizer, bundle.spec, two)
    with pytest.raises(ConfigError, match="unnorm_key: required, the model has 2 datasets in norm_stats: "
                                          "bridge_orig, fractal"):
        predict_action(bundle2, _image(), "pick")


def test_cli_predict_prints_the_action_and_rejects_bad_input(bundle, tmp_path):
    png = tmp_path / "frame.png"
    Image.fromarray(_image(5)).save(png)
    args = ["predict", "--vla_path", str(bundle.source), "--image", str(png), "--instruction", "Close the drawer"]
    done = run_cli(args)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.array(json.loads(done.stdout.strip().splitlines()[-1])),
                                  predict_action(bundle, _image(5), "Close the drawer"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    done = run_cli(["predict", "--vla_path", str(bundle.source), "--image", str(bad), "--instruction", "x"])
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(f"error: --image: {bad}")
    done = run_cli(args + ["--unnorm_key", "nope"])
    assert done.returncode == 2 and "error: unnorm_key: 'nope'" in done.stderr
    done = run_cli(["predict", "--vla_path", str(tmp_path), "--image", str(png), "--instruction", "x"])
    assert done.returncode == 2 and f"error: {tmp_path / 'config.json'}: missing" in done.stderr
