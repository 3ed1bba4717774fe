import numpy as np
import pytest
import torch

from steadyvla.model.action_tokenizer import ActionTokenizer


def test_llama_token_ids_match_openvla():
    tok = ActionTokenizer(vocab_end=32000)
    ids = tok.encode(np.array([-1.0, -0.9999, 0.0, 0.9999, 1.0, 5.0, -5.0]))
    # OpenVLA: 32000 - digitize(clip(a), linspace(-1, 1, 256)) -> ids 31744..31999
    expected = 32000 - np.digitize(np.clip([-1.0, -0.9999, 0.0, 0.9999, 1.0, 5.0, -5.0], -1, 1), np.linspace(-1, 1, 256))
    assert ids.tolist() == expected.tolist()
    assert ids.min() >= 31744 and ids.max() <= 31999
    assert ids[0] == 31999 and ids[4] == 31744


def test_round_trip_error_is_at_most_one_bin():
    tok = ActionTokenizer(vocab_end=768)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(1000, 7))
    decoded = tok.decode(tok.encode(actions))
    bin_width = 2.0 / 255
    assert np.abs(decoded - actions).max() <= bin_width + 1e-6
    assert decoded.dtype == np.float32


def test_decode_uses_bin_centers_and_clips_index():
    tok = ActionTokenizer(vocab_end=32000)
    centers = (tok.bins[:-1] + tok.bins[1:]) / 2
    # index = clip(32000 - token - 1, 0, 254)
    assert tok.decode(np.array([31999]))[0] == pytest.approx(centers[0])
    assert tok.decode(np.array([31744]))[0] == pytest.approx(centers[254])
    assert tok.decode(np.array([31745]))[0] == pytest.approx(centers[254])


def test_torch_decode_and_mask_agree_with_numpy():
    tok = ActionTokenizer(vocab_end=768)
    ids = torch.tensor([511, 512, 600, 767, 768, 2])
    assert tok.is_action_token(ids).tolist() == [False, True, True, True, False, False]
    np.testing.assert_array_equal(tok.decode_torch(ids[1:4]).numpy(), tok.decode(ids[1:4].numpy()))
