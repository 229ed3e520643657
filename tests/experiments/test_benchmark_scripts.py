"""The benchmark scripts' usage errors: one line on stderr and exit 2, before any build or timing."""

import importlib.util

import pytest
import torch

from paths import ROOT  # noqa: E402

from hnca_kernels.models import CategoricalVAE


def _script(name):
    spec = importlib.util.spec_from_file_location(f"hnca_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_line_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,says", [(["FOO:"], "the capability must be"),
                                       (["--shape", "5x3", "AVX2:"], "--shape: '5x3'"),
                                       (["AVX2@no-such-revision:"], "no git revision 'no-such-revision'"),
                                       (["--op", "categorical", "--shape", "5x21x3", "AVX2:"], "not a multiple of --classes")])
def test_kernel_variants_refuses_bad_arguments(argv, says, capsys):
    assert says in _one_line_error(_script("kernel_variants").main, argv, capsys)


def test_trained_messages_refuses_a_file_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    err = _one_line_error(_script("trained_messages").main, [str(tmp_path / "bad.pt"), "AVX2:"], capsys)
    assert "cannot read the checkpoint" in err
    assert "no git revision" in _one_line_error(_script("trained_messages").main,
                                                [str(tmp_path / "bad.pt"), "AVX2@no-such-revision:"], capsys)


def test_vae_interleaved_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    torch.save({"epoch": 1, "model": CategoricalVAE(1).state_dict()}, tmp_path / "categorical.pt")
    main = _script("vae_interleaved").main
    err = _one_line_error(main, ["--checkpoints", str(tmp_path / "categorical.pt"), str(tmp_path / "categorical.pt")], capsys)
    assert "is not a checkpoint of this benchmark's BernoulliVAE" in err
    err = _one_line_error(main, ["--checkpoints", str(tmp_path / "none.pt"), str(tmp_path / "categorical.pt")], capsys)
    assert "cannot read the checkpoint" in err
