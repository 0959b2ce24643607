"""``xsml train``: train the tagger on synthetic frames (resumable).

The training frames are rendered once and cached as preprocessed float16
inputs (:mod:`bluesky_xsml.training.data`); each epoch then costs only the
network. After every epoch the full training state is written atomically to
``OUT/last.pt`` (weights, optimizer, EMA weights, step, history, RNG state)
and the inference checkpoint to ``OUT/model.pt`` (a :class:`Tagger` whose
thresholds are the max-F1 thresholds on the validation set). Running the same
command again continues from the last finished epoch; ``--epochs`` may be
raised to train longer.

``--init CHECKPOINT`` starts from the weights of an earlier model (a
:class:`Tagger` checkpoint, such as another run's ``OUT/model.pt``) instead
of random ones, with a fresh optimiser and learning-rate schedule: the way to
go on training a model on more frames. The network shape and preprocessing
then come from that checkpoint, and its content id is recorded as
``metadata["init_checkpoint"]`` of every model the run writes.

``--relation STAGE`` adds a :class:`~bluesky_xsml.model.RelationBlock`
(self-attention over the positions of the feature map) after that stage.
Added with ``--init`` to a checkpoint that has none, it starts as a no-op
(zero output projection), so training begins from the checkpoint's outputs.

This module is the command's wiring (options, resuming, the epoch loop, the
files it writes); the recipe's pieces (loss weights, augmentation, batches,
learning-rate schedule, weight averaging) are the library
:mod:`bluesky_xsml.training.recipe`, re-exported here.

Examples
--------
>>> import argparse
>>> from bluesky_xsml.training import train
>>> p = argparse.ArgumentParser(); train.add_arguments(p)
>>> args = p.parse_args(["--epochs", "3", "--widths", "16,32"])
>>> args.epochs, args.widths
(3, (16, 32))
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..checkpoints import atomic_torch_save, safe_torch_load
from ..errors import CheckpointError
from ..inference.device import cpu_supports_bf16
from ..inference.tagger import Tagger
from ..model import TaggerNet, TaggerNetConfig
from ..preprocess import CHANNELS, PreprocessConfig
from ..tags import TAG_NAMES
from .data import describe, load_arrays, parse_spec
from .metrics import evaluate_scores
from .recipe import BatchLoader, augment, ema_update, lr_at, pos_weights

# the recipe's pieces lived here before training.recipe; kept importable from here
__all__ = ["BatchLoader", "add_arguments", "augment", "lr_at", "main", "pos_weights"]

log = logging.getLogger(__name__)

STATE_FORMAT = "bluesky-xsml-train-state"
DEFAULT_DATA = "synth:seed=0,n=24000,sizes=256+512+1024,detectors=train"
DEFAULT_VAL = "synth:seed=1,n=2000,sizes=256+512+1024,detectors=train"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).replace("+", ",").split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml train``."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=DEFAULT_DATA,
                   help="training frames: a 'synth:...' or 'renderb:...' spec, an 'xsml synth' "
                        "zarr store, or several joined by '|' "
                        f"(default {DEFAULT_DATA})")
    g.add_argument("--n", type=int, default=None,
                   help="number of training frames (overrides n= of a synth: or renderb: spec)")
    g.add_argument("--val-data", default=DEFAULT_VAL,
                   help=f"validation frames for thresholds and monitoring (default {DEFAULT_VAL})")
    g.add_argument("--input-size", type=int, default=128, help="model input side (default 128)")
    g.add_argument("--cache-dir", default=None,
                   help="where preprocessed inputs are cached (default $XSML_CACHE, else "
                        "$XDG_CACHE_HOME/bluesky-xsml or ~/.cache/bluesky-xsml)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes rendering frames of synth: and renderb: specs")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20,
                   help="epochs of the learning-rate schedule (default 20)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="frames per training step (default 64)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (default 0.05)")
    g.add_argument("--warmup", type=float, default=0.5, help="warm-up length in epochs")
    g.add_argument("--ema", type=float, default=0.998,
                   help="decay of the weight moving average that is evaluated and shipped "
                        "(0 disables)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weight initialisation and batch order (default 0)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast precision of the training step (fp32 master weights); auto: "
                        "bf16 on CPUs with native bf16")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    g = parser.add_argument_group("model")
    g.add_argument("--widths", type=_ints, default=(32, 64, 128, 192),
                   help="channels per stage, comma separated (default 32,64,128,192)")
    g.add_argument("--depths", type=_ints, default=(1, 1, 2, 1),
                   help="residual blocks per stage (default 1,1,2,1)")
    g.add_argument("--stem-width", type=int, default=24,
                   help="channels of the first convolution (default 24)")
    g.add_argument("--dropout", type=float, default=0.1,
                   help="dropout before the classifier (default 0.1)")
    g.add_argument("--relation", type=int, default=None, metavar="STAGE",
                   help="add a relation block (self-attention over positions) after this stage "
                        "(0-based); with --init it is added to the checkpoint's network, "
                        "starting as a no-op")
    g.add_argument("--relation-heads", type=int, default=4,
                   help="attention heads of the --relation block (default 4)")
    g.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this tagger checkpoint's weights (its network shape and "
                        "preprocessing replace --widths/--depths/--stem-width/--input-size)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="runs/tagger", help="output directory (default runs/tagger)")
    g.add_argument("--export", default=None,
                   help="also write the final model to this path (e.g. "
                        "bluesky_xsml/models/default.pt)")
    g.add_argument("--restart", action="store_true",
                   help="ignore OUT/last.pt and start from scratch")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs in this invocation (rerun to continue; "
                        "the schedule still spans --epochs)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


# ---------------------------------------------------------------------- helpers


def _with_n(source: str, n: int | None) -> str:
    if n is None:
        return source
    spec = parse_spec(source) if "|" not in source else None
    if spec is None:
        raise SystemExit("--n applies only to a single 'synth:...' or 'renderb:...' data source")
    return str(replace(spec, n=int(n)))


def _init_tagger(path: str, tags):
    """The tagger whose weights a run starts from; its tags must be the vocabulary's."""
    try:
        init = Tagger.load(path, device="cpu")
    except CheckpointError as err:
        raise SystemExit(f"--init: {err}") from err
    if list(init.tags) != list(tags):
        raise SystemExit(f"--init: {path} has tags {list(init.tags)}; training needs the "
                         f"{len(tags)} tags of the vocabulary in order")
    return init


# ------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    """Run ``xsml train``; returns the process exit code."""
    import torch
    from tqdm.auto import tqdm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16())
    progress = not args.no_progress

    train_src = _with_n(args.data, args.n)
    pcfg = PreprocessConfig(size=args.input_size)
    state = None
    init = None
    if (out / "last.pt").exists() and not args.restart:
        state = safe_torch_load(out / "last.pt")
        if state.get("format") != STATE_FORMAT:
            raise SystemExit(f"{out / 'last.pt'} is not a training state; use --restart")
        train_src, pcfg = state["train_data"], PreprocessConfig.from_dict(state["preprocess"])
        print(f"resuming from {out / 'last.pt'} after epoch {state['epoch']} "
              f"(training data {train_src})")
    elif args.init:
        init = _init_tagger(args.init, TAG_NAMES)
        pcfg = init.preprocess_config
        print(f"starting from the weights of {args.init} ({init.checkpoint_id})")

    t0 = time.perf_counter()
    train = load_arrays(train_src, config=pcfg, cache_dir=args.cache_dir, workers=args.workers,
                        progress=progress)
    if train.preprocess and int(train.inputs.shape[-1]) != pcfg.size:
        pcfg = PreprocessConfig.from_dict(train.preprocess)  # preprocessed arrays decide
    val = load_arrays(args.val_data if state is None else state["val_data"], config=pcfg,
                      cache_dir=args.cache_dir, workers=args.workers, progress=progress)
    data_seconds = time.perf_counter() - t0
    print(f"data ready in {data_seconds:.0f} s: {len(train)} training, {len(val)} validation "
          f"frames")

    relation = {} if args.relation is None else {
        "relation_stage": args.relation, "relation_heads": args.relation_heads}
    if init is not None:
        config = TaggerNetConfig.from_dict({**init.net.config.to_dict(), **relation})
    elif state is None:
        config = TaggerNetConfig(n_tags=len(TAG_NAMES), in_channels=len(CHANNELS),
                                 stem_width=args.stem_width, widths=tuple(args.widths),
                                 depths=tuple(args.depths), dropout=args.dropout, **relation)
    else:
        config = TaggerNetConfig.from_dict(state["model_config"])
    torch.manual_seed(args.seed)
    try:
        net = TaggerNet(config)
    except ValueError as err:
        raise SystemExit(f"--relation: {err}") from err
    if init is not None:
        # a relation block added to a checkpoint that has none starts as a no-op
        missing, unexpected = net.load_state_dict(init.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("relation.") for k in missing):
            raise SystemExit(f"--init: {args.init} does not fit the network: missing "
                             f"{missing}, unexpected {unexpected}")
    net.pos_weight.copy_(torch.from_numpy(pos_weights(train.labels)))
    net = net.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in net.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()} if args.ema > 0 else None
    history: list[dict] = []
    start_epoch, step = 0, 0
    train_seconds = 0.0
    if state is not None:
        net.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema = {k: v.clone() for k, v in state["ema"].items()}
        history = list(state["history"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        train_seconds = float(state.get("train_seconds", 0.0))
        torch.set_rng_state(state["torch_rng"])

    loader = BatchLoader(train.inputs, train.labels, args.batch_size, seed=args.seed,
                         augment_fn=augment)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"batch size {args.batch_size} exceeds the {len(train)} training frames")
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(args.warmup * steps_per_epoch))
    n_params = sum(p.numel() for p in net.parameters())
    print(f"model {config.to_dict()} ({n_params / 1e6:.2f} M parameters); {steps_per_epoch} "
          f"steps/epoch; autocast {'bf16' if bf16 else 'fp32'}; {torch.get_num_threads()} threads")

    def eval_net():
        if ema is None:
            return net
        m = TaggerNet(config)
        m.load_state_dict(ema)
        return m.to(memory_format=torch.channels_last)

    def validated(model, metadata):
        """The Tagger of ``model`` with max-F1 thresholds from its own validation scores."""
        tg = Tagger(model.float().eval(), TAG_NAMES, preprocess=pcfg, metadata=metadata)
        vp = np.concatenate([tg.predict_inputs(np.asarray(val.inputs[a:a + 64], np.float32))
                             for a in range(0, len(val), 64)])
        vm = evaluate_scores(val.labels, vp, TAG_NAMES)
        tg.thresholds = vm.threshold.astype(np.float32)
        tg.metadata["val_mAP"] = round(vm.mean_ap, 4)
        return tg, vm

    tagger = None
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs,
                                                                start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        net.train()
        te = time.perf_counter()
        run_loss, n_seen = 0.0, 0
        bar = tqdm(loader.epoch(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/"
                   f"{args.epochs}", unit="batch", disable=not progress, mininterval=2.0)
        for x, y in bar:
            lr = lr_at(step, total=total, warmup=warmup, peak=args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, loss = net(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
            opt.step()
            if ema is not None:
                ema_update(ema, net, min(args.ema, (1 + step) / (10 + step)))
            step += 1
            run_loss += loss.item() * len(y)
            n_seen += len(y)
            bar.set_postfix(loss=f"{run_loss / n_seen:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.close()
        epoch_seconds = time.perf_counter() - te
        train_seconds += epoch_seconds
        # validation, in the deployed form (fused, TorchScript, inference precision): mAP and
        # the max-F1 thresholds that the checkpoint carries
        metadata = {
            "trained_by": "xsml train",
            "train_data": train_src, "val_data": args.val_data if state is None
            else state["val_data"],
            "n_train": len(train), "epochs": epoch + 1, "seed": args.seed,
            "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
            "thresholds_from": "max F1 on the validation data",
            "train_seconds": round(train_seconds, 1),
        }
        init_id = init.checkpoint_id if init is not None else \
            (state or {}).get("init_checkpoint")
        if init_id:
            metadata["init_checkpoint"] = init_id
        tagger, vm = validated(eval_net(), metadata)
        rec = {"epoch": epoch + 1, "step": step, "train_loss": round(run_loss / n_seen, 5),
               "val_mAP": round(vm.mean_ap, 4), "val_worst": vm.worst(3),
               "lr": lr, "epoch_seconds": round(epoch_seconds, 1),
               "frames_per_second": round(n_seen / epoch_seconds, 1)}
        history.append(rec)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {rec['train_loss']:.4f}  val mAP "
              f"{vm.mean_ap:.4f}  worst {', '.join(f'{t} {a:.3f}' for t, a in vm.worst(3))}  "
              f"({epoch_seconds:.0f} s, {rec['frames_per_second']:.0f} frames/s)", flush=True)
        with open(out / "history.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        tagger.save(out / "model.pt")
        atomic_torch_save({
            "format": STATE_FORMAT, "epoch": epoch + 1, "step": step,
            "model_config": config.to_dict(), "preprocess": pcfg.to_dict(),
            "train_data": train_src, "val_data": metadata["val_data"],
            "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "ema": ema, "optimizer": opt.state_dict(), "history": history,
            "torch_rng": torch.get_rng_state(), "train_seconds": train_seconds,
            "init_checkpoint": init_id,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                     if not k.startswith("_")},
        }, out / "last.pt")

    if tagger is None:  # nothing left to train: rebuild the model from the state
        print(f"already trained for {start_epoch} epochs (raise --epochs to continue); "
              f"rebuilding {out / 'model.pt'} from {out / 'last.pt'}")
        metadata = dict(Tagger.load(out / "model.pt").metadata)
        metadata.pop("checkpoint_id", None)
        tagger, vm = validated(eval_net(), metadata)
        tagger.save(out / "model.pt")
    (out / "data.json").write_text(json.dumps({"train": describe(train), "val": describe(val),
                                                "data_seconds": round(data_seconds, 1)},
                                               indent=1))
    if args.export:
        tagger.save(args.export)
        print(f"exported {args.export}")
    last = history[-1] if history else {}
    print(f"trained {last.get('epoch', start_epoch)} epochs in {train_seconds:.0f} s; "
          f"val mAP {last.get('val_mAP', float('nan'))}; model {out / 'model.pt'}")
    return 0
