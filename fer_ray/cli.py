"""What every job script shares: logging, Ray start-up, and one-sentence errors."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from fer_ray import ray_logs
from fer_ray.config import ConfigError, _coerce

log = logging.getLogger("fer_ray")


def setup_logging() -> None:
    # Line by line into a file or a pipe too (`> train.log`, `| tee`, nohup, a batch system):
    # Ray prints the workers' lines (each epoch's) to the driver's stdout without a flush,
    # and a block-buffered stdout held ~40 of them, most of a run, back. (`ray job submit`
    # runs the driver unbuffered.)
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.line_buffering:
        sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    ray_logs.hide_ray_noise()


INTERRUPTED_RESUMES = "interrupted; rerun the same command to resume where possible"


class StoppedLate(KeyboardInterrupt):
    """A stop (Ctrl-C, SIGTERM) that came once the job's output was in place, or part of it:
    its message, not the job's usual interrupted line, says what there is."""


def run_job(job: Callable[[], int | None], interrupted: str | Callable[[], str] = INTERRUPTED_RESUMES) -> int:
    """Run a job; user errors end in one clear sentence and exit status 2, Ctrl-C in the
    line `interrupted` (or the line it returns then: what was saved decides it) and 130
    (SIGTERM once Ray runs: 143); otherwise the status the job returns (0 for None)."""
    def interrupted_line() -> str:
        if not callable(interrupted):
            return interrupted
        try:
            return interrupted()
        except Exception:  # noqa: BLE001 - (a bucket that does not answer): the general line
            return INTERRUPTED_RESUMES

    setup_logging()
    try:
        status = job()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(str(e) if isinstance(e, StoppedLate) else interrupted_line(), file=sys.stderr)
        # (A StoppedLate raised for Ray's SIGTERM exit holds it as its context; Ray Train's
        # Ctrl-C may hold a SystemExit(1).)
        sigterm = isinstance(e.__context__, SystemExit) and is_stop(e.__context__)
        return 128 + signal.SIGTERM if _TERMINATED.is_set() or sigterm else 130
    except SystemExit as e:
        if not is_stop(e):
            raise
        print(interrupted_line(), file=sys.stderr)
        return 128 + signal.SIGTERM
    return status or 0


def is_stop(e: BaseException | None) -> bool:
    """Ctrl-C, or SIGTERM once Ray runs: Ray's SIGTERM handler calls sys.exit(SIGTERM); from
    the start of ray.init, before _note_sigterm notes the signal, only the code tells."""
    return isinstance(e, KeyboardInterrupt) or (
        isinstance(e, SystemExit) and (_TERMINATED.is_set() or e.code == signal.SIGTERM)
    )


_TERMINATED = threading.Event()  # SIGTERM came once Ray ran (Ray's own handler then ends the job)


def _note_sigterm() -> None:
    """Note SIGTERM before Ray's handler (ray.init's: sys.exit) ends the job, which Ray's
    calls may turn into another exception on the way (Ray Train's: KeyboardInterrupt)."""
    ray_handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(ray_handler):
        return

    def noted(signum, frame):
        _TERMINATED.set()
        ray_handler(signum, frame)

    signal.signal(signal.SIGTERM, noted)


def on_cluster() -> bool:
    """Whether this job runs on a cluster it joined (RAY_ADDRESS names one, as `ray job
    submit` sets it, or init_ray joined a `ray start` one) rather than a Ray of its own
    (no RAY_ADDRESS, or RAY_ADDRESS=local)."""
    return os.environ.get("RAY_ADDRESS", "").strip().lower() not in ("", "local")


def _token_auth_as_ray_init_finds_it() -> None:
    """Token auth on where Ray's own `ray.init()` turns it on for the local cluster it finds
    (RAY_AUTH_MODE unset and a token file there, as `ray start --head` makes one whenever a
    token exists): Ray does it only for an address it found itself, and this job joins
    with the address it read from `ray start`'s note, which Ray then refused without the
    token ("rejected this job's authentication token")."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a private API: where it moves, RAY_AUTH_MODE=token still does it
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def init_ray(min_cpus: int = 4, dashboard: bool = False, quiet_workers: bool = False) -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets it) or start one locally.

    A local start gets at least `min_cpus` logical CPUs: a trial, its Train worker and the
    Ray Data tasks feeding it each hold one, and on a 2-core laptop they would otherwise
    wait on each other forever.

    `dashboard=True` (training and sweeps) starts Ray's dashboard, whose State API Ray
    Train's placement-group cleaner asks every second whether the run's controller lives.
    Without it the local Ray still advertises 127.0.0.1:8265 as its API server: when any
    other Ray on the machine serves a dashboard there, that one answers "no such actor"
    and the cleaner removes the placement group under the running workers (seen here: a
    training run lost its worker when a test cluster started beside it). Jobs that only
    run Ray Data (scoring, preparing shards) start without it, which leaves 2 cores ~8%
    more throughput (bench/PERFORMANCE.md); FER_RAY_DASHBOARD=1 turns it on for them too.
    A cluster from `ray start` or cluster.yaml keeps its own dashboard. `quiet_workers`: see
    _ray_init.
    """
    import ray

    if ray.is_initialized():
        return
    address = (os.environ.get("RAY_ADDRESS") or "").strip()  # read as on_cluster reads it
    if address and address.lower() != "local":
        connect_ray(address, quiet_workers=quiet_workers)
        return
    note = None if address else _ray_start_note()  # read once: joined, or warned about
    if note and note[2]:  # the latest `ray start` cluster on this machine, still answering
        running = note[1]
        # As Ray's own `ray.init()` does (which then refuses num_cpus in a traceback).
        # (`ray start --address=HEAD` on a worker node records the head's: "joined" there)
        log.info("Joining the Ray cluster that `ray start` on this machine started or joined, at %s "
                 "(RAY_ADDRESS=local starts a Ray of this job's own instead)", running)
        _token_auth_as_ray_init_finds_it()
        connect_ray(running, where=f"{running!r} (the cluster `ray start` on this machine started or joined)",
                    quiet_workers=quiet_workers)
        os.environ["RAY_ADDRESS"] = running  # a cluster, as for a submitted job (warn_local_paths)
        return
    dashboard = dashboard or _coerce(os.environ.get("FER_RAY_DASHBOARD", "").strip() or "0", bool, "FER_RAY_DASHBOARD")
    num_cpus = max(os.cpu_count() or 1, min_cpus)
    options = {}
    if dashboard:
        # Ray Train's placement-group cleaner (in an actor) finds the dashboard from the
        # machine's Ray processes, and with another local Ray running it died in a 20-line
        # "Found multiple active Ray instances" traceback (its cleanup then undone): it is
        # told this Ray's dashboard, on a port the system gives now (a port given to Ray is
        # not tried again when taken: 8265, found free, was taken by a job starting beside
        # this one, and this one failed after a minute).
        port = _free_port()
        options = {"dashboard_port": port,
                   "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}
    _ray_init(quiet_workers, address="local", num_cpus=num_cpus, include_dashboard=dashboard, **options)
    if not dashboard:
        log.info("Started a local Ray (%d logical CPUs) without the dashboard; "
                 "FER_RAY_DASHBOARD=1 keeps it, or `ray start --head` and submit jobs to it.", num_cpus)


# How long a job waits for the host in RAY_ADDRESS to accept a TCP connection, and then for
# `ray.init` to connect (Ray's own retries on a rejected token take about 20 s).
CONNECT_TIMEOUT_S = 10.0
def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment; a value that is not one is named on stderr
    and the default used (a bad variable made every job, --help too, end in a traceback).
    At most threading.TIMEOUT_MAX (~292 years: a timer past it fails to start)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
        if 0 <= value <= threading.TIMEOUT_MAX:
            return value
    except ValueError:
        pass
    print(f"warning: {name}={text!r} is not a number of seconds; using {default:g}", file=sys.stderr)
    return default


INIT_TIMEOUT_S = env_seconds("FER_RAY_CONNECT_TIMEOUT_S", 45)

_TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and give the cluster's token (`ray get-auth-token` on the head "
    "node) in ~/.ray/auth_token or RAY_AUTH_TOKEN, or submit with `ray job submit` instead"
)


def _ray_start_note() -> tuple[str, str, bool] | None:
    """Ray's note of the latest `ray start` cluster on this machine: (its file, the address
    it names, whether something answers there; Ray leaves the file behind when a head dies),
    or None when there is none."""
    try:
        from ray._private.utils import get_ray_address_file, read_ray_address

        address, path = read_ray_address(), get_ray_address_file(None)
    except Exception:  # noqa: BLE001 (a private helper of Ray's: without it, start a local Ray)
        return None
    host_port = _host_port(address) if address else None
    if host_port is None:
        return None
    return path, address, _answers(host_port, 1.0) is None


def _ray_init(quiet_workers: bool = False, **options: Any) -> None:
    """ray.init, with SIGTERM ending the job as run_job reports it (_quiet_sigterm,
    _note_sigterm); with `quiet_workers`, Ray Data's routine lines are kept off the console
    in the job's workers too (fer_ray.ray_logs). Only training and sweeps ask for it: there
    Ray Data's own actors print lines every epoch, and a local start already gives their
    workers a runtime env (the dashboard's address). A runtime env of a job's own is not given
    to prepare's and scoring's tasks, which may then start in workers Ray has ready."""
    import ray

    if quiet_workers and not _job_runtime_env().get("worker_process_setup_hook"):  # a job's own wins
        # The function itself, pickled by value: a worker needs no importable fer_ray to run it.
        ray.cloudpickle.register_pickle_by_value(ray_logs)
        options["runtime_env"] = {**(options.get("runtime_env") or {}),
                                  "worker_process_setup_hook": ray_logs.hide_ray_noise}
    _quiet_sigterm()
    ray.init(**options)
    _note_sigterm()


def _job_runtime_env() -> dict[str, Any]:
    """The runtime env a job was submitted with (`ray job submit --runtime-env-json`), which
    ray.init merges with its own: giving a field twice fails."""
    import json

    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def _quiet_sigterm() -> None:
    """SIGTERM (a batch system's or `ray job stop`'s stop) ended the job in exit status 134
    and a C++ stack dump from the failure-signal handler Ray installs in the driver: without
    it, Ray's own SIGTERM handler ends the job through run_job (its interrupted line, exit
    status 143). The job's Ray workers keep theirs; faulthandler prints the driver's Python
    stack on a crash instead."""
    import faulthandler

    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        if not faulthandler.is_enabled():
            faulthandler.enable()
    except (RuntimeError, ValueError, OSError):  # a stderr without a file descriptor
        pass


def _free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing uses now, as the system hands them out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host_port: tuple[str, int], timeout: float) -> OSError | None:
    """None when something accepts a TCP connection at `host_port`, else the error."""
    try:
        socket.create_connection(host_port, timeout=timeout).close()
    except OSError as e:
        return e
    return None


def connect_ray(address: str, where: str | None = None, quiet_workers: bool = False) -> None:
    """`ray.init(address)` that fails in one sentence instead of retrying for minutes.

    Against a closed port `ray.init` keeps retrying the GCS for well over two minutes, so
    the host is probed first; against a port that accepts but never answers it waits
    forever, so a watchdog ends the process after INIT_TIMEOUT_S (env
    FER_RAY_CONNECT_TIMEOUT_S); a token the cluster rejects surfaces from Ray as a generic
    ConnectionError, so the cause is looked up and named.
    """
    from ray.exceptions import AuthenticationError

    where = where or f"RAY_ADDRESS={address!r}"

    if address.lower().startswith(("http://", "https://")):
        # Ray's docs export the dashboard's URL as RAY_ADDRESS for `ray job submit`; ray.init
        # ends in a traceback on it.
        raise ConfigError(
            f"{where} is a web address (a dashboard's, as `ray job submit --address` takes); a "
            "job joins a cluster at its GCS address, host:port (6379 by default), e.g. "
            "RAY_ADDRESS=127.0.0.1:6379, or unset RAY_ADDRESS to run on this machine."
        )
    host_port = _host_port(address)
    refused = _answers(host_port, CONNECT_TIMEOUT_S) if host_port is not None else None
    if refused is not None:
        raise ConfigError(
            f"Nothing answers at {where} ({refused.strerror or refused}); start the "
            "cluster (`ray start --head` or `ray up cluster.yaml`) or unset RAY_ADDRESS to "
            "run on a Ray instance of this machine."
        )
    watchdog = threading.Timer(INIT_TIMEOUT_S, _give_up, args=(where,))
    watchdog.daemon = True
    if INIT_TIMEOUT_S > 0:  # 0: no limit (as long as ray.init takes); it failed every connection
        watchdog.start()
    try:
        _ray_init(quiet_workers, address=address, log_to_driver=True)  # (`ray job stop` sends SIGTERM)
    except ValueError as e:  # an address ray.init cannot parse
        raise ConfigError(f"Ray cannot use {where}: {e}") from None
    except AuthenticationError:
        raise ConfigError(
            f"Token authentication is on (RAY_AUTH_MODE=token) but no token was found for "
            f"{where}; {_TOKEN_HELP}."
        ) from None
    except ConnectionError as e:
        if _auth_rejected(e):
            raise ConfigError(
                f"The Ray cluster at {where} rejected this job's authentication "
                f"token; {_TOKEN_HELP}."
            ) from None
        raise ConfigError(
            f"Could not connect to a Ray cluster at {where}; give the head "
            "node's GCS address (host:port, 6379 by default) of a running cluster."
        ) from None
    finally:
        watchdog.cancel()


def _give_up(where: str) -> None:
    # ray.init cannot be interrupted from here; end the process as run_job would.
    print(
        f"error: No Ray cluster answered at {where} within "
        f"{INIT_TIMEOUT_S:.0f} s; give the head node's GCS address (host:port, 6379 by "
        "default), not the dashboard's.",
        file=sys.stderr, flush=True,
    )
    os._exit(2)


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` or `ray://host:port` address, None for anything else."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or "/" in rest or not port.isdigit():
        return None  # "auto", "local", an http:// URL: ray.init explains those itself
    return host.strip("[]"), int(port)


def _auth_rejected(error: BaseException) -> bool:
    """Whether a failed connection was the GCS refusing a missing or wrong token."""
    seen: BaseException | None = error
    while seen is not None:
        text = f"{type(seen).__name__}: {seen}"
        if "AuthenticationError" in text or "InvalidAuthToken" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# How long a job on a cluster waits for the autoscaler to bring up GPU nodes.
GPU_WAIT_S = env_seconds("FER_RAY_GPU_WAIT_S", 900)
GPU_POLL_S = 5.0  # how often the wait looks at the cluster's GPUs


# Where `ray up` leaves the cluster's config on the head node, for its autoscaler (the
# head_start_ray_commands in cluster.yaml); `ray job submit` runs job drivers there.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource (CPU, GPU...) the cluster's autoscaler may grow to, from
    the node types' max_workers (what Ray Train and Ray Data check their requests against),
    or None where no such limit is known (a local instance, a fixed cluster).

    Ray publishes the config only where the autoscaler reports it to the GCS (not `ray up`'s
    autoscaler in Ray 2.60); on a cluster, a job on the head node then reads the same from
    the config file `ray up` put there (`bootstrap_limits`)."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: when it moves, behave as if Ray knew no limit
        limits = None
    if not limits and on_cluster():
        limits = bootstrap_limits(os.path.expanduser(BOOTSTRAP_CONFIG))
    return limits or None


def cluster_cpus() -> tuple[float, float] | None:
    """On a cluster this job joined: (its CPUs now, the most its autoscaler may grow it to,
    at least those it has). None for a Ray of the job's own, sized for the job (init_ray's
    min_cpus)."""
    import ray

    if not on_cluster():
        return None
    have = float(ray.cluster_resources().get("CPU", 0))
    return have, max(have, float((autoscaler_limits() or {}).get("CPU", 0)))


def require_cpus(need: float, needs: str) -> None:
    """On a cluster this job joined: ConfigError unless the cluster, or what its autoscaler
    may grow it to, holds `need` CPUs (what would otherwise wait forever for a CPU: Ray Data's
    tasks beside Train workers that took them all hung on a 2-CPU `ray start` head). `needs`:
    the rest of the sentence, what needs them and how to ask for fewer."""
    cpus = cluster_cpus()
    if cpus is None or cpus[1] >= need:
        return
    have, most = cpus
    grows = f" (its autoscaler up to {most:g})" if most > have else ""
    raise ConfigError(f"The Ray cluster has {have:g} CPU(s){grows}; {needs}")


def _node_types(path: str) -> tuple[dict[str, float] | None, list[tuple[int, dict[str, float]]], int | None] | None:
    """From an autoscaler config file: the head node type's `resources` (None when no type
    is the head), each worker type's max_workers and `resources`, and the cluster's
    max_workers (None when not given). None when the file is missing or unreadable."""
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        head, workers = None, []
        for name, node_type in (config.get("available_node_types") or {}).items():
            resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
            if name == config.get("head_node_type"):
                head = resources
            else:
                workers.append((int(node_type.get("max_workers", 0)), resources))
        cap = config.get("max_workers")
        return head, workers, None if cap is None else int(cap)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def bootstrap_limits(path: str) -> dict[str, float] | None:
    """The most of each resource an autoscaler config file allows: the head node's, plus
    the worker nodes richest in it, each type up to its max_workers and all of them together
    up to the cluster's max_workers (when given), from the `resources` each type names (a
    type whose resources are left to detection counts nothing; cluster.yaml names them).
    None when the file is missing or unreadable."""
    read = _node_types(path)
    if read is None:
        return None
    head, workers, cap = read
    total = dict(head or {})
    for key in {k for _, r in workers for k in r} | set(total):
        left = cap
        for most, resources in sorted(workers, key=lambda w: -w[1].get(key, 0.0)):
            n = most if left is None else min(most, left)
            total[key] = total.get(key, 0.0) + n * resources.get(key, 0.0)
            if left is not None:
                left -= n
    return total or None


def bootstrap_node_types(path: str) -> list[dict[str, float]] | None:
    """The `resources` of each node type an autoscaler config file lets the cluster have (the
    head's, and each worker type's with max_workers above 0); None when the file is missing
    or unreadable."""
    read = _node_types(path)
    if read is None:
        return None
    head, workers, _ = read
    return ([head] if head is not None else []) + [resources for most, resources in workers if most > 0]


def gcs_node_types() -> list[dict[str, float]] | None:
    """The `resources` of each node group the autoscaler reports to the GCS (where it does:
    not `ray up`'s in Ray 2.60); None where it reports none."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        groups = list(config.node_group_configs) if config is not None else []
        return [{k: float(v) for k, v in g.resources.items()} for g in groups if g.max_count != 0] or None
    except Exception:  # a private API: when it moves, as if none were reported
        return None


def require_node_fits(bundle: dict[str, float], what: str, fewer: str, gpus_up: bool = False) -> None:
    """On a cluster this job joined: ConfigError unless one node holds `bundle` (one Train
    worker's CPUs, and its GPU): a node up now, or a node type its autoscaler may bring up
    (`ray up`'s config on the head, or the node groups reported to the GCS). The cluster-wide
    totals that require_cpus checks can hold a worker that no node holds, and Ray then waits
    for ever. Where no node types are known, the nodes up are all there is; their GPUs are
    counted once require_gpus has waited for them (`gpus_up`), the CPUs at once. A node type
    whose resources are left to detection (none named) may hold anything: not refused."""
    import ray

    if not on_cluster():
        return
    fits = lambda res: all(res.get(k, 0) >= v for k, v in bundle.items())  # noqa: E731
    up = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(fits(r) for r in up):
        return
    types = bootstrap_node_types(os.path.expanduser(BOOTSTRAP_CONFIG))
    types = types if types is not None else gcs_node_types()
    if types is not None:
        if any(fits(r) or not r for r in types):
            return
        nodes, where = up + types, "up or among the autoscaler's node types"
    else:
        if autoscaler_limits():  # (an autoscaler whose node types this job cannot read)
            return
        if not gpus_up and any(r.get("CPU", 0) >= bundle.get("CPU", 0) for r in up):
            return  # (the GPUs: once require_gpus has waited for them)
        nodes, where = up, "up"
    need = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    if bundle.get("GPU"):
        with_gpu = [n.get("CPU", 0) for n in nodes if n.get("GPU", 0) >= bundle["GPU"]]
        most = f"the nodes with a GPU hold at most {max(with_gpu):g} CPU" if with_gpu else "no node holds a GPU"
    else:
        most = f"the most any holds: {max((n.get('CPU', 0) for n in nodes), default=0):g} CPU"
    raise ConfigError(f"{what} needs {need} on one node, and no node {where} holds that ({most}); {fewer}")


def warn_output_in_job_package(output: str | None) -> None:
    """A Ray job submitted with --working-dir runs in Ray's unpacked copy of it, a folder of
    the session named by the package's hash: an output there (a relative --output, say)
    goes with that copy, and the same job submitted again after any edit (another hash)
    does not find it to resume. One warning naming the folder."""
    import json

    from fer_ray import storage

    try:
        env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return
    if not output or not env.get("working_dir"):
        return
    local = storage.local_here(output)
    if local and storage.inside(local, os.getcwd()):
        log.warning("--output %s lies in Ray's copy of this job's --working-dir (%s), which goes with the job's "
                    "package: the same job submitted again after an edit would not find it; give an absolute "
                    "path outside it, or a URI.", output, os.getcwd())


def warn_local_paths(**paths: str | None) -> None:
    """On a cluster whose work runs on other nodes than this driver's (several nodes up, a
    head that holds no CPUs, or an autoscaler that adds nodes), a local path is right only on
    a filesystem every node mounts at the same place: one warning names the flags that give
    one. (Ray Train finds out only at the first checkpoint, after an epoch's work; Ray Data's
    writes would land on the workers' own disks.) Flags are given as keyword names."""
    import ray

    from fer_ray import storage

    if not on_cluster():
        return
    local = [f"--{flag.replace('_', '-')} {path}" for flag, path in paths.items()
             if path and (not storage.is_uri(path) or path.startswith("file://"))]
    if not local:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    head_cpus = next((n.get("Resources", {}).get("CPU", 0) for n in nodes if n.get("NodeID") == here), None)
    if len(nodes) > 1 or head_cpus == 0 or autoscaler_limits():
        log.warning(
            "%s: local path%s on a cluster whose work runs on other nodes (%d up now): unless "
            "%s on a filesystem every node mounts at the same place, the workers cannot read or "
            "write %s; use s3://, gs:// or such a shared mount.",
            ", ".join(local), "s" if len(local) > 1 else "", len(nodes),
            "they are" if len(local) > 1 else "it is", "them" if len(local) > 1 else "it",
        )


def require_gpus(need: int, wait_s: float | None = None) -> None:
    """Raise ConfigError unless the Ray cluster has `need` GPUs.

    A Ray instance this job started itself fails at once. On a cluster (RAY_ADDRESS set to
    one, as under `ray job submit`) the autoscaler is asked for the GPUs and given `wait_s`
    seconds (FER_RAY_GPU_WAIT_S, 900) to add GPU nodes: cluster.yaml starts none.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    if wait_s is None:
        wait_s = GPU_WAIT_S if on_cluster() else 0.0
    deadline = time.monotonic() + wait_s
    have = ray.cluster_resources().get("GPU", 0)
    limits = autoscaler_limits() if have < need else {}
    most = (limits or {}).get("GPU")
    if most is not None and most < need:
        raise ConfigError(
            f"--use-gpu needs {need} GPU(s) but this cluster's autoscaler can bring up at most "
            f"{most:g}; lower --num-workers/--num-actors, or raise the GPU node type's "
            "max_workers in cluster.yaml (and the cluster's max_workers with it)."
        )
    requested = have < need and wait_s > 0
    if requested:
        request_resources(bundles=[{"GPU": 1}] * need)
        if limits is None:  # (a cluster started by hand may have no autoscaler at all)
            log.warning(
                "Waiting up to %.0f s for %d GPU(s) (the cluster has %g now). No autoscaler "
                "configuration is visible from here: a cluster started by hand with `ray start` "
                "gains no nodes, and there the wait cannot end well; Ctrl-C stops it, and "
                "FER_RAY_GPU_WAIT_S=0 fails at once.", wait_s, need, have,
            )
        else:
            log.info("Waiting up to %.0f s for %d GPU(s) (the cluster has %g now)", wait_s, need, have)
    try:
        while have < need and time.monotonic() < deadline:
            time.sleep(GPU_POLL_S)
            have = ray.cluster_resources().get("GPU", 0)
            if have < need:
                # Asked again at every look: a request replaces the one before it, and Ray
                # Data's autoscaling coordinator (a detached actor that outlives the jobs that
                # used Ray Data) sends its own, empty when idle, every 20 s.
                request_resources(bundles=[{"GPU": 1}] * need)
    finally:
        if requested:
            # A request stands until the next one replaces it, and the autoscaler keeps
            # the nodes it needs past their idle timeout: withdrawn once the GPUs are there
            # (the job's workers then hold them) or the wait is over.
            request_resources()
    if have < need:
        waited = f" after waiting {wait_s:.0f} s" if wait_s > 0 else ""
        raise ConfigError(
            f"--use-gpu needs {need} GPU(s) but the Ray cluster has {have:g}{waited}; drop "
            "--use-gpu, lower --num-workers/--num-actors, or use a cluster with GPU nodes."
        )
