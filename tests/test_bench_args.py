"""Benchmark command lines: every method spec, length and mode is checked before anything is timed, with an
error naming the bad item and what is allowed (a typo must not surface after an hour of measuring)."""

import argparse
import re

import pytest

from hf_fastattn import bench, bench_model


def _args(module, *argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("methods, match", [
    ("sdpa,bogus", r"unknown method 'bogus' in 'bogus'; choose from sdpa, flash, exact, poly, conv"),
    ("poly:foo=3", r"method 'poly:foo=3': unknown option 'foo'; poly takes degree, band, chunk, kernel"),
    ("poly:degree", r"option 'degree' needs a value \(degree=...\)"),
    ("poly:band=wide", r"band='wide' must be an integer"),
    ("poly:kernel=cuda", r"kernel='cuda'; choose from auto, torch, triton"),
    ("conv:placement=random", r"placement='random'; choose from search, even, geometric"),
    ("exact:band=4", r"unknown option 'band'; exact takes none"),
    # the arms' (config) names get the op's name back
    ("poly:local_window=64", r"unknown option 'local_window' \(local_window is the config's name; the op's is band=\)"),
    ("conv:conv_k=4", r"unknown option 'conv_k' \(conv_k is the config's name; the op's is k=\)"),
    # values out of range are refused up front too (they were rows of errors in a JSON, exit status 0)
    ("poly:degree=0", r"degree='0' must be >= 2"),
    ("poly:degree=3", r"degree='3' must be even"),
    ("poly:band=-1", r"band='-1' must be >= 0"),
    ("conv:k=0", r"k='0' must be >= 1"),
    ("sdpa,poly:chunk=64,kernel=triton", r"kernel=triton needs --device cuda \(or TRITON_INTERPRET=1 on CPU\)"),
])
def test_bench_bad_method_specs(methods, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite runs Triton's interpreter on CPU
    args = _args(bench, "--methods", methods, "--lengths", "64", "--quiet")
    with pytest.raises(ValueError, match=match):
        bench.check_args(args)
    with pytest.raises(SystemExit, match=f"hf-fastattn bench: .*{match}"):
        bench.main(args)


@pytest.mark.parametrize("module, argv", [
    (bench, ["--threads", "-1"]), (bench, ["--device", "tpu"]), (bench, ["--heads", "0"]), (bench, ["--repeats", "0"]),
    (bench, ["--degree", "3"]), (bench_model, ["--heads", "0"]), (bench_model, ["--device", "cuda:x"]),
])
def test_bench_bad_numbers_are_usage_errors(module, argv, capsys):
    with pytest.raises(SystemExit):
        _args(module, *argv)
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: must be" in err and "Traceback" not in err


def test_cuda_device_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        _args(bench, "--device", "cuda")
    assert "this torch has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, match", [
    ("--lengths", "128,0", r"must be an integer >= 1, got '0'"),
    ("--lengths", "1k", r"must be an integer >= 1, got '1k'"),
    ("--modes", "fwd,bwd", r"mode 'bwd': choose from fwd, fwdbwd"),
])
def test_bench_bad_lengths_and_modes(option, value, match):
    args = _args(bench, option, value, "--quiet")
    with pytest.raises(ValueError, match=match):
        bench.run(args)  # raised before any row is timed


def test_bench_flash_without_flash_attn():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"method 'flash' needs the flash-attn package"):
            bench.check_args(_args(bench, "--methods", "sdpa,flash"))
    else:
        pytest.skip("flash-attn is installed here")


def test_bench_good_specs_parse():
    base, extra = bench.parse_spec("poly:band=64,chunk=128,kernel=torch,seg=1024")
    assert base == "poly" and extra == {"band": "64", "chunk": "128", "kernel": "torch", "seg": "1024"}
    lengths, methods, modes = bench.check_args(_args(bench, "--methods", "sdpa+poly:band=8,chunk=64+conv:k=4",
                                                     "--lengths", "64,128", "--modes", "fwdbwd"))
    assert (lengths, methods, modes) == ([64, 128], ["sdpa", "poly:band=8,chunk=64", "conv:k=4"], ["fwdbwd"])
    # the comma form of bench-model's arms: an option item continues the spec before it
    assert bench.check_args(_args(bench, "--methods", "sdpa,poly:band=8,chunk=64,conv:k=4", "--lengths", "64"))[1] == methods


def test_arms_with_several_options():
    """An option item after an arm continues it (the arms' list and an arm's options share the comma)."""
    args = _args(bench_model, "--arms", "sdpa,poly:local_window=64,poly_decode_state=false,band:local_window=8,exact")
    assert args.arms == ["sdpa", "poly:local_window=64,poly_decode_state=false", "band:local_window=8", "exact"]
    from hf_fastattn.evaluation import parse_arm

    assert parse_arm(args.arms[1])[1] == {"method": "poly", "guard": "off", "local_window": 64,
                                          "poly_decode_state": False}


@pytest.mark.parametrize("argv, match", [
    (["--arms", "sdpa,poly:local_window=4,windw=2"], r"argument --arms: arm 'poly:local_window=4,windw=2': unknown "
                                                       r"option 'windw'"),
    (["--modes", "fwd,train"], r"argument --modes: mode 'train': choose from fwd, fwdbwd"),
    (["--lengths", "1024,-1"], r"argument --lengths: must be an integer >= 1, got '-1'"),
    (["--arms", "sdpa,poly:degre=2"], r"argument --arms: arm 'poly:degre=2': unknown option 'degre'"),
    (["--arms", "sdpa:degree=2"], r"arm 'sdpa:degree=2': sdpa takes no options"),  # were accepted and ignored
    (["--arms", "poly:method=conv"], r"arm 'poly:method=conv': unknown option 'method' \(the method is the arm's name"),
    (["--arms", "poly:band=64"], r"unknown option 'band' \(.*; band is the op's name \(bench's\), the config's is "
                                 r"local_window=\)"),
    (["--arms", "plan:/nonexistent/plan.json"], r"argument --arms: arm 'plan:/nonexistent/plan.json': .*No such file"),
])
def test_bench_model_bad_arguments_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        _args(bench_model, *argv)
    assert exit_.value.code == 2
    assert re.search(match, capsys.readouterr().err)
