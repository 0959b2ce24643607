# The base of the xsml beamline profile: the RunEngine and the usual namespace.
#
# Follows the NSLS-II startup pattern. With XSML_USE_NSLSII=1 and the `nslsii`
# package installed, `nslsii.configure_base` does this; otherwise (the default
# here: nslsii pulls in opencv, confluent-kafka, caproto and more) the plain
# equivalent below builds the same objects: RE, bec, sd, bp/bps/bpp, the
# plans star-imported, magics and progress bars in an interactive session.
#
# Works both in IPython (ipython --profile-dir=profiles/profile_xsml) and in a
# queue-server worker (start-re-manager --startup-dir .../startup), where there
# is no IPython shell and nothing must print or plot.

import os
import time as ttime  # noqa: F401  (configure_base star-imports bluesky.simulators, rebinding `time`)

try:
    from bluesky_queueserver import is_re_worker_active
except ImportError:  # the queue server is optional

    def is_re_worker_active():
        return False


def _ipython():
    try:
        return get_ipython()  # noqa: F405 - IPython defines it in the namespace it runs this in
    except NameError:
        return None


_interactive = _ipython() is not None and not is_re_worker_active()

if os.environ.get("XSML_USE_NSLSII") == "1" and _ipython() is not None:
    import nslsii

    nslsii.configure_base(
        _ipython().user_ns, "temp", bec=_interactive, epics_context=False,
        magics=_interactive, mpl=False, pbar=_interactive, configure_logging=False,
        ipython_logging=False, publish_documents_with_kafka=False,
    )
else:
    import bluesky.plan_stubs as bps  # noqa: F401
    import bluesky.plans as bp  # noqa: F401
    import bluesky.preprocessors as bpp  # noqa: F401
    from bluesky import RunEngine, SupplementalData
    from bluesky.plans import *  # noqa: F403
    from bluesky.simulators import *  # noqa: F403  (rebinds `time`; use ttime)

    RE = RunEngine({})
    sd = SupplementalData()
    RE.preprocessors.append(sd)
    if _interactive:
        from bluesky.callbacks.best_effort import BestEffortCallback
        from bluesky.magics import BlueskyMagics
        from bluesky.utils import ProgressBarManager

        bec = BestEffortCallback()
        bec.disable_plots()  # the tagger's pictures are saved with `xsml plot`
        RE.subscribe(bec)
        RE.waiting_hook = ProgressBarManager()
        _ipython().register_magics(BlueskyMagics)

RE.md["beamline_id"] = os.environ.get("XSML_BEAMLINE_ID", "xsml-sim")
