"""Command-line options checked up front, with argparse usage errors that name the option (not tracebacks, not an
endless loop, not silently ignored), for finetune, diagnose, demo and scripts/eval_long_context.py; the warm-up's
first step; the held-out split of a single --data file; where the experiment's fine-tuning runs write; run.sh
running commands in the caller's directory. All fast: tiny models or no model at all."""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fastattn.loading import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
PROG = __import__("argparse").ArgumentParser().prog  # what a parser without prog= calls itself here
needs_embedded = pytest.mark.skipif(not (EMBEDDED / "config.json").exists(), reason="embedded model not built")


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the suite) when the body runs longer than `seconds`."""

    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def usage_error(capsys, main, argv, prog):
    """main(argv) must exit with argparse's status 2 and its usage line; returns the error message."""
    with deadline(240), pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: {prog} " in err, err  # argparse's usage line, not a traceback
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _text(tmp_path, n=3000, name="small.txt"):
    from hf_fastattn.data import stdlib_text

    text = stdlib_text("heldout")[:n]
    path = tmp_path / name
    path.write_text(text)
    return str(path), len(text.encode()) + 1  # the byte tokenizer's tokens (+ eos)


def _ft_argv(tmp_path, *extra):
    return ["--model", "embedded", "--seq-len", "64", "--batch-size", "1", "--method", "exact", "--eval-every", "0",
            "--eval-batches", "1", "--no-save-model", "--quiet", "--output-dir", str(tmp_path / "out"), *extra]


# ---------------------------------------------------------------------------------------------- finetune
@needs_embedded
def test_finetune_refuses_a_batch_size_larger_than_the_data(tmp_path, capsys):
    """Fewer training rows than --batch-size: the drop_last loader had no batch and `while step < steps` spun
    forever; now a usage error with the row count."""
    from hf_fastattn.finetune import main

    path, tokens = _text(tmp_path)
    rows = tokens // 256
    train_rows = rows - max(1, rows // 20)
    msg = usage_error(capsys, main, _ft_argv(tmp_path, "--data", path, "--seq-len", "256", "--batch-size", "64",
                                             "--steps", "2"), PROG)
    assert msg == (f"{PROG}: error: --batch-size 64 x 1 process(es) needs at least 64 training rows, "
                   f"but the data has {train_rows} row(s) of --seq-len 256 tokens: lower --batch-size or --seq-len, "
                   "or add data")


@needs_embedded
def test_finetune_holds_out_the_end_of_a_single_data_file(tmp_path):
    """One --data file and no --eval-data: the eval rows are the last 5 % of its rows and none of them is trained
    on (the eval split used to be the whole training text); data of a single row is refused."""
    import argparse

    from hf_fastattn.data import byte_tokenizer
    from hf_fastattn.finetune import add_arguments, build_data, token_stream

    path, tokens = _text(tmp_path, 20_000)
    p = argparse.ArgumentParser()
    add_arguments(p)
    tok = byte_tokenizer()
    train, evald = build_data(p.parse_args(["--data", path, "--seq-len", "128"]), tok)
    rows = tokens // 128
    assert (len(train), len(evald)) == (rows - rows // 20, rows // 20)
    all_rows = torch.from_numpy(token_stream(tok, [Path(path).read_text()])[: rows * 128].reshape(rows, 128))
    assert torch.equal(evald.rows, all_rows[len(train):]) and torch.equal(train.rows, all_rows[: len(train)])
    assert not any(torch.equal(t, e) for t in train.rows for e in evald.rows)

    small, _ = _text(tmp_path, 150, "one-row.txt")
    with pytest.raises(ValueError, match=r"--data has 151 tokens = 1 row\(s\) of --seq-len 128; holding out an eval "
                                         r"split needs at least 2 rows"):
        build_data(p.parse_args(["--data", small, "--seq-len", "128"]), tok)


@needs_embedded
def test_finetune_first_step_moves_the_weights(tmp_path):
    """The linear warm-up's first step is at lr / warmup, not 0 (AdamW at lr 0 left every weight as it was); the
    recorded lr is the one each step used."""
    import argparse

    from hf_fastattn.finetune import add_arguments, check_args, run
    from hf_fastattn.loading import load_model

    path, _ = _text(tmp_path)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(_ft_argv(tmp_path, "--data", path, "--eval-data", path, "--steps", "1", "--warmup", "4",
                                 "--lr", "1e-3"))
    with pytest.warns(RuntimeWarning, match="--warmup 4 is longer than --steps 1: the learning rate peaks at 25% of"):
        m = run(args)
    fresh, _ = load_model("embedded")
    moved = max((a - b).abs().max().item() for a, b in zip(m["model"].parameters(), fresh.parameters()))
    assert moved > 1e-5  # Adam's first step moves every weight with a gradient by about lr
    assert m["train"][0]["lr"] == pytest.approx(1e-3 / 4)
    from hf_fastattn.finetune import lr_lambda

    factor = lr_lambda(4, 12)
    assert [factor(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factor(8) == pytest.approx(0.5) and factor(12) == 0.0
    assert lr_lambda(0, 10)(0) == 1.0  # no warm-up: the peak at once
    default = p.parse_args(_ft_argv(tmp_path, "--steps", "40"))
    check_args(default)
    assert default.warmup == 4  # a tenth of --steps, at most 10 (10 before: longer than a short run)


@needs_embedded
@pytest.mark.parametrize("case", ["plan-missing", "plan-not-json", "plan-invalid", "resume-missing", "data-missing",
                                  "batch-size-0", "lora-targets", "degree-3", "window-negative", "model-missing",
                                  "family-unknown", "steps-0"])
def test_finetune_bad_options_are_usage_errors(tmp_path, capsys, case):
    from hf_fastattn.finetune import main

    prog = PROG
    bad = tmp_path / "bad.json"
    if case == "plan-not-json":
        bad.write_text("{not json")
    elif case == "plan-invalid":
        bad.write_text(json.dumps({"plan": {"settings": {"a": {"method": "exact"}}, "layers": {"0": ["b"]}}}))
    argv, expected = {
        "plan-missing": (["--plan", str(tmp_path / "nope.json")], f"--plan: no such file: {tmp_path / 'nope.json'}"),
        "plan-not-json": (["--plan", str(bad)], f"--plan {bad}: not a JSON file (Expecting property name"),
        "plan-invalid": (["--plan", str(bad)],
                         f"--plan {bad}: not a valid plan: fastattn_config['plan']['layers']['0'] names unknown "
                         "settings ['b']"),
        "resume-missing": (["--resume", str(tmp_path / "ckpt")], f"--resume {tmp_path / 'ckpt'}: no such directory; "
                                                                 "give a checkpoint-N directory"),
        "data-missing": (["--data", str(tmp_path / "train.txt")], f"--data: no such file: {tmp_path / 'train.txt'}"),
        "batch-size-0": (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
        # fastattn option values are checked before the model loads (they were tracebacks from configure)
        "degree-3": (["--method", "poly", "--degree", "3"], "fastattn_config['degree'] must be even"),
        "window-negative": (["--local-window", "-1"], "fastattn_config['local_window'] must be an integer >= 0; got -1"),
        "model-missing": (["--model", str(tmp_path / "nope")], f"--model '{tmp_path / 'nope'}': no such model directory"),
        "family-unknown": (["--model", "tiny:nosuch"], "--model 'tiny:nosuch': cannot load the model: ValueError: "
                                                       "unknown family 'nosuch'"),
        "steps-0": (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        "lora-targets": (["--model", "tiny:llama", "--lora", "--lora-targets", "q_proj,qkv_proj"],
                         "--lora-targets: LlamaForCausalLM has no modules named qkv_proj; its Linear layers are "
                         "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    }[case]
    if case == "lora-targets":
        pytest.importorskip("peft")
    msg = usage_error(capsys, main, _ft_argv(tmp_path, "--steps", "1", *argv), prog)
    assert msg.startswith(f"{prog}: error: {expected}"), msg


# ---------------------------------------------------------------------------------------------- diagnose
@needs_embedded
@pytest.mark.parametrize("case", ["save-without-plan", "plan-negative", "plan-zero", "plan-nan", "text-missing",
                                  "model-missing"])
def test_diagnose_bad_options_are_usage_errors(tmp_path, capsys, case):
    from hf_fastattn import cli

    fast = ["--max-length", "64", "--batches", "1", "--settings", "conv-k4", "--no-depth", "--out-dir", str(tmp_path)]
    argv, expected = {
        "save-without-plan": (["--save", str(tmp_path / "m")],
                              "--save saves the planned model: it needs --plan BUDGET"),
        "plan-negative": (["--plan", "-0.1"], "argument --plan: must be a positive number, got '-0.1'"),
        "plan-zero": (["--plan", "0"], "argument --plan: must be a positive number, got '0'"),
        "plan-nan": (["--plan", "nan"], "argument --plan: must be a positive number, got 'nan'"),
        "text-missing": (["--text", str(tmp_path / "my.txt")], f"--text: no such file: {tmp_path / 'my.txt'}"),
        "model-missing": ([str(tmp_path / "no-model")],
                          f"model {str(tmp_path / 'no-model')!r}: no such model directory"),
    }[case]
    msg = usage_error(capsys, cli.main, ["diagnose", *argv, *fast], "hf-fastattn diagnose")
    assert msg == f"hf-fastattn diagnose: error: {expected}"
    assert not (tmp_path / "report.json").exists()  # refused before any work


# -------------------------------------------------------------------------------------------------- demo
def _no_model(*_, **__):
    raise AssertionError("a model was loaded before the options were checked")


@pytest.mark.parametrize("argv, expected", [
    (["--arms", "exact,poyl,band"], "--arms: unknown arm(s) 'poyl'; choose from exact, poly, band, conv, plan"),
    (["--seq-len", "96"], "--seq-len 96 is too short for the copy probe: its distance seq_len - 96 = 0 must be at "
                          "least the 48-byte passage, so --seq-len >= 144"),
    (["--seq-len", "64"], "--seq-len 64 is too short for the copy probe: its distance seq_len - 96 = -32"),
    (["--seq-len", "144"], "--seq-len 144: the copy probe's distance seq_len - 96 = 48 must be at least the window "
                           "W = 64 (beyond the band), so --seq-len >= 160"),
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
])
def test_demo_checks_arms_and_seq_len_before_any_work(tmp_path, capsys, monkeypatch, argv, expected):
    from hf_fastattn import cli, loading

    monkeypatch.setattr(loading, "load_model", _no_model)
    msg = usage_error(capsys, cli.main, ["demo", *argv, "--out", str(tmp_path)], "hf-fastattn demo")
    assert msg.startswith(f"hf-fastattn demo: error: {expected}"), msg


def test_demo_plumbing_check_uses_the_models_vocabulary(tmp_path, capsys, monkeypatch):
    """tiny:llama has 97 tokens: ids drawn from 0..255 indexed past its embedding; the demo's output directory is
    handed to the experiment (its fine-tuning runs go under it)."""
    from dataclasses import asdict

    from hf_fastattn import cli, experiment

    seen = {}

    def fake_experiment(cfg, out=None):
        seen["out"] = out
        return {"config": asdict(cfg), "arms": {}, "verdict": "poly vs band not compared"}

    monkeypatch.setattr(experiment, "run_experiment", fake_experiment)
    assert cli.main(["demo", "--model", "tiny:llama", "--arms", "exact", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    diff = float(re.search(r"plumbing check on tiny:llama: fastattn\(exact\) vs eager, max \|logit diff\| = (\S+)\n",
                           out).group(1))
    assert diff < 1e-4 and seen["out"] == tmp_path
    assert json.loads((tmp_path / "results.json").read_text())["config"]["arms"] == ["exact"]


def test_experiment_finetunes_under_its_output_dir(tmp_path, monkeypatch):
    """Each arm's fine-tuning run writes under the experiment's output directory (out/ft-<arm>), not a fixed
    runs/experiment/ft shared by every arm and every experiment."""
    from hf_fastattn import experiment, finetune, loading

    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda name, **kw: real_load("tiny:llama", **kw))
    monkeypatch.setattr(loading, "read_text", lambda path, split="heldout": "some text " * 50)
    monkeypatch.setattr(experiment, "measure", lambda *a: {k: 1.0 for k in ("ppl", "ppl_long", "copy_second",
                                                                             "copy_first", "passkey")})
    dirs = []

    def fake_run(args, fastattn_override=None):
        dirs.append(args.output_dir)
        return {"model": real_load("tiny:llama")[0], "train": [{"loss": 1.0}], "op_calls": {}}

    monkeypatch.setattr(finetune, "run", fake_run)
    cfg = experiment.ExperimentConfig(arms=["exact", "band"], steps=1, seq_len=160)
    res = experiment.run_experiment(cfg, progress=lambda *_: None, out=tmp_path / "exp")
    assert dirs == [str(tmp_path / "exp" / "ft-exact"), str(tmp_path / "exp" / "ft-band")]
    assert list(res["arms"]) == ["exact", "band"]


# ------------------------------------------------------------------------------------- eval_long_context
def test_eval_long_context_checks_every_arm_before_loading(tmp_path, capsys, monkeypatch):
    """A bad second arm is a usage error before the model is loaded (it used to fail after the first arm's whole
    evaluation)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_long_context

    from hf_fastattn import loading

    monkeypatch.setattr(loading, "load_model", _no_model)
    prog = PROG
    msg = usage_error(capsys, eval_long_context.main, ["--arms", "exact", "poly:windw=3", "--out", str(tmp_path)], prog)
    assert msg.startswith(f"{prog}: error: --arms 'poly:windw=3': arm 'poly:windw=3': unknown option 'windw'")
    assert "options: guard, guard_tolerance, degree" in msg  # what is allowed
    msg = usage_error(capsys, eval_long_context.main, ["--arms", "exact", f"plan:{tmp_path / 'p.json'}"], prog)
    assert msg.startswith(f"{prog}: error: --arms 'plan:{tmp_path / 'p.json'}': [Errno 2] No such file")
    msg = usage_error(capsys, eval_long_context.main, ["--lengths", "256,abc"], prog)
    assert msg == f"{prog}: error: argument --lengths: must be an integer >= 1, got 'abc'"
    msg = usage_error(capsys, eval_long_context.main, ["--copy-distances", "384,0"], prog)
    assert msg == f"{prog}: error: argument --copy-distances: must be an integer >= 1, got '0'"


def test_comma_list():
    """The one comma-list type: each item through the item type, a bad one named; '' only where allowed (eval's
    --passkey-lengths '' skips the passkey)."""
    import argparse

    from hf_fastattn.cli import at_least, comma_list

    assert comma_list(at_least(1))("4096, 16384") == [4096, 16384]
    assert comma_list(at_least(1), allow_empty=True)("") == []
    for text, bad in (("", "''"), ("8,,16", "''"), ("8,-2", "'-2'")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer >= 1, got {bad}"):
            comma_list(at_least(1))(text)


# ----------------------------------------------------------------------------------------------- run.sh
def test_run_sh_runs_commands_in_the_callers_directory(tmp_path):
    """`bash run.sh diagnose --text my.txt` from another directory: the command runs where the caller is (the
    relative path means the caller's file); `bash run.sh test` still runs pytest from the repository root."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stamp = hashlib.sha1((ROOT / "pyproject.toml").read_bytes() + b"\n").hexdigest()[:12]  # set up already
    (venv / f".hf-fastattn-{stamp}").touch()
    for name in ("hf-fastattn", "python"):
        exe = venv / "bin" / name
        exe.write_text('#!/bin/sh\necho "cwd=$(pwd -P) args=$*"\n')
        exe.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HF_FASTATTN_PINS"}
    env["HF_FASTATTN_VENV"] = str(venv)

    def run(*args):
        return subprocess.run(["bash", str(ROOT / "run.sh"), *args], cwd=caller, env=env, capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip()

    assert run("diagnose", "--text", "my.txt") == f"cwd={caller.resolve()} args=diagnose --text my.txt"
    assert run("test", "-k", "demo") == f"cwd={ROOT.resolve()} args=-m pytest -k demo"


def test_local_names_are_not_hub_ids(tmp_path):
    """One rule says what is meant as a local path (cli's --model, finetune's --data): '.', '/', '~' first, more
    than one '/', or (data) a file type; a missing one is a usage error naming the option, never a hub lookup."""
    from hf_fastattn.cli import UsageError, looks_local
    from hf_fastattn.finetune import _FILE_SUFFIXES, check_files

    assert not any(looks_local(n) for n in ("meta-llama/Llama-3.2-1B", "gpt2", "embedded"))
    assert all(looks_local(n) for n in ("./m", "/abs/m", "~/m", "runs/ft/final"))
    assert looks_local("train.JSONL", _FILE_SUFFIXES) and not looks_local("wikitext", _FILE_SUFFIXES)
    with pytest.raises(UsageError, match="--data: no such file: data/sub/train"):
        check_files("--data", ["data/sub/train"])  # two '/': a path, though it has no file type
    check_files("--data", ["owner/dataset"])  # a hub dataset name, tried when loading
