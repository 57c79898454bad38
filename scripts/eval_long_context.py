#!/usr/bin/env python
"""Long-context evaluation of one model under several attention arms, side by side:
(a) held-out perplexity vs context length, (b) passkey retrieval vs length and depth, the repeated-passage
copy probe, (c) optional lm-eval tasks. Writes results.json (with the environment: device, versions, threads)
and results.png to --out. Every arm and list option is checked before the model is loaded; a progress bar
counts the arms (--quiet: none).

    python scripts/eval_long_context.py --model embedded \\
        --arms exact poly:local_window=64 band:local_window=64 conv:conv_k=16 \\
        --lengths 256,512,1024,2048,4096 --passkey-lengths 512,2048 --depths 0.1,0.5,0.9
    python scripts/eval_long_context.py --model PATH --text book.txt --lengths 4096,16384,65536 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hf_fastattn.cli import at_least, comma_list, device_name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="'embedded', 'tiny:<family>' or a model path")
    p.add_argument("--arms", nargs="+", default=["exact", "poly:local_window=64", "band:local_window=64"],
                   help="attention arms: exact | poly:opt=v,... | band:local_window=W | conv:conv_k=k | plan:PATH | sdpa")
    p.add_argument("--text", default=None, help="long held-out text file (default: the embedded held-out corpus)")
    p.add_argument("--lengths", type=comma_list(at_least(1)), default="256,512,1024,2048",
                   help="context lengths for perplexity")
    p.add_argument("--tokens", type=at_least(1), default=16384, help="tokens evaluated per length")
    p.add_argument("--copy-distances", type=comma_list(at_least(1)), default="384",
                   help="copy-probe distances (row length = distance + 128)")
    p.add_argument("--passkey-lengths", type=comma_list(at_least(1), allow_empty=True), default="512,1024",
                   help="passkey prompt lengths ('' to skip)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="relative depths of the passkey")
    p.add_argument("--trials", type=at_least(1), default=4, help="passkey trials per (length, depth)")
    p.add_argument("--lm-eval-tasks", default="", help="comma list of lm-eval tasks (needs lm-eval and its data)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=at_least(0), default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default="runs/eval", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    import torch
    from tqdm.auto import tqdm

    from hf_fastattn import evaluation
    from hf_fastattn.bench import environment
    from hf_fastattn.data import encode
    from hf_fastattn.cli import UsageError, load_model_arg
    from hf_fastattn.loading import read_text, tokenize

    # everything checkable is checked before the model is loaded and the first arm runs
    arms = []
    for spec in args.arms:
        try:
            arms.append(evaluation.parse_arm(spec))
        except (OSError, ValueError, TypeError) as err:  # unknown option / value, a plan file missing or invalid
            p.error(f"--arms {spec!r}: {err}")
    labels = [label for label, _ in arms]
    if len(set(labels)) != len(labels):
        p.error(f"--arms: an arm is given twice: {' '.join(args.arms)}")
    lengths, distances, passkey_lengths = args.lengths, args.copy_distances, args.passkey_lengths
    try:
        depths = [float(x) for x in args.depths.split(",") if x]
    except ValueError:
        p.error(f"--depths must be a comma list of numbers in [0, 1], got {args.depths!r}")
    if passkey_lengths and (not depths or not all(0 <= d <= 1 for d in depths)):
        p.error(f"--depths must be a comma list of numbers in [0, 1], got {args.depths!r}")
    if args.text and not Path(args.text).is_file():
        p.error(f"--text: no such file: {args.text}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_model_arg("--model", args.model, device=args.device)
    except UsageError as err:
        p.error(str(err))
    model.eval()
    text = read_text(args.text)
    ids = tokenize(tokenizer, text)
    source = encode(text)
    results = {"model": args.model, "env": environment(device), "arms": {}, "args": vars(args)}
    bar = tqdm(arms, desc="arms", unit="arm", disable=args.quiet)
    for label, options in bar:
        bar.set_postfix_str(label)
        evaluation.use_arm(model, options)
        t0 = time.time()
        arm = {"perplexity": evaluation.perplexity_vs_length(model, ids, lengths, args.tokens)}
        arm["copy"] = [evaluation.copy_probe(model, source, d + 128, d) for d in distances]
        if passkey_lengths:
            arm["passkey"] = evaluation.passkey(model, source, passkey_lengths, depths, args.trials)
        if args.lm_eval_tasks:
            try:
                arm["lm_eval"] = evaluation.lm_eval_tasks(model, tokenizer, args.lm_eval_tasks.split(","), args.lm_eval_limit)
            except Exception as err:  # lm-eval needs its datasets; offline they are usually missing
                arm["lm_eval"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        arm["seconds"] = time.time() - t0
        results["arms"][label] = arm
        ppl = "  ".join(f"{n}: {v['perplexity']:.3f}" for n, v in arm["perplexity"].items())
        copy = "  ".join(f"d={c['distance']}: {c['first']:.2f} -> {c['second']:.2f}" for c in arm["copy"])
        keys = f" | passkey {sum(arm['passkey'].values()) / len(arm['passkey']):.0%}" if arm.get("passkey") else ""
        bar.write(f"{label:<28} ppl {ppl} | copy 1st -> 2nd {copy}{keys}", file=sys.stdout)
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    evaluation.plot(json.loads((out / "results.json").read_text()), out / "results.png")
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
