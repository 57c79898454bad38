"""Smoke tests of the user's workflows on the embedded model: fine-tuning (1 and 2 CPU processes, resume,
through fastattn's own backward), long-context evaluation, the offline perplexity metric, the CLI (demo,
diagnose, bench, bench-model, bench-generate). Each checks its outputs, not just that it ran."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_fastattn.loading import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (EMBEDDED / "config.json").exists(), reason="embedded model not built")


def _finetune(tmp, *extra):
    from hf_fastattn.finetune import main

    main(["--model", "embedded", "--seq-len", "256", "--batch-size", "2", "--lr", "2e-4", "--warmup", "1",
          "--method", "poly", "--local-window", "16", "--chunk-size", "64", "--eval-every", "3", "--eval-batches", "1",
          "--output-dir", str(tmp), "--quiet", *extra])
    return json.loads((tmp / "metrics.json").read_text())


def test_embedded_model_is_small_and_documented():
    size = sum(f.stat().st_size for f in EMBEDDED.iterdir()) / 2**20
    assert size <= 10
    info = json.loads((EMBEDDED / "TRAINING.json").read_text())
    assert info["command"].startswith("python scripts/train_tiny.py")
    assert info["attention_logits_on_heldout"] and info["final"]["copy448_second"] < info["final"]["copy448_first"]


def _small_text(tmp_path):
    from hf_fastattn.data import stdlib_text

    path = tmp_path / "small.txt"
    path.write_text(stdlib_text("heldout")[:3000])
    return str(path)


def test_finetune_one_process_goes_through_poly_backward(tmp_path):
    text = _small_text(tmp_path)  # train and evaluate on the same few rows: the loss must go down
    m = _finetune(tmp_path, "--steps", "6", "--data", text, "--eval-data", text)
    assert m["world_size"] == 1 and m["steps"] == 6
    # every layer of every training step, and nothing else (the eval forwards are not counted)
    assert m["op_calls"]["poly.backward"] == m["op_calls"]["poly.forward"] == 6 * 4
    assert [e["step"] for e in m["eval"]] == [0, 3, 6]
    assert m["eval"][-1]["eval_loss"] < m["eval"][0]["eval_loss"]  # fixed seed, fixed held-out rows: it learns
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["fastattn_config"]["method"] == "poly" and saved["fastattn_config"]["local_window"] == 16


def test_finetune_lora_on_a_fused_qkv_family(tmp_path):
    """--lora adapts every Linear of the attention modules, whatever they are called (Phi-3: qkv_proj, o_proj),
    trains through poly's backward and saves the merged model."""
    pytest.importorskip("peft")
    from hf_fastattn.finetune import lora_targets
    from hf_fastattn.loading import load_model

    model, _ = load_model("tiny:phi3")
    assert lora_targets(model, "attention") == ["o_proj", "qkv_proj"]
    assert lora_targets(model, "qkv_proj,,o_proj") == ["qkv_proj", "o_proj"]
    with pytest.raises(ValueError, match="--lora-targets: Phi3ForCausalLM has no modules named q_proj, v_proj; its "
                                         "Linear layers are down_proj, gate_up_proj, lm_head, o_proj, qkv_proj"):
        lora_targets(model, "q_proj,,v_proj")  # peft would adapt nothing
    assert lora_targets(model, "all-linear") == "all-linear"
    m = _finetune(tmp_path, "--model", "tiny:phi3", "--lora", "--steps", "2", "--seq-len", "160", "--eval-every", "0")
    assert m["steps"] == 2 and m["op_calls"].get("poly.backward", 0) >= 2 * 2
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["model_type"] == "phi3" and saved["fastattn_config"]["method"] == "poly"


def test_finetune_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = _finetune(tmp_path / "full", "--steps", "4", "--no-save-model")
    _finetune(tmp_path / "cut", "--steps", "4", "--stop-at", "2", "--save-every", "2", "--no-save-model")  # preempted
    resumed = _finetune(tmp_path / "cut", "--steps", "4", "--resume", "auto", "--no-save-model")
    assert [h["step"] for h in resumed["train"]] == [1, 2, 3, 4]  # the records before the cut are kept
    assert [e["step"] for e in full["eval"]] == [0, 3, 4]
    assert [e["step"] for e in resumed["eval"]] == [0, 2, 3, 4]  # the cut run's last eval too
    for a, b in zip(full["train"], resumed["train"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and a["lr"] == pytest.approx(b["lr"])
    # the op calls of all 4 steps, not of the 2 after the resume (they were 8 and 8)
    assert resumed["op_calls"] == full["op_calls"] and full["op_calls"]["poly.backward"] == 4 * 4


def test_finetune_two_cpu_processes(tmp_path):
    """Data parallel on 2 CPU processes: the schedule advances once per optimizer step (accelerate's prepared
    scheduler stepped once per process: lr 0 from step 3 on) and the step-0 eval loss, over the same first
    --eval-batches batches of the eval set, equals the single-process one (3 batches: 2 processes had read 4)."""
    from hf_fastattn.finetune import lr_lambda, main

    args = ["--model", "embedded", "--steps", "4", "--warmup", "2", "--seq-len", "128", "--batch-size", "2",
            "--method", "poly", "--local-window", "16", "--chunk-size", "32", "--eval-every", "4", "--eval-batches",
            "3", "--no-save-model", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "scripts" / "finetune.py"), *args, "--output-dir", str(tmp_path / "two")]
    subprocess.run(cmd, check=True, env=env, timeout=600, capture_output=True)
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 4 and m["op_calls"].get("poly.backward", 0) == 4 * 4
    factor = lr_lambda(2, 4)
    assert [h["lr"] for h in m["train"]] == pytest.approx([3e-4 * factor(i) for i in range(4)])
    assert min(h["lr"] for h in m["train"]) > 0
    main([*args, "--steps", "1", "--warmup", "1", "--output-dir", str(tmp_path / "one")])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["world_size"] == 1
    assert m["eval"][0]["eval_loss"] == pytest.approx(one["eval"][0]["eval_loss"], rel=1e-5)


def test_headline_verdict_says_what_the_numbers_say():
    from hf_fastattn.experiment import verdict

    def arm(ppl, first, second):
        return {"after": {"ppl": ppl, "ppl_long": ppl, "copy_first": first, "copy_second": second}}

    cfg = {"seq_len": 512, "window": 64, "long_factor": 4}
    same = verdict({"config": cfg, "arms": {"poly": arm(2.47, 3.35, 3.38), "band": arm(2.484, 3.38, 3.39),
                                            "exact": arm(2.31, 3.36, 0.18)}})
    assert "does NOT recover" in same and "equal within 1%" in same and "beyond W: exact." in same
    wins = verdict({"config": cfg, "arms": {"poly": arm(2.2, 3.3, 1.0), "band": arm(2.5, 3.3, 3.3)}})
    assert "carries long-range information" in wins and "(lower)" in wins and "beyond W: poly." in wins


def test_perplexity_metric_offline():
    import evaluate

    from hf_fastattn.metrics import PERPLEXITY

    metric = evaluate.load(PERPLEXITY)
    metric.add_batch(nll=[10.0, 2.0], tokens=[5, 3])
    out = metric.compute()
    assert out["tokens"] == 8 and out["perplexity"] == pytest.approx(torch.tensor(12.0 / 8).exp().item())


def test_eval_long_context_script(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_long_context

    eval_long_context.main(["--arms", "exact", "band:local_window=32", "--lengths", "128,256", "--tokens", "512",
                            "--copy-distances", "200", "--passkey-lengths", "256", "--depths", "0.2", "--trials", "1",
                            "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["arms"]) == {"exact", "band:local_window=32"}
    env = res["env"]  # bench.environment: where and with what the numbers were measured
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_threads"] >= 1
    err = capsys.readouterr().err
    assert "arms: 100%" in err and "2/2" in err  # the progress bar over the arms
    for arm in res["arms"].values():
        assert set(arm["perplexity"]) == {"128", "256"} and arm["perplexity"]["256"]["perplexity"] > 1
        assert arm["copy"][0]["distance"] == 200 and "256@0.2" in arm["passkey"]
    # the band cannot see the first copy 200 bytes back; exact can
    assert res["arms"]["exact"]["copy"][0]["second"] < res["arms"]["band:local_window=32"]["copy"][0]["second"]
    assert (tmp_path / "results.png").stat().st_size > 1000


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_fastattn.cli", *args], check=True, capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout


def test_cli_diagnose_plan_save(tmp_path):
    out = _cli("diagnose", "embedded", "--max-length", "128", "--batches", "1", "--settings", "poly-d2-w64,conv-k4",
               "--no-depth", "--plan", "0.3", "--save", str(tmp_path / "planned"), "--out-dir", str(tmp_path))
    assert "max|sqk|" in out and "predicted" in out and "realised" in out
    assert json.loads((tmp_path / "plan.json").read_text())["plan"]["layers"]
    cfg = json.loads((tmp_path / "planned" / "config.json").read_text())
    assert "plan" in cfg["fastattn_config"]
    assert (tmp_path / "heatmap.png").exists() and (tmp_path / "report.json").exists()


def test_cli_bench_json_schema(tmp_path):
    _cli("bench", "--lengths", "256,512", "--methods", "sdpa,poly,conv:k=4", "--repeats", "1", "--quiet",
         "--out", str(tmp_path / "b.json"))
    rep = json.loads((tmp_path / "b.json").read_text())
    assert {"date", "device", "torch", "transformers", "command"} <= set(rep["env"])
    # the run's options, to rerun it (the methods and lengths were missing)
    assert rep["config"]["methods"] == "sdpa,poly,conv:k=4" and rep["config"]["lengths"] == "256,512"
    rows = [r for r in rep["results"] if "ms" in r]
    assert len(rows) == 12 and all(r["ms"] > 0 and "speedup_vs_sdpa" in r and r["finite"] for r in rows)
    # every step allocates: no 0 MiB rows (the peak RSS gave them), and a longer row holds more
    assert rep["peak_memory"].startswith("CPU tensor bytes") and all(r["peak_mb"] > 0 for r in rows)
    peak = {(r["method"], r["mode"], r["n"]): r["peak_mb"] for r in rows}
    assert all(peak[m, mode, 512] > peak[m, mode, 256] for m, mode, _ in peak)
    assert set(rep["exponents"]) == {"sdpa", "poly", "conv:k=4"}
    assert "partial" not in rep and not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "b.png").exists()


def test_bench_checkpoints_each_row(tmp_path):
    """A run cut off by a time limit keeps every finished row: the JSON is rewritten after each one, marked
    partial, with the same schema as the final report."""
    import argparse

    from hf_fastattn import bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--lengths", "128,256", "--methods", "sdpa,poly", "--modes", "fwd", "--repeats", "1",
                         "--warmup", "0", "--quiet", "--device", "cpu"])
    path, seen = tmp_path / "a.json", []

    def checkpoint(report):
        bench.checkpoint_to(path)(report)
        seen.append(json.loads(path.read_text()))

    final = bench.run(args, checkpoint)
    order = [("sdpa", 128), ("poly", 128), ("sdpa", 256), ("poly", 256)]
    assert [[(r["method"], r["n"]) for r in rep["results"]] for rep in seen] == [order[:i] for i in range(1, 5)]
    assert seen[0]["partial"] == "rows through sdpa fwd at n=128"
    assert "speedup_vs_sdpa" in seen[1]["results"][1] and seen[1]["partial"] == "rows through poly fwd at n=128"
    assert seen[-1]["results"] == json.loads(json.dumps(final["results"])) and "partial" not in final


def test_time_step_budget(monkeypatch):
    """--repeat-seconds: timed repeats stop once they add up to the budget, and a warm-up run past it, for a step
    that already ran at a shorter length, is the one timed run (what fits SDPA at 1M tokens into a GPU session)."""
    from hf_fastattn import bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    cpu = torch.device("cpu")

    def runs(seconds, **kw):
        calls = []

        def step():
            calls.append(seconds)
            clock[0] += seconds
            return torch.ones(1)

        sec, _, finite, timed = bench.time_step(step, cpu, 3, 1, **kw)
        assert sec == seconds and finite
        return len(calls), timed

    assert runs(10.0) == (4, 3)  # no budget: warm-up + 3 repeats
    assert runs(10.0, budget=5.0) == (2, 1)  # not warm: the warm-up stays untimed, one repeat passes the budget
    assert runs(10.0, budget=5.0, warm=True) == (1, 1)  # warm: the long warm-up is the measurement
    assert runs(2.0, budget=5.0, warm=True) == (4, 3)  # a short warm-up is not kept; 2 + 2 + 2 > 5 after three
    assert runs(2.0, budget=3.0, warm=True) == (3, 2)


def test_cpu_peak_counts_live_tensor_bytes(capfd):
    """CPU peak memory: the most tensor bytes alive at once, above those alive before, exactly, whatever the
    allocator reuses (the process's peak RSS, used before, gave 0 MiB to a step that reused freed pages); what the
    step prints to stderr still comes through (only the profiler's own start / stop lines are silenced)."""
    import sys

    from hf_fastattn import bench

    n = int(torch.randint(200, 400, ()).item()) * 1024  # fresh sizes: float32, n * 4 bytes each
    held = torch.randn(n)  # alive before: not counted

    def step():
        a = torch.randn(n)
        b = torch.randn(2 * n)  # a + b alive: the peak, 3 n floats
        del a, b
        c = torch.randn(2 * n)  # reuses freed memory: RSS would not grow
        print("from the step", file=sys.stderr)
        return c[:1] + held[:1]

    for _ in range(2):  # the second time the allocator has the pages already
        with bench.cpu_peak() as mem:
            step()
        assert abs(mem["bytes"] - 12 * n) < 1024, (mem["bytes"], 12 * n)
    assert capfd.readouterr().err.count("from the step") == 2
    for warmup in (0, 2):  # time_step profiles one untimed run (an extra one without warm-up)
        _, peak_mib, finite, runs = bench.time_step(step, torch.device("cpu"), 2, warmup)
        assert abs(peak_mib * 2**20 - 12 * n) < 1024 and finite and runs == 2


def test_cli_bench_model(tmp_path):
    """Training steps of a random 2-layer decoder: every arm runs, through the op it names (call counters), and
    computes the same loss as SDPA within its approximation (random weights: small logits, where poly holds)."""
    out = _cli("bench-model", "--lengths", "160,320", "--layers", "2", "--heads", "2", "--head-dim", "16",
               "--arms", "sdpa,exact,poly:local_window=16,poly:poly_save_states=true,band:local_window=16",
               "--modes", "fwdbwd,fwd", "--repeats", "1", "--warmup", "0", "--quiet",
               "--out", str(tmp_path / "m.json"))
    assert "x sdpa" in out and "poly.backward 2" in out
    rep = json.loads((tmp_path / "m.json").read_text())
    rows = {(r["arm"], r["mode"], r["n"]): r for r in rep["results"]}
    assert len(rows) == 20 and all(r["ms"] > 0 and r["finite"] and "speedup_vs_sdpa" in r for r in rows.values())
    for n in (160, 320):
        sdpa = rows["sdpa", "fwdbwd", n]
        assert abs(sdpa["loss"] - torch.log(torch.tensor(256.0)).item()) < 0.3 and not sdpa["ops"]
        assert abs(rows["exact", "fwdbwd", n]["loss"] - sdpa["loss"]) < 1e-5
        assert rows["exact", "fwdbwd", n]["ops"] == {"exact.sdpa": 2}  # the plain causal case: torch's fused kernel
        assert rows["band:local_window=16", "fwdbwd", n]["ops"] == {"exact.forward": 2, "exact.backward": 2}
        for arm in ("poly:local_window=16", "poly:poly_save_states=true"):
            assert abs(rows[arm, "fwdbwd", n]["loss"] - sdpa["loss"]) < 1e-3
            assert rows[arm, "fwdbwd", n]["ops"] == {"poly.forward": 2, "poly.backward": 2}
            assert rows[arm, "fwd", n]["ops"] in ({"poly.forward": 2}, {"poly.forward": 2, "poly.state_from_prefill": 2})
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_cli_bench_generate(tmp_path):
    """Decode timing of the embedded model, each arm uncompiled and auto-compiled: the compiled runs make no graph
    break (the attention calls are one op each) and give the uncompiled tokens; bad --new-tokens is a usage error."""
    out = _cli("bench-generate", "--arms", "sdpa,exact,poly:local_window=16", "--prompt", "48", "--new-tokens", "6",
               "--repeats", "1", "--compile-backend", "aot_eager", "--out", str(tmp_path / "g.json"))
    assert "ms/token" in out and "DIFFER" not in out
    rep = json.loads((tmp_path / "g.json").read_text())
    assert rep["kind"] == "generate" and rep["env"]["torch"] and rep["config"]["compile_mode"] == "default"
    assert rep["config"]["arms"] == ["sdpa", "exact", "poly:local_window=16"] and rep["config"]["prompt"] == 48
    rows = {(r["arm"], r["compiled"]): r for r in rep["results"]}
    assert len(rows) == 6 and all(r["decode_ms_per_token"] > 0 and r["prefill_ms"] > 0 for r in rows.values())
    for arm in ("sdpa", "exact", "poly:local_window=16"):
        r = rows[arm, True]
        assert r["tokens_equal_uncompiled"] and r["graph_breaks"] == 0 and 1 <= r["graphs"] <= 2, r
    assert (tmp_path / "g.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "hf_fastattn.cli", "bench-generate", "--new-tokens", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "--new-tokens: must be an integer >= 2 (the decode time" in bad.stderr, bad.stderr[-2000:]


def test_parse_arm_options():
    from hf_fastattn.evaluation import parse_arm

    assert parse_arm("poly:poly_save_states=false,local_window=8")[1] == {
        "method": "poly", "guard": "off", "poly_save_states": False, "local_window": 8}
    assert parse_arm("poly:poly_save_states=true")[1]["poly_save_states"] is True
    assert parse_arm("sdpa") == ("sdpa", None)
    with pytest.raises(ValueError, match="poly_save_states must be true or false, got 'yes'"):
        parse_arm("poly:poly_save_states=yes")
    with pytest.raises(ValueError, match="local_window must be an integer, got '1.5'"):
        parse_arm("poly:local_window=1.5")
    with pytest.raises(ValueError, match="unknown option 'windw'"):
        parse_arm("poly:windw=3")


def test_cli_demo(tmp_path):
    # 160 > the default chunk of 128: the poly arm runs the chunked op and its custom backward
    out = _cli("demo", "--steps", "2", "--seq-len", "160", "--eval-tokens", "1024", "--out", str(tmp_path))
    diff = float(re.search(r"plumbing check on embedded: fastattn\(exact\) vs eager, max \|logit diff\| = (\S+)",
                           out)[1])
    assert diff < 1e-4  # exact is exact
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["arms"]) == ["exact", "poly", "band"]
    assert re.search(r"^arm +\| +ppl@160 \| +ppl@320 \| +copy 2nd @64 \| +passkey$", out, re.M)
    for arm, r in res["arms"].items():  # each table row prints that arm's own before -> after numbers
        b, a = r["before"], r["after"]
        row = (f"{arm:<6} | {b['ppl']:>7.3f} -> {a['ppl']:>6.3f} | {b['ppl_long']:>7.3f} -> {a['ppl_long']:>6.3f} | "
               f"{b['copy_second']:>8.2f} -> {a['copy_second']:>6.2f} | {b['passkey']:>4.0%} -> {a['passkey']:>4.0%}")
        assert re.search(rf"^{re.escape(row)}$", out, re.M), row
        assert 1 < a["ppl"] < 256 and r["train_loss"] and len(r["train_loss"]) == 2
    assert res["arms"]["poly"]["op_calls"].get("poly.backward", 0) > 0
    assert res["arms"]["band"]["options"] == {"method": "band", "local_window": 64}
    assert f"copy probe at distance 64 >= W=64: poly {res['arms']['poly']['after']['copy_second']:.2f} vs band " \
           f"{res['arms']['band']['after']['copy_second']:.2f}" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ft-")) == ["ft-band", "ft-exact", "ft-poly"]


def test_poly_targets_script(capsys):
    """scripts/poly_targets.py on the H100 run kept in the repo: the rates docs/poly-triton.md quotes (section 2;
    they move with the kernels' feature layout, and so must the page)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import poly_targets

    path = ROOT / "benchmarks" / "results" / "h100" / "attention-h100-bf16-d128-segmented.json"
    rows = {r["n"]: r for r in poly_targets.rows(json.loads(path.read_text()))}
    at128k, at1m = rows[131072], rows[1048576]
    assert at128k["target"] == 5 and at1m["target"] == 30 and rows[65536]["target"] == 1
    assert round(at128k["recomputed"]["needs_tflops"]) == 371 and round(at128k["saved"]["needs_tflops"]) == 320
    assert round(at1m["recomputed"]["needs_tflops"]) == 332 and round(at1m["saved"]["needs_tflops"]) == 294
    rc = at128k["recomputed"]
    assert rc["needs_tflops"] * at128k["sdpa_ms"] / 1e3 / 5 == pytest.approx(rc["tflop"])
    assert rc["flop_ratio"] == pytest.approx(7.2, abs=0.05) and at128k["saved"]["tflop"] < rc["tflop"]
    assert at128k["measured"][0]["ratio"] == pytest.approx(1.2157, rel=1e-3)
    assert "measured" not in at1m  # the old layout ran out of memory there
    poly_targets.main([str(path)])
    assert "| 128 | 131072 | 461.6 ms |" in capsys.readouterr().out


def _gpu_session():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_session

    return gpu_session


def test_gpu_session_smoke(tmp_path):
    """scripts/gpu_session.py, what a GPU session runs in its one device call, on the CPU at toy sizes: its stages
    run in order with the same commands, a failing stage (the profile needs CUDA) does not stop the rest, each
    stage's status is recorded, and what comes back fits the device tool's limits (8 files, plain names)."""
    r = subprocess.run([sys.executable, "scripts/gpu_session.py", "--smoke", "--out", str(tmp_path),
                        "--only", "tests,bench-d128,profile,targets,decode"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the profile stage failed, as it must on CPU
    stages = {s["name"]: s for s in json.loads((tmp_path / "session.json").read_text())["stages"]}
    assert list(stages) == ["tests", "bench-d128", "profile", "targets", "decode"]
    assert stages["profile"]["status"] == "failed" and stages["profile"]["rc"] == 1
    assert all(stages[s]["status"] == "ok" for s in ("tests", "bench-d128", "targets", "decode"))
    dec = json.loads((tmp_path / "poly-decode-cpu-fp32-d16.json").read_text())
    assert [r["n"] for r in dec["rows"]] == [300, 600] and max(r["rel_diff"] for r in dec["rows"]) < 1e-4
    rep = json.loads((tmp_path / "attention-cpu-fp32-d16.json").read_text())
    assert "partial" not in rep and rep["config"]["repeat_seconds"] == 5
    assert {(r["method"], r["mode"]) for r in rep["results"] if r.get("runs", 0) >= 1} == {
        (m, mode) for m in ("sdpa", "poly:chunk=16,kernel=torch") for mode in ("fwd", "fwdbwd")}
    log = (tmp_path / "session.log").read_text()
    assert "needs a CUDA GPU" in log and "| 16 | 128 |" in log  # the profile's reason; the targets table
    files = [f.name for f in tmp_path.iterdir()]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files


def test_gpu_session_deadline_and_kill(tmp_path):
    """Stages that cannot get their minimum under the deadline are skipped (and said so); a stage past its limit
    is killed with its whole process group, children included; an unknown stage name is refused."""
    gs = _gpu_session()
    gs.main(["--smoke", "--seconds", "10", "--out", str(tmp_path), "--only", "bench-d64,model"])
    stages = json.loads((tmp_path / "session.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["bench-d64", "model"]
    assert all(s["status"].startswith("skipped:") and s["seconds"] == 0 for s in stages)
    with pytest.raises(SystemExit, match="unknown stage.*'bench'.*choose from tests, bench-d128"):
        gs.main(["--smoke", "--out", str(tmp_path), "--only", "bench"])
    log = tmp_path / "kill.log"
    with open(log, "w") as f:
        status, rc = gs.run_stage(["bash", "-c", "sleep 60 & echo $!; wait"], 2, dict(os.environ), f)
    assert status == "timed out after 2 s" and rc is None
    child = int(log.read_text().split()[0])
    time.sleep(0.5)
    try:
        state = Path(f"/proc/{child}/status").read_text()
        assert "zombie" in state  # killed, not yet reaped by init
    except FileNotFoundError:
        pass


def test_gpu_session_commands_parse(tmp_path, monkeypatch):
    """The GPU stages' own command lines (not the smoke's), checked here since a GPU session has one try: every
    bench method resolves and has a FLOP count at every length, the model's arms parse, and the profile's variants
    name real knobs (a misspelt one is refused instead of timing the default under another name)."""
    import argparse

    from hf_fastattn import bench, bench_model
    from hf_fastattn.evaluation import parse_arm

    gs = _gpu_session()
    import profile_poly

    plan = {s.name: s for s in gs.stages(False, tmp_path, "h200")}
    assert list(plan) == ["tests", "bench-d128", "bench-d64", "profile", "model", "targets", "compile", "decode"]
    import bench_poly_decode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device cuda parses as on the GPU machine
    dec = bench_poly_decode.parser().parse_args(plan["decode"].cmd[2:])
    assert (dec.device, dec.dtype, dec.heads, dec.kv_heads, dec.head_dim) == ("cuda", "bf16", 32, 8, 128)
    assert dec.lengths[-1] == 2**20 and dec.out.endswith("poly-decode-h200-bf16-d128.json")
    compiled = plan["compile"].cmd
    assert compiled[compiled.index("-k") + 1] == "cuda_graphs" and "tests/test_backend_families.py" in compiled
    selected = subprocess.run([sys.executable, *compiled[1:], "--co", "-q"], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)  # the -k picks the gpu tests (collected here, skipped in runs)
    assert "tests/test_backend_families.py: 2" in selected.stdout, selected.stdout[-2000:]  # exact and poly
    for name, d in (("bench-d128", 128), ("bench-d64", 64)):
        p = argparse.ArgumentParser()
        bench.add_arguments(p)
        args = p.parse_args(plan[name].cmd[2:])
        assert (args.device, args.dtype, args.heads, args.head_dim) == ("cuda", "bf16", 16, d)
        assert args.out.endswith(f"attention-h200-bf16-d{d}.json") and "131072" in args.lengths
        methods = bench.split_specs(args.methods)
        assert methods[:2] == ["sdpa", gs.POLY] and methods[2] == gs.POLY + ",save=1" and all(callable(bench._method_fn(m, args)) for m in methods)
        args.device = "cpu"  # the FLOP count's state budget without asking CUDA (as scripts/poly_targets.py does)
        for n in map(int, args.lengths.split(",")):
            assert all(bench.flop_count(m, 1, 16, 16, n, d, "fwdbwd", args) > 0 for m in methods)
    p = argparse.ArgumentParser()
    bench_model.add_arguments(p)
    model = p.parse_args(plan["model"].cmd[4:])
    assert [parse_arm(a)[0] for a in model.arms] == ["sdpa", "poly", "band:local_window=128"]
    monkeypatch.undo()  # the profile asks CUDA itself
    variants = plan["profile"].cmd[plan["profile"].cmd.index("--variants") + 1:]
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):  # every variant passed the check
        profile_poly.main(["--variants", *variants])
    with pytest.raises(SystemExit, match="'stage_read=1' is not KEY=VALUE"):
        profile_poly.main(["--variants", "tile=16", "stage_read=1"])


class _Bigram(torch.nn.Module):
    """A stub causal LM: the logits at position t depend on token t only (a random bigram table)."""

    def __init__(self, vocab=259):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab))

    def forward(self, input_ids, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])

    def nll(self, prev, token):  # -log p(token | prev), computed on its own
        return -torch.log_softmax(self.table[prev].double(), 0)[token].item()


def test_window_nll_and_copy_probe_score_the_next_token():
    """window_nll sums -log p(x_t | x_<t) over t >= 1 of each of the first `max_windows` non-overlapping windows
    and counts only those predicted tokens; copy_probe averages the same per-token NLL over the positions its masks
    mark (token t predicted from t - 1): checked against a stub bigram model, term by term."""
    import numpy as np

    from hf_fastattn.data import copy_probe as make
    from hf_fastattn.evaluation import copy_probe, window_nll

    model = _Bigram()
    ids = torch.randint(0, 259, (70,))
    total, count = window_nll(model, ids, 16, max_windows=3, batch=2)  # 4 windows fit; 3 are scored
    expected = sum(model.nll(ids[w * 16 + t - 1], ids[w * 16 + t]) for w in range(3) for t in range(1, 16))
    assert count == 3 * 15 and total == pytest.approx(expected, rel=1e-5)

    source = np.random.default_rng(0).integers(0, 256, 600).astype(np.uint8)
    res = copy_probe(model, source, length=64, distance=20, rows=3, passage=8)
    x, m1, m2 = make(source, 3, 64, 8, 20, seed=11)
    for key, m in (("first", m1), ("second", m2)):
        terms = [model.nll(x[r, t - 1], x[r, t]) for r in range(3) for t in range(64) if m[r, t]]
        assert res[key] == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_passkey_scores_the_generated_continuation():
    """passkey: the prompt holds the key once, ends with the question, and is scored on the 5 generated tokens only
    (a stub that reads the key out of the prompt scores 1.0; the prompt's own last byte is not part of the answer)."""
    import numpy as np

    from hf_fastattn.evaluation import passkey

    class Reader(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, x, max_new_tokens, **_):
            text = bytes(x[0].tolist())
            at = text.index(b" the pass key is ") + len(b" the pass key is ")
            key = torch.tensor(list(text[at : at + max_new_tokens]))[None]
            return torch.cat([x, key], 1)

    source = np.frombuffer(b"lorem ipsum dolor sit amet " * 40, dtype=np.uint8)
    assert passkey(Reader(), source, [200], [0.0, 0.5, 1.0], trials=2) == {"200@0.0": 1.0, "200@0.5": 1.0,
                                                                            "200@1.0": 1.0}


def test_probe_rows_put_copies_and_needles_where_they_say():
    """copy_probe: the second copy starts exactly `distance` after the first, both masks cover the passage minus
    its first byte (unpredictable), and the masked second-copy tokens repeat the first copy. passkey_prompt: exactly
    `length` bytes, the needle at relative `depth` of the filler, the question last."""
    import random

    import numpy as np

    from hf_fastattn.data import copy_probe, encode, passkey_prompt

    source = np.random.default_rng(1).integers(0, 256, 1000).astype(np.uint8)
    ids, m1, m2 = copy_probe(source, 5, 96, 12, 30, seed=3)
    for r in range(5):
        p1, p2 = m1[r].nonzero().flatten(), m2[r].nonzero().flatten()
        assert len(p1) == len(p2) == 11 and torch.equal(p2, p1 + 30)
        assert torch.equal(ids[r, p2], ids[r, p1]) and torch.equal(ids[r, p2[0] - 1], ids[r, p1[0] - 1])
    needle, question = encode(" the pass key is 12345. "), encode(" the pass key is ")
    filler = 300 - len(needle) - len(question)
    for depth in (0.0, 0.25, 1.0):
        ids, end = passkey_prompt(source, 300, depth, "12345", random.Random(0))
        assert len(ids) == end == 300 and bytes(ids[-len(question):]) == bytes(question)
        at = bytes(ids).index(bytes(needle))
        assert at == int(depth * filler)


def test_stdlib_split_is_a_disjoint_tenth():
    """The corpus split is by file: every file lands in exactly one split, held-out is ~10 % of the files, and
    test directories are left out (a synthetic library of 300 files)."""
    import tempfile

    from hf_fastattn.data import stdlib_text

    with tempfile.TemporaryDirectory() as root:
        for i in range(300):
            (Path(root) / f"mod{i}.py").write_text(f"x = {i}")
        (Path(root) / "tests").mkdir()
        (Path(root) / "tests" / "test_a.py").write_text("x = -1")
        train, held = (set(stdlib_text(s, root=root).split("\n\n")) for s in ("train", "heldout"))
    assert not train & held and train | held == {f"x = {i}" for i in range(300)}
    assert 10 <= len(held) <= 60


def test_windows_are_whole_batches():
    """loading.windows: consecutive non-overlapping [batch, length] windows, a partial last batch dropped (one
    window when not even a batch fits), at most max_batches."""
    from hf_fastattn.loading import windows

    out = windows(torch.arange(95), 10, 3)  # 9 rows -> 3 batches of 3
    assert [w.shape for w in out] == [(3, 10)] * 3 and torch.equal(torch.cat(out).flatten(), torch.arange(90))
    assert [w.shape for w in windows(torch.arange(105), 10, 3)] == [(3, 10)] * 3  # the 10th row is dropped
    assert [w.shape for w in windows(torch.arange(25), 10, 3)] == [(1, 10)]
    assert len(windows(torch.arange(95), 10, 3, max_batches=2)) == 2


def test_bench_flop_counts_and_scaling():
    """flop_count: causal softmax attention is 4 B H N^2 D / 2 forward and 3.5x that forward + backward; a conv
    basis costs (D + 1) real FFT pairs of length 2N (5 * 2N log2(2N)) plus its score columns; in a GQA group each
    query head does its own readout and band, only the state build is shared. compare: speedups are sdpa / method,
    exponents the log-log slope over the `fit_points` longest lengths."""
    import argparse

    from hf_fastattn import bench

    args = argparse.Namespace(device="cpu", dtype="fp32", degree=2, band=0, chunk=64, kernel="torch", conv_k=16)
    fwd = bench.flop_count("sdpa", 2, 4, 4, 256, 32, "fwd", args)
    assert fwd == 4 * 2 * 4 * 256**2 * 32 / 2
    assert bench.flop_count("exact", 2, 4, 4, 256, 32, "fwdbwd", args) == 3.5 * fwd
    conv = bench.flop_count("conv:k=8", 1, 2, 2, 512, 16, "fwd", args)
    assert conv == pytest.approx(2 * 8 * (17 * 5 * 2 * 512 * math.log2(1024) + 2 * 512 * 16))
    one, gqa, mha = (bench.flop_count("poly:band=32", 1, h, hkv, 1024, 16, "fwd", args) for h, hkv in
                     ((1, 1), (4, 1), (4, 4)))
    assert mha == pytest.approx(4 * one) and 2 * one < gqa < mha

    times = ((100, 1.0, 2.0), (200, 2.0, 2.0), (400, 8.0, 4.0), (800, 32.0, 8.0))  # n, sdpa ms, poly ms
    rows = [{"method": m, "mode": "fwd", "n": n, "ms": ms} for n, s, p in times for m, ms in (("sdpa", s), ("poly", p))]
    rows.append({"method": "poly", "mode": "fwd", "n": 1600, "error": "oom"})
    exps = bench.compare(rows, "method", 2)
    assert exps["sdpa"]["fwd"] == pytest.approx(2.0) and exps["poly"]["fwd"] == pytest.approx(1.0)
    assert [r.get("speedup_vs_sdpa") for r in rows if r["method"] == "poly"] == [0.5, 1.0, 2.0, 4.0, None]
    ns = [1e3, 2e3, 4e3, 8e3]
    assert bench.scaling_exponent(ns, [3.0 * n**1.5 for n in ns]) == pytest.approx(1.5)
    assert math.isnan(bench.scaling_exponent([512, 512], [1.0, 2.0]))
