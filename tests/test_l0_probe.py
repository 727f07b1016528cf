"Tests of sae_nb.l0_probe: the n-th decoder projection on dictionaries where the answer is known, the L0 suggestion, argument errors."
import pytest
import torch
import torch.nn.functional as F

from sae_nb.data import ToyFeatures
from sae_nb.l0_probe import (decoder_projection_curve, decoder_projections, nth_decoder_projection, projection_scores,
                             suggest_l0)
from sae_nb.sae import make_sae


def dictionary_sae(W_dec, b_dec=None, variant="batchtopk"):
    "An SAE whose decoder rows are `W_dec` (as given) and decoder bias `b_dec` (default 0)."
    sae = make_sae(variant, d_in=W_dec.shape[1], d_sae=W_dec.shape[0], k=1)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec)
    return sae


@pytest.fixture(scope="module")
def toy():
    "Orthonormal features, magnitudes exactly 1, feature 0 frequent: about 3 active features per input."
    t = ToyFeatures(d_in=32, n_features=16, firing_probs=[0.8] + [2.2 / 15] * 15, magnitude_std=0.0, seed=0)
    x, f = t.sample(4096)
    return t.features, x, f


def test_index_is_n_times_batch():
    "s_n is the entry at 0-based index n*B of the decreasingly sorted projections."
    torch.manual_seed(0)
    W = F.normalize(torch.randn(6, 4), dim=-1)
    sae = dictionary_sae(W, b_dec=torch.randn(4))
    x = torch.randn(5, 4)
    P = (x - sae.b_dec.detach()) @ W.T
    ranked = P.flatten().sort(descending=True).values
    for n in range(6):
        assert nth_decoder_projection(sae, x, n) == pytest.approx(ranked[n * 5].item())
    assert decoder_projection_curve(sae, x).tolist() == pytest.approx(ranked[::5].tolist())


def test_leading_dims_are_rows_and_row_norms_divide_out():
    W = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    sae = dictionary_sae(W, variant="relu")   # relu does not keep unit-norm rows
    x = torch.tensor([[[1.0, 2.0], [4.0, -1.0]]])   # [1, 2, 2]: B = 2 rows
    torch.testing.assert_close(decoder_projections(sae, x), torch.tensor([[1.0, 2.0], [4.0, -1.0]]))
    assert nth_decoder_projection(sae, x, 1) == pytest.approx(1.0)   # sorted (4, 2, 1, -1), index 2


def test_ground_truth_dictionary(toy):
    "With the true features as decoder, s_n is 1 (a magnitude) for small n and exactly 0 beyond the active features."
    features, x, f = toy
    s = decoder_projection_curve(dictionary_sae(features), x)
    assert s[0] == pytest.approx(1.0, abs=1e-5) and s[1] == pytest.approx(1.0, abs=1e-5)
    assert s[6:].abs().max() < 1e-5


def test_hedging_raises_s_n_and_suggest_picks_truth(toy):
    features, x, f = toy
    truth = dictionary_sae(features)
    hedged = {a: dictionary_sae(F.normalize(features + a * features[0], dim=-1)) for a in (0.3, 0.6)}
    for n in range(5, 12):
        assert nth_decoder_projection(hedged[0.3], x, n) > nth_decoder_projection(truth, x, n) + 0.2
        assert nth_decoder_projection(hedged[0.6], x, n) > nth_decoder_projection(hedged[0.3], x, n)
    saes_by_k = {1: hedged[0.6], 2: hedged[0.3], 3: truth}
    scores = projection_scores(saes_by_k, x, n=6)
    assert list(scores) == [1, 2, 3] and scores[1] > scores[2] > scores[3]
    assert suggest_l0(saes_by_k, x, n=6) == 3


def test_suggest_tie_takes_smallest_k(toy):
    features, x, f = toy
    same = dictionary_sae(features)
    assert suggest_l0({7: same, 4: same, 9: same}, x, n=8) == 4


def test_argument_errors(toy):
    features, x, f = toy
    sae = dictionary_sae(features)
    with pytest.raises(ValueError, match=r"n: expected an int in \[0, d_sae - 1\] = \[0, 15\], got 16"):
        nth_decoder_projection(sae, x, 16)
    with pytest.raises(ValueError, match="n: expected an int in"):
        nth_decoder_projection(sae, x, -1)
    with pytest.raises(TypeError, match="n: expected an int, got float"):
        nth_decoder_projection(sae, x, 2.0)
    with pytest.raises(TypeError, match="n: expected an int, got bool"):
        nth_decoder_projection(sae, x, True)
    with pytest.raises(ValueError, match="x: expected last dimension d_in=32"):
        nth_decoder_projection(sae, torch.ones(4, 31), 0)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        nth_decoder_projection(sae, torch.ones(4, 32, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        nth_decoder_projection(sae, [[0.0] * 32], 0)
    with pytest.raises(ValueError, match="x: expected at least one row"):
        nth_decoder_projection(sae, torch.ones(0, 32), 0)
    with pytest.raises(TypeError, match="sae: expected an SAE"):
        nth_decoder_projection(object(), x, 0)
    with pytest.raises(ValueError, match="saes_by_k: expected a non-empty dict"):
        suggest_l0({}, x, n=3)
    with pytest.raises(ValueError, match="saes_by_k: expected a non-empty dict"):
        suggest_l0([sae], x, n=3)
    with pytest.raises(TypeError, match="saes_by_k: expected numeric keys"):
        suggest_l0({"k=3": sae}, x, n=3)
    with pytest.raises(ValueError, match="n: expected an int in"):
        suggest_l0({3: sae}, x, n=40)
