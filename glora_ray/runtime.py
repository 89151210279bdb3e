"""Starting Ray: the one place glora-ray initialises it (pipeline, training and search alike).

``init_ray`` joins the cluster a ``ray job submit`` (or ``RAY_ADDRESS``) names, else starts a
local instance, and exports that instance's address as ``RAY_ADDRESS``; ``child_runtime_env``
hands it to a task's children (Train's controller and its PlacementGroupCleaner, Tune trials),
so they query this instance even while another local Ray runs on the same machine (otherwise:
"Found multiple active Ray instances").  Unless ``verbose``, Ray's internal chatter (worker
output, Train's per-report lines, the token-authentication notice) stays in Ray's log files
(``/tmp/ray/session_latest/logs``); the package's own progress and errors still show.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import urllib.parse
from typing import Any, Callable

from .errors import GLoRARayError, one_line
from .limits import address_space_limit, limit_hint

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0  # to reach a given cluster's address: Ray itself retries for minutes


class RayUnreachableError(GLoRARayError):
    """``RAY_ADDRESS`` names a cluster that does not answer, or Ray cannot start here."""


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse at once an address (``host:port`` or ``ray://host:port``) where nothing answers;
    an address without a port (``auto``) is left to Ray."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number
        host, port = None, None
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise RayUnreachableError(
            f"RAY_ADDRESS={address}: no Ray cluster answers at {host}:{port} ({one_line(err)}, waited at most "
            f"{timeout_s:g} s); start the cluster (ray start --head), give the address it printed, or unset "
            f"RAY_ADDRESS to run on a local Ray") from None

# Ray Train V2 prints a deprecation banner per run unless told otherwise.
_QUIET_ENV = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
# Loggers of Ray internals that print at INFO/WARNING on every run of a healthy pipeline.
_RAY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data")
VERBOSE_ENV = "GLORA_RAY_VERBOSE"  # "1": Ray's own INFO lines too (--verbose)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_ray_logs(verbose: bool) -> None:
    """In this process: Ray's internal loggers at ERROR unless ``verbose``; remembered for later stages."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def init_ray(verbose: bool | None = None) -> None:
    """Join or start Ray once per process; later calls do nothing.

    ``verbose`` None keeps what this process was told before (default: quiet).
    """
    import ray

    if ray.is_initialized():
        return
    verbose = is_verbose() if verbose is None else verbose
    quiet_ray_logs(verbose)
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    level = logging.INFO if verbose else logging.ERROR
    # Workers' output (ours is logged, not printed) reaches this console only when verbose.
    if os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"])
    address = {} if os.environ.get("RAY_ADDRESS") else {"address": "local"}
    try:
        _keeping_sigterm_handler(lambda: ray.init(logging_level=level, log_to_driver=verbose, **address))
    except Exception as err:  # noqa: BLE001 - Ray's own errors; under `ulimit -v` they hide the cause
        if address_space_limit() is None:
            raise
        # Ray's own message first: a large limit set by a scheduler may not be the cause.
        raise RayUnreachableError(f"Ray did not start ({one_line(err)}); perhaps the limit: {limit_hint()}") from err
    # Children of this driver (Train controller, Tune trials) find this instance and no other.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    log.info("Ray %s at %s", ray.__version__, os.environ["RAY_ADDRESS"])


def _keeping_sigterm_handler(start: Callable[[], Any]) -> None:
    """``start()`` (``ray.init``), keeping a SIGTERM handler the caller installed.

    ``ray.init`` replaces the driver's SIGTERM handler with one that calls ``sys.exit(15)``, and
    Ray's core worker adds a crash handler that dumps "SIGTERM received" and aborts (exit 134).
    A caller's own handler (the pipelines' clean stop, docs/method.md §6) is put back afterwards;
    a SIGTERM during ``ray.init`` itself is handed to it.  Without one, Ray's stays.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if not callable(previous):
        start()
        return
    try:
        start()
    except SystemExit as exit_:
        if exit_.code != signal.SIGTERM:
            raise
        signal.signal(signal.SIGTERM, previous)
        previous(signal.SIGTERM, None)  # raises the caller's stop
        raise
    signal.signal(signal.SIGTERM, previous)


def child_runtime_env() -> dict:
    """``runtime_env`` for a task whose children query Ray's State API (Train's controller and its
    PlacementGroupCleaner, Tune): this instance's address, so they never pick among several
    local instances, and this process's verbosity."""
    import ray

    return {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, VERBOSE_ENV: "1" if is_verbose() else "0"}}


def on_this_node() -> Any:
    """A scheduling strategy that keeps a task or actor on this process's Ray node.

    The driver's helpers (each unit's orchestrating task, the progress queue; through the unit
    task, Ray Train's controller, which Ray attaches to the node that calls ``fit``) live and
    die with the driver: a lost worker node (a preempted spot instance) takes only training
    workers and evaluator actors with it, which Ray Train and the pool replace.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
