"""The hierarchical Bernoulli VAE: every estimator's exact expectation against the exact ELBO
gradient (enumeration in float64), variance, the bounds, bad input, and the CLI end to end."""

import itertools
import json
import math

import pytest
import torch

from hnca_kernels.models import ESTIMATORS, BernoulliVAE

DT = torch.float64
PIXELS, HIDDEN = 4, 2
SCORE_ESTIMATORS = ("hnca", "hnca_baseline", "reinforce", "reinforce_baseline")


def make_vae(layers, seed=0, scale=1.2, **options):
    torch.manual_seed(seed)
    vae = BernoulliVAE(layers, hidden=HIDDEN, data_dim=PIXELS, dtype=DT, **options)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, scale)
    return vae


def make_x(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, PIXELS, generator=g) < 0.5).to(DT)


def layer_values(n=HIDDEN):
    return [torch.tensor(c, dtype=DT) for c in itertools.product((0.0, 1.0), repeat=n)]


def configs(num):
    """All joint values of ``num`` hidden layers: list of lists of [HIDDEN] tensors."""
    return [list(c) for c in itertools.product(layer_values(), repeat=num)]


def log_q_prefix(vae, x, prefix):
    """log q(Phi_1..Phi_k = prefix | x) for x [N, D], prefix list of [N, H]: [N]."""
    h, total = x, torch.zeros(x.shape[0], dtype=DT)
    for layer, z in zip(vae.encoder, prefix):
        logits = layer.logits(h)
        total = total + torch.nn.functional.logsigmoid(torch.where(z > 0, logits, -logits)).sum(-1)
        h = z
    return total


def rows(x, per_example_configs):
    """Stack (example, configuration) pairs into one batch: x repeated, configs broadcast."""
    n, c = x.shape[0], len(per_example_configs)
    xs = x.repeat_interleave(c, 0)
    return xs, n, c


def evaluate(vae, x, latents):
    """(log q(latents | x) [B], f_E [B], the record) of one replayed pass, with autograd."""
    rec = vae.forward_pass(x, latents)
    log_q = sum(c.layer.log_prob(c.logits, c.sample) for c in rec.sampled_calls)
    return log_q, rec.elbo(), rec


def component(rec, layer):
    """The summed components [B] of the call of ``layer`` (a log-probability or an entropy)."""
    (call,) = [c for c in rec.calls if c.layer is layer]
    per_unit = call.layer.log_prob_units(call.logits, call.sample) if call.observed else \
        call.layer.entropy_units(call.logits)
    return per_unit.sum(-1)


def exact_gradient(vae, x):
    """grad of mean_n E_q[f_E(x_n, z)] by enumerating z (autograd through q and f_E)."""
    vae.zero_grad()
    zs = configs(vae.num_layers)
    xs, n, c = rows(x, zs)
    latents = [torch.stack([z[k] for z in zs]).repeat(n, 1) for k in range(vae.num_layers)]
    log_q, f, _ = evaluate(vae, xs, latents)
    (log_q.exp() * f).sum().div(n).backward()
    return {name: q.grad.clone() for name, q in vae.named_parameters()}


def expected_estimate(vae, x, estimator):
    """Exact expectation of the estimate (main pass enumerated), for the non-branched estimators."""
    vae.zero_grad()
    zs = configs(vae.num_layers)
    xs, n, c = rows(x, zs)
    latents = [torch.stack([z[k] for z in zs]).repeat(n, 1) for k in range(vae.num_layers)]
    with torch.no_grad():
        weight = log_q_prefix(vae, xs, latents).exp()
    surrogate, _ = vae.surrogate(xs, estimator, latents=latents)
    (weight * surrogate).sum().div(n).backward()
    return {name: q.grad.clone() for name, q in vae.named_parameters()}


def pair_law(vae, h_prev, estimator):
    """Joint law of the layer pair (a, b) given the previous layer [H]: list of (a, b, prob fn)."""
    vals = layer_values()
    out = []
    for a, b in itertools.product(vals, vals):
        out.append((a, b))
    return out


def log_pair_prob(logits, a, b, estimator):
    """log P(a, b) per row: independent draws (LOO) or the antithetic coupling (DisARM)."""
    p = torch.sigmoid(logits)
    if estimator == "reinforce_loo":
        lp = lambda z: torch.nn.functional.logsigmoid(torch.where(z > 0, logits, -logits)).sum(-1)
        return lp(a) + lp(b)
    both1, both0, split = (2 * p - 1).clamp_min(0), (1 - 2 * p).clamp_min(0), torch.minimum(p, 1 - p)
    prob = torch.where((a > 0) & (b > 0), both1, torch.where((a == 0) & (b == 0), both0, split))
    return prob.log().sum(-1)


def expected_branched(vae, x, estimator, k):
    """Exact expectation of encoder layer k's gradient for LOO/DisARM: the upstream prefix
    (Phi_1..Phi_k) enumerated, the pair of layer-(k+1) values by its law, and each branch's deeper
    layers by q. Only encoder[k]'s gradient is meaningful (other layers' branches are fixed)."""
    L = vae.num_layers
    prefixes = configs(k)
    pairs = [(a, b) for a, b in itertools.product(layer_values(), layer_values())]
    deepers = configs(L - k - 1)
    combos = list(itertools.product(prefixes, pairs, deepers, deepers))
    xs, n, c = rows(x, combos)
    stack = lambda items: torch.stack(items).repeat(n, 1)
    zero = torch.zeros(HIDDEN, dtype=DT)
    prefix_t = [stack([cb[0][m] for cb in combos]) for m in range(k)]
    latents = prefix_t + [stack([zero] * c) for _ in range(L - k)]
    a_t, b_t = stack([cb[1][0] for cb in combos]), stack([cb[1][1] for cb in combos])
    da = [stack([cb[2][m] for cb in combos]) for m in range(L - k - 1)]
    db = [stack([cb[3][m] for cb in combos]) for m in range(L - k - 1)]
    branches = []
    for m in range(L):
        if m == k:
            branches.append(([a_t, *da], [b_t, *db]))
        else:
            fixed = [stack([zero] * c) for _ in range(L - m)]
            branches.append((fixed, fixed))
    with torch.no_grad():
        logw = log_q_prefix(vae, xs, prefix_t)
        h_k = prefix_t[-1] if k else xs
        logw = logw + log_pair_prob(vae.encoder[k].logits(h_k), a_t, b_t, estimator)
        logw = logw + log_q_prefix_from(vae, k + 1, a_t, da) + log_q_prefix_from(vae, k + 1, b_t, db)
    vae.zero_grad()
    surrogate, _ = vae.surrogate(xs, estimator, latents=latents, branches=branches)
    (logw.exp() * surrogate).sum().div(n).backward()
    return {name: q.grad.clone() for name, q in vae.encoder[k].named_parameters()}


def log_q_prefix_from(vae, start, h, deeper):
    total = torch.zeros(h.shape[0], dtype=DT)
    for layer, z in zip(list(vae.encoder)[start:], deeper):
        logits = layer.logits(h)
        total = total + torch.nn.functional.logsigmoid(torch.where(z > 0, logits, -logits)).sum(-1)
        h = z
    return total


def set_baselines(vae, values=(3.0, -7.0, 11.0)):
    for b, v in zip(vae.baselines, values):
        b.value.fill_(v)


@pytest.mark.parametrize("layers", [1, 2, 3], ids=lambda n: f"L={n}")
@pytest.mark.parametrize("estimator", SCORE_ESTIMATORS)
def test_score_estimators_unbiased(layers, estimator):
    vae, x = make_vae(layers), make_x()
    set_baselines(vae)  # a nonzero baseline state: still unbiased
    truth = exact_gradient(vae, x)
    assert max(t.abs().max() for t in truth.values() if t.numel()) > 1e-2  # the test can see a wrong gradient
    mean = expected_estimate(vae, x, estimator)
    for name in truth:
        torch.testing.assert_close(mean[name], truth[name], rtol=0, atol=1e-9, msg=f"{estimator}: {name}")


@pytest.mark.parametrize("layers", [1, 2, 3], ids=lambda n: f"L={n}")
@pytest.mark.parametrize("estimator", ["reinforce_loo", "disarm"])
def test_branched_estimators_unbiased(layers, estimator):
    vae, x = make_vae(layers, seed=2), make_x()
    truth = exact_gradient(vae, x)
    for k in range(layers):
        mean = expected_branched(vae, x, estimator, k)
        for name, value in mean.items():
            torch.testing.assert_close(value, truth[f"encoder.{k}.{name}"], rtol=0, atol=1e-9,
                                       msg=f"{estimator}: encoder.{k}.{name}")
    # decoder and prior: the exact gradient of f_E at the main pass, whatever the branches
    mean = expected_estimate(vae, x, "hnca")
    for name in truth:
        if not name.startswith("encoder"):
            torch.testing.assert_close(mean[name], truth[name], rtol=0, atol=1e-9)


@pytest.mark.parametrize("layers", [2, 3], ids=lambda n: f"L={n}")
@pytest.mark.parametrize("option", ["rho_direct", "rho_direct_mediated_baseline", "upstream"])
def test_ablations_change_the_estimate_but_stay_unbiased(layers, option):
    x = make_x()
    options = {"rho_direct_mediated_baseline": {"rho_direct": True, "direct_in_baseline": False}}.get(
        option, {option: True})
    plain, ablated = make_vae(layers), make_vae(layers, **options)
    truth = exact_gradient(ablated, x)
    for estimator in ("hnca", "hnca_baseline"):
        set_baselines(ablated)
        mean = expected_estimate(ablated, x, estimator)
        for name in truth:
            torch.testing.assert_close(mean[name], truth[name], rtol=0, atol=1e-9, msg=f"{option} {estimator}: {name}")
    z = configs(layers)[5]
    latents = [v.expand(x.shape[0], -1).clone() for v in z]
    s_plain, _ = plain.surrogate(x, "hnca", latents=latents)
    s_abl, _ = ablated.surrogate(x, "hnca", latents=latents)
    g_plain = torch.autograd.grad(s_plain.sum(), plain.encoder[0].weight)[0]
    g_abl = torch.autograd.grad(s_abl.sum(), ablated.encoder[0].weight)[0]
    assert (g_plain - g_abl).abs().max() > 1e-6


def test_rho_direct_baseline_tracks_what_rho_weighs():
    """With rho_direct the paper's moving average tracks mediated + direct components at their
    sampled values; direct_in_baseline=False keeps the mediated components only."""
    x = make_x()
    z = [v.expand(x.shape[0], -1).clone() for v in configs(2)[3]]
    tracked = {}
    for flag in (True, False):
        vae = make_vae(2, rho_direct=True, direct_in_baseline=flag)
        vae.baselines[0].decay = 0.0  # the baseline becomes the last batch's mean
        vae.elbo_loss(x, "hnca_baseline", latents=z)
        _, _, rec = evaluate(vae, x, z)
        mediated = (component(rec, vae.decoder[1]) + component(rec, vae.prior)).mean()
        direct = (component(rec, vae.decoder[0]) + component(rec, vae.encoder[1])).mean()
        tracked[flag] = (vae.baselines[0].value.item(), mediated.item(), direct.item())
    value, mediated, direct = tracked[True]
    assert value == pytest.approx(mediated + direct, rel=1e-12)
    value, mediated, _ = tracked[False]
    assert value == pytest.approx(mediated, rel=1e-12)


def test_every_tensor_of_the_model_is_on_its_device():
    # the baselines too: on a GPU a CPU baseline meant a host copy every step (and no graph capture)
    vae = BernoulliVAE(2, hidden=4, data_dim=5, device="meta")
    assert {t.device.type for t in (*vae.parameters(), *vae.buffers())} == {"meta"}


def test_per_layer_widths_and_swapped_layers():
    vae = BernoulliVAE(3, hidden=[6, 4, 3], data_dim=7)
    assert [(m.in_features, m.out_features) for m in vae.encoder] == [(7, 6), (6, 4), (4, 3)]
    assert vae.prior_logits.shape == (3,) and vae.generate(2).shape == (2, 7)
    x = (torch.rand(5, 7) < 0.5).float()
    for estimator in ESTIMATORS:
        vae.elbo_loss(x, estimator).backward()
    with pytest.raises(ValueError, match="list of 3"):
        BernoulliVAE(3, hidden=[6, 4])
    from hnca_kernels import BernoulliLinear, CategoricalLinear
    for bad, error in ((CategoricalLinear(6, 4), TypeError), (BernoulliLinear(6, 4, centered=True), TypeError),
                       (BernoulliLinear(6, 5), ValueError)):
        vae.encoder[1] = bad
        with pytest.raises(error, match="encoder\\[1\\]"):
            vae.elbo_loss(x, "hnca")


def test_no_batch_on_the_model_after_a_step():
    import copy
    import io
    vae, x = make_vae(2), make_x()
    empty = io.BytesIO()
    torch.save(vae, empty)
    estimate = vae.estimate(x, "hnca_baseline")
    estimate.loss.backward()
    assert estimate.gradient_variance() > 0
    saved = io.BytesIO()
    torch.save(copy.deepcopy(vae), saved)
    assert len(saved.getvalue()) < len(empty.getvalue()) + 8192  # grads only


def per_draw_variance(vae, x, estimator):
    """Exact per-example elementwise variance of the encoder's estimate: {name: [N, *shape]}."""
    names = [n for n, _ in vae.named_parameters() if n.startswith("encoder")]
    params = dict(vae.named_parameters())
    first = {n: torch.zeros((x.shape[0],) + params[n].shape, dtype=DT) for n in names}
    second = {n: torch.zeros_like(first[n]) for n in names}
    for z in configs(vae.num_layers):
        for i in range(x.shape[0]):
            latents = [v.unsqueeze(0) for v in z]
            with torch.no_grad():
                prob = log_q_prefix(vae, x[i : i + 1], latents).exp()
            s, _ = vae.surrogate(x[i : i + 1], estimator, latents=latents)
            grads = torch.autograd.grad(s.sum(), [params[n] for n in names])
            for n, g in zip(names, grads):
                first[n][i] += prob * g
                second[n][i] += prob * g * g
    return {n: second[n] - first[n] ** 2 for n in names}


@pytest.mark.parametrize("layers", [1, 2, 3], ids=lambda n: f"L={n}")
def test_hnca_variance_below_reinforce(layers):
    vae, x = make_vae(layers, seed=3), make_x()
    v_h, v_r = per_draw_variance(vae, x, "hnca"), per_draw_variance(vae, x, "reinforce")
    strictly = 0
    for name in v_h:
        assert (v_h[name] <= v_r[name] + 1e-12).all(), name
        strictly += int((v_h[name] < v_r[name] - 1e-6).sum())
    assert strictly > 0


@pytest.mark.parametrize("estimator", ["hnca_baseline", "reinforce_baseline"])
def test_baseline_uses_earlier_batches_only_and_is_saved(estimator):
    vae, x = make_vae(2), make_x()
    s0, _ = vae.surrogate(x, estimator)
    first = vae.baselines[0].value.item()
    assert first != 0.0  # folded in the first batch
    state = vae.state_dict()
    assert "baselines.0.value" in state and "baselines.1.value" in state
    # the value used for a batch is the state before it: replaying with the state reset
    # gives the same signal as the plain estimator
    vae2 = make_vae(2)
    z = vae.sample_latents(x)
    s_b, _ = vae2.surrogate(x, estimator, latents=z)
    s_h, _ = vae2.surrogate(x, estimator.removesuffix("_baseline"), latents=z)
    g_b = torch.autograd.grad(s_b.sum(), vae2.encoder[0].weight)[0]
    g_h = torch.autograd.grad(s_h.sum(), vae2.encoder[0].weight)[0]
    torch.testing.assert_close(g_b, g_h, rtol=0, atol=1e-12)


def test_elbo_loss_value_and_batch_mean():
    vae, x = make_vae(2), make_x(3)
    z = vae.sample_latents(x)
    loss = vae.elbo_loss(x, "hnca", latents=z)
    _, f, _ = evaluate(vae, x, z)
    torch.testing.assert_close(loss, -f.mean().detach())
    loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in vae.parameters())


@pytest.mark.parametrize("estimator", ["hnca_baseline", "disarm"])
def test_forward_pass_then_estimate_is_the_step(estimator):
    """estimate(x, forward=forward_pass(x)) is the step split in two: the same draws and the same
    grads as elbo_loss, baselines included (DisARM draws its pairs in the second half)."""
    import copy
    vae, x = make_vae(3), make_x(3)
    split = copy.deepcopy(vae)
    for _ in range(2):  # the second step reads the baselines the first folded in
        torch.manual_seed(5)
        vae.zero_grad()
        vae.elbo_loss(x, estimator).backward()
        torch.manual_seed(5)
        split.zero_grad()
        p = split.forward_pass(x)
        assert p.calls[0].logits.requires_grad  # the forward half runs with autograd
        split.estimate(x, estimator, forward=p).loss.backward()
    for (name, a), b in zip(vae.named_parameters(), split.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="forward="):
        split.estimate(make_x(3, seed=2), estimator, forward=split.forward_pass(x))


def exact_log_px(vae, x):
    zs = configs(vae.num_layers)
    out = []
    for i in range(x.shape[0]):
        lw = torch.stack([vae.log_weight(x[i : i + 1], [v.unsqueeze(0) for v in z])[0] for z in zs])
        lq = torch.stack([log_q_prefix(vae, x[i : i + 1], [v.unsqueeze(0) for v in z])[0] for z in zs])
        out.append((lw, lq))
    return out


def test_multisample_bound_below_log_px_and_rises_with_k():
    vae, x = make_vae(2, seed=4), make_x()
    with torch.no_grad():
        tables = exact_log_px(vae, x)
        for i, (lw, lq) in enumerate(tables):
            log_px = torch.logsumexp(lw + lq, 0)
            q = lq.exp()
            # exact expectations of the k-sample bound for k = 1, 2, 3 by enumerating k-tuples
            expected = []
            for k in (1, 2, 3):
                total = 0.0
                for tup in itertools.product(range(len(q)), repeat=k):
                    idx = torch.tensor(tup)
                    total += q[idx].prod() * (torch.logsumexp(lw[idx], 0) - math.log(k))
                expected.append(float(total))
            assert expected[0] < expected[1] < expected[2] < float(log_px)
            torch.testing.assert_close(torch.tensor(expected[0], dtype=DT), (q * lw).sum())  # k=1: the ELBO
            # the sampler's bound (chunked: 1000 rows at a time) has the exact mean (MC, 5 standard errors)
            draws = vae.multisample_bound(x[i : i + 1].expand(4000, -1).contiguous(), k=3, max_rows=1000)
            se = draws.std() / math.sqrt(draws.numel())
            assert abs(draws.mean() - expected[2]) < 5 * se + 1e-12
            elbos = vae.elbo(x[i : i + 1].expand(4000, -1).contiguous())
            assert abs(elbos.mean() - float((q * tables[i][0]).sum())) < 5 * elbos.std() / math.sqrt(4000)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bad_input(estimator):
    vae = make_vae(2)
    x = make_x()
    with pytest.raises(ValueError, match="shape"):
        vae.elbo_loss(x[:, :3], estimator)
    with pytest.raises(TypeError, match="dtype"):
        vae.elbo_loss(x.float(), estimator)
    with pytest.raises(ValueError, match="binary"):
        vae.elbo_loss(x * 0.5, estimator)
    with pytest.raises(TypeError, match="torch.Tensor"):
        vae.elbo_loss(x.tolist(), estimator)
    if torch.device("meta") != x.device:
        with pytest.raises(ValueError, match="is on"):
            vae.elbo_loss(torch.zeros(2, PIXELS, dtype=DT, device="meta"), estimator)


def test_unknown_estimator_and_bad_arguments():
    vae, x = make_vae(1), make_x()
    with pytest.raises(ValueError, match="unknown estimator"):
        vae.elbo_loss(x, "arm")
    with pytest.raises(ValueError, match="num_layers"):
        BernoulliVAE(0)
    with pytest.raises(ValueError, match="k must"):
        vae.multisample_bound(x, k=0)
    with pytest.raises(ValueError, match="latents"):
        vae.elbo_loss(x, "hnca", latents=[torch.full((2, HIDDEN), 0.5, dtype=DT)])


def test_module_layout():
    vae = BernoulliVAE(3, hidden=5, data_dim=7)
    assert [(m.in_features, m.out_features) for m in vae.encoder] == [(7, 5), (5, 5), (5, 5)]
    assert [(m.in_features, m.out_features) for m in vae.decoder] == [(5, 7), (5, 5), (5, 5)]
    assert vae.prior_logits.shape == (5,)
    assert vae.generate(3).shape == (3, 7)


# ------------------------------------------------------------------ CLI end to end
import os  # noqa: E402
from pathlib import Path  # noqa: E402

from hnca_kernels.cli import main  # noqa: E402

from paths import SHARED  # noqa: E402
needs_mnist = pytest.mark.skipif(not (SHARED / "t10k-labels-idx1-ubyte.gz").exists(), reason=f"no MNIST files in {SHARED}")


def cli_vae(out, *extra, epochs=2, test_every=1):
    argv = ["vae", "--layers", "2", "--hidden", "16", "--estimator", "hnca_baseline", "--limit-train", "200",
            "--limit-test", "50", "--epochs", str(epochs), "--test-every", str(test_every), "--test-samples", "5",
            "--data-dir", str(SHARED), "--out", str(out), "--no-progress", "--device", "cpu", *extra]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
@needs_mnist
def test_cli_end_to_end_resume_and_sample(tmp_path, capsys):
    """--resume --epochs 6 after 3 epochs equals a 6-epoch run (metrics and weights), although the
    first session tested at its last epoch (3) and the straight run tests at every epoch: the test
    bound draws from its own stream, so testing never changes training."""
    straight = cli_vae(tmp_path / "straight", epochs=6, test_every=1)
    assert [r["epoch"] for r in straight] == [1, 2, 3, 4, 5, 6]
    for r in straight:
        assert {"train_elbo", "grad_variance", "test_bound"} <= set(r)
        assert math.isfinite(r["train_elbo"]) and r["train_elbo"] < 0 and r["grad_variance"] > 0
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["estimator"] == "hnca_baseline" and config["layers"] == 2 and config["experiment"] == "vae"

    cli_vae(tmp_path / "split", epochs=3, test_every=2)
    capsys.readouterr()
    assert main(["vae", "--out", str(tmp_path / "split"), "--epochs", "6"]) == 1  # an existing run is not overwritten
    assert "already holds a run (3 epoch(s)); pass --resume" in capsys.readouterr().err
    resumed = cli_vae(tmp_path / "split", "--resume", epochs=6, test_every=2)
    assert [e for e, r in enumerate(resumed, 1) if "test_bound" in r] == [2, 3, 4, 6]
    straight_same_keys = [{k: s[k] for k in r} for r, s in zip(without_time(resumed), without_time(straight))]
    assert without_time(resumed) == straight_same_keys
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["baselines.0.value"] != 0  # the baseline state is part of the checkpoint
    # and a different seed differs: the comparisons above can fail
    other = cli_vae(tmp_path / "other", "--seed", "1", epochs=1)
    assert other[0]["train_elbo"] != straight[0]["train_elbo"]

    png = tmp_path / "digits.png"
    assert main(["sample", str(tmp_path / "straight"), "-o", str(png), "-n", "9"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(tmp_path, capsys):
    assert main(["vae", "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert capsys.readouterr().err == f"hnca vae: --resume: nothing to resume in {tmp_path / 'none'} (no such directory)\n"
    assert main(["vae", "--estimator", "arm"]) == 2
    assert capsys.readouterr().err.startswith("hnca vae: error: argument --estimator: invalid choice: 'arm'")
    assert main(["sample", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"hnca sample: {tmp_path} is not a VAE run with a checkpoint (needs config.json and checkpoint.pt)\n"


@pytest.mark.parametrize("estimator", ["hnca", "hnca_baseline"])
def test_hnca_finite_at_saturation_float32(estimator):
    # logits of several hundred: a naive rho = P(children | phi) / P(children) overflows float32
    torch.manual_seed(0)
    vae = BernoulliVAE(3, hidden=8, data_dim=12, rho_direct=True)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 40.0)
    x = (torch.rand(5, 12) < 0.5).float()
    vae.elbo_loss(x, estimator).backward()
    for name, p in vae.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # and the float32 signal matches float64 at the same latents
    vae64 = BernoulliVAE(3, hidden=8, data_dim=12, rho_direct=True, dtype=DT)
    vae64.load_state_dict({k: v.double() for k, v in vae.state_dict().items()})
    z = vae.sample_latents(x)
    s32, _ = vae.surrogate(x, "hnca", latents=z)
    s64, _ = vae64.surrogate(x.double(), "hnca", latents=[v.double() for v in z])
    g32 = torch.autograd.grad(s32.sum(), vae.encoder[1].weight)[0]
    g64 = torch.autograd.grad(s64.sum(), vae64.encoder[1].weight)[0]
    assert ((g32.double() - g64).norm() / g64.norm().clamp_min(1e-30)) < 1e-4


def test_disarm_pair_has_the_antithetic_law():
    # the sampler behind the enumerated law of test_branched_estimators_unbiased
    vae = make_vae(1)
    logits = torch.tensor([[-1.3, 0.0, 0.4, 2.5]], dtype=DT).expand(200000, -1)
    a, b = vae._draw_pair(vae.encoder[0], logits, "disarm")
    p = torch.sigmoid(logits[0])
    law = {(1, 1): (2 * p - 1).clamp_min(0), (1, 0): torch.minimum(p, 1 - p),
           (0, 1): torch.minimum(p, 1 - p), (0, 0): (1 - 2 * p).clamp_min(0)}
    for (va, vb), prob in law.items():
        freq = ((a == va) & (b == vb)).to(DT).mean(0)
        se = (prob * (1 - prob) / a.shape[0]).sqrt()
        assert ((freq - prob).abs() <= 5 * se + 1e-12).all(), (va, vb, freq, prob)
