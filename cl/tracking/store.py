"""The tracking store: where MLflow keeps runs, how it is opened, checked and linked to.

Nothing here imports MLflow at module level: `cl run` checks a store's URI before it
imports anything heavy, and opens it on a thread (`StoreWarmup`) or in the delivery
child (`cl.tracking.delivery`) while the data loads.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from cl.config.names import file_name

# How long a store may fail before the user is told what waits, and how long a run's end
# waits for it: `--tracking-timeout`, or CL_TRACKING_TIMEOUT.
DEFAULT_TIMEOUT_S = float(os.environ.get("CL_TRACKING_TIMEOUT") or 5.0)


class TrackingError(RuntimeError):
    """The tracking store could not be written; the message names the store and the cause."""



def artifacts_beside(uri: str | None, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlruns/<experiment>/` beside
    the database, so a store and its plots stay together wherever `cl run` was started (MLflow's
    default is ./mlruns of the working directory). Other stores choose for themselves (None)."""
    if not uri or not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    # A name is data: its folder is a safe, distinct file name (`..` or `a/b` never reach past mlruns/).
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / file_name(experiment)).as_uri()


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a local SQLite store URI (`sqlite:///path`), or None (another store,
    an in-memory one)."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextmanager
def sqlite_store_lock(uri: str | None):
    """Hold an exclusive lock on `<store>.lock` beside a local SQLite store while opening it,
    and create the store first if it does not exist yet (`create_sqlite_store`).

    Processes started together on one fresh store (a seed sweep) would otherwise race to
    create and migrate its schema, and all but one fail ("table ... already exists", "online
    migration expected to match one row"). Other stores are left as MLflow opens them: a
    tracking server creates its own store; a database server's (PostgreSQL, MySQL) MLflow
    migrates in place, as ever (on PostgreSQL each migration is a transaction, whole or not at
    all); a folder store (`file:`) has no schema. Systems without `fcntl` get no lock, but
    still an atomic creation."""
    if uri is None:  # MLflow's own default, ./mlflow.db unless configured otherwise
        import mlflow

        uri = mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # a store in a folder yet to be made
    if fcntl is None:
        create_sqlite_store(path, locked=False)
        yield
        return
    with open(str(path) + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            create_sqlite_store(path, locked=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CREATING = ".creating-"  # `.<store>.creating-<pid>-<random>`: a store being built, hidden beside it
_swept: set[Path] = set()  # stores whose folder this process has cleared of dead creators' leftovers


def create_sqlite_store(path: Path, locked: bool) -> None:
    """Make the SQLite store `path` complete, or leave it absent: never half-migrated.

    MLflow creates a fresh store in place, in some 70 migrations, each committed on its own; a
    process killed among them (a run SIGKILLed in its first seconds, the delivery child ending
    with it) leaves a store every later open refuses ("out-of-date database schema", "table
    _alembic_tmp_experiments already exists"). So the schema is built in a hidden file beside
    the store and linked into place in one step: a kill at any moment leaves either no store or
    a complete one, plus at most a leftover that the next opener removes. `os.link` never
    replaces a store; a creator that loses a race (no lock: another host, no `fcntl`) uses the
    winner's, equally fresh. An existing non-empty file is never touched (an older MLflow's
    store is MLflow's to refuse, with its own advice); an empty one (`touch`) is replaced,
    under the lock only. `locked`: this process holds the store's lock, so every leftover
    is a dead creator's."""
    path = Path(path)
    try:
        size: int | None = path.stat().st_size
    except FileNotFoundError:
        size = None
    if size or (size == 0 and not locked):  # a store already: the common case, one stat
        if path not in _swept:
            _sweep(path, locked)
        return
    _sweep(path, locked)
    tmp = path.with_name(f".{path.name}{_CREATING}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        _build_schema(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:  # another creator won (its store is as fresh), or an empty file
            if locked and path.stat().st_size == 0:
                os.replace(tmp, path)
        except OSError:  # a file system without hard links: a rename, checked first (under the lock, safe)
            if not path.exists() or (locked and path.stat().st_size == 0):
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass


def _build_schema(tmp: Path) -> None:
    """MLflow's schema, every migration, in the new file `tmp`. A file thrown away if anything
    fails needs no journal on disk and no sync per migration (SQLite's defaults make this take
    5 s, not 1): one fsync at the end, before it is linked into place, does for all."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables, _verify_schema

    quiet_mlflow()
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}", poolclass=sqlalchemy.pool.NullPool)

    @sqlalchemy.event.listens_for(engine, "connect")
    def _fast(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA journal_mode=MEMORY")  # not kept in the file: the store opens as MLflow's does
        cursor.close()

    try:
        _initialize_tables(engine)
        _verify_schema(engine)  # complete, or nothing is linked
    finally:
        engine.dispose()  # no connection left on the file that becomes the store
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(path: Path, locked: bool) -> None:
    """Remove what creators of `path` killed mid-way left beside it: every leftover while this
    process holds the store's lock (a creator holds it throughout), else only old ones."""
    prefix = f".{path.name}{_CREATING}"
    folder = path.parent if str(path.parent) else Path(".")
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        try:
            if locked or time.time() - entry.stat().st_mtime > 600:
                os.unlink(entry.path)
        except OSError:  # gone already, or not ours to remove: ignored, never opened
            pass
    _swept.add(path)


class StoreWarmup:
    """Imports MLflow and opens (creating if needed) the tracking store on a thread,
    so the seconds this takes the first time overlap with loading the data."""

    def __init__(self, tracking_uri: str | None, timeout: float = DEFAULT_TIMEOUT_S):
        self.tracking_uri = tracking_uri
        self.unreachable: BaseException | None = None  # a server that does not answer (yet)
        self._error: BaseException | None = None
        if is_server(tracking_uri):
            bound_http_requests(timeout)
        self._thread = threading.Thread(target=self._work, name="mlflow-warmup", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            quiet_mlflow()
            with sqlite_store_lock(self.tracking_uri):
                MlflowClient(self.tracking_uri).search_experiments(max_results=1)
        except BaseException as err:
            self._error = err

    def settle(self, timeout: float = 60.0) -> None:
        """Let an open in progress end, without raising: a run that fails before it waited for
        the store returns only once nothing of it still writes there (a caller of `cl.api.run`
        opening the same store next would otherwise migrate it beside this thread)."""
        self._thread.join(timeout)

    def wait(self) -> float:
        """Block until the store is ready; return the seconds spent waiting. A store that can
        never work (a malformed URI, a path that cannot be written) raises `TrackingError`
        naming it; a tracking server that does not answer is noted in `unreachable`, and the
        runs go on, their records waiting in their journals."""
        t = time.perf_counter()
        self._thread.join()
        if self._error is not None:
            if is_server(self.tracking_uri) and unanswered(self._error):
                self.unreachable = self._error
            else:
                problem = storage_problem(self._error)
                raise TrackingError(f"MLflow store {self.tracking_uri or '(default)'} could not be opened"
                                    f"{': ' + problem if problem else ''} ({one_line(self._error)})")
        return time.perf_counter() - t


# The schemes of the stores MLflow itself opens; plugins add theirs as `mlflow.tracking_store` entry points.
MLFLOW_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                  "databricks-uc", "uc"}


def check_store_location(uri: str | None) -> None:
    """Refuse, without importing MLflow, a store URI no MLflow store has the scheme of, and a
    local SQLite store whose folder cannot be made or is not one: what would otherwise be found
    only once MLflow is imported in the delivery process, after training started."""
    if not uri:
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in MLFLOW_SCHEMES:
        from importlib.metadata import entry_points

        plugins = {e.name for e in entry_points(group="mlflow.tracking_store")}
        if scheme not in plugins:
            raise TrackingError(f"MLflow store {uri} could not be opened: no MLflow store has the scheme "
                                f"'{scheme}' (known: {', '.join(sorted(MLFLOW_SCHEMES - {''} | plugins))})")
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return
    path = Path(uri[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder")
    except OSError as err:
        raise TrackingError(f"MLflow store {uri} could not be opened: {type(err).__name__}: {err}") from None


def one_line(err: BaseException) -> str:
    """An error on one line: SQLAlchemy's messages go on with the SQL and its parameters."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def storage_problem(err: BaseException | None) -> str | None:
    """What keeps a store from taking records for as long as nobody acts, if that is what `err`
    says: its disk is full, or it is read-only. Else None (a lock, a server down: they pass)."""
    import errno

    seen = set()
    while err is not None and id(err) not in seen:  # MLflow wraps SQLAlchemy's, which wraps sqlite3's
        seen.add(id(err))
        text = str(err).lower()
        code = getattr(err, "errno", None)
        if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or "no space left" in text:
            return "its disk is full"
        if code == errno.EROFS or "readonly database" in text or "read-only file system" in text:
            return "it is read-only"
        err = err.__cause__ or err.__context__
    return None


def storage_notice(uri: str | None, err: BaseException | None, pending: int, folder) -> str | None:
    """One line for a store that cannot take records (`storage_problem`): the store, the problem,
    what waits where, and the command that delivers it once the store is fixed. Else None."""
    problem = storage_problem(err)
    if problem is None:
        return None
    until = "it has room" if "full" in problem else "it can be written"
    target = f" --tracking-uri {uri}" if uri else ""
    return (f"MLflow store {uri or '(default)'} cannot take records: {problem} ({one_line(err)}); "
            f"{pending} record(s) wait in {folder}, delivered by `cl sync {folder}{target}` once {until}")


def is_server(tracking_uri: str | None) -> bool:
    return bool(tracking_uri) and tracking_uri.startswith(("http://", "https://"))


def unanswered(err: BaseException) -> bool:
    """A server that is down or overloaded, not one that refuses: worth waiting for."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out", "503", "502"))


def bound_http_requests(timeout: float) -> None:
    """MLflow's REST client retries a dead server for minutes (7 retries with backoff) before
    it says anything; the sink retries on its own, so each request gets one try of at most
    `timeout` seconds. A user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))


UI_PORT = 5000  # where `cl ui` serves a local store


def run_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI's page of a run, opened on its training view (`workflowType=machine_learning`:
    MLflow 3 otherwise opens an experiment on an empty GenAI overview). A local store is shown by
    `cl ui`, on its default address."""
    base = tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith(("http://", "https://")) \
        else f"http://127.0.0.1:{UI_PORT}"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


def view_link(tracking_uri: str | None, experiment_id: str | None, key: str) -> str:
    """The MLflow UI's runs list of an experiment opened on its saved view `key`
    (`cl.tracking.views`), on the address `run_link` uses."""
    from cl.tracking.views import link

    return link(run_link(tracking_uri, None, None).split("/#/", 1)[0], experiment_id, key)


def quiet_mlflow() -> None:
    """MLflow logs at INFO on import ("Creating initial MLflow database tables..."); a run's
    output is the lab's own lines and the result. Its warnings and errors still show."""
    import logging

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs every database error with its traceback before raising it; the lab catches it,
    # retries, and says once what is wrong (a full disk made 748 tracebacks in one run).
    db_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _RaisedAnyway) for f in db_log.filters):
        db_log.addFilter(_RaisedAnyway())


class _RaisedAnyway:
    """Drops MLflow's log of a database error it raises anyway (`quiet_mlflow`)."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


def default_tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` if set, else None: MLflow's own default (./mlflow.db)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None
