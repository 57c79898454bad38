"""Fine-tuning through fastattn with accelerate (`scripts/finetune.py` is the entry point).

    accelerate launch scripts/finetune.py --model PATH --attn fastattn --method poly --local-window 64 \\
        --data train.txt --seq-len 1024 --steps 1000 --bf16
    torchrun --nproc_per_node 2 scripts/finetune.py ...      # data parallel on CPU (gloo)

Any causal LM path; fastattn options on the command line; local text / json(l) files through `datasets`
(hub names when online; default: the embedded corpus); packing to --seq-len; gradient accumulation;
bf16/fp32; gradient checkpointing; LoRA via peft; cosine schedule with a linear warm-up whose first step is
already at lr/--warmup (never 0); tqdm on the main process;
periodic eval loss; checkpoints every --save-every steps with exact resume (optimizer, scheduler, RNG,
data position); a final `save_pretrained` that carries `fastattn_config`. metrics.json records the loss
curve (each step's "lr" is the one that step used), the world size the job really had, and the op call
counters (proof that fastattn's backward ran).

With --data and no --eval-data, the last 5 % of the packed rows (at least one) are held out for the eval loss
and never trained on; data too small to leave a training row as well is refused. Bad options (missing files, an
invalid --plan, LoRA targets the model lacks, a --batch-size larger than the data) are usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .cli import UsageError, at_least, load_model_arg, looks_local, positive

FASTATTN_OPTIONS = ("method", "degree", "local_window", "chunk_size", "guard", "poly_coeffs", "fit_range",
                    "conv_k", "conv_placement", "kernel")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded', 'tiny:<family>' or a causal-LM path")
    p.add_argument("--attn", default="fastattn", choices=["fastattn", "sdpa", "eager"], help="attention implementation")
    p.add_argument("--method", default="poly", choices=["exact", "poly", "conv", "band"], help="fastattn method")
    p.add_argument("--degree", type=int, default=2, help="poly degree")
    p.add_argument("--local-window", type=int, default=64, help="exact band W (poly) / window (band)")
    p.add_argument("--chunk-size", type=int, default=128, help="poly chunk size")
    p.add_argument("--guard", default="off", choices=["warn", "exact", "error", "off"],
                   help="poly guard policy (default off, unlike the config's warn: fine-tuning through poly is the point, "
                   "and a guard would warn at every layer of a model not yet adapted)")
    p.add_argument("--poly-coeffs", default="taylor", choices=["taylor", "fit"], help="poly coefficients")
    p.add_argument("--fit-range", type=float, default=2.0, help="logit range of the fitted polynomial")
    p.add_argument("--conv-k", type=int, default=16, help="conv bases")
    p.add_argument("--conv-placement", default="even", choices=["search", "even", "geometric"], help="conv basis columns")
    p.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"], help="poly kernel")
    p.add_argument("--plan", default=None, help="a plan.json from `hf-fastattn diagnose --plan` (overrides --method)")
    p.add_argument("--data", nargs="*", default=None, help="text / json / jsonl files or a hub dataset (default: embedded corpus)")
    p.add_argument("--text-field", default="text", help="field of json records holding the text")
    p.add_argument("--eval-data", nargs="*", default=None,
                   help="held-out files (default: the embedded held-out corpus; with --data, its last 5 %% of rows, "
                        "held out of training)")
    p.add_argument("--copy-fraction", type=float, default=0.0, help="share of training rows with a repeated passage (embedded data)")
    p.add_argument("--seq-len", type=at_least(1), default=512, help="tokens per packed row")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="rows per process per micro-batch")
    p.add_argument("--grad-accum", type=at_least(1), default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=at_least(1), default=100, help="optimizer steps")
    p.add_argument("--lr", type=positive, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (linear from lr/warmup at the first step; default: a tenth of --steps, at most 10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (accelerate mixed precision)")
    p.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present (implied without one)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of all weights")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--lora-targets", default="attention",
                   help="modules LoRA adapts: 'attention' (every Linear inside the attention modules: q/k/v/o, Phi-3's "
                        "fused qkv_proj, DeepSeek's latent projections), 'all-linear', or a comma list of module names")
    p.add_argument("--eval-every", type=int, default=50, help="steps between eval losses (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=4, help="eval micro-batches")
    p.add_argument("--save-every", type=int, default=0, help="steps between resumable checkpoints (0: none)")
    p.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the latest in --output-dir")
    p.add_argument("--stop-at", type=int, default=0, help="end this run at this step (the schedule still spans --steps; resume later)")
    p.add_argument("--output-dir", default="runs/finetune", help="checkpoints, final model and metrics.json")
    p.add_argument("--no-save-model", action="store_true", help="skip the final save_pretrained")
    p.add_argument("--seed", type=int, default=0, help="seed (model init, data order)")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads per process (0: default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------- data
_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".py")


def check_files(option: str, files) -> None:
    """UsageError unless every entry of a --data / --eval-data list is an existing file (a single entry that is
    not a path may be a hub dataset name)."""
    files = list(files)
    if not files:
        raise UsageError(f"{option} needs at least one file (or leave the option out)")
    if len(files) == 1 and not os.path.exists(files[0]) and not looks_local(files[0], _FILE_SUFFIXES):
        return  # a hub dataset name, tried when loading
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UsageError(f"{option}: no such file: {', '.join(missing)}")


def _load_texts(files, text_field, option="--data"):
    from datasets import load_dataset

    files = list(files)
    check_files(option, files)
    if len(files) == 1 and not os.path.exists(files[0]):  # a hub dataset name (needs the network)
        try:
            ds = load_dataset(files[0], split="train")
        except Exception as err:  # offline, or no such dataset
            raise UsageError(f"{option} {files[0]!r} is not a file, and loading it as a hub dataset failed: "
                             f"{type(err).__name__}: {err}"[:500]) from err
    else:
        ext = Path(files[0]).suffix.lower()
        builder = "json" if ext in (".json", ".jsonl") else "text"
        ds = load_dataset(builder, data_files=files, split="train", **({"sample_by": "document"} if builder == "text" else {}))
    if text_field not in ds.column_names:
        raise UsageError(f"--text-field {text_field!r} not in the dataset columns {ds.column_names}")
    return [t for t in ds[text_field] if t]


def token_stream(tokenizer, texts) -> np.ndarray:
    from .loading import tokenize

    eos = getattr(tokenizer, "eos_token_id", None)
    parts = []
    for t in texts:
        parts.append(tokenize(tokenizer, t).numpy())
        if eos is not None:
            parts.append(np.array([eos]))
    return np.concatenate(parts).astype(np.int64)


class PackedRows(torch.utils.data.Dataset):
    """Non-overlapping rows of seq_len tokens of a token stream (packing); optionally some rows get a passage
    repeated far apart (teaches/keeps copying from far context)."""

    def __init__(self, stream: np.ndarray, seq_len: int, copy_fraction: float = 0.0, seed: int = 0):
        self.rows = torch.from_numpy(stream[: (len(stream) // seq_len) * seq_len].reshape(-1, seq_len))
        if len(self.rows) == 0:
            raise ValueError(f"the data has {len(stream)} tokens, fewer than one row of --seq-len {seq_len}")
        self.stream, self.seq_len, self.copy_fraction, self.seed = stream, seq_len, copy_fraction, seed
        if copy_fraction and stream.max() < 256:  # byte-level ids: copy_row works on uint8 text
            self.stream = stream.astype(np.uint8)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if self.copy_fraction and (i * 2654435761 + self.seed) % 1000 < self.copy_fraction * 1000:
            import random

            from .data import copy_row

            rng = random.Random(self.seed * 100003 + i)
            passage = rng.randint(16, 64)
            distance = rng.randint(passage, self.seq_len - passage)
            row, _, _ = copy_row(self.stream, self.seq_len, passage, distance, rng, random_passage=rng.random() < 0.5)
            return {"input_ids": torch.as_tensor(row, dtype=torch.long)}
        return {"input_ids": self.rows[i]}


class Shuffled(torch.utils.data.Dataset):
    """A fixed permutation per epoch, seeded from (seed, epoch): the data order is a pure function of the step,
    so a resumed run skips exactly the batches the interrupted one consumed (no sampler RNG to restore)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(self.order[i])]


def held_out_split(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train stream, eval stream): the last 5 % of the stream's rows of seq_len tokens (at least one) held out.
    Refuses a stream of fewer than two rows (nothing would be left to train on, or to evaluate on)."""
    rows = len(stream) // seq_len
    if rows < 2:
        raise UsageError(f"--data has {len(stream)} tokens = {rows} row(s) of --seq-len {seq_len}; holding out an "
                         "eval split needs at least 2 rows: add data, lower --seq-len, or give --eval-data")
    held = max(1, rows // 20)
    cut = (rows - held) * seq_len
    return stream[:cut], stream[cut : rows * seq_len]


def build_data(args, tokenizer):
    """(train dataset, eval dataset). --data without --eval-data: the last 5 % of its rows are the eval split
    (see `held_out_split`), so the eval loss is never measured on training rows."""
    if args.data:
        stream = token_stream(tokenizer, _load_texts(args.data, args.text_field))
        if args.eval_data:
            eval_stream = token_stream(tokenizer, _load_texts(args.eval_data, args.text_field, "--eval-data"))
        else:
            stream, eval_stream = held_out_split(stream, args.seq_len)
    else:
        from .data import stdlib_text

        stream = token_stream(tokenizer, [stdlib_text("train")])
        eval_stream = token_stream(tokenizer, [stdlib_text("heldout")])
    try:
        train = PackedRows(stream, args.seq_len, args.copy_fraction, args.seed)
        evald = PackedRows(eval_stream, args.seq_len)
    except ValueError as err:  # fewer tokens than one row
        raise UsageError(str(err)) from err
    return train, evald


# ------------------------------------------------------------------------------------------ training
def lora_targets(model, spec: str) -> list[str] | str:
    """`--lora-targets` as peft's target_modules (see the option's help)."""
    if spec == "all-linear":
        return spec
    if spec != "attention":
        names = [name for name in spec.split(",") if name]
        modules = [n for n, _ in model.named_modules() if n]
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing or not names:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            named = ", ".join(missing) if missing else repr(spec)
            raise UsageError(f"--lora-targets: {type(model).__name__} has no modules named {named}; "
                             f"its Linear layers are {', '.join(linear)} (or use attention, all-linear)")
        return names
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".self_attn." in f".{name}"})
    if not names:
        raise UsageError(f"--lora-targets attention: {type(model).__name__} has no Linear layers inside modules named "
                         "self_attn; give a comma list of module names, or all-linear")
    return names


def read_plan(path: str) -> dict:
    """The plan of a plan.json (`hf-fastattn diagnose --plan` writes {"plan": ..., "realised": ...}); a
    UsageError naming --plan when the file is missing, not JSON or not a valid plan."""
    from .config import FastAttnConfig

    if not Path(path).is_file():
        raise UsageError(f"--plan: no such file: {path}")
    try:
        raw = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--plan {path}: not a JSON file ({err})") from None
    plan = raw.get("plan", raw) if isinstance(raw, dict) else raw
    try:
        FastAttnConfig(plan=plan)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--plan {path}: not a valid plan: {err}") from None
    return plan


def check_resume(resume) -> None:
    if resume and resume != "auto" and not (Path(resume) / "trainer_state.json").is_file():
        what = "is not a checkpoint directory (no trainer_state.json)" if Path(resume).is_dir() else "no such directory"
        raise UsageError(f"--resume {resume}: {what}; give a checkpoint-N directory written with --save-every, or auto")


def check_args(args) -> None:
    """The options checkable before any model or data is loaded (UsageError)."""
    if args.warmup is None:
        args.warmup = min(10, args.steps // 10)
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0; got {args.warmup}")
    if args.warmup > args.steps:
        warnings.warn(f"--warmup {args.warmup} is longer than --steps {args.steps}: the learning rate peaks at "
                      f"{args.steps / args.warmup:.0%} of --lr", RuntimeWarning, stacklevel=2)
    if args.attn == "fastattn":  # a bad option value (--degree 3, --local-window -1) before the model loads
        from .config import FastAttnConfig

        try:
            FastAttnConfig.from_dict(fastattn_options(args))
        except ValueError as err:
            raise UsageError(f"{err} (the option of that name, or --plan)") from None
    check_resume(args.resume)
    if args.data is not None:
        check_files("--data", args.data)
    if args.eval_data is not None:
        check_files("--eval-data", args.eval_data)


def fastattn_options(args) -> dict:
    opts = {k: getattr(args, k) for k in FASTATTN_OPTIONS}
    if args.plan:
        opts["plan"] = read_plan(args.plan)
    return opts


def lr_lambda(warmup: int, steps: int):
    """Learning-rate factor of optimizer step i (0-based): a linear warm-up (i + 1) / warmup, so the first step
    already moves the weights, then a cosine decay to 0 at `steps`."""
    import math

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        progress = (i - warmup) / max(1, steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def _latest_checkpoint(out: Path):
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def _earlier_metrics(out: Path, step: int) -> tuple[list, list]:
    """The train and eval records up to `step` of the run being resumed (its metrics.json, if it wrote one)."""
    path = out / "metrics.json"
    if not path.is_file():
        return [], []
    old = json.loads(path.read_text())
    return ([r for r in old.get("train", []) if r["step"] <= step],
            [r for r in old.get("eval", []) if r["step"] <= step])


def run(args, fastattn_override: dict | None = None) -> dict:
    """Fine-tune; returns the metrics (and the trained model under "model"). `fastattn_override` replaces the
    fastattn options of the command line (used by the headline experiment)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    import hf_fastattn
    from hf_fastattn.loading import enable_checkpointing
    from hf_fastattn.ops import stats

    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # cpu=True without a GPU: accelerate then turns torchrun's WORLD_SIZE > 1 into gloo data parallelism
    # (with cpu=False it silently trains one copy per process)
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision="bf16" if args.bf16 else "no",
                      cpu=args.cpu or not torch.cuda.is_available())
    set_seed(args.seed)
    out = Path(args.output_dir)
    model, tokenizer = load_model_arg("--model", args.model, attn=args.attn)
    options = fastattn_override if fastattn_override is not None else fastattn_options(args)
    if args.attn == "fastattn":
        hf_fastattn.configure(model, replace=True, **options)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules=lora_targets(model, args.lora_targets),
                                                 task_type="CAUSAL_LM"))
    train, evald = build_data(args, tokenizer)
    train = Shuffled(train, args.seed)
    if len(train) < args.batch_size * acc.num_processes:  # drop_last would leave no batch: the loop would never end
        raise UsageError(f"--batch-size {args.batch_size} x {acc.num_processes} process(es) needs at least "
                         f"{args.batch_size * acc.num_processes} training rows, but the data has {len(train)} "
                         f"row(s) of --seq-len {args.seq_len} tokens: lower --batch-size or --seq-len, or add data")
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=False, drop_last=True)
    eval_loader = torch.utils.data.DataLoader(evald, batch_size=args.batch_size, shuffle=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    # not prepared: accelerate's wrapper steps a scheduler once per process per optimizer step (2 processes ran the
    # schedule at twice the speed); stepped below once per optimizer step, and saved with the checkpoints
    model, opt, loader, eval_loader = acc.prepare(model, opt, loader, eval_loader)
    acc.register_for_checkpointing(sched)

    step, history, evals = 0, [], []
    stats.reset()
    resume = args.resume
    if resume == "auto":
        resume = _latest_checkpoint(out)
    if resume:
        acc.load_state(str(resume))
        saved = json.loads((Path(resume) / "trainer_state.json").read_text())
        step = saved["step"]
        stats.COUNTS.update(saved.get("op_calls", {}))  # the op calls of the steps before it
        acc.print(f"resumed from {resume} at step {step}")
        history, evals = _earlier_metrics(out, step)
    world = acc.num_processes
    acc.print(f"world size {world} ({acc.distributed_type}), {len(train)} training rows of {args.seq_len} tokens, "
              f"attn={args.attn} {options if args.attn == 'fastattn' else ''}")

    def evaluate():
        """Mean loss per row (rows have equal lengths: per token) over the first --eval-batches batches of the eval
        set, whatever the number of processes; eval forwards are not counted. accelerate deals the batches round
        robin (process p reads global batches p, p + world, ...), and every process must join every gather: the
        rows of a global batch past --eval-batches are gathered with weight 0 (2 processes had evaluated
        ceil(n / 2) * 2 batches: another loss than 1 process's)."""
        model.eval()
        losses, weights, counts = [], [], stats.COUNTS.copy()
        with torch.no_grad():
            for i, batch in enumerate(eval_loader):
                if i >= math.ceil(args.eval_batches / world):
                    break
                ids = batch["input_ids"]
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                counted = float(i * world + acc.process_index < args.eval_batches)
                rows = loss.detach().expand(ids.shape[0]), torch.full((ids.shape[0],), counted, device=ids.device)
                loss_rows, weight_rows = acc.gather_for_metrics(rows)  # one entry per row
                losses.append(loss_rows)
                weights.append(weight_rows)
        stats.COUNTS.clear()
        stats.COUNTS.update(counts)
        model.train()
        if not losses:
            return float("nan")
        w = torch.cat(weights)
        return float((torch.cat(losses) * w).sum() / w.sum())

    if args.eval_every and step == 0:
        evals.append({"step": 0, "eval_loss": evaluate()})
    model.train()
    bar = tqdm(total=args.steps, initial=step, disable=args.quiet or not acc.is_main_process, desc="finetune")
    t0 = time.time()
    per_epoch = len(loader)
    epoch, skip = divmod(step * args.grad_accum, max(1, per_epoch))
    train.set_epoch(epoch)
    data_iter = iter(_skip(loader, skip))
    last = min(args.steps, args.stop_at) if args.stop_at else args.steps
    batches_this_epoch, micro = skip, []
    while step < last:
        try:
            batch = next(data_iter)
            batches_this_epoch += 1
        except StopIteration:
            if batches_this_epoch == 0:
                raise RuntimeError(f"an epoch of the training data gave no batch ({len(train)} rows, --batch-size "
                                   f"{args.batch_size}, {world} process(es))") from None
            batches_this_epoch = 0
            epoch += 1
            train.set_epoch(epoch)
            data_iter = iter(loader)
            continue
        lr = opt.param_groups[0]["lr"]  # what this step uses (the scheduler then sets the next one)
        with acc.accumulate(model):
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss
            acc.backward(loss)
            micro.append(loss.detach())
            if acc.sync_gradients:
                acc.clip_grad_norm_(params, 1.0)
            opt.step()
            if acc.sync_gradients:
                sched.step()
            opt.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        step += 1
        loss_all = float(acc.gather_for_metrics(torch.stack(micro).mean()[None]).mean())  # over the accumulation
        micro = []
        history.append({"step": step, "loss": loss_all, "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_all:.3f}")
        if args.eval_every and step % args.eval_every == 0:
            evals.append({"step": step, "eval_loss": evaluate()})
            acc.print(f"step {step}: eval loss {evals[-1]['eval_loss']:.4f}")
        if args.save_every and step % args.save_every == 0:
            ckpt = out / f"checkpoint-{step}"
            acc.save_state(str(ckpt))
            if acc.is_main_process:
                (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "op_calls": dict(stats.COUNTS)}))
    bar.close()
    if not evals or evals[-1]["step"] != step:
        evals.append({"step": step, "eval_loss": evaluate()})
    acc.wait_for_everyone()
    metrics = {
        "world_size": world, "distributed_type": str(acc.distributed_type), "steps": step,
        "seconds": time.time() - t0, "train": history, "eval": evals,
        "op_calls": dict(stats.COUNTS),  # this process's training calls (every process makes the same)
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not args.no_save_model:
            final = acc.unwrap_model(model)
            if args.lora:
                final = final.merge_and_unload()
            final.save_pretrained(out / "final")
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(out / "final")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    # Drop the DDP wrapper before the process group goes. Otherwise its Reducer holds the last reference to the gloo
    # group and destroys it on the main thread with the GIL held. That destructor joins gloo's worker threads,
    # and a worker still freeing the final barrier's work needs the GIL: the rank hangs after its last line (seen
    # in 2-process CPU runs; pytorch/pytorch#56297). Dropped here, destroy_process_group ends the group, and its
    # binding releases the GIL first.
    model = acc.unwrap_model(model)
    acc.free_memory()  # the accelerator's own references to the wrapper; collects garbage
    acc.end_training()
    metrics["model"] = model
    return metrics


def _skip(loader, n):
    """The loader with its first n batches skipped (resume inside an epoch)."""
    for i, batch in enumerate(loader):
        if i >= n:
            yield batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        p.error(str(err))
    return 0
