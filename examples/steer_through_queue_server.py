"""Steer through the bluesky queue server: stored tags -> policy -> a plan added to the queue.

    python examples/steer_through_queue_server.py [--points 5] [--size 256]

Needs Debian's ``redis-server`` and ``bluesky-queueserver``. The example

1. starts an embedded Tiled catalog here, ``redis-server`` and an RE Manager
   whose worker runs the project's IPython profile
   (``profiles/profile_xsml/startup``: RunEngine, the simulated beamline, the
   tagging callback writing to this catalog through ``XSML_TILED_URI``);
2. queues a coarse line scan across the sample and waits for it;
3. reads the run's tags back from the catalog and gives them to a
   ``PolicyEngine`` whose rule asks to ``refine`` where the structure changes;
4. lets ``QueueSteering`` turn that decision into a finer scan, added at the
   front of the queue and started, with the decision in its metadata.
"""

import argparse
import sys
import time
from pathlib import Path

from bluesky_queueserver_api import BPlan

from bluesky_xsml.catalog.embedded import EmbeddedCatalog
from bluesky_xsml.plots import STRUCTURE_TAGS, load_run_tags
from bluesky_xsml.steering.local_server import LocalQueueServer, QueueServerStartError
from bluesky_xsml.steering.policy import FrameRef, Policy, PolicyEngine, Rule
from bluesky_xsml.steering.queue import QueueSteering

STARTUP = Path(__file__).resolve().parents[1] / "profiles" / "profile_xsml" / "startup"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--points", type=int, default=5)
parser.add_argument("--size", type=int, default=256)
args = parser.parse_args()

# 1. a catalog, and a queue server whose worker runs the profile and writes there
catalog = EmbeddedCatalog()
server = LocalQueueServer(STARTUP, name_prefix="xsml_example",
                          env={"XSML_TILED_URI": catalog.uri, "XSML_SIM_SIZE": str(args.size)})
try:
    try:
        server.start()
    except QueueServerStartError as err:
        sys.exit(str(err))
    api = server.api
    print("RE Manager ready; worker environment from", STARTUP)

    # 2. a coarse line scan through the queue
    api.item_add(BPlan("scan", ["det"], "sample_x", 1.0, 9.6, args.points,
                       md={"purpose": "coarse line"}))
    api.queue_start()
    api.wait_for_idle(timeout=300)
    uid = api.history_get()["items"][-1]["result"]["run_uids"][0]
    # the worker's callback stores the tags, then the stop: wait for the stop
    deadline = time.monotonic() + 120
    while "xsml_frames" not in ((catalog.catalog[uid].metadata.get("stop") or {})
                                if uid in catalog.catalog else {}):
        if time.monotonic() > deadline:
            sys.exit(f"run {uid} was not stored with its tags within 120 s")
        time.sleep(0.5)
    run = catalog.catalog[uid]
    tags = load_run_tags(run)
    xs = tags.positions["sample_x"]
    for x, t in zip(xs, tags.tags, strict=True):
        print(f"  sample_x = {x:5.2f}: {', '.join(t) or '(no tag)'}")

    # 3. the policy decides from the stored tags
    policy = Policy(rules=[Rule(name="boundary", kind="changes", tags=list(STRUCTURE_TAGS),
                                action="refine")])
    engine = PolicyEngine(policy)
    position = dict(zip(tags.seq_nums.tolist(), xs.tolist(), strict=True))

    def finer_scan(decision):
        """Five points between the two frames whose structure differs."""
        seqs = sorted(ref.seq_num for ref in decision.evidence)
        lo, hi = position[seqs[0] - 1 if seqs[0] > 1 else seqs[0]], position[seqs[-1]]
        return BPlan("scan", ["det"], "sample_x", lo, hi, 5, md={"purpose": "refine"})

    # 4. decisions become queue items
    # an unattended demo: act at once (the default waits for a person to approve)
    steering = QueueSteering(api, plans={"refine": finer_scan}, start_queue=True,
                             require_approval=False)
    steering.attach(engine)
    refs = [FrameRef(run_uid=uid, seq_num=int(s), key=k, tags=t)
            for s, k, t in zip(tags.seq_nums, tags.source_key, tags.tags, strict=True)]
    for ref in refs:                    # one frame at a time, as live results would arrive
        decision = engine.update(uid, [ref])
        if decision.action == "refine":
            print(f"decision: {decision.action} ({decision.reason})")
            break
    steering.flush(60)
    time.sleep(1.0)
    api.wait_for_idle(timeout=300)
    for action in steering.actions:
        print(f"queue action: {action.kind} {action.status} {action.detail or ''}")
    history = api.history_get()["items"]
    purposes = [(h["name"], h["kwargs"].get("md", {}).get("purpose")) for h in history]
    print(f"queue history: {purposes}")
    steering.close()
finally:
    server.close()
    catalog.close()
