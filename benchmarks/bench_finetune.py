"""Fine-tuning the default model on a shifted domain: gain, forgetting, cost.

Reproduces, on synthetic data, the source work's experiment (a network
trained on synthetic frames meets a new data stream and is fine-tuned on a
few labeled frames of it):

* **shifted domain** (``--shift``): detector shapes held out of training
  (Pilatus 900K, Eiger 4M; ``detectors=heldout``) rendered at 512 px, and

  - ``integrating`` (default): read out by an integrating detector in ADU
    (gain 4-40 ADU per photon, offset 100-1000 ADU, read noise 3-30 ADU,
    float32 with NaN masks). Training frames are photon counts, or CCDs at
    1 ADU per photon with offsets below 60.
  - ``exposure``: every scene's intensities (feature amplitudes and
    background) scaled by an exposure factor ``k ~ logU(0.02, 0.2)``, far
    below the training distribution.

  - ``renderb``: frames of renderer B (bluesky_xsml.render_b, written apart
    from the generator: its own detectors, readouts, sentinels and shapes),
    labeled frames from ``renderb:seed=1`` and the test frames from
    ``--shift-test`` (renderer B's test set, ``renderb:seed=100,n=1000``):
    issue 21's "fine-tuning on 200 labelled frames of a domain the model was
    not trained on".

  Labels are recomputed from the shifted scene (for ``exposure``, features
  that sink into the noise lose their tag and ``weak_scattering`` appears),
  so they stay true to the frames. The shift is applied to the scene here,
  not in the generator, so every cached training set stays valid.
* With 32, 128 and 512 labeled shifted frames: mAP on held-out shifted
  frames before/after, mAP on the original domain (the default model's
  synthetic test set) before/after, wall time of fine-tuning on CPU, and
  whether the validation gate promoted the result.
* Tagging throughput (``Tagger.predict`` on raw 512 px frames) while a
  :class:`~bluesky_xsml.training.live.LiveFineTuner` trains in its low-priority
  thread, against idle.

Run (about 10 minutes on 2 cores)::

    nice python benchmarks/bench_finetune.py

Targets (issue 4): +10 mAP points with 128 labels; original domain within
1 point; tagging throughput while fine-tuning >= 50 % of idle.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

#: The shifted domains. Each applies to scenes of the detector shapes held out of training
#: (Pilatus 900K, Eiger 4M; ``detectors=heldout``) rendered at 512 px.
SHIFTS = {
    # every intensity scaled by an exposure factor k ~ logU(0.02, 0.2)
    "exposure": {"seed": 5, "size": 512, "detectors": "heldout", "k_lo": 0.02, "k_hi": 0.2,
                 "version": 1},
    # read out by an integrating detector in ADU: gain ~ logU(4, 40) ADU per photon, offset
    # ~ U(100, 1000) ADU, read noise ~ U(3, 30) ADU; float32 frames, NaN where masked, 16-bit
    # full scale. Training frames are photon counts or CCDs at 1 ADU per photon, offset < 60.
    "integrating": {"seed": 5, "size": 512, "detectors": "heldout", "gain": (4.0, 40.0),
                    "offset": (100.0, 1000.0), "read_sigma": (3.0, 30.0), "version": 1},
    # frames of renderer B: the labeled pool is renderb:seed=1, the test set --shift-test
    "renderb": {"source": "renderb:seed=1"},
}
#: Renderer B's test set (docs/render-b.md), where ``--shift renderb`` scores.
RENDERB_TEST = "renderb:seed=100,n=1000"


#: Original-domain frames replayed while fine-tuning, and those the gate checks forgetting on
REPLAY = "synth:seed=0,n=2000,sizes=256+512+768+1024,detectors=train"
GATE_VAL = "synth:seed=1,n=2000,sizes=256+512+768+1024,detectors=train"


def shift_scene(scene: dict, rng: np.random.Generator, *, k_lo: float, k_hi: float) -> dict:
    """The scene with every intensity scaled by one exposure factor ``k ~ logU(k_lo, k_hi)``."""
    sc = copy.deepcopy(scene)
    k = float(np.exp(rng.uniform(np.log(k_lo), np.log(k_hi))))
    for f in sc.get("features", []):
        for key in ("amp", "i0", "peak_amp", "min_amp"):
            if f.get(key) is not None:
                f[key] = (np.asarray(f[key], float) * k).tolist()
    if sc.get("background"):
        sc["background"]["level"] = float(sc["background"]["level"]) * k
    sc["exposure_scale"] = k
    return sc


def integrating_scene(scene: dict, rng: np.random.Generator, *, gain: tuple[float, float],
                      offset: tuple[float, float], read_sigma: tuple[float, float]) -> dict:
    """The scene read out by an integrating detector of the same shape, in ADU."""
    sc = copy.deepcopy(scene)
    det = sc["detector"]
    det.update(family="ccd", dtype="float32", count_cutoff=65535.0)
    sc["noise"] = {"dark": float(sc.get("noise", {}).get("dark", 0.0)),
                   "gain": float(np.exp(rng.uniform(np.log(gain[0]), np.log(gain[1])))),
                   "offset": float(rng.uniform(*offset)),
                   "read_sigma": float(rng.uniform(*read_sigma))}
    return sc


def apply_shift(scene: dict, rng: np.random.Generator, shift: dict) -> dict:
    """The scene under ``shift`` (an entry of :data:`SHIFTS`)."""
    if "k_lo" in shift:
        return shift_scene(scene, rng, k_lo=shift["k_lo"], k_hi=shift["k_hi"])
    return integrating_scene(scene, rng, gain=shift["gain"], offset=shift["offset"],
                             read_sigma=shift["read_sigma"])


def _render(args):
    a, b, shift = args
    from bluesky_xsml.preprocess import PreprocessConfig, preprocess_batch
    from bluesky_xsml.sim.generator import SceneGenerator, render_scene, scene_labels

    gen = SceneGenerator(seed=shift["seed"], size=shift["size"], detectors=shift["detectors"])
    frames, labels = [], []
    for i in range(a, b):
        scene, _, _ = gen.scene_at(i)
        rng = np.random.default_rng([shift["seed"], 7, i])
        sc = apply_shift(scene, rng, shift)
        frames.append(render_scene(sc, rng))
        labels.append(scene_labels(sc))
    inputs, _ok, errors = preprocess_batch(frames, PreprocessConfig())
    assert not errors, errors
    return a, inputs.astype(np.float16), np.stack(labels).astype(np.float32), frames[:4]


def shifted_data(n: int, workers: int, shift: dict):
    """``(inputs, labels, sample raw frames)`` of the first ``n`` shifted frames (cached)."""
    from bluesky_xsml.training.data import default_cache_dir, generator_fingerprint

    key = hashlib.sha1(json.dumps({**shift, "n": n, "gen": generator_fingerprint()},
                                  sort_keys=True).encode()).hexdigest()[:16]
    path = default_cache_dir() / f"finetune-shift-{key}.npz"
    if path.exists():
        z = np.load(path)
        return z["inputs"], z["labels"], [z[f"frame_{i}"] for i in range(4)]
    t0 = time.perf_counter()
    chunks = [(a, min(n, a + 64), shift) for a in range(0, n, 64)]
    with ProcessPoolExecutor(workers) as pool:
        parts = sorted(pool.map(_render, chunks), key=lambda p: p[0])
    inputs = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    frames = list(parts[0][3])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, inputs=inputs, labels=labels, **{f"frame_{i}": f for i, f in enumerate(frames)})
    print(f"rendered {n} shifted frames in {time.perf_counter() - t0:.0f} s -> {path}")
    return inputs, labels, frames


def renderb_data(n: int, test: str, config, *, workers: int, cache_dir=None):
    """Renderer B's labeled pool (its first ``n`` frames), test set and 4 raw frames.

    Returns ``(inputs, labels, test_inputs, test_labels, raw)``; the pool and the test
    set come through :func:`~bluesky_xsml.training.data.load_arrays` (cached in
    ``cache_dir``, default the training cache). The pool and the test set must not share
    frames: a test source of the pool's seed is refused.
    """
    from bluesky_xsml.render_b import render_scene
    from bluesky_xsml.training.data import RenderBSpec, load_arrays, parse_spec

    pool_spec = RenderBSpec.parse(f"{SHIFTS['renderb']['source']},n={n}")
    test_spec = parse_spec(test)
    if isinstance(test_spec, RenderBSpec) and test_spec.seed == pool_spec.seed:
        raise ValueError(f"test frames {test!r} share a seed with the labeled pool "
                         f"{str(pool_spec)!r}")
    pool = load_arrays(str(pool_spec), config=config, workers=workers, progress=False,
                       cache_dir=cache_dir)
    test_set = load_arrays(test, config=config, workers=workers, progress=False,
                           cache_dir=cache_dir)
    raw = [render_scene(pool_spec.seed, i)[0] for i in range(4)]
    return (np.asarray(pool.inputs), pool.labels, np.asarray(test_set.inputs),
            test_set.labels, raw)


def scores(tagger, inputs, labels):
    """Per-tag metrics of ``tagger`` over the tags of ``labels`` (first columns of a grown head)."""
    from bluesky_xsml.training.metrics import evaluate_scores

    t = labels.shape[1]
    probs = np.concatenate([tagger.predict_inputs(np.asarray(inputs[a:a + 64], np.float32))
                            for a in range(0, len(inputs), 64)])
    return evaluate_scores(labels, probs[:, :t], tagger.tags[:t])


def mean_ap(tagger, inputs, labels) -> float:
    """mAP of ``tagger`` over the tags of ``labels`` (the first columns of a grown head)."""
    return float(scores(tagger, inputs, labels).mean_ap)


def throughput(tagger, frames, seconds: float) -> float:
    """Frames per second of ``tagger.predict`` on raw frames, over ``seconds``."""
    batch = (frames * 8)[:16]
    for _ in range(4):  # compile kernels for these shapes and dtypes, let TorchScript specialise
        tagger.predict(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tagger.predict(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def pseudo_labels(tagger, inputs, *, confident: float = 0.9) -> np.ndarray:
    """``tagger``'s labels for unlabeled inputs where it is confident (self-training).

    Probability ``>= confident`` becomes 1, ``<= 1 - confident`` becomes 0, anything between
    stays ``NaN`` (unknown). Columns are ``tagger.tags``.
    """
    x = np.asarray(inputs, np.float32)
    probs = np.concatenate([tagger.predict_inputs(x[a:a + 64]) for a in range(0, len(x), 64)])
    out = np.full(probs.shape, np.nan, np.float32)
    out[probs >= confident], out[probs <= 1 - confident] = 1.0, 0.0
    return out


def experiment_setup(model: str | None, shift: str, n: int, *, threads: int):
    """What an experiment built on this benchmark starts from, with its default settings.

    Returns ``(tagger, inputs, labels, settings)``: the checkpoint, the first ``n`` frames of
    the shifted pool (the benchmark labels frames 0-511 and tests on 512-911) and the keyword
    arguments of :func:`~bluesky_xsml.training.finetune.finetune` this benchmark uses at 128
    labels (300 steps, batch 32, lr 5e-4, the stem frozen, distillation weight 2, 2,000
    replayed and 500 gate frames of the original domain, a quarter of the labels held out).
    """
    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.training.data import load_arrays

    if shift not in ("integrating", "exposure"):
        raise ValueError(f"experiment_setup renders scene shifts only, not {shift!r}")
    torch.set_num_threads(threads)
    tagger = Tagger.load(model)
    cfg = tagger.preprocess_config
    x, y, _ = shifted_data(n, 2, SHIFTS[shift])
    gate = load_arrays(GATE_VAL, config=cfg, progress=False)
    settings = dict(synthetic=load_arrays(REPLAY, config=cfg, progress=False),
                    synthetic_val=(np.asarray(gate.inputs[:500]), gate.labels[:500], gate.tags),
                    steps=300, batch_size=32, lr=5e-4, freeze=1, distill=2.0, val_fraction=0.25)
    return tagger, x, y, settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="checkpoint to start from (default: the packaged default model)")
    p.add_argument("--shift", choices=sorted(SHIFTS), default="integrating",
                   help="the shifted domain (see SHIFTS; default: integrating)")
    p.add_argument("--labels", default="32,128,512",
                   help="labeled shifted frames per run ('none': only the throughput part)")
    p.add_argument("--test-n", type=int, default=400, help="held-out shifted test frames")
    p.add_argument("--shift-test", default=RENDERB_TEST,
                   help="with --shift renderb: the test frames (a data source, e.g. "
                        "renderer B's zarr test store; default: %(default)s)")
    p.add_argument("--steps", default="100,300,600", help="fine-tuning steps per label count")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--freeze", type=int, default=1,
                   help="leading modules kept fixed (stem + blocks; see finetune)")
    p.add_argument("--distill", type=float, default=2.0,
                   help="weight of the distillation term on replayed frames (see finetune)")
    p.add_argument("--replay", default=REPLAY,
                   help="original-domain frames replayed while fine-tuning")
    p.add_argument("--gate-val", default=GATE_VAL,
                   help="original-domain frames the gate checks forgetting on")
    p.add_argument("--gate-val-n", type=int, default=500)
    p.add_argument("--orig-test", default="synth:seed=2,n=2000,sizes=256+512+768+1024,"
                                          "detectors=train",
                   help="original-domain test frames (the model card's test set)")
    p.add_argument("--orig-test-n", type=int, default=1000)
    p.add_argument("--throughput-seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for fine-tuning runs (default: cores)")
    p.add_argument("--tag-threads", type=int, default=None,
                   help="torch threads for the throughput part (default: cores - 1, as "
                        "TaggingCallback)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering shifted frames")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)

    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.training.data import load_arrays
    from bluesky_xsml.training.finetune import finetune
    from bluesky_xsml.training.live import LiveFineTuner

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    label_ns = [] if args.labels == "none" else [int(v) for v in args.labels.split(",")]
    steps = [int(v) for v in args.steps.split(",")][:len(label_ns)]
    if len(steps) != len(label_ns):
        raise SystemExit("--steps needs one value per --labels value")
    tagger = Tagger.load(args.model)
    cfg = tagger.preprocess_config
    shift = SHIFTS[args.shift]
    if args.shift == "renderb":
        x_shift, y_shift, x_test, y_test, raw = renderb_data(
            max([*label_ns, 64]), args.shift_test, cfg, workers=args.workers)
        args.test_n = len(x_test)
        shift = {**shift, "test": args.shift_test}
    else:
        n_shift = max([*label_ns, 512]) + args.test_n
        x_shift, y_shift, raw = shifted_data(n_shift, args.workers, shift)
        x_test, y_test = x_shift[-args.test_n:], y_shift[-args.test_n:]
    replay = load_arrays(args.replay, config=cfg, progress=False)
    gate_val = load_arrays(args.gate_val, config=cfg, progress=False)
    gate_val = (np.asarray(gate_val.inputs[:args.gate_val_n]),
                gate_val.labels[:args.gate_val_n], gate_val.tags)
    orig = load_arrays(args.orig_test, config=cfg, progress=False)
    x_orig = np.asarray(orig.inputs[:args.orig_test_n])
    y_orig = orig.labels[:args.orig_test_n]

    before_tags = scores(tagger, x_test, y_test)
    shift_before = float(before_tags.mean_ap)
    orig_before = mean_ap(tagger, x_orig, y_orig)
    print(f"default model {tagger.checkpoint_id}: shifted-domain test mAP {shift_before:.4f} "
          f"({args.test_n} frames), original-domain test mAP {orig_before:.4f} "
          f"({len(x_orig)} frames); torch threads {torch.get_num_threads()}")
    results = {"command": "nice python benchmarks/bench_finetune.py " + " ".join(argv or
                                                                                 sys.argv[1:]),
               "shift": {"name": args.shift, **shift}, "checkpoint": tagger.checkpoint_id,
               "shifted_before": shift_before, "original_before": orig_before, "runs": []}
    print(f"{'labels':>6} {'steps':>5} {'shifted mAP':>19} {'gain':>6} {'original mAP':>19} "
          f"{'change':>7} {'seconds':>7} gate")
    for n, st in zip(label_ns, steps, strict=True):
        new, rep = finetune(tagger, x_shift[:n], y_shift[:n], synthetic=replay,
                            synthetic_val=gate_val, steps=st, batch_size=args.batch_size,
                            lr=args.lr, freeze=args.freeze, distill=args.distill,
                            val_fraction=0.25)
        after_tags = scores(new, x_test, y_test)
        s_after = float(after_tags.mean_ap)
        o_after = mean_ap(new, x_orig, y_orig)
        run = {"labels": n, "steps": rep.steps, "seconds": rep.seconds,
               "shifted_after": s_after, "gain_points": 100 * (s_after - shift_before),
               "original_after": o_after, "original_change_points": 100 * (o_after - orig_before),
               "gate_passed": rep.passed, "gate_reason": rep.reason}
        run["shifted_ap_by_tag"] = {
            t: [round(float(a), 4), round(float(b), 4)] for t, a, b in
            zip(before_tags.tags, before_tags.ap, after_tags.ap, strict=True)}
        results["runs"].append(run)
        print(f"{n:>6} {rep.steps:>5} {shift_before:.4f} -> {s_after:.4f} "
              f"{run['gain_points']:>+6.1f} {orig_before:.4f} -> {o_after:.4f} "
              f"{run['original_change_points']:>+7.2f} {rep.seconds:>7.1f} "
              f"{'promoted' if rep.passed else 'kept'}", flush=True)

    # tagging throughput, idle vs while a live fine-tuner trains in the background, with the
    # torch threads TaggingCallback sets by default (one less than the cores)
    torch.set_num_threads(args.tag_threads or max(1, (os.cpu_count() or 2) - 1))
    live = Tagger.load(args.model)
    idle_a = throughput(live, raw, args.throughput_seconds / 2)
    with tempfile.TemporaryDirectory() as tmp:
        ft = LiveFineTuner(live, tmp, auto=False, steps=100000, batch_size=args.batch_size,
                           synthetic=replay, synthetic_val=None, freeze=args.freeze)
        ft.add_labels(x_shift[:64], y_shift[:64])
        ft.retrain_now()
        t0 = time.perf_counter()
        while ft.status()["step"] < 1 and time.perf_counter() - t0 < 300:
            time.sleep(0.2)
        step0 = ft.status()["step"]
        busy = throughput(live, raw, args.throughput_seconds)
        steps_done = ft.status()["step"] - step0
        ft.close()
    # idle measured before and after, so a change in the machine's other load shows less
    idle = (idle_a + throughput(live, raw, args.throughput_seconds / 2)) / 2
    ratio = busy / idle
    results.update(throughput_idle=idle, throughput_finetuning=busy, throughput_ratio=ratio,
                   finetune_steps_during=steps_done, tag_threads=torch.get_num_threads())
    print(f"tagging throughput (Pilatus/Eiger frames at 512 px, {torch.get_num_threads()} torch "
          f"threads): idle {idle:.1f} frames/s, while fine-tuning {busy:.1f} frames/s "
          f"({steps_done} fine-tuning steps in those {args.throughput_seconds:.0f} s)")

    if results["runs"]:
        print("\nshifted-domain AP per tag, before -> after (" +
              ", ".join(f"{r['labels']} labels" for r in results["runs"]) + "):")
        for t in before_tags.tags:
            print(f"  {t:18s} {results['runs'][0]['shifted_ap_by_tag'][t][0]:.3f} -> " +
                  "  ".join(f"{r['shifted_ap_by_tag'][t][1]:.3f}" for r in results["runs"]))
    print("\nratios against the default model, measured in this run:")
    for run in results["runs"]:
        print(f"  {run['labels']:>4} labels: shifted mAP x{run['shifted_after'] / shift_before:.3f}"
              f" ({run['gain_points']:+.1f} points; target +10 at 128), original mAP "
              f"x{run['original_after'] / orig_before:.4f} ({run['original_change_points']:+.2f} "
              f"points; target >= -1), {run['seconds']:.0f} s")
    print(f"  tagging throughput while fine-tuning / idle: {ratio:.2f} (target >= 0.50)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
